"""A private PostgreSQL server for central's tests: initdb in a temp dir, a free port, 127.0.0.1 only.

Skips cleanly when Debian's postgresql binaries are absent (``./run test`` installs them).
As root, initdb refuses to run: the data directory is owned by ``postgres`` and the server runs as
that user through ``runuser``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iaflash.agent.demo.broker import free_port


def pg_bindir() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


class PgServer:
    def __init__(self, root: Path, fsync: bool = False) -> None:
        bindir = pg_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql, or ./run test)")
        self.bindir, self.root, self.port = bindir, root, free_port()
        self.data = root / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(root / "pg.log"),
            "-w",
            "start",
            "-o",
            f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync={'on' if fsync else 'off'}",
        )

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args], check=False, capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            log = (self.root / "pg.log").read_text() if (self.root / "pg.log").exists() else ""
            raise RuntimeError(f"{tool} failed: {proc.stderr[-800:]} {log[-800:]}")

    def new_database(self) -> str:
        """A fresh empty database; its postgresql:// URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    # Not under pytest's tmp dir: its parents are 0700 root, which user postgres cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="iaflash-pg-"))
    try:
        server = PgServer(root)
        yield server
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true (the suite's wait helper, as in test_e2e)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
