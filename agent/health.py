"""Supervision and observability: sd_notify, watchdog, JSON logging for journald.

``sd_notify`` writes one datagram to ``$NOTIFY_SOCKET`` (no third-party package:
the protocol is a single sendto). Outside systemd it does nothing.

:class:`InstanceLock` is the single-instance lock of a state directory: two agents on one config
would share the spool, the outbox and the MQTT client id (the broker then disconnects each in
turn, every few seconds); the second one stops at start with a message naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from iaflash.agent.errors import InstanceLocked

log = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1", "WATCHDOG=1") to systemd. False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify(%s) failed on %s: %s", state.split("=", maxsplit=1)[0], addr, exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Liveness:
    """Tracks the inference loop: busy since when, last progress. Stuck work stops watchdog pings."""

    def __init__(self, stuck_after_s: float) -> None:
        self.stuck_after_s = stuck_after_s
        self.busy_since: float | None = None
        self.last_progress = time.monotonic()

    def begin(self) -> None:
        self.busy_since = time.monotonic()

    def end(self) -> None:
        self.busy_since = None
        self.last_progress = time.monotonic()

    def healthy(self) -> bool:
        busy = self.busy_since
        return busy is None or time.monotonic() - busy < self.stuck_after_s


class InstanceLock:
    """An exclusive ``flock`` on ``<dir>/agent.lock`` holding the owner's pid; released when the process ends.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale file never
    blocks a restart.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "agent.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise InstanceLocked naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise InstanceLocked(
                f"{self.path}: another agent (pid {holder}) already runs on this state directory; two agents "
                "on one config would share the spool, the outbox and the MQTT client id. Fix: stop the other one "
                f"(systemctl stop iaflash-agent, or kill {holder}) or give this one its own config and directories"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[f"extra_{key}" if key in doc else key] = value  # never overwrite the core fields
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Configure the root logger once, for the service (libraries add no handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
