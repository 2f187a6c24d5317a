"""``iaflash-provision``: the field technician's CLI.

Exit codes: 0 ok, 1 operational error (bad file, gap, key mismatch...), 2 usage error (Click),
3 a check found problems (``doctor``). Diagnostics go to stderr; ``--json`` puts one
stable document on stdout. Errors read ``error: <where>: <what>; fix: <how>``.
"""

from __future__ import annotations

import functools
import json
import logging
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from iaflash.agent.cli.progress import progress_callback
from iaflash.agent.config import Config, load_config, read_secret
from iaflash.agent.errors import AlreadyApplied, IaflashError, RegistryError
from iaflash.agent.registry.cache import import_signed_subset, read_state
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.agent.registry.record import RegistryState
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR, version_option
from iaflash.engines.errors import EngineError
from iaflash.provisioning.doctor.checks import DEFAULT_CONFIG, Report, run_doctor
from iaflash.provisioning.enrol.command import enrol_command
from iaflash.provisioning.model.cli import model as model_group
from iaflash.provisioning.output import print_error
from iaflash.provisioning.ownership import give_to_agent
from iaflash.provisioning.selftest_command import selftest_command
from iaflash.provisioning.tail import tail_command

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


_WARNINGS = "iaflash.warnings"  # ctx.meta key: what a command warns about, said after its result or its error


