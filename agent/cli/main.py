"""``iaflash-agent``: run the daemon, check a config, run the demo.

Exit codes: 0 ok, 1 operational error, 2 usage error, 3 check found problems.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from iaflash.agent.cli.eval import commands as eval_commands
from iaflash.agent.cli.fit import fit
from iaflash.agent.config import load_config
from iaflash.agent.config_checks import semantic_issues
from iaflash.agent.errors import ConfigError, ConfigIssue, EngineError, IaflashError
from iaflash.agent.health import setup_logging
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR, EXIT_OK, EXIT_PROBLEMS, version_option

log = logging.getLogger(__name__)


def _err(message: str) -> None:
    click.echo(f"error: {message}", err=True)


@click.group(context_settings=CONTEXT)
@version_option("iaflash-agent")
def main() -> None:
    """iaflash-agent: the radar-site daemon that flags cloned licence plates.

    \b
    Example:
      iaflash-agent demo
      iaflash-agent check-config /etc/iaflash/agent.toml
      iaflash-agent run --config /etc/iaflash/agent.toml
    """


@main.command(context_settings=CONTEXT)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The agent's TOML config file.",
)
def run(config_path: Path) -> None:
    """Run the daemon until SIGTERM/SIGINT (systemd runs this); SIGHUP reloads the model bundles.

    \b
    Example:
      iaflash-agent run --config /etc/iaflash/agent.toml
    """
    from iaflash.agent.logformat import configure_logging  # noqa: PLC0415  # keeps `--help` fast
    from iaflash.agent.service import Service  # noqa: PLC0415  # keeps `--help` fast

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        for issue in exc.issues:
            _err(str(issue))
        sys.exit(EXIT_ERROR)
    configure_logging(cfg.log.level, cfg.log.format)  # journald priorities, the reason in text lines
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the capture in flight, then exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service = Service(cfg)
    # SIGHUP: load the bundles the config's paths name now, without losing a capture (docs/BUNDLES.md).
    signal.signal(signal.SIGHUP, lambda _signum, _frame: service.request_reload("SIGHUP"))
    try:
        service.start(stop)
    except (IaflashError, EngineError) as exc:
        log.error("cannot start: %s", exc)
        service.stop()
        sys.exit(EXIT_ERROR)
    sys.exit(service.run(stop))


@main.command("check-config", context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout.")
@click.option("--syntax-only", is_flag=True, help="Only validate keys and values; don't look at files.")
def check_config(file: Path, as_json: bool, syntax_only: bool) -> None:
    """Validate a config file; print every problem with its file, key and fix.

    Exits 0 when the file is usable, 3 when problems were found.

    \b
    Example:
      iaflash-agent check-config /etc/iaflash/agent.toml
    """
    issues: list[ConfigIssue]
    try:
        cfg = load_config(file)
        issues = [] if syntax_only else semantic_issues(cfg, str(file))
    except ConfigError as exc:
        issues = exc.issues
    if as_json:
        doc: dict[str, Any] = {"file": str(file), "ok": not issues, "issues": [vars(i) for i in issues]}
        click.echo(json.dumps(doc, indent=2))
    else:
        for issue in issues:
            where = f"{issue.file}:{issue.line}" if issue.line else issue.file
            click.echo(f"{where}: {issue.key}: {issue.problem}\n    fix: {issue.fix}", err=True)
        click.echo(f"{file}: {'ok' if not issues else f'{len(issues)} problem(s)'}", err=bool(issues))
    sys.exit(EXIT_PROBLEMS if issues else EXIT_OK)


@main.command(context_settings=CONTEXT)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-run"),
    show_default=True,
    help="Where the demo writes its model, registry, spool and state (wiped first).",
)
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="Embedded broker: mosquitto if installed (MQTT 5), else amqtt (MQTT 3.1.1).",
)
@click.option("--count", type=click.IntRange(16, 500), default=40, show_default=True, help="Number of demo captures.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def demo(workdir: Path, broker_kind: str, count: int, as_json: bool) -> None:
    """Run the whole job end to end on generated data: spool → model → registry → verdict → MQTT.

    Starts a local broker on 127.0.0.1, trains a DEMO model on a synthetic fleet, imports a
    demo registry in which some plates are registered to another make/model, runs the real
    daemon, and subscribes as central would.

    \b
    Example:
      iaflash-agent demo
      iaflash-agent demo --workdir /tmp/iaflash-demo --count 100 --json
    """
    from iaflash.agent.demo.runner import run_demo  # noqa: PLC0415  # demo-only imports

    setup_logging("WARNING", "text")
    echo = (lambda _msg: None) if as_json else click.echo
    try:
        import onnx  # noqa: F401, PLC0415  # the [demo] extra: checked first, before minutes of set-up

        result = run_demo(workdir, broker_kind=broker_kind, count=count, echo=echo)
    except ModuleNotFoundError as exc:  # the [demo] extra: onnx builds the demo models, amqtt is the fallback broker
        if (exc.name or "").split(".")[0] not in ("onnx", "amqtt"):
            raise
        _err(f"the demo needs the Python package {exc.name!r} ([demo] extra); fix: pip install 'iaflash-edge[demo]'")
        sys.exit(EXIT_ERROR)
    summary = {
        "processed": result.processed,
        "outcomes": dict(sorted(result.outcomes.items())),
        "flags_expected": result.expected_flags,
        "flags_received": result.flags_received,
        "duplicates": result.duplicates,
        "rejected": result.rejected,
        "unexpected_verdicts": result.wrong,
        "seconds": round(result.seconds, 1),
        "evidence_stored": result.evidence_stored,
        "review": result.review,
        "ok": result.ok,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo("\nSummary")
        click.echo(f"  processed        {result.processed}")
        for outcome, n in sorted(result.outcomes.items()):
            click.echo(f"    {outcome:<18}{n}")
        click.echo(
            f"  flags received   {result.flags_received} of {result.expected_flags} expected "
            f"(duplicates {result.duplicates})"
        )
        click.echo(f"  rejected         {result.rejected} (see {workdir}/spool/rejected/*.error.json)")
        click.echo(f"  time             {result.seconds:.1f}s")
        click.echo("  result           " + ("OK" if result.ok else f"UNEXPECTED: {result.wrong}"))
        if result.review:
            click.echo(f"  review page      {result.evidence_stored} flag(s) with their evidence in the review store:")
            for line in result.review:
                click.echo(f"                   {line}")
    sys.exit(EXIT_OK if result.ok else EXIT_ERROR)


for _command in eval_commands:  # calibrate and evaluate live beside their code (agent/cli_eval.py)
    main.add_command(_command)
main.add_command(fit)  # fit lives beside its code (agent/cli/fit.py)
