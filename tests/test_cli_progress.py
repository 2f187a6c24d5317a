"""iaflash.agent.cli.progress: off a terminal, one plain line on stderr per tenth of the work, nothing on stdout."""

from __future__ import annotations

import pytest

from iaflash.agent.cli.progress import progress_callback


def test_plain_lines_go_to_stderr_once_per_tenth_with_the_unit(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_callback("importing s.gz", "records") as progress:
        for done in range(101):
            progress(done, 100)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"importing s.gz: {n}/100 records" for n in range(0, 101, 10)]


def test_without_a_unit_and_with_nothing_to_do_one_line_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_callback("sweeping thresholds") as progress:
        progress(0, 0)
        progress(0, 0)
    assert capsys.readouterr().err == "sweeping thresholds: 0/0\n"
