"""Opening state.db at start: a full or read-only disk is waited out (one ERROR, systemd told), not a stop.

Real files on tmpfs mounts (root only, skipped cleanly otherwise); systemd's notify socket is a
real unix datagram socket named by $NOTIFY_SOCKET.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from iaflash.agent.errors import OutboxError
from iaflash.agent.outbox.salvage import salvage_notes
from iaflash.agent.outbox.startup import is_disk_fault, open_at_start
from iaflash.agent.outbox.store import Outbox

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="tmpfs mounts need root and mount(8)"
)


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 1 MiB tmpfs filled to the last byte: (the mount, the filler file)."""
    mount = tmp_path / "state"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (a container without CAP_SYS_ADMIN)")
    filler = mount / "filler"
    try:
        with filler.open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(4096))
            except OSError:  # ENOSPC: full
                pass
        yield mount, filler
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Notify:
    """systemd's side of sd_notify: a datagram socket at $NOTIFY_SOCKET that keeps what it receives."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def received(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Notify]:
    listener = Notify(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    yield listener
    listener.sock.close()


def opening(path: Path, stop: threading.Event) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with open_at_start(path, stop=stop, retry_s=0.1) as ob:  # a connection serves the thread that made it
                result["recorded"] = ob.record("cap-1", "match", None, None)  # its tables exist
        except OutboxError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@needs_root
def test_a_full_disk_at_start_is_waited_out_with_one_error_and_the_start_goes_on_by_itself(
    full_tmpfs: tuple[Path, Path], notify: Notify, caplog: pytest.LogCaptureFixture
) -> None:
    mount, filler = full_tmpfs
    path = mount / "state.db"
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="iaflash.agent.outbox.startup"):
        thread, result = opening(path, stop)
        wait_until(lambda: len([m for m in notify.received() if m.startswith("STATUS=")]) >= 3, 10, "three retries")
        assert thread.is_alive() and not result  # waiting, not stopped
        filler.unlink()
        thread.join(10)
    assert result == {"recorded": True}
    paused = [r for r in caplog.records if r.getMessage().startswith("start paused")]
    assert len(paused) == 1 and paused[0].levelno == logging.ERROR  # once, not once per retry
    assert "database or disk is full" in paused[0].getMessage() and "free disk space" in paused[0].getMessage()
    assert any(r.getMessage().startswith("start resumed") for r in caplog.records)
    sent = notify.received()
    assert any(m.startswith("STATUS=start paused: outbox") for m in sent)
    assert "WATCHDOG=1" in sent and any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in sent)


@needs_root
def test_a_stop_asked_while_waiting_ends_the_start_with_the_outbox_error(full_tmpfs: tuple[Path, Path]) -> None:
    mount, _ = full_tmpfs
    stop = threading.Event()
    thread, result = opening(mount / "state.db", stop)
    wait_until((mount / "state.db").exists, 10, "the first try")
    stop.set()  # SIGTERM
    thread.join(10)
    assert "asked to stop while it waited" in str(result["error"]) and "disk is full" in str(result["error"])


@needs_root
def test_a_read_only_file_system_at_start_is_waited_out_too(tmp_path: Path) -> None:
    mount = tmp_path / "state"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        Outbox(mount / "state.db").close()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        thread, result = opening(mount / "state.db", threading.Event())
        thread.join(0.5)
        assert thread.is_alive() and not result
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
        thread.join(10)
        assert result == {"recorded": True}
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_an_error_that_is_not_the_disk_stops_the_start_at_once(tmp_path: Path) -> None:
    (tmp_path / "state.db").mkdir()  # a folder where the file should be: a technician's fix, not a wait
    with pytest.raises(OutboxError, match=r"state\.db: cannot open") as info:
        open_at_start(tmp_path / "state.db", retry_s=30)
    assert not is_disk_fault(info.value, tmp_path)


def test_a_corrupt_file_is_salvaged_on_the_way_to_a_working_outbox(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"garbage" * 1000)
    with open_at_start(path) as ob:
        assert ob.record("cap-1", "match", None, None)
    (note,) = salvage_notes(path)
    assert note["state"] == "salvaged" and Path(note["moved_to"]).read_bytes() == b"garbage" * 1000


def test_each_start_reminds_of_an_earlier_salvage_until_its_copy_is_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"garbage" * 1000)
    with caplog.at_level(logging.WARNING, logger="iaflash.agent.outbox.startup"):
        open_at_start(path).close()  # the salvage itself: its ERROR, no reminder yet
        assert not [r for r in caplog.records if r.name.endswith("startup")]
        open_at_start(path).close()  # the next start
    (reminder,) = [r.getMessage() for r in caplog.records if r.name.endswith("startup")]
    (note,) = salvage_notes(path)
    assert Path(note["moved_to"]).name in reminder and "delete both" in reminder
    for leftover in tmp_path.glob("state.db.corrupt-*"):
        leftover.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iaflash.agent.outbox.startup"):
        open_at_start(path).close()
    assert not caplog.records
