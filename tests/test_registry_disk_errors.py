"""The registry cache on a full disk, a read-only file system, or without permission: each says so, with its fix.

A full file system, a read-only mount and a permission error each used to be reported as a corrupt
cache ("corrupt or unreadable (disk I/O error)"; fix: move it aside and re-import a snapshot), which
sends the technician the wrong way: the file is intact and heals by itself once the fault is fixed.
Only real damage (SQLITE_CORRUPT, SQLITE_NOTADB, a failed quick_check) may advise a re-import.

Real files and real SQLite throughout. Full and read-only file systems are real tmpfs mounts (root
only, skipped cleanly otherwise); SQLITE_FULL on an import is also produced everywhere with SQLite's
own ``max_page_count`` on the import's real connection. Permissions are real kernel checks: as
root, the test drops its effective uid to ``nobody`` (root ignores modes); otherwise it uses chmod.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import shutil
import sqlite3
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tmpfs_mounts import needs_root, remount

from iaflash.agent.errors import RegistryError, RegistryFileError, RegistryUnavailable
from iaflash.agent.registry.cache import (
    Registry,
    RegistryRecord,
    check_integrity,
    import_subset,
    read_state,
    records_from_plates,
    write_subset,
)
from iaflash.agent.registry.plates import key_id
from iaflash.agent.sqlite import store_fault

KEY = bytes(range(32))
KID = key_id(KEY)
LETTERS = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase if a not in "IOU" and b not in "IOU"]
ROOT = os.geteuid() == 0


def plates(n: int) -> list[tuple[str, str, str, str | None, str | None]]:
    return [(f"{a}-{i:03d}-{a}", "RENAULT", "CLIO", "VP", "CI") for a in LETTERS for i in range(1, 1000)][:n]


def snapshot(path: Path, n: int, seq: int = 1) -> Path:
    write_subset(path, dataset_id="siv-test", seq=seq, key_id=KID, records=records_from_plates(KEY, plates(n)))
    return path


FIRST = plates(1)[0][0]
RECORD = RegistryRecord("RENAULT", "CLIO", "VP", "CI")


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until its file system is full to the last byte; returns it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * size)
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return filler


def assert_not_called_corrupt(text: str) -> None:
    assert "corrupt" not in text and "re-import a snapshot" not in text and "mv " not in text, text


# ---------------------------------------------------------------- a full file system


@needs_root
def test_a_registry_on_a_full_disk_is_unavailable_with_the_free_space_fix_and_heals_without_a_re_import(
    tmp_path: Path, tmpfs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    disk = tmpfs(tmp_path / "disk", "1m")
    db = disk / "registry.db"
    import_subset(db, snapshot(tmp_path / "s1.jsonl.gz", 5), expected_key_id=KID)
    filler = fill(disk)  # no -wal/-shm now: opening the cache must create its -shm, and cannot
    with caplog.at_level(logging.ERROR):
        reg = Registry(db, KEY)
    try:
        health = reg.health()
        assert health["state"] == "unavailable" and health["cause"] == "disk_full"
        assert health["problem"].startswith(f"{db}: the file system holding {disk} is full (")
        assert health["fix"].startswith(f"free space on the file system holding {disk} (`df -h {disk}`")
        assert "no re-import is needed" in health["fix"]
        for text in (health["problem"], health["fix"]):
            assert_not_called_corrupt(text)
        errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("registry unavailable")]
        assert len(errors) == 1 and f"Fix: free space on the file system holding {disk}" in errors[0]
        with pytest.raises(RegistryUnavailable, match=f"holding {disk} is full") as info:
            reg.lookup(FIRST)
        assert_not_called_corrupt(str(info.value))
        # registry status and doctor (read_state) and the integrity check say the same
        with pytest.raises(RegistryUnavailable, match=f"holding {disk} is full.*; fix: free space on") as info:
            read_state(db)
        assert_not_called_corrupt(str(info.value))
        assert f"the file system holding {disk} is full" in str(check_integrity(db))
        # the file was intact: room again, and the agent reads it by itself
        filler.unlink()
        reg.reopen_every_s = 0.0
        assert reg.lookup(FIRST) == RECORD
        assert reg.health() == {"state": "ok", "vehicles": 5, "seq": 1}
    finally:
        reg.close()


@needs_root
def test_an_import_that_fills_the_disk_says_free_space_and_leaves_the_cache_as_it_was(
    tmp_path: Path, tmpfs: Any
) -> None:
    disk = tmpfs(tmp_path / "disk", "1m")
    db = disk / "registry.db"
    import_subset(db, snapshot(tmp_path / "s1.jsonl.gz", 5), expected_key_id=KID)
    big = snapshot(tmp_path / "s2.jsonl.gz", 20_000, seq=2)  # ~2 MB of rows: more than the 1 MiB disk holds
    with pytest.raises(RegistryError) as info:
        import_subset(db, big, expected_key_id=KID)
    message = str(info.value)
    assert message.startswith(f"registry import failed on {db}: the file system holding {disk} is full (")
    assert f"fix: free space on the file system holding {disk} (`df -h {disk}`" in message
    assert "nothing was imported (the cache is as it was): run the import again" in message
    assert_not_called_corrupt(message)
    state = read_state(db)
    assert state is not None and (state.seq, state.count) == (1, 5)  # the cache is exactly as it was


def test_an_import_that_hits_sqlite_full_says_free_space_not_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLITE_FULL without root: SQLite's own page limit on the import's real connection (no mount needed)."""
    db = tmp_path / "registry.db"
    import_subset(db, snapshot(tmp_path / "s1.jsonl.gz", 5), expected_key_id=KID)
    connect = sqlite3.connect

    def limited(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(database, *args, **kwargs)
        conn.execute("PRAGMA max_page_count = 8")  # SQLite answers SQLITE_FULL past 8 pages of 4 KiB
        return conn

    monkeypatch.setattr(sqlite3, "connect", limited)
    with pytest.raises(RegistryError) as info:
        import_subset(db, snapshot(tmp_path / "s2.jsonl.gz", 3000, seq=2), expected_key_id=KID)
    monkeypatch.undo()
    message = str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert "database or disk is full" in str(info.value.__cause__)
    assert message.startswith(f"registry import failed on {db}: the file system holding {tmp_path} is full (")
    assert f"fix: free space on the file system holding {tmp_path}" in message and "run the import again" in message
    assert_not_called_corrupt(message)
    state = read_state(db)
    assert state is not None and (state.seq, state.count) == (1, 5)


# ---------------------------------------------------------------- a read-only file system


@needs_root
def test_a_registry_on_a_read_only_file_system_says_remount_it_and_heals_by_itself(tmp_path: Path, tmpfs: Any) -> None:
    disk = tmpfs(tmp_path / "disk", "4m")
    db = disk / "registry.db"
    import_subset(db, snapshot(tmp_path / "s1.jsonl.gz", 5), expected_key_id=KID)
    remount(disk, "ro")  # what ext4 does after an I/O error
    reg = Registry(db, KEY)
    try:
        health = reg.health()
        assert health["state"] == "unavailable" and health["cause"] == "read_only"
        assert health["problem"].startswith(f"{db}: the file system holding {disk} is read-only (")
        assert health["fix"].startswith(f"remount the file system holding {disk} read-write (`findmnt -T {disk}`")
        assert_not_called_corrupt(health["problem"] + health["fix"])
        with pytest.raises(RegistryUnavailable, match=f"holding {disk} is read-only.*fix: remount"):
            read_state(db)
        with pytest.raises(RegistryError, match=f"holding {disk} is read-only.*nothing was imported") as info:
            import_subset(db, snapshot(tmp_path / "s2.jsonl.gz", 5, seq=2), expected_key_id=KID)
        assert_not_called_corrupt(str(info.value))
        remount(disk, "rw")
        reg.reopen_every_s = 0.0
        assert reg.lookup(FIRST) == RECORD
        assert reg.health()["state"] == "ok"
    finally:
        reg.close()


# ---------------------------------------------------------------- permissions


@contextlib.contextmanager
def locked_out(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """(a folder holding a good cache that this process may read but not write, give_back()).

    As root (modes do not apply to root), the cache is root's and the block runs with the effective
    uid and gid of ``nobody``; give_back() chowns the files to nobody. Otherwise the folder and file
    are made read-only with chmod, and give_back() restores their modes.
    """
    folder = Path(tempfile.mkdtemp(prefix="iaflash-perm-")) if ROOT else tmp_path / "perm"
    folder.mkdir(exist_ok=True)
    db = folder / "registry.db"
    import_subset(db, snapshot(tmp_path / "s1.jsonl.gz", 5), expected_key_id=KID)
    if ROOT:
        nobody = pwd.getpwnam("nobody")
        os.chmod(folder, 0o755)
        os.chmod(db, 0o644)

        def give_back() -> None:
            os.seteuid(0)
            for path in (folder, db):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            os.seteuid(nobody.pw_uid)

        os.setegid(nobody.pw_gid)
        os.seteuid(nobody.pw_uid)
        try:
            yield folder, give_back
        finally:
            os.seteuid(0)
            os.setegid(0)
            shutil.rmtree(folder, ignore_errors=True)
    else:
        os.chmod(db, 0o444)
        os.chmod(folder, 0o555)

        def give_back() -> None:
            os.chmod(folder, 0o755)
            os.chmod(db, 0o644)

        try:
            yield folder, give_back
        finally:
            give_back()


def test_a_registry_the_service_user_may_not_write_says_permission_with_the_user_and_heals(tmp_path: Path) -> None:
    with locked_out(tmp_path) as (folder, give_back):
        db = folder / "registry.db"
        user = pwd.getpwuid(os.geteuid()).pw_name
        reg = Registry(db, KEY)
        try:
            health = reg.health()
            assert health["state"] == "unavailable" and health["cause"] == "permission"
            assert health["problem"].startswith(f"{db}: permission denied for user {user} on {folder} (its folder")
            assert health["fix"].startswith(f"let {user} (the service user, normally iaflash) read and write {db}")
            assert f"`namei -l {db}`" in health["fix"] and "no re-import is needed" in health["fix"]
            assert_not_called_corrupt(health["problem"] + health["fix"])
            with pytest.raises(RegistryUnavailable, match=f"permission denied for user {user}") as info:
                read_state(db)
            assert_not_called_corrupt(str(info.value))
            give_back()
            reg.reopen_every_s = 0.0
            assert reg.lookup(FIRST) == RECORD
        finally:
            reg.close()


def test_a_subset_file_the_user_may_not_read_says_permission_not_damaged(tmp_path: Path) -> None:
    subset = snapshot(tmp_path / "s1.jsonl.gz", 5)
    folder = Path(tempfile.mkdtemp(prefix="iaflash-perm-"))
    try:
        file = folder / "s1.jsonl.gz"
        shutil.copy(subset, file)
        os.chmod(folder, 0o755)
        os.chmod(file, 0o000 if not ROOT else 0o600)  # as root: root's file, read by nobody below
        nobody = pwd.getpwnam("nobody")
        with contextlib.ExitStack() as stack:
            if ROOT:
                os.seteuid(nobody.pw_uid)
                stack.callback(os.seteuid, 0)
            with pytest.raises(RegistryFileError) as info:
                import_subset(folder / "registry.db", file, expected_key_id=KID)
        message = str(info.value)
        assert message.startswith(f"{file}: cannot be read: [Errno 13] Permission denied")
        assert "fix: let the user running the import read it" in message and "not damaged" in message
        assert "damaged or not gzip" not in message
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- real corruption is still corruption


def test_a_file_that_is_not_a_database_is_still_corrupt_with_the_re_import_fix(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    db.write_bytes(b"this is not an SQLite file at all" * 200)
    reg = Registry(db, KEY)
    try:
        health = reg.health()
        assert health["cause"] == "corrupt" and health["problem"].startswith(f"{db}: corrupt (")
        assert "re-import a snapshot" in health["fix"] and f"mv {db} {db}.corrupt" in health["fix"]
    finally:
        reg.close()
    with pytest.raises(RegistryUnavailable, match=r"corrupt.*re-import a snapshot"):
        read_state(db)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk_full"),
        (sqlite3.OperationalError("database or disk is full"), "disk_full"),
        (OSError(errno.EROFS, "Read-only file system"), "read_only"),
        (OSError(errno.EACCES, "Permission denied"), "permission"),
        (sqlite3.DatabaseError("database disk image is malformed"), "corrupt"),
        (sqlite3.DatabaseError("file is not a database"), "corrupt"),
        (sqlite3.OperationalError("database is locked"), "locked"),
    ],
)
def test_store_fault_tells_each_cause_by_its_errno_or_sqlite_words(
    tmp_path: Path, exc: BaseException, kind: str
) -> None:
    fault = store_fault(exc, tmp_path / "registry.db")
    assert fault.kind == kind
    if kind != "corrupt":
        assert str(tmp_path) in fault.problem and str(tmp_path) in fault.fix
