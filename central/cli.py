"""``iaflash-central``: central-side tools (reference event listener, registry subsets, commands).

Exit codes: 0 ok, 1 operational error (broker unreachable, fewer events than --count before
--timeout, no response to a command or a command refused), 2 usage error.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from pathlib import Path
from typing import Any

import click

from iaflash.central.brokers.templates import broker_config_command
from iaflash.central.commands import CommandClient
from iaflash.central.connection import BrokerOptions, broker_options
from iaflash.central.enrolment import enrolment_group
from iaflash.central.export import export_command
from iaflash.central.serve.command import review_command, reviewer_command, serve_command
from iaflash.central.subscriber import DEFAULT_FILTER, Subscriber
from iaflash.central.subsets import registry_group
from iaflash.central.train.cli import train_command
from iaflash.central.train.detector import train_detector_command
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR, version_option
from iaflash.engines.errors import EngineError

__all__ = ["main"]


@click.group(context_settings=CONTEXT)
@version_option("iaflash-central")
def main() -> None:
    """Central tools for iaflash-edge sites.

    \b
    Example:
      iaflash-central listen --host 127.0.0.1 --port 1883 --count 1 --timeout 60
    """


main.add_command(registry_group)
main.add_command(serve_command)
main.add_command(reviewer_command)
main.add_command(review_command)
main.add_command(broker_config_command)
main.add_command(train_command)
main.add_command(train_detector_command)
main.add_command(export_command)
main.add_command(enrolment_group)


def _line(event: dict[str, Any]) -> str:
    v = event["verdict"]
    level = f"/{v['level']}" if v.get("level") else ""
    probs = " ".join(f"{k}={v[k]:.3f}" for k in ("p_make", "p_model") if v.get(k) is not None)
    stale = " registry_stale" if v.get("registry_stale") else ""
    return (
        f"{event['captured_at']} {event['site_id']}/{event['device_id']} {v['outcome']}{level} "
        f"capture={event['capture_id']} event={event['event_id']} {probs}{stale}"
    ).rstrip()


@main.command(context_settings=CONTEXT)
@broker_options
@click.option("--topic", default=DEFAULT_FILTER, show_default=True, help="Topic filter to subscribe to.")
@click.option(
    "--client-id", default=None, help="Fixed client id: use a persistent session so events sent while away are kept."
)
@click.option("--json", "as_json", is_flag=True, help="Print each event as one JSON line.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N distinct events.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Give up after S seconds (exit 1 if --count was not reached).",
)
def listen(
    broker: BrokerOptions,
    topic: str,
    client_id: str | None,
    as_json: bool,
    count: int | None,
    timeout: float | None,
) -> None:
    """Print each new event (deduplicated on event_id) as it arrives.

    Invalid messages are reported on stderr and do not stop the listener.

    \b
    Example:
      iaflash-central listen --port 1883 --topic 'iaflash/v1/+/+/events/mismatch' --json --count 10
    """
    done = threading.Event()
    printed = 0

    def show(event: dict[str, Any]) -> None:
        nonlocal printed
        click.echo(json.dumps(event, separators=(",", ":")) if as_json else _line(event))
        printed += 1
        if count is not None and printed >= count:
            done.set()

    host, port = broker.host, broker.port
    sub = Subscriber(
        host, port, protocol=broker.protocol, topic=topic, client_id=client_id, on_event=show, configure=broker.apply
    )
    try:
        sub.start(timeout=timeout if timeout is not None else 10.0)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"listening on {host}:{port} {topic}", err=True)
    try:
        reached = done.wait(timeout)
    except KeyboardInterrupt:
        reached = True
    finally:
        sub.stop()
    click.echo(f"{printed} event(s), {sub.duplicates} duplicate(s), {len(sub.invalid)} invalid", err=True)
    if count is not None and not reached:
        click.echo(f"error: only {printed} of {count} event(s) before the {timeout} s timeout", err=True)
        sys.exit(EXIT_ERROR)


def _args(pairs: tuple[str, ...], file: Path | None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--arg {pair!r}: expected KEY=VALUE")
        args[key] = value
    if file is not None:
        sig = file.with_name(file.name + ".sig")
        if not sig.is_file():
            raise click.UsageError(
                f"--file {file}: its signature {sig} is missing; sign it with "
                f"`iaflash-engines sign {file} --key PUBLISHER.key`"
            )
        args["file_b64"] = base64.b64encode(file.read_bytes()).decode("ascii")
        args["signature"] = json.loads(sig.read_text(encoding="utf-8"))
    return args


def _summary(response: dict[str, Any]) -> str:
    if not response["ok"]:
        return f"refused: {response['error']['code']}: {response['error']['message']}"
    result = response["result"]
    if "images" in result:  # send_evidence: the image bytes are for --json or --out
        result = {**result, "images": [{k: v for k, v in i.items() if k != "jpeg_b64"} for i in result["images"]]}
    return json.dumps(result, indent=2, sort_keys=True)


def _save_evidence(response: dict[str, Any], out: Path) -> None:
    result = response.get("result") or {}
    out.mkdir(parents=True, exist_ok=True)
    for image in result.get("images", []):
        (out / Path(image["name"]).name).write_bytes(base64.b64decode(image["jpeg_b64"]))
        click.echo(f"wrote {out / Path(image['name']).name}", err=True)
    if "sidecar" in result:
        name = Path(f"{result['capture_id']}.json").name  # never a path from the network
        (out / name).write_text(json.dumps(result["sidecar"], indent=2))


@main.command("cmd", context_settings=CONTEXT)
@click.argument("site")
@click.argument("device")
@click.argument("command")
@click.option("--arg", "pairs", multiple=True, metavar="KEY=VALUE", help="A command argument (repeatable).")
@click.option(
    "--file",
    "file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="registry_sync: the subset file (.jsonl.gz); its FILE.sig is sent with it.",
)
@click.option(
    "--revocations",
    "revocations",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="revoke_keys: the signed revocation list (iaflash-engines trust sign-revocations).",
)
@click.option(
    "--key",
    "key",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Central's command key (PEM, role commands); its .pub must be in the sites' trust_dir/commands/.",
)
@broker_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the response.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="send_evidence: write the images and the sidecar into this directory.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the response document as JSON.")
def cmd(
    site: str,
    device: str,
    command: str,
    pairs: tuple[str, ...],
    file: Path | None,
    revocations: Path | None,
    key: Path,
    broker: BrokerOptions,
    timeout: float,
    out: Path | None,
    as_json: bool,
) -> None:
    """Send a signed COMMAND to one box; print its response.

    COMMAND: ping, status, send_evidence, registry_sync, revoke_keys, reload (the box loads the
    bundles its config names now, without a restart: docs/BUNDLES.md#reload).

    Exit 0 when the box answers ok, 1 when it refuses or does not answer in time.

    \b
    Example:
      iaflash-central cmd site-042 box-01 ping --key central.key --port 1883
      iaflash-central cmd site-042 box-01 send_evidence --arg capture_id=20261102-081500-000123 \\
          --key central.key --out evidence/
      iaflash-central cmd site-042 box-01 registry_sync --file siv-0002.jsonl.gz --key central.key --json
      iaflash-central cmd site-042 box-01 revoke_keys --revocations revoked-0003.json --key central.key
      iaflash-central cmd site-042 box-01 reload --key central.key --timeout 120
    """
    args = _args(pairs, file)
    if revocations is not None:
        try:
            args["list"] = json.loads(revocations.read_bytes())
        except ValueError as exc:
            raise click.UsageError(f"--revocations {revocations}: not JSON ({exc})") from exc
    try:
        client = CommandClient(
            broker.host, broker.port, protocol=broker.protocol, private_key_path=key, configure=broker.apply
        )
        with client:
            response = client.send(site, device, command, args, timeout=timeout)
    except (TimeoutError, EngineError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if out is not None:
        _save_evidence(response, out)
    click.echo(json.dumps(response, separators=(",", ":")) if as_json else _summary(response))
    if not response["ok"]:
        sys.exit(EXIT_ERROR)
