"""``iaflash-provision model install | list | rollback`` (docs/BUNDLES.md, docs/TECHNICIAN.md).

Exit codes: 0 done (or nothing to do), 1 refused or failed (nothing changed, or switched back),
2 usage. Text mode prints each step as it happens; ``--json`` prints one document on stdout, also
on failure (the provisioning CLI's error document: ``ok``, ``command``, ``exit_code``, ``error``, ``fix``).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from iaflash.agent.config import load_config
from iaflash.agent.errors import IaflashError
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR
from iaflash.provisioning.doctor.checks import DEFAULT_CONFIG
from iaflash.provisioning.model.history import listing, rollback
from iaflash.provisioning.model.install import install
from iaflash.provisioning.model.steps import Report
from iaflash.provisioning.model.store import SLOTS
from iaflash.provisioning.output import print_error

__all__ = ["model"]

F = TypeVar("F", bound=Callable[..., Any])


def _failures(command: str) -> Callable[[F], F]:
    """Our errors: ``error: ...`` on stderr (and a JSON document on stdout with --json), exit 1."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except IaflashError as exc:
                print_error(command, str(exc), EXIT_ERROR, bool(kwargs.get("as_json")))
                sys.exit(EXIT_ERROR)

        return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature; mypy can't see it

    return decorate


def _say(as_json: bool) -> Callable[[str, str], None] | None:
    if as_json:
        return None
    return lambda step, detail: click.echo(f"{step:<12} {detail}")


def _finish(report: Report, as_json: bool, summary: str) -> None:
    if as_json:
        doc = {**report.to_dict(), "exit_code": 0 if report.ok else EXIT_ERROR}
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    elif report.ok:
        click.echo(summary)
    else:
        click.echo(
            f"error: {report.command}: the agent refused the new bundle; the box runs what it ran before", err=True
        )
    sys.exit(0 if report.ok else EXIT_ERROR)


_config = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The agent's config: model.store_dir, the slots' paths, the trust store, the state folder.",
)
_json = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
_reload = click.option(
    "--reload/--no-reload",
    default=True,
    show_default=True,
    help="Signal the running agent (SIGHUP) to load the new bundle now, and wait for its answer.",
)
_wait = click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, 3600),
    default=60.0,
    show_default=True,
    metavar="S",
    help="Seconds to wait for the agent to report the reload.",
)
_slot = click.option(
    "--slot",
    type=click.Choice(SLOTS),
    help="classifier (model.bundle), detector (model.detector_bundle) or evidence (evidence.detector_bundle); "
    "default: from the bundle's task.",
)


@click.group("model", context_settings=CONTEXT)
def model() -> None:
    """Model bundles: install side by side, list, roll back; the agent reloads without a restart.

    \b
    Example:
      sudo iaflash-provision model install /media/usb/vmmr-2026.12.0.tgz
      iaflash-provision model list
      sudo iaflash-provision model rollback
    """


@model.command("install", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@_config
@_slot
@_reload
@_wait
@_json
@_failures("model install")
def install_cmd(
    bundle: Path,
    config_path: Path,
    slot: str | None,
    reload: bool,
    wait_s: float,
    as_json: bool,
) -> None:
    """Verify BUNDLE (a folder or a .tar/.tgz of one), install it beside the others, switch to it, reload.

    BUNDLE is checked exactly as the agent checks it (signature by a key of security.trust_dir,
    every file's sha256) and loaded once in ONNX Runtime. It goes to
    <model.store_dir>/<name>/<version>/, then the slot's path (model.bundle for a classifier)
    becomes a link to it in one atomic rename. The running agent is sent SIGHUP and loads it
    without dropping a capture; if it refuses the bundle, the link is switched back. Versions
    beyond model.keep_versions are removed (never one in use). A version older than the newest
    this box ran is refused unless the publisher signed it as a rollback (docs/SIGNING.md);
    `model rollback` goes back to an installed one. Nothing changes before the switch.

    \b
    Example:
      sudo iaflash-provision model install /media/usb/vmmr-effnet-b0-2026.12.0.tgz
      sudo iaflash-provision model install ./face-detector/ --slot evidence --json
    """
    cfg = load_config(config_path)
    report = install(cfg, bundle, slot_name=slot, reload=reload, wait_s=wait_s, say=_say(as_json))
    current = report.details.get("current")
    _finish(report, as_json, f"done: the {report.slot} slot uses {current}")


@model.command("rollback", context_settings=CONTEXT)
@click.argument("version", required=False)
@_config
@click.option("--slot", type=click.Choice(SLOTS), default="classifier", show_default=True, help="Which slot.")
@_reload
@_wait
@_json
@_failures("model rollback")
def rollback_cmd(version: str | None, config_path: Path, slot: str, reload: bool, wait_s: float, as_json: bool) -> None:
    """Switch back to the previous version (or to VERSION, or NAME/VERSION) still installed, then reload.

    Without VERSION it goes one step back in the slot's history; run it again to go further back.
    The version is verified again first (a key removed from the trust store since is refused).

    \b
    Example:
      sudo iaflash-provision model rollback
      sudo iaflash-provision model rollback 2026.11.0 --json
    """
    cfg = load_config(config_path)
    report = rollback(cfg, version, slot_name=slot, reload=reload, wait_s=wait_s, say=_say(as_json))
    _finish(report, as_json, f"done: the {report.slot} slot uses {report.details.get('current', 'what it used')}")


@model.command("list", context_settings=CONTEXT)
@_config
@_json
@_failures("model list")
def list_cmd(config_path: Path, as_json: bool) -> None:
    """Show each slot's link, the versions installed, which one is in use, running, and the rollback target.

    \b
    Example:
      iaflash-provision model list
      iaflash-provision model list --config /etc/iaflash/agent.toml --json
    """
    doc = listing(load_config(config_path))
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    for name, slot in doc["slots"].items():
        if slot["link"] is None:
            click.echo(f"{name:<11} ({slot['config_key']} is not set)")
            continue
        click.echo(f"{name:<11} {slot['link']} -> {slot['current'] or '(' + slot['link_kind'] + ')'}")
        for v in slot["installed"]:
            mark = "*" if v["current"] else " "
            signer = (v.get("signed_by") or {}).get("name", "unsigned")
            flags = [f for f, on in (("running", v["running"]), ("rollback target", v["rollback_to"])) if on]
            extra = f"  ({', '.join(flags)})" if flags else ""
            click.echo(f"  {mark} {v['name']} {v['version']}  installed {v['installed_at']}  signed by {signer}{extra}")
    agent = doc["agent"]
    if agent["pid"] is None:
        click.echo("agent       not running")
    else:
        last = agent["last_reload"]
        said = "no reload since start"
        if last:
            outcome = "ok" if last["ok"] else f"FAILED: {last['error']}"
            said = f"last reload {outcome} at {last['at']} ({last['trigger']})"
        click.echo(f"agent       pid {agent['pid']}, {said}")
