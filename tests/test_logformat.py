"""The service's log lines: journald priorities when stderr is the journal, the reason in text lines."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from iaflash.agent.health import JsonFormatter
from iaflash.agent.logformat import LineFormat, configure_logging, journal_priority, stderr_is_journal


def record(level: int, msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("iaflash.test", level, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_each_level_gets_its_syslog_priority() -> None:
    assert [journal_priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


def test_journal_prefix_on_every_line_of_a_record() -> None:
    fmt = LineFormat(logging.Formatter("%(levelname)s %(message)s"), text=True, journal=True)
    assert fmt.format(record(logging.WARNING, "disk low\nsecond line")) == "<4>WARNING disk low\n<4>second line"
    assert fmt.format(record(logging.ERROR, "x")) == "<3>ERROR x"


def test_the_text_format_carries_the_verdicts_reason_the_json_one_already_has_it() -> None:
    text = LineFormat(logging.Formatter("%(message)s"), text=True, journal=False)
    assert text.format(record(logging.INFO, "capture c: inconclusive", reason="no vehicle")) == (
        "capture c: inconclusive [reason: no vehicle]"
    )
    as_json = LineFormat(JsonFormatter(), text=False, journal=False)
    line = as_json.format(record(logging.INFO, "capture c: inconclusive", reason="no vehicle"))
    assert line.startswith("{") and '"reason":"no vehicle"' in line and "[reason:" not in line


def test_the_prefix_is_used_only_when_stderr_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "stream").open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # a parent's stream, not ours
        assert not stderr_is_journal()
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not stderr_is_journal()


def test_configure_logging_wraps_the_root_handler() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "text", journal=True)
        (handler,) = root.handlers
        assert isinstance(handler.formatter, LineFormat) and handler.formatter.journal
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
