"""The one map from sqlite3's errors to the project's: what failed, on which file, and the fix.

Used by every SQLite store of the agent (the outbox, the registry cache, the command replay
store); each names its own error class and action, the fix comes from here.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from iaflash.agent.errors import IaflashError

__all__ = ["fix_for", "sqlite_errors"]


def fix_for(exc: sqlite3.Error) -> str:
    """How to fix ``exc``, from what SQLite said (disk full, read-only, locked, corrupt)."""
    text = str(exc).lower()
    if "full" in text:
        return "free disk space on that filesystem; nothing was recorded by the failed write"
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return "check that the directory exists and the service user may write the file and its directory"
    if "locked" in text or "busy" in text:
        return "another process holds a long write lock on the file; stop it (only the agent writes here)"
    if "malformed" in text or "not a database" in text:
        return "stop the agent, keep a copy of the file, then recover it ('sqlite3 FILE .recover') or rebuild it"
    return "check the file, its directory's permissions and free disk space"


@contextlib.contextmanager
def sqlite_errors(
    what: str, path: Path | str, error: Callable[[str], IaflashError], *, fix: str | None = None
) -> Iterator[None]:
    """Turn a sqlite3 error raised inside the block into ``error(message)``, raised from it.

    The message is ``<what> failed on <path>: <sqlite's text>; fix: <fix>``; ``fix`` overrides
    the generic advice where the store knows better (for instance "re-import a snapshot").
    """
    try:
        yield
    except sqlite3.Error as exc:
        raise error(f"{what} failed on {path}: {exc}; fix: {fix or fix_for(exc)}") from exc
