"""Central in-process for the demo: an SQLite store fed by the shared-subscription ingester.

The demo (``agent/demo/runner.py``) plays central with this one module: it stores the demo's
flags, fetches each flag's evidence image from the demo box with the signed ``send_evidence``
command, and leaves a store and a reviewers file that ``iaflash-central review`` serves.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from iaflash.central.connection import BrokerOptions
from iaflash.central.serve.command import evidence_fetcher
from iaflash.central.serve.ingest import Ingester
from iaflash.central.serve.store import Store

__all__ = ["EmbeddedCentral"]

REVIEWER = "demo"


class EmbeddedCentral:
    """``start()`` subscribes; ``wait_stored(n)``; ``fetch_evidence()``; ``stop()``; ``review_hint()``."""

    def __init__(self, workdir: Path, port: int, command_key: Path) -> None:
        self.workdir, self.command_key = workdir, command_key
        self.db = workdir / "central.db"
        self.broker = BrokerOptions(port=port)
        self.store = Store(str(self.db))
        self.store.migrate()
        self.ingester = Ingester(self.store, self.broker, client_id="iaflash-central-demo-1")
        self.evidence_fetched = 0
        self.evidence_failed: list[str] = []

    def start(self) -> EmbeddedCentral:
        self.ingester.start()
        return self

    def wait_stored(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ingester.counters()["stored"] >= n:
                return True
            time.sleep(0.05)
        return False

    def fetch_evidence(self, timeout: float = 15.0) -> int:
        """Fetch and store every stored flag's evidence image from its box; the number fetched."""
        fetch = evidence_fetcher(self.broker, self.command_key, timeout=timeout)
        for flag in self.store.flags(status=None):
            try:
                sidecar, jpeg = fetch(flag["site_id"], flag["device_id"], flag["capture_id"])
            except (RuntimeError, TimeoutError) as exc:
                self.evidence_failed.append(f"{flag['capture_id']}: {exc}")
                continue
            self.store.put_evidence(flag["event_id"], sidecar, jpeg)
            self.store.audit(reviewer="demo-central", event_id=flag["event_id"], action="evidence_fetched")
            self.evidence_fetched += 1
        return self.evidence_fetched

    def stop(self) -> None:
        self.ingester.stop()
        self.store.close()

    def write_reviewer(self) -> tuple[Path, Path]:
        """A reviewers file with the demo reviewer; (users file, password file), both 0600."""
        from werkzeug.security import generate_password_hash  # noqa: PLC0415  # the [central] extra

        password = secrets.token_urlsafe(9)
        users, secret = self.workdir / "reviewers", self.workdir / "secrets" / "reviewer-password"
        for path, text in ((users, f"{REVIEWER}:{generate_password_hash(password)}\n"), (secret, password + "\n")):
            path.write_text(text)
            os.chmod(path, 0o600)
        return users, secret

    def review_hint(self, port: int = 8080) -> list[str]:
        users, secret = self.write_reviewer()
        return [
            f"iaflash-central review --db {self.db} --users {users} --web-port {port}",
            f"then open http://127.0.0.1:{port}/ and log in as '{REVIEWER}' (password in {secret})",
        ]