def _operational(func: F) -> F:
    """Print our errors as ``error: ...`` on stderr and exit 1 (Click keeps exit 2 for usage errors).

    The command's warnings (``ctx.meta[_WARNINGS]``) follow on stderr as ``warning: ...``, whether it failed or not.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return func(*args, **kwargs)
        except (IaflashError, EngineError) as exc:  # EngineError: signature refusals (iaflash.engines.signing)
            command = " ".join(ctx.command_path.split()[1:])  # e.g. "registry import"
            print_error(command, str(exc), EXIT_ERROR, bool(kwargs.get("as_json")))  # --json: the error document
            sys.exit(EXIT_ERROR)
        finally:
            for warning in ctx.meta.pop(_WARNINGS, []):
                click.echo(f"warning: {warning}", err=True)

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature; mypy can't see it


def _emit(doc: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(text)


def _read_key_file(path: Path) -> bytes:
    """An explicit --key-file obeys the same rule as the configured one: mode 0600."""
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the HMAC key ({exc.strerror}); fix: check --key-file") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RegistryError(
            f"{path}: HMAC key file is readable by group/others (mode {stat.S_IMODE(mode):o}); fix: chmod 600 {path}"
        )
    return raw


@click.group(context_settings=CONTEXT)
@version_option("iaflash-provision")
def cli() -> None:
    """Install, enrol, check and fix an iaflash edge box.

    \b
    Example:
      iaflash-provision registry import /media/usb/siv-snapshot.jsonl.gz
    """


@cli.group("registry", context_settings=CONTEXT)
def registry() -> None:
    """The local SIV subset cache: import subset files, show its state.

    \b
    Example:
      iaflash-provision registry status --json
    """


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Agent config file (TOML); default: built-in defaults.",
)
_db_option = click.option(
    "--db",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Registry cache file; default: [registry] db from the config.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout.")


@registry.command("import", context_settings=CONTEXT)
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@_config_option
@_db_option
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="HMAC key file (hex, mode 0600); default: systemd credential hmac-key or [registry] hmac_key_file.",
)
@_json_option
@_operational
def import_cmd(file: Path, config_path: Path | None, db: Path | None, key_file: Path | None, as_json: bool) -> None:
    """Import a registry subset FILE (snapshot or delta) into the cache, in one transaction.

    FILE must be signed (FILE.sig, written at central by `iaflash-engines sign FILE --key KEY`) by a
    key whose .pub is in [security] trust_dir/registry/; [security] allow_unsigned = true also accepts
    unsigned files, for development only. The bytes whose signature was checked are the bytes
    imported. On any error the cache is left exactly as it was. A delta must follow the cache's seq;
    a file older than what the box applied (seq) is refused.

    \b
    Example:
      iaflash-provision registry import siv-0042.jsonl.gz --config /etc/iaflash/agent.toml
    """
    cfg = load_config(config_path)
    db_path = db or cfg.registry.db
    raw = (
        _read_key_file(key_file)
        if key_file
        else read_secret("hmac-key", cfg.registry.hmac_key_file, what="HMAC key", config_key="registry.hmac_key_file")
    )
    expected = key_id(load_hmac_key(raw, cfg.registry.hmac_key_id))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc, text = _import_file(cfg, file, db_path, expected)
    finally:  # as root: the files it wrote, even for a refused file (refusals are counted), go to the agent's user
        warnings = give_to_agent(_written(db_path, cfg.trust_state_file))
        click.get_current_context().meta[_WARNINGS] = warnings  # said after the result, or after the error
    _emit({**doc, "warnings": warnings}, as_json, text)


def _written(db_path: Path, state_file: Path) -> list[Path]:
    """What an import may write: the cache, its -wal and -shm, the trust state and its lock."""
    return [
        *(db_path.with_name(db_path.name + suffix) for suffix in ("", "-wal", "-shm")),
        *(state_file.with_name(state_file.name + suffix) for suffix in ("", ".lock")),
    ]


def _import_file(cfg: Config, file: Path, db_path: Path, expected: str) -> tuple[dict[str, Any], str]:
    """Import ``file`` with progress on stderr; the command's JSON document and its line of text."""
    records = [0]
    start = time.perf_counter()
    with progress_callback(f"importing {file.name}", "records") as show:

        def progress(done: int, total: int) -> None:
            records[0] = done
            show(done, total)

        try:
            state, signer = import_signed_subset(
                db_path,
                file,
                trust_dir=cfg.security.trust_dir,
                allow_unsigned=cfg.security.allow_unsigned,
                expected_key_id=expected,
                progress=progress,
                state_file=cfg.trust_state_file,
            )
        except AlreadyApplied:  # signature checked first; a re-import of the last delta changes nothing: exit 0
            applied = read_state(db_path)
            assert applied is not None  # AlreadyApplied is raised only against a cache holding that seq
            doc = {"command": "registry import", "file": str(file), "db": str(db_path), "records": 0,
                   "already_applied": True, "state": applied.to_dict(), "signed_by": None}  # fmt: skip
            return doc, (f"already at seq {applied.seq}: {file.name} (delta seq {applied.seq} of "
                         f"{applied.dataset_id}) was applied before; nothing changed in {db_path}")  # fmt: skip
    seconds = time.perf_counter() - start
    rate = records[0] / seconds if seconds > 0 else 0.0
    doc = {
        "command": "registry import",
        "file": str(file),
        "db": str(db_path),
        "records": records[0],
        "seconds": round(seconds, 3),
        "records_per_s": round(rate),
        "state": state.to_dict(),
        "signed_by": signer,
    }
    text = (
        f"imported {state.kind} {state.dataset_id} seq {state.seq}: {records[0]} records "
        f"in {seconds:.1f} s ({rate:,.0f} records/s); {state.count} vehicles in {db_path}"
    )
    return doc, text


def _status_text(db_path: Path, state: RegistryState | None, max_age: float) -> str:
    if state is None:
        return f"{db_path}: empty (never imported); import a snapshot"
    age = state.age_hours()
    stale = " (STALE)" if age > max_age else ""
    return (
        f"{db_path}: dataset {state.dataset_id} seq {state.seq} ({state.kind}), key id {state.key_id}, "
        f"{state.count} vehicles, age {age:.1f} h{stale} (max {max_age:g} h), "
        f"imported {state.imported_at.isoformat(timespec='seconds')}"
    )


