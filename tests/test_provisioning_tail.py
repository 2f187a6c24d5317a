"""``iaflash-provision tail``: the verdicts of a running agent, with their reasons, from its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from provisioning_box import CentralFiles, central_files
from waiting import wait_until

from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.provisioning.cli import cli
from iaflash.provisioning.selftest_captures import KNOWN, write_known
from iaflash.provisioning.tail import parse_line

BIN = Path(sys.executable).parent
JSON_LINE = (
    '{"ts":"2026-12-02T06:40:01.123Z","level":"INFO","logger":"iaflash.agent.pipeline.committer",'
    '"msg":"capture c-1: mismatch/make","capture_id":"c-1","verdict":"mismatch/make",'
    '"reason":"P(registered make)=0.0032 < 0.05","stage_ms":{"total":41.2},"event_id":"97b31a48-aaaa"}'
)


def test_a_json_verdict_line_with_or_without_a_journal_priority() -> None:
    for raw in (JSON_LINE, f"<6>{JSON_LINE}\n"):
        line = parse_line(raw)
        assert line is not None
        assert (line.capture_id, line.outcome, line.level, line.total_ms) == ("c-1", "mismatch", "make", 41.2)
        assert line.reason == "P(registered make)=0.0032 < 0.05"
        assert line.text() == (
            "2026-12-02T06:40:01.123Z  c-1  mismatch/make     P(registered make)=0.0032 < 0.05  (41 ms)  event 97b31a48"
        )


def test_a_text_verdict_line_carries_its_reason() -> None:
    raw = (
        "2026-12-02 06:40:01,123 INFO iaflash.agent.pipeline.committer: capture c-2: inconclusive [reason: no vehicle]"
    )
    line = parse_line(raw)
    assert line is not None and (line.capture_id, line.outcome, line.reason) == ("c-2", "inconclusive", "no vehicle")


def test_other_lines_are_not_verdicts() -> None:
    assert parse_line('{"ts":"x","level":"INFO","msg":"agent started"}') is None
    assert parse_line("2026-12-02 06:40:01,123 INFO x: MQTT connected") is None
    assert parse_line("{not json") is None


def test_journal_without_journalctl_says_to_use_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    result = CliRunner().invoke(cli, ["tail", "--json", "--no-follow"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["command"] == "tail" and "--file PATH" in doc["fix"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> CentralFiles:
    return central_files(tmp_path_factory.mktemp("central"))


@pytest.fixture
def agent(files: CentralFiles, tmp_path: Path, broker: MosquittoBroker) -> Iterator[tuple[Path, Path]]:
    """An enrolled box whose agent runs (``iaflash-agent run``), stderr to a file taken for the journal stream."""
    bundle = files.build(tmp_path / "bundle", f"mqtt://127.0.0.1:{broker.port}")
    box = tmp_path / "box"
    assert CliRunner().invoke(cli, ["enrol", str(bundle), "--root", str(box), "--broker-timeout", "1"]).exit_code == 0
    config, log = box / "etc/iaflash/agent.toml", tmp_path / "agent.log"
    with log.open("w") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        env.pop("CREDENTIALS_DIRECTORY", None)
        proc = subprocess.Popen([str(BIN / "iaflash-agent"), "run", "--config", str(config)], stderr=err, env=env)
    try:
        wait_until(lambda: "agent started" in log.read_text(), timeout=60)
        yield box, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_tail_follows_the_verdicts_of_a_running_agent(agent: tuple[Path, Path]) -> None:
    """Started before the captures arrive, it prints each verdict as the agent commits it, with its reason."""
    box, log = agent
    tail = subprocess.Popen(
        [str(BIN / "iaflash-provision"), "tail", "--file", str(log), "--json", "--count", "3", "--lines", "1000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert tail.stdout is not None
    incoming = box / "var/lib/iaflash/spool/incoming"
    write_known(incoming, "A13-PK42", KNOWN[:1])
    first = tail.stdout.readline()  # printed as soon as the agent committed it
    assert json.loads(first)["capture_id"] == "selftest-model"
    write_known(incoming, "A13-PK42", KNOWN[1:])  # these two arrive while tail follows the file
    rest, _ = tail.communicate(timeout=60)
    out = first + rest
    assert tail.returncode == 0
    seen = {d["capture_id"]: d for d in map(json.loads, out.splitlines())}
    assert set(seen) == {"selftest-model", "selftest-noplate", "selftest-detector"}
    assert seen["selftest-noplate"]["outcome"] == "unreadable_plate"
    assert seen["selftest-noplate"]["reason"] == "radar could not read the plate"
    assert seen["selftest-model"]["outcome"] == "unknown_plate" and seen["selftest-model"]["total_ms"] > 0
    # the agent wrote journald priorities, since its stderr was the "journal stream"
    assert any(line.startswith("<6>{") for line in log.read_text().splitlines())


def test_tail_filters_by_outcome_in_text(agent: tuple[Path, Path]) -> None:
    box, log = agent
    write_known(box / "var/lib/iaflash/spool/incoming", "A13-PK42")
    wait_until(lambda: log.read_text().count('"verdict":') >= 3, timeout=60)
    result = CliRunner().invoke(cli, ["tail", "--file", str(log), "--no-follow", "--outcome", "unreadable_plate"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 1 and "selftest-noplate  unreadable_plate" in lines[0]
    assert "radar could not read the plate" in lines[0]
    flags = CliRunner().invoke(cli, ["tail", "--file", str(log), "--no-follow", "--outcome", "flag"])
    assert flags.exit_code == 0 and flags.output == ""  # no mismatch among the known captures
