"""iaflash.agent.cli.main: help for every command, check-config (text, --json, --syntax-only) and run's config errors.

Exit codes: 0 ok, 1 operational error, 2 usage error, 3 check found problems.
The demo command itself is covered elsewhere; only its help is checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from onnx_builders import LABELS, classifier_onnx

from iaflash.agent.cli.main import main
from iaflash.engines.bundle import Preprocessing, write_bundle
from iaflash.engines.cli_common import EXIT_ERROR, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE
from iaflash.engines.signing import generate_keypair, sign_bundle

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    """A config whose bundle, key file and directories all exist: a real tiny ONNX bundle and a 0600 key."""
    bundle = tmp_path / "bundle"
    write_bundle(
        bundle,
        onnx_bytes=classifier_onnx(num_classes=len(LABELS)),
        labels=LABELS,
        name="tiny-classifier",
        version="1.0.0",
        input_name="input",
        input_shape=["N", 3, 8, 8],
        preprocessing=Preprocessing(height=8, width=8),
        output_name="logits",
    )
    (tmp_path / "trust").mkdir()
    private, public = generate_keypair(tmp_path / "publisher")
    public.rename(tmp_path / "trust" / public.name)
    sign_bundle(bundle, private, signer="test-publisher")
    key = tmp_path / "hmac.key"
    key.write_text("00" * 32 + "\n")
    key.chmod(0o600)
    (tmp_path / "var").mkdir()
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[spool]\ndir = "{tmp_path}/var/spool"\n'
        f'[model]\nbundle = "{bundle}"\n'
        f'[registry]\ndb = "{tmp_path}/var/registry.db"\nhmac_key_file = "{key}"\n'
        f'[outbox]\ndb = "{tmp_path}/var/state.db"\n'
        f'[security]\ntrust_dir = "{tmp_path}/trust"\n'
    )
    return path


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    """A syntactically valid config whose bundle, key file and directories are all wrong."""
    key = tmp_path / "loose.key"
    key.write_text("00" * 32)
    key.chmod(0o644)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = tmp_path / "bad.toml"
    path.write_text(
        f'[spool]\ndir = "{blocker}/spool"\n'
        f'[model]\nbundle = "{tmp_path}/no-bundle"\n'
        f'[registry]\ndb = "{tmp_path}/var/registry.db"\nhmac_key_file = "{key}"\n'
        f'[outbox]\ndb = "{tmp_path}/var/state.db"\n'
    )
    return path


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return CliRunner()


# ---------------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[], ["run"], ["check-config"], ["demo"]], ids=["main", "run", "check-config", "demo"]
)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_has_help_with_an_example(runner: CliRunner, command: list[str], flag: str) -> None:
    """`iaflash-agent [cmd] -h` exits 0 and shows usage and an 'Example:' section."""
    result = runner.invoke(main, [*command, flag])
    assert result.exit_code == EXIT_OK, result.output
    assert "Usage:" in result.output
    assert "Example:" in result.output
    assert f"iaflash-agent {command[0] if command else 'demo'}" in result.output


def test_main_help_lists_every_command(runner: CliRunner) -> None:
    """The group help lists run, check-config and demo."""
    result = runner.invoke(main, ["-h"])
    for name in ("run", "check-config", "demo"):
        assert name in result.output


def test_version_option(runner: CliRunner) -> None:
    """--version prints the program name and version."""
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == EXIT_OK
    assert "iaflash-agent, version 0.1.0" in result.output


@pytest.mark.parametrize(
    "argv", [["nope"], ["check-config"], ["run"], ["check-config", "--bogus", "x.toml"], ["demo", "--count", "3"]]
)
def test_usage_errors_exit_2(runner: CliRunner, argv: list[str]) -> None:
    """Unknown commands, missing arguments, unknown options and out-of-range values exit 2."""
    result = runner.invoke(main, argv)
    assert result.exit_code == EXIT_USAGE
    assert "Error:" in result.output


# ---------------------------------------------------------------------------------------------------
# check-config
# ---------------------------------------------------------------------------------------------------


def test_check_config_on_a_good_file_exits_0(runner: CliRunner, good_config: Path) -> None:
    """A valid file whose bundle, key and directories are usable: exit 0 and '<file>: ok'."""
    result = runner.invoke(main, ["check-config", str(good_config)])
    assert result.exit_code == EXIT_OK, result.output
    assert result.stdout.strip() == f"{good_config}: ok"
    assert result.stderr == ""


def test_check_config_reports_every_file_problem_with_file_key_and_fix(runner: CliRunner, bad_config: Path) -> None:
    """Missing bundle, loose key mode and a spool under a regular file: exit 3, one block each."""
    result = runner.invoke(main, ["check-config", str(bad_config)])
    assert result.exit_code == EXIT_PROBLEMS
    err = result.stderr
    assert f"{bad_config}: model.bundle: " in err
    assert "fix: point it at a bundle directory" in err
    assert f"{bad_config}: registry.hmac_key_file: " in err
    assert "readable by group/others (mode 644)" in err
    assert f"fix: chmod 600 {bad_config.parent / 'loose.key'}" in err
    assert f"{bad_config}: spool.dir: " in err
    assert "fix: create the directory or fix the path" in err
    assert err.count("    fix: ") == 3
    assert err.rstrip().endswith(f"{bad_config}: 3 problem(s)")
    assert result.stdout == ""


def test_check_config_reports_key_errors_with_exit_3(runner: CliRunner, tmp_path: Path) -> None:
    """Validation errors are printed as file:line: key: problem / fix (with "did you mean") and exit 3."""
    path = tmp_path / "typo.toml"
    path.write_text("[decision]\nmin_top_1 = 0.5\n[mqtt]\nport = 0\n")
    result = runner.invoke(main, ["check-config", str(path)])
    assert result.exit_code == EXIT_PROBLEMS
    assert f"{path}:2: decision.min_top_1: Extra inputs are not permitted\n" in result.stderr
    assert "    fix: did you mean 'min_top1'? remove it or correct its spelling; allowed keys here: " in result.stderr
    assert f"{path}:4: mqtt.port: " in result.stderr
    assert "    fix: use a value inside the documented range" in result.stderr
    assert f"{path}: 2 problem(s)" in result.stderr


def test_check_config_json_on_problems(runner: CliRunner, bad_config: Path) -> None:
    """--json prints one document {file, ok, issues[{file, line, key, problem, fix}]} on stdout; exit 3."""
    result = runner.invoke(main, ["check-config", "--json", str(bad_config)])
    assert result.exit_code == EXIT_PROBLEMS
    doc = json.loads(result.stdout)
    assert set(doc) == {"file", "ok", "issues"}
    assert doc["file"] == str(bad_config)
    assert doc["ok"] is False
    assert sorted(i["key"] for i in doc["issues"]) == ["model.bundle", "registry.hmac_key_file", "spool.dir"]
    for issue in doc["issues"]:
        assert set(issue) == {"file", "line", "key", "problem", "fix"}
        assert issue["file"] == str(bad_config)
        assert issue["problem"]
        assert issue["fix"]


def test_check_config_json_on_a_good_file(runner: CliRunner, good_config: Path) -> None:
    """--json on a usable file: ok true, no issues, exit 0."""
    result = runner.invoke(main, ["check-config", str(good_config), "--json"])
    assert result.exit_code == EXIT_OK
    assert json.loads(result.stdout) == {"file": str(good_config), "ok": True, "issues": []}


def test_check_config_json_on_a_syntax_error(runner: CliRunner, tmp_path: Path) -> None:
    """Broken TOML in --json mode is one '(syntax)' issue."""
    path = tmp_path / "broken.toml"
    path.write_text("[site\n")
    result = runner.invoke(main, ["check-config", "--json", str(path)])
    assert result.exit_code == EXIT_PROBLEMS
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert [(i["file"], i["key"]) for i in doc["issues"]] == [(str(path), "(syntax)")]


def test_check_config_syntax_only_skips_file_checks(runner: CliRunner, bad_config: Path) -> None:
    """--syntax-only validates keys and values only: the missing bundle and loose key are not looked at."""
    result = runner.invoke(main, ["check-config", "--syntax-only", "--json", str(bad_config)])
    assert result.exit_code == EXIT_OK
    assert json.loads(result.stdout) == {"file": str(bad_config), "ok": True, "issues": []}


def test_check_config_syntax_only_still_refuses_bad_values(runner: CliRunner, tmp_path: Path) -> None:
    """--syntax-only still reports key and value errors, with exit 3."""
    path = tmp_path / "bad.toml"
    path.write_text("[log]\nformat = 'xml'\n")
    result = runner.invoke(main, ["check-config", "--syntax-only", str(path)])
    assert result.exit_code == EXIT_PROBLEMS
    assert f"{path}:2: log.format: " in result.stderr


def test_check_config_on_a_missing_file_exits_3(runner: CliRunner, tmp_path: Path) -> None:
    """A config file that does not exist is a problem of the check: exit 3, '(file)' key."""
    path = tmp_path / "missing.toml"
    result = runner.invoke(main, ["check-config", "--json", str(path)])
    assert result.exit_code == EXIT_PROBLEMS
    doc = json.loads(result.stdout)
    assert [(i["file"], i["key"]) for i in doc["issues"]] == [(str(path), "(file)")]


def test_check_config_as_a_real_subprocess(good_config: Path, bad_config: Path) -> None:
    """`python -m iaflash.agent check-config FILE` works as a process: exit 0 on a good file, 3 on a bad one."""
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    ok = subprocess.run(
        [sys.executable, "-m", "iaflash.agent", "check-config", str(good_config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert ok.returncode == EXIT_OK, ok.stderr
    assert ok.stdout.strip() == f"{good_config}: ok"
    bad = subprocess.run(
        [sys.executable, "-m", "iaflash.agent", "check-config", "--json", str(bad_config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == EXIT_PROBLEMS
    assert json.loads(bad.stdout)["ok"] is False


# ---------------------------------------------------------------------------------------------------
# run (only its refusals: the daemon itself is covered by the end-to-end tests)
# ---------------------------------------------------------------------------------------------------


def test_run_with_a_missing_config_exits_1_naming_the_file(runner: CliRunner, tmp_path: Path) -> None:
    """`run --config missing.toml` exits 1 with an error naming the file and the '(file)' key."""
    path = tmp_path / "missing.toml"
    result = runner.invoke(main, ["run", "--config", str(path)])
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.startswith(f"error: {path}: (file): cannot read")
    assert result.stdout == ""


def test_run_with_an_invalid_config_exits_1_listing_each_issue(runner: CliRunner, tmp_path: Path) -> None:
    """`run` refuses a config with bad keys before starting anything: one 'error:' line per issue."""
    path = tmp_path / "agent.toml"
    path.write_text("[mqtt]\nport = 0\nprotocol = '4'\n")
    result = runner.invoke(main, ["run", "--config", str(path)])
    assert result.exit_code == EXIT_ERROR
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert [line.split(": ")[1:3] for line in lines] == [[f"{path}:2", "mqtt.port"], [f"{path}:3", "mqtt.protocol"]]


def test_check_config_reports_an_unsigned_bundle_with_the_fix(good_config: Path) -> None:
    """Removing the bundle's signature makes check-config exit 3 naming model.bundle and how to fix it."""
    (good_config.parent / "bundle" / "manifest.sig").unlink()
    result = CliRunner().invoke(main, ["check-config", "--json", str(good_config)])
    assert result.exit_code == 3
    doc = json.loads(result.output)
    (issue,) = doc["issues"]
    assert issue["key"] == "model.bundle"
    assert "not signed" in issue["problem"]