@registry.command("status", context_settings=CONTEXT)
@_config_option
@_db_option
@_json_option
@_operational
def status_cmd(config_path: Path | None, db: Path | None, as_json: bool) -> None:
    """Show the cache's dataset, seq, key id, age and vehicle count.

    \b
    Example:
      iaflash-provision registry status --config /etc/iaflash/agent.toml --json
    """
    cfg = load_config(config_path)
    db_path = db or cfg.registry.db
    state = read_state(db_path)
    max_age = cfg.registry.max_age_hours
    age = None if state is None else round(state.age_hours(), 3)
    doc = {
        "command": "registry status",
        "db": str(db_path),
        "state": None if state is None else state.to_dict(),
        "age_hours": age,
        "max_age_hours": max_age,
        "stale": age is None or age > max_age,
    }
    _emit(doc, as_json, _status_text(db_path, state, max_age))


_LABEL = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip", "error": "ERROR"}
_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim", "error": "bold magenta"}


def _print_report(report: Report) -> None:
    """One line per check (status, name, finding), its fix indented below; colours only on a terminal."""
    s, code = report.summary(), report.exit_code
    verdict = {0: "no problems", 3: "problems found"}.get(code, "doctor could not finish")
    total = f"doctor: {s['ok']} ok, {s['warn']} warn, {s['fail']} FAIL, {s['skip']} skipped" + (
        f", {s['error']} errors" if s["error"] else ""
    )
    if not sys.stdout.isatty():
        for c in report.checks:
            fix = f"\n{'':<20}fix: {c.fix}" if c.fix and c.status != "ok" else ""
            click.echo(f"{_LABEL[c.status]:<5} {c.name:<13} {c.finding}{fix}")
        click.echo(f"{total}: {verdict}")
        return
    from rich.console import Console  # noqa: PLC0415  # only on a terminal
    from rich.markup import escape  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for c in report.checks:
        fix = f"\n[cyan]fix:[/] {escape(c.fix)}" if c.fix and c.status != "ok" else ""
        table.add_row(f"[{_STYLE[c.status]}]{_LABEL[c.status]}[/]", escape(c.name), escape(c.finding) + fix)
    console = Console(highlight=False)
    console.print(table)
    console.print(f"[bold]{escape(total)}[/]: {escape(verdict)}")


@cli.command("doctor", context_settings=CONTEXT)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="Agent config file (TOML) to check the box against.",
)
@_json_option
@click.option(
    "--broker-timeout",
    "broker_timeout",
    type=click.FloatRange(0.1, 60),
    default=3.0,
    show_default=True,
    metavar="S",
    help="Seconds to wait for a TCP connection to the MQTT broker.",
)
def doctor_cmd(config_path: Path, as_json: bool, broker_timeout: float) -> None:
    """Check the whole box and say what to fix: one line per check, ok / warn / FAIL.

    Checks the config, HMAC key, registry cache (key id, age), model and detector bundles
    (signatures), inference backends, spool folders and backlog, rejected captures, outbox,
    free disk, broker reachability and TLS files, and the systemd unit. Doctor only reads.

    Exit codes: 0 nothing failed (warnings allowed), 3 a check FAILed (an unreadable or invalid
    config is a FAIL too), 1 doctor itself could not run a check (see stderr).

    \b
    Example:
      sudo iaflash-provision doctor
      iaflash-provision doctor --config /etc/iaflash/agent.toml --json --broker-timeout 10
    """
    report = run_doctor(config_path, broker_timeout_s=broker_timeout)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    for check in report.checks:
        if check.status == "error":
            click.echo(f"error: doctor: {check.name}: {check.finding}", err=True)
    sys.exit(report.exit_code)


cli.add_command(enrol_command)
cli.add_command(selftest_command)
cli.add_command(tail_command)


cli.add_command(model_group)  # model install | list | rollback (provisioning/model/)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``iaflash-provision``)."""
    cli.main(args=argv, prog_name="iaflash-provision")
