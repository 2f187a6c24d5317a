"""The command protocol: limits, the error type, canonical bytes, schema checks, parsing, replay store.

The wire contract is docs/MQTT.md#commands; :mod:`iaflash.agent.commands.handlers` runs the commands.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from iaflash.agent.errors import CommandError
from iaflash.agent.schemas.loader import validator
from iaflash.agent.sqlite import sqlite_errors
from iaflash.agent.strictjson import loads_strict
from iaflash.engines.sigdoc import canonical_bytes as _canonical

SCHEMA_ID = "iaflash.command/1"
RESPONSE_SCHEMA_ID = "iaflash.response/1"
MAX_FILE_BYTES = 64 * 1024 * 1024  # registry_sync: the decoded subset file
MAX_PAYLOAD_BYTES = MAX_FILE_BYTES * 4 // 3 + 1024 * 1024  # base64 of that, plus the JSON around it
MAX_VALIDITY_S = 24 * 3600  # expires_at - issued_at; also how long an id is kept for replay checks
CLOCK_SKEW_S = 300  # tolerated lead of central's clock over the box's
SLOW = frozenset({"send_evidence", "registry_sync"})
FIX_SIGN = "send it with `iaflash-central cmd ... --key COMMANDS.key` (a key of role commands)"
COMMAND_ROLE = "commands"  # the trust store folder whose keys may sign commands (docs/SIGNING.md#roles)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def canonical_bytes(body: dict[str, Any]) -> bytes:
    """What a command's signature covers: sorted keys, no spaces, UTF-8, without ``signature``.

    The same form as a revocation list's (:func:`iaflash.engines.sigdoc.canonical_bytes`).
    """
    return _canonical(body)


def _validator(name: str) -> Draft202012Validator:
    return validator(name)


def _validate(doc: Any, name: str, what: str) -> None:
    errors = sorted(_validator(name).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "; ".join(f"{e.json_path}: {e.message[:200]}" for e in errors[:5])
        raise CommandError("invalid", f"{what} does not match {name} ({len(errors)} problem(s)): {lines}")


def validate_command(doc: Any) -> None:
    """Check a request against ``command.v1.json``; CommandError("invalid") lists the problems."""
    _validate(doc, "command.v1.json", "command")


def validate_response(doc: Any) -> None:
    """Check a response against ``response.v1.json``; CommandError("invalid") lists the problems."""
    _validate(doc, "response.v1.json", "response")


def parse_command(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise CommandError(
            "invalid",
            f"command is {len(payload)} bytes, the limit is {MAX_PAYLOAD_BYTES}; "
            f"fix: registry files over {MAX_FILE_BYTES} bytes must be copied on site",
        )
    try:
        doc = loads_strict(payload)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CommandError("invalid", f"command is not UTF-8 JSON: {str(exc)[:200]}; fix: {FIX_SIGN}") from exc
    if not isinstance(doc, dict):
        raise CommandError("invalid", f"command is not a JSON object; fix: {FIX_SIGN}")
    return doc


class ReplayStore:
    """Command ids already accepted, in a small SQLite file, kept until their expiry has passed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        with self._errors("open"):
            self._conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS seen_commands (command_id TEXT PRIMARY KEY, "
                "expires_at REAL NOT NULL, received_at REAL NOT NULL) WITHOUT ROWID"
            )

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """This store's sqlite3 errors become CommandError("failed") (the map is iaflash.agent.sqlite)."""
        with sqlite_errors(f"replay store: {action}", self.path, lambda message: CommandError("failed", message)):
            yield

    def first_time(self, command_id: str, expires_at: float) -> bool:
        """Record ``command_id``; False when it was already recorded (a replay)."""
        now = time.time()
        with self._lock, self._errors("record a command id"):
            self._conn.execute("DELETE FROM seen_commands WHERE expires_at < ?", (now - CLOCK_SKEW_S,))
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO seen_commands VALUES (?, ?, ?)", (command_id, expires_at, now)
            )
            return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._conn.close()
