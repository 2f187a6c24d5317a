"""iaflash.agent.health: sd_notify over a real AF_UNIX datagram socket, the watchdog interval, Liveness, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iaflash.agent.errors import InstanceLocked
from iaflash.agent.health import (
    InstanceLock,
    JsonFormatter,
    Liveness,
    sd_notify,
    setup_logging,
    watchdog_interval_s,
)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket standing in for systemd, with NOTIFY_SOCKET pointing at it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_sd_notify_sends_the_state_as_one_datagram(notify_socket: socket.socket) -> None:
    """sd_notify('READY=1') returns True and the socket receives exactly b'READY=1'."""
    assert sd_notify("READY=1") is True
    assert notify_socket.recv(4096) == b"READY=1"
    assert sd_notify("WATCHDOG=1") is True
    assert sd_notify("STATUS=processing 3 captures\nREADY=1") is True
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notify_socket.recv(4096) == b"STATUS=processing 3 captures\nREADY=1"


def test_sd_notify_without_notify_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd (no NOTIFY_SOCKET, or an empty one) sd_notify returns False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sd_notify("READY=1") is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_sd_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET starting with '@' is an abstract-namespace address ('\\0' + name)."""
    name = f"iaflash-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_sd_notify_to_a_missing_socket_returns_false_and_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY_SOCKET that nobody listens on is not fatal: False, and one warning naming the state."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="iaflash.agent.health"):
        assert sd_notify("WATCHDOG=1") is False
    assert len(caplog.records) == 1
    assert "sd_notify(WATCHDOG) failed" in caplog.records[0].getMessage()


# ---------------------------------------------------------------------------------------------------
# watchdog_interval_s
# ---------------------------------------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=30 s gives a ping every 15 s."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 15.0


def test_watchdog_interval_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_PID equal to our pid keeps the interval."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 0.5


def test_watchdog_for_another_pid_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watchdog meant for another process (WATCHDOG_PID mismatch) is not ours: None."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval_s() is None


@pytest.mark.parametrize("usec", [None, "", "thirty", "1.5e6"])
def test_watchdog_absent_or_malformed_is_none(monkeypatch: pytest.MonkeyPatch, usec: str | None) -> None:
    """No WATCHDOG_USEC, an empty one or a non-integer one means no watchdog."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert watchdog_interval_s() is None


# ---------------------------------------------------------------------------------------------------
# Liveness
# ---------------------------------------------------------------------------------------------------


def test_liveness_is_healthy_when_idle() -> None:
    """Not busy is healthy, however long ago the last progress was."""
    live = Liveness(stuck_after_s=0.01)
    time.sleep(0.03)
    assert live.busy_since is None
    assert live.healthy() is True


def test_liveness_stuck_when_busy_too_long_and_healthy_again_after_end() -> None:
    """Busy for longer than stuck_after_s is unhealthy; end() makes it healthy and records progress."""
    live = Liveness(stuck_after_s=0.1)
    live.begin()
    assert live.healthy() is True
    time.sleep(0.15)
    assert live.healthy() is False
    before = live.last_progress
    live.end()
    assert live.healthy() is True
    assert live.busy_since is None
    assert live.last_progress > before


def test_liveness_begin_restarts_the_clock() -> None:
    """A new begin() after a long item is judged from its own start, not the previous one."""
    live = Liveness(stuck_after_s=0.1)
    live.begin()
    time.sleep(0.15)
    live.end()
    live.begin()
    assert live.healthy() is True


# ---------------------------------------------------------------------------------------------------
# JsonFormatter and setup_logging
# ---------------------------------------------------------------------------------------------------


def _record(
    msg: str, *args: object, extra: dict[str, object] | None = None, exc_info: bool = False
) -> logging.LogRecord:
    logger = logging.getLogger("iaflash.test")
    ei = None
    if exc_info:
        try:
            raise ValueError("boom")
        except ValueError:
            ei = sys.exc_info()
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, ei, extra=extra)
    return record


def test_json_formatter_emits_one_json_object_with_extras() -> None:
    """One line of JSON with ts, level, logger, the formatted msg and every extra field."""
    line = JsonFormatter().format(
        _record("capture %s: %d ms", "c-1", 42, extra={"capture_id": "c-1", "latency_ms": 42.5, "path": Path("/x")})
    )
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "iaflash.test"
    assert doc["msg"] == "capture c-1: 42 ms"
    assert doc["capture_id"] == "c-1"
    assert doc["latency_ms"] == 42.5
    assert doc["path"] == "/x"  # non-JSON values fall back to str()
    assert doc["ts"].endswith("Z")
    assert time.strptime(doc["ts"][:19], "%Y-%m-%dT%H:%M:%S")
    assert set(doc) == {"ts", "level", "logger", "msg", "capture_id", "latency_ms", "path"}


def test_json_formatter_includes_the_exception() -> None:
    """exc_info becomes an 'exc' field holding the traceback text."""
    doc = json.loads(JsonFormatter().format(_record("failed", exc_info=True)))
    assert doc["msg"] == "failed"
    assert "ValueError: boom" in doc["exc"]
    assert doc["exc"].startswith("Traceback")


def test_setup_logging_installs_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    """setup_logging replaces the root handlers with one JSON (or text) handler at the given level."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup_logging("WARNING", "json")
        setup_logging("WARNING", "json")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
        setup_logging("DEBUG", "text")
        assert len(root.handlers) == 1
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_watchdog_usec_zero_means_no_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=0 disables the watchdog instead of asking for pings every 0 s."""
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() is None


def test_json_formatter_extra_fields_never_overwrite_core_fields() -> None:
    """An extra named 'level' is kept under extra_level; the record's own level stays."""
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello", None, None)
    record.level = "spoofed"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "WARNING" and doc["extra_level"] == "spoofed"


def test_the_instance_lock_refuses_a_second_holder_naming_the_first_and_frees_on_release(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path)
    first.acquire()
    assert (tmp_path / "agent.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(InstanceLocked, match=rf"another agent \(pid {os.getpid()}\) already runs") as info:
        InstanceLock(tmp_path).acquire()
    assert "Fix: stop the other one" in str(info.value)
    first.release()
    second = InstanceLock(tmp_path)
    second.acquire()  # free again
    second.release()


def test_the_instance_lock_dies_with_its_process_even_on_sigkill(tmp_path: Path) -> None:
    import subprocess

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from iaflash.agent.health import InstanceLock; "
            f"InstanceLock(Path({str(tmp_path)!r})).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        with pytest.raises(InstanceLocked, match=rf"pid {holder.pid}"):
            InstanceLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    lock = InstanceLock(tmp_path)
    lock.acquire()  # the stale file does not block a restart
    lock.release()
