"""The ``iaflash-provision enrol`` command (the steps are in :mod:`iaflash.provisioning.enrol.plan`)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import click

from iaflash.agent.errors import IaflashError
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR
from iaflash.engines.errors import EngineError
from iaflash.provisioning.enrol.actions import Box
from iaflash.provisioning.enrol.plan import EnrolReport, enrol
from iaflash.provisioning.enrol.source import open_source
from iaflash.provisioning.output import check_lines, print_error

__all__ = ["enrol_command", "report_lines"]


def report_lines(report: EnrolReport, site: str) -> list[str]:
    head = "would enrol" if report.dry_run else "enrol"
    lines = [f"{head} {site} from {report.source} into {report.root}"]
    width = max((len(s.name) for s in report.steps), default=10)
    lines += [f"  {s.status:<12} {s.name:<{width}}  {s.detail}" for s in report.steps]
    if report.ownership:
        lines.append(f"owners: {report.ownership}")
    if report.dry_run:
        lines.append(f"dry run: {report.changed} of {len(report.steps)} steps would change something; nothing was done")
    else:
        if report.issues:
            lines += [f"check-config: {report.config}: {len(report.issues)} problem(s)"]
            lines += [f"  {i}" for i in report.issues]
        else:
            lines.append(f"check-config: {report.config}: ok")
        if report.doctor is not None:
            s = report.doctor.summary()
            lines.append(f"doctor: {s['ok']} ok, {s['warn']} warn, {s['fail']} FAIL, {s['skip']} skipped")
            lines += [f"  {line}" for line in check_lines(report.doctor.checks)]
        lines.append(
            f"enrolled: {report.changed} steps changed"
            if report.changed
            else "nothing to do: the box already matches this bundle (0 steps changed)"
        )
    lines.append("next:")
    lines += [f"  {n}. {step}" for n, step in enumerate(report.next_steps, start=1)]
    return lines


@click.command("enrol", context_settings=CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/"),
    show_default=True,
    help="Install under this folder (staging or tests); the service user is created only for /.",
)
@click.option("--dry-run", is_flag=True, help="List each step and what it would change; change nothing.")
@click.option("--user", "user", default="iaflash", show_default=True, help="The service account (User= in the unit).")
@click.option(
    "--broker-timeout", type=click.FloatRange(0.1, 60), default=3.0, show_default=True, metavar="S",
    help="Seconds doctor waits for the broker at the end.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout.")
def enrol_command(source: Path, root: Path, dry_run: bool, user: str, broker_timeout: float, as_json: bool) -> None:
    """Install a box from the provisioning bundle SOURCE (a folder or .tar.gz from central).

    Creates the service user (with the GPU groups video/render where they exist), installs the
    HMAC key, TLS files, trust store and model bundles with their owners and modes, writes the agent
    config, installs the systemd unit, imports the first registry snapshot, then runs check-config
    and doctor and prints what to do next. Run it again at any time: it changes only what differs.

    Exit codes: 0 enrolled (doctor may warn), 3 check-config or doctor found a problem, 1 the bundle
    or a step failed (nothing after that step was done).

    \b
    Example:
      sudo iaflash-provision enrol /media/usb/enrol-A13-PK42-box-01.tar.gz
      iaflash-provision enrol enrol-A13-PK42-box-01/ --root /tmp/box --dry-run
    """
    workdir = Path(tempfile.mkdtemp(prefix="iaflash-enrol-"))
    try:
        bundle = open_source(source, workdir)
        report = enrol(bundle, Box(root, user), dry_run=dry_run, broker_timeout_s=broker_timeout)
    except (IaflashError, EngineError, OSError) as exc:
        print_error("enrol", str(exc), EXIT_ERROR, as_json)
        sys.exit(EXIT_ERROR)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        for line in report_lines(report, f"{bundle.site_id}/{bundle.device_id}"):
            click.echo(line)
    sys.exit(report.exit_code)
