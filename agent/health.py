"""Supervision and observability: sd_notify, watchdog, JSON logging for journald.

``sd_notify`` writes one datagram to ``$NOTIFY_SOCKET`` (no third-party package:
the protocol is a single sendto). Outside systemd it does nothing.

:class:`InstanceLock` is the single-instance lock of a state directory: two agents on one config
would share the spool, the outbox and the MQTT client id (the broker then disconnects each in
turn, every few seconds); the second one stops at start with a message naming the holder.
:func:`lock_holder` tells another process (``iaflash-provision model``) which pid runs the agent.

The heartbeat's shared parts live here too: :class:`LastErrors` (the last ERROR line of each
subsystem), :func:`disk_usage` (free space per watched file system), :func:`registry_summary`
(dataset, seq, age, staleness) and the model report file (``<state dir>/models.json``, what the
running agent loaded and the outcome of its last reload) that ``iaflash-provision model`` reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iaflash.agent.errors import InstanceLocked, RegistryError
from iaflash.engines.atomic import write_atomic

if TYPE_CHECKING:  # the registry layer is below; only its type is named here
    from iaflash.agent.registry.cache import Registry

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
        try:  # the pid only names the holder; the flock is the lock (a full disk must not stop the start here)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            log.warning("%s: cannot write this agent's pid into the lock file (%s); the lock is held", self.path, exc)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock_holder(directory: Path) -> int | None:
    """The pid of the agent holding ``<directory>/agent.lock``, or None when no agent holds it."""
    path = Path(directory) / "agent.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)  # we got it: nobody runs there
        return None
    finally:
        os.close(fd)


# ----- the heartbeat's shared parts -----------------------------------------------------------

MODEL_REPORT = "models.json"


def model_report_path(state_dir: Path) -> Path:
    """``<state dir>/models.json``: what the running agent loaded (the state dir holds agent.lock)."""
    return Path(state_dir) / MODEL_REPORT


def write_model_report(path: Path, doc: dict[str, Any]) -> None:
    """Write the model report atomically (readers never see half a file)."""
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode=0o644)


def read_model_report(path: Path) -> dict[str, Any] | None:
    """The model report, or None when there is none (the agent never ran) or it cannot be read."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def subsystem_of(logger_name: str) -> str:
    """``iaflash.agent.link.mqtt`` → ``link``; ``iaflash.engines.build`` → ``engines``; others as given."""
    parts = logger_name.split(".")
    if parts[:2] == ["iaflash", "agent"] and len(parts) > 2:
        return parts[2]
    if parts[:1] == ["iaflash"] and len(parts) > 1:
        return parts[1]
    return logger_name or "root"


class LastErrors(logging.Handler):
    """Keeps the last ERROR (or worse) line of each subsystem, and how many there were, for the heartbeat.

    Attached by the service to the ``iaflash`` logger while it runs. Messages are the log lines'
    own, which never hold a plate in clear or a secret (docs/PRIVACY.md); they are cut at 300 characters.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._last: dict[str, dict[str, Any]] = {}
        self._counts: dict[str, int] = {}
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  # a bad format string must never break logging
            message = str(record.msg)
        subsystem = subsystem_of(record.name)
        with self._guard:
            self._counts[subsystem] = self._counts.get(subsystem, 0) + 1
            self._last[subsystem] = {
                "at": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="seconds"),
                "level": record.levelname,
                "logger": record.name,
                "message": message[:300],
                "count": self._counts[subsystem],
            }

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._guard:
            return {k: dict(v) for k, v in sorted(self._last.items())}


def disk_usage(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Free space of each distinct file system holding one of ``paths`` (the first path names it)."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for path in paths:
        try:
            dev = os.stat(path).st_dev
            st = os.statvfs(path)
        except OSError as exc:
            out.append({"path": str(path), "error": exc.strerror or str(exc)})
            continue
        if dev in seen:
            continue
        seen.add(dev)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        out.append(
            {
                "path": str(path),
                "free_bytes": free,
                "total_bytes": total,
                "free_mb": round(free / 2**20, 1),
                "total_mb": round(total / 2**20, 1),
                "free_ratio": round(free / total, 4) if total else None,
                "read_only": bool(st.f_flag & os.ST_RDONLY),
            }
        )
    return out


def registry_summary(registry: Registry, max_age_hours: float) -> dict[str, Any]:
    """The registry's health plus its dataset, kind, seq, vehicles, age and staleness (None when unknown)."""
    doc: dict[str, Any] = {**registry.health(), "max_age_hours": max_age_hours}
    state = None
    with contextlib.suppress(RegistryError):  # unavailable: health() above already says why
        state = registry.state()
    if state is None:
        doc.update(dataset_id=None, kind=None, seq=None, vehicles=0, age_hours=None, stale=True)
        return doc
    age = state.age_hours()
    doc.update(
        dataset_id=state.dataset_id,
        kind=state.kind,
        seq=state.seq,
        vehicles=state.count,
        key_id=state.key_id,
        imported_at=state.imported_at.isoformat(timespec="seconds"),
        created_at=state.created_at.isoformat(timespec="seconds") if state.created_at else None,
        age_hours=round(age, 3),
        stale=age > max_age_hours,
    )
    return doc


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
