"""The README's first command: the demo runs the real daemon end to end and gets every verdict right."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from iaflash.agent.cli.main import main
from iaflash.agent.demo.runner import run_demo

pytestmark = pytest.mark.slow


# amqtt 0.12 leaves its side of client connections open when it shuts down (its own transports,
# reported as ResourceWarnings by the garbage collector): tolerated for that broker only.
AMQTT_LEAKS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")


@pytest.mark.parametrize("broker", ["mosquitto", pytest.param("amqtt", marks=AMQTT_LEAKS)])
def test_demo_flags_exactly_the_planted_clones_on_either_embedded_broker(tmp_path: Path, broker: str) -> None:
    """mosquitto (MQTT 5) and the amqtt fallback (MQTT 3.1.1) give the same verdicts and flags."""
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", broker_kind=broker, count=40, echo=lines.append)
    assert result.ok, result.wrong
    assert result.outcomes["mismatch/make"] == 3 and result.outcomes["mismatch/model"] == 2
    assert result.outcomes["inconclusive"] == 1 and result.outcomes["unsupported"] == 1
    assert result.flags_received == result.expected_flags == 5 and result.duplicates == 0
    assert result.rejected == 2
    assert any("central received FLAG" in line for line in lines)
    assert any("signed by demo-registry" in line for line in lines)  # one key per role
    gc.collect()  # collect amqtt's leftovers here, under this test's filter, not in a later test


def test_demo_command_json_summary(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "d"), "--count", "16", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["ok"] is True and doc["unexpected_verdicts"] == []
    assert doc["flags_received"] == doc["flags_expected"] >= 2
    assert doc["processed"] + doc["rejected"] == 16
