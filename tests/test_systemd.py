"""The systemd unit is valid and sandboxed (systemd-analyze, offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "iaflash-agent.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def unit_with_existing_binary(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks it is executable)."""
    text = UNIT.read_text().replace("/opt/iaflash/.venv/bin/iaflash-agent", shutil.which("true") or "/bin/true")
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    """Unknown keys only warn (rc 0), so stderr must be empty, not just the exit code."""
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr.strip() == ""


def test_unit_is_sandboxed_to_an_exposure_of_at_most_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr[-500:]
    assert float(match.group(1)) <= 2.0


def test_a_stopped_crash_loop_never_leaves_the_unit_failed_for_good(tmp_path: Path) -> None:
    """No start limit (StartLimitIntervalSec=0): systemd retries every RestartSec forever, so the
    agent comes back by itself once the cause is fixed; poison captures are quarantined meanwhile."""
    text = UNIT.read_text()
    unit_section = text.split("[Service]")[0]
    assert "StartLimitIntervalSec=0" in unit_section and "StartLimitBurst" not in text
    assert "Restart=on-failure" in text
    restart = re.search(r"^RestartSec=(\d+)$", text, re.M)
    assert restart and 5 <= int(restart.group(1)) <= 60
    shown = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0 and shown.stderr.strip() == ""


def test_unit_is_a_notify_service_with_a_watchdog_and_the_key_as_a_credential() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=60",
        "Restart=on-failure",
        "LoadCredential=hmac-key:",
        "ExecStart=/opt/iaflash/.venv/bin/iaflash-agent run --config /etc/iaflash/agent.toml",
    ):
        assert line in text
