"""The ``iaflash-provision selftest`` command (the checks are in :mod:`iaflash.provisioning.selftest`).

Run as root, it reads the HMAC key (which may be a root-only systemd credential file), then drops
to the service user, as the agent runs: whatever SQLite or the engine cache writes is then owned
by that user, and the selftest proves that user can read the bundles and the TLS files.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

import click

from iaflash.agent.config import load_config, read_secret
from iaflash.agent.errors import IaflashError
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR
from iaflash.engines.errors import EngineError
from iaflash.provisioning.doctor.report import DEFAULT_CONFIG, SERVICE_USER, Report
from iaflash.provisioning.output import check_lines, print_error

__all__ = ["drop_privileges", "selftest_command"]


def drop_privileges(user: str) -> str:
    """As root: become ``user`` (its groups too) and say so; otherwise, or when it does not exist, say why not."""
    if os.geteuid() != 0:
        return f"running as {pwd.getpwuid(os.geteuid()).pw_name}"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return f"running as root: the service user {user} does not exist here"
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
    return f"running as {user}, the service user"


def _key_as_root(config: Path) -> bytes | None:
    """The HMAC key, read before dropping privileges (None when it cannot be read: the selftest says why)."""
    try:
        cfg = load_config(config)
        return read_secret("hmac-key", cfg.registry.hmac_key_file, what="HMAC key", config_key="registry.hmac_key_file")
    except IaflashError:
        return None


def _summary(report: Report) -> str:
    s = report.summary()
    verdict = "the box works end to end" if report.exit_code == 0 else "problems found"
    return f"selftest: {s['ok']} ok, {s['warn']} warn, {s['fail']} FAIL, {s['skip']} skipped: {verdict}"


@click.command("selftest", context_settings=CONTEXT)
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_CONFIG,
    show_default=True, help="The agent config of this box.",
)  # fmt: skip
@click.option("--timeout", type=click.FloatRange(1, 600), default=60.0, show_default=True, metavar="S",
              help="Seconds to wait for the verdicts (a first TensorRT start may need more).")  # fmt: skip
@click.option("--broker-timeout", type=click.FloatRange(0.5, 120), default=10.0, show_default=True, metavar="S",
              help="Seconds to wait for the broker to acknowledge the events.")  # fmt: skip
@click.option("--user", default=SERVICE_USER, show_default=True, help="Run as this user when started as root.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout.")
def selftest_command(config_path: Path, timeout: float, broker_timeout: float, user: str, as_json: bool) -> None:
    """Drop known captures through this box's real pipeline and broker, and check the verdicts.

    Uses the installed model, detector, registry (read only) and broker, with a temporary spool
    and outbox: production captures, the outbox and the agent's MQTT session are not touched.
    Events go under <prefix>/<site>/<device>/selftest/, which central ignores.

    Exit codes: 0 every check passed (warnings allowed), 3 a check FAILed (each with its fix),
    1 the selftest itself could not run.

    \b
    Example:
      sudo iaflash-provision selftest
      iaflash-provision selftest --config /etc/iaflash/agent.toml --json
    """
    from iaflash.provisioning.selftest import run_selftest  # noqa: PLC0415  # keeps `--help` fast

    key = _key_as_root(config_path)
    who = drop_privileges(user)
    try:
        report = run_selftest(config_path, timeout_s=timeout, broker_timeout_s=broker_timeout, hmac_key=key)
    except (IaflashError, EngineError, OSError) as exc:
        print_error("selftest", f"the selftest could not run: {exc}", EXIT_ERROR, as_json)
        sys.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "command": "selftest", "user": who}, indent=2))
    else:
        click.echo(f"selftest of {config_path} ({who})")
        for line in check_lines(report.checks):
            click.echo(line)
        click.echo(_summary(report))
    sys.exit(report.exit_code)
