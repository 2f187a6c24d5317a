"""engines.cli_common: every iaflash-* CLI shares the help options, exit codes and --version."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from click.testing import CliRunner

from iaflash.agent.cli.main import main as agent_main
from iaflash.central.cli import main as central_main
from iaflash.engines.cli import main as engines_main
from iaflash.provisioning.cli import cli as provision_main

CLIS = {
    "iaflash-agent": agent_main,
    "iaflash-provision": provision_main,
    "iaflash-central": central_main,
    "iaflash-engines": engines_main,
}


@pytest.mark.parametrize("name", sorted(CLIS))
def test_every_cli_prints_the_installed_version(name: str) -> None:
    result = CliRunner().invoke(CLIS[name], ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"{name}, version {version('iaflash-edge')}"


@pytest.mark.parametrize("name", sorted(CLIS))
def test_every_cli_answers_short_help(name: str) -> None:
    group = CLIS[name]
    result = CliRunner().invoke(group, ["-h"])
    assert result.exit_code == 0 and "Usage:" in result.output and "Example" in result.output
