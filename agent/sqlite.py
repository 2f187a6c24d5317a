"""The one map from sqlite3's errors to the project's: what failed, on which file, and the fix.

Used by every SQLite store of the agent (the outbox, the registry cache, the command replay
store); each names its own error class and action, the fix comes from here.

:func:`store_fault` tells apart, for a file PATH, the faults whose fixes differ: a full file
system, a read-only one, a permission error, real corruption, a lock, an I/O error. SQLite's
words alone are not enough: a full disk often reads "disk I/O error" (the ``-shm`` file cannot
grow) and a read-only mount "unable to open database file", so the file system holding PATH is
asked too (``statvfs``, ``access``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from iaflash.agent.errors import IaflashError

__all__ = ["StoreFault", "fix_for", "sqlite_errors", "store_fault"]

# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode, Python 3.11+; the text is used before)
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26
_LOW_FREE_BYTES = 1 << 20  # an I/O error with less room than this left is a full disk (SQLite needs 32 KiB for -shm)
_FULL_WORDS = ("disk is full", "no space left", "quota exceeded")
_OPEN_WORDS = ("readonly database", "read-only", "unable to open", "permission denied", "access permission")
_DISK_FULL, _READ_ONLY, _PERMISSION, _CORRUPT = "disk_full", "read_only", "permission", "corrupt"
_MISSING, _LOCKED, _IO_ERROR, _OTHER = "missing_folder", "locked", "io_error", "other"


@dataclass(frozen=True)
class StoreFault:
    """What a failed operation on a file means for the technician.

    ``kind`` is one of ``disk_full``, ``read_only``, ``permission``, ``corrupt``, ``missing_folder``,
    ``locked``, ``io_error``, ``other``; ``problem`` says what is wrong, naming the file or its file system;
    ``fix`` says what to do. Only ``corrupt`` means the file itself is damaged: the store then
    supplies its own fix (move it aside and re-import, salvage), since only it knows what the file holds.
    """

    kind: str
    problem: str
    fix: str


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return code & 0xFF if isinstance(code, int) else None


def is_corrupt(exc: BaseException) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB ("malformed", "file is not a database"): the file itself is damaged."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    text = str(exc).lower()
    return _code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text or "not a database" in text


def _user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _denied(path: Path) -> list[str]:
    """What the effective user may not use: a folder above it it cannot enter, its folder, the file, -wal, -shm."""
    folder = path.absolute().parent
    for above in reversed(folder.parents):
        if not _may(above, "x"):
            return [f"{above} (a folder above it: enter)"]
    if not os.path.isdir(folder):
        return []
    out = [] if _may(folder, "rwx") else [f"{folder} (its folder: read, write, enter)"]
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if os.path.lexists(file) and not _may(file, "rw"):
            out.append(f"{file} (read, write)")
    return out


def _may(path: Path, what: str) -> bool:
    """``os.access`` for the effective user (the one SQLite runs as), ``what`` among r, w, x."""
    mode = sum(flag for letter, flag in (("r", os.R_OK), ("w", os.W_OK), ("x", os.X_OK)) if letter in what)
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def store_fault(exc: BaseException, path: Path | str) -> StoreFault:
    """Classify ``exc``, raised by an operation on the file ``path``: its kind, the problem and the fix.

    The first rule that holds wins: corrupt (SQLITE_CORRUPT/SQLITE_NOTADB, "malformed", "not a
    database"); a full file system (ENOSPC/EDQUOT, SQLITE_FULL, "disk is full"); a read-only one
    (EROFS, or an I/O, open or write error on a file system mounted read-only); a permission error
    (EACCES/EPERM, or such an error where the effective user may not use the file, its -wal/-shm,
    its folder or a folder above it); a full file system again (such an error with under 1 MiB
    left: SQLite says "disk I/O error" when ``-shm`` cannot grow); a missing folder; a lock; an I/O
    error; else ``other``, with SQLite's generic advice.
    """
    path = Path(path)
    folder = path.parent
    text, code = str(exc).lower(), _code(exc)
    err = exc.errno if isinstance(exc, OSError) else None
    try:
        fs: os.statvfs_result | None = os.statvfs(folder)
    except OSError:  # a folder it may not enter, or none
        fs = None
    free = None if fs is None else fs.f_bavail * fs.f_frsize
    storage = err == errno.EIO or code == _SQLITE_IOERR or "disk i/o error" in text
    opening = code in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN) or _any(text, _OPEN_WORDS)
    denied = _denied(path) if opening or storage or err in (errno.EACCES, errno.EPERM) else []
    mounted_ro = fs is not None and bool(fs.f_flag & os.ST_RDONLY)
    low = free is not None and free < _LOW_FREE_BYTES
    sqlite_lock = code in (_SQLITE_BUSY, _SQLITE_LOCKED) or _any(text, ("locked", "busy"))
    rules = (
        (_CORRUPT, is_corrupt(exc)),
        (_DISK_FULL, err in (errno.ENOSPC, errno.EDQUOT) or code == _SQLITE_FULL or _any(text, _FULL_WORDS)),
        (_READ_ONLY, err == errno.EROFS or "read-only file system" in text or ((storage or opening) and mounted_ro)),
        (_PERMISSION, bool(denied) or err in (errno.EACCES, errno.EPERM)),  # after read-only: access() says EROFS too
        (_DISK_FULL, (storage or opening) and low),
        (_MISSING, opening and not os.path.isdir(folder)),
        (_LOCKED, isinstance(exc, sqlite3.Error) and sqlite_lock),
        (_IO_ERROR, storage),
    )
    kind = next((kind for kind, holds in rules if holds), _OTHER)
    intact = "the file itself is intact"
    if kind == _CORRUPT:
        problem, fix = f"{path} is corrupt ({exc})", ""  # the store's own fix: it knows what the file holds
    elif kind == _DISK_FULL:
        problem = f"the file system holding {folder} is full ({exc}{'' if free is None else f'; {_size(free)} free'})"
        fix = (
            f"free space on the file system holding {folder} (`df -h {folder}`; if it shows room, SQLite's "
            f"temporary files filled /var/tmp or /tmp); {intact}"
        )
    elif kind == _READ_ONLY:
        problem = f"the file system holding {folder} is read-only ({exc})"
        fix = (
            f"remount the file system holding {folder} read-write (`findmnt -T {folder}`, then "
            "`mount -o remount,rw MOUNTPOINT`; the kernel remounts ext4 read-only after an I/O error: check "
            f"`dmesg` and `fsck` it first, or replace the card); {intact}"
        )
    elif kind == _PERMISSION:
        user = _user()
        problem = f"permission denied for user {user} on {'; '.join(denied) or path} ({exc})"
        fix = (
            f"let {user} (the service user, normally iaflash) read and write {path}, its -wal and -shm files "
            f"and their folder {folder}, and enter every folder above it (`namei -l {path}` shows the owners "
            f"and modes; e.g. `chown iaflash: {path}*`); {intact}"
        )
    elif kind == _MISSING:
        problem, fix = f"{folder} does not exist ({exc})", f"create {folder}, or fix the path"
    elif kind == _LOCKED:
        problem = f"{path} is locked by another process ({exc})"
        fix = (
            f"another process holds a long write lock on {path}: find it (`fuser -v {path}*`), let it finish or stop it"
        )
    elif kind == _IO_ERROR:
        problem = f"the storage holding {path} reported an I/O error ({exc})"
        fix = (
            f"check the storage device (`dmesg`, `df -h {folder}`); the file is used again by itself once the "
            "device reads again, and needs replacing only if it is then reported corrupt"
        )
    else:
        problem = f"{path}: {exc}"
        fix = fix_for(exc) if isinstance(exc, sqlite3.Error) else "check the path, its permissions and free disk space"
    return StoreFault(kind, problem, fix)


def _any(text: str, words: tuple[str, ...]) -> bool:
    return any(word in text for word in words)


def _size(n: int) -> str:
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    return f"{n / (1 << 20):.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.1f} GiB"


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
