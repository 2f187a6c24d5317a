"""Opening ``state.db`` when the agent starts: a corrupt file salvaged, a full or read-only disk waited out.

The start used to stop on the outbox's first error, and systemd restarted the agent every 15 s
(reloading its models each time) until the disk had room again. :func:`open_at_start` instead:

* finishes a salvage a crash left half-done, and salvages a corrupt file (:mod:`.salvage`);
* on a full, read-only or failing file system (the outbox cannot create its tables or its WAL),
  logs one ERROR with the fix, tells systemd why (``STATUS=``, and ``EXTEND_TIMEOUT_USEC`` so the
  start timeout does not kill a box that only waits for room; ``WATCHDOG=1`` too), retries every
  :data:`RETRY_S` seconds, and goes on by itself once the file can be written, with one WARNING;
* stops waiting when ``stop`` is set (SIGTERM), raising the outbox's error;
* reminds, with one WARNING per start, of each earlier salvage whose moved file is still there.

Any other error (permissions, a path that is a folder) still stops the start with its fix.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path
from typing import Any

from iaflash.agent.errors import OutboxError
from iaflash.agent.health import sd_notify
from iaflash.agent.outbox.salvage import FIX_NOTE, check_and_salvage, describe, salvage_notes
from iaflash.agent.outbox.store import Outbox

__all__ = ["RETRY_S", "is_disk_fault", "open_at_start"]

log = logging.getLogger(__name__)

RETRY_S = 5.0
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
_DISK_WORDS = ("disk is full", "readonly database", "read-only file system", "disk i/o error", "no space left")


def is_disk_fault(exc: OutboxError, folder: Path) -> bool:
    """True when ``exc`` comes from the file system of ``folder`` being full, read-only or failing."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS:
        return True
    text = str(cause if cause is not None else exc).lower()
    if any(word in text for word in _DISK_WORDS):
        return True
    try:  # "unable to open database file": SQLite hides the errno; ask the file system
        st = os.statvfs(folder)
    except OSError:
        return False
    return bool(st.f_flag & os.ST_RDONLY) or st.f_bavail == 0


def open_at_start(path: Path, *, stop: threading.Event | None = None, retry_s: float = RETRY_S) -> Outbox:
    """The outbox connection for the start's recovery step; waits out a full or read-only disk (see module)."""
    waiting: str | None = None
    pause = stop or threading.Event()
    while True:
        try:
            fresh = check_and_salvage(path)
            outbox = Outbox(path)
        except OutboxError as exc:
            if not is_disk_fault(exc, path.parent):
                raise
            if waiting is None:
                log.error(
                    "start paused: %s; the agent retries every %.0f s and starts by itself once %s can be written",
                    exc,
                    retry_s,
                    path.parent,
                )
            waiting = str(exc)
            _tell_systemd(f"STATUS=start paused: {waiting[:300]}", retry_s)
            if pause.wait(retry_s):
                raise OutboxError(f"{exc}; the agent was asked to stop while it waited") from exc
            continue
        if waiting is not None:
            log.warning("start resumed: %s can be written again", path)
            sd_notify("STATUS=starting")
        _remind(path, fresh)
        return outbox


def _remind(path: Path, fresh: dict[str, Any] | None) -> None:
    """One WARNING per start for each earlier salvage whose moved file is still there (the persistent state)."""
    for note in salvage_notes(path):
        if fresh is None or note.get("moved_to") != fresh.get("moved_to"):
            log.warning("outbox: %s; fix: %s", describe(note)[1], FIX_NOTE)


def _tell_systemd(status: str, retry_s: float) -> None:
    sd_notify(status)
    sd_notify(f"EXTEND_TIMEOUT_USEC={int(retry_s * 4 * 1e6)}")  # the start goes on for as long as we wait
    sd_notify("WATCHDOG=1")  # waiting for room is not a stuck agent
