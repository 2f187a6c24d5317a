"""``iaflash-central``: central-side tools (reference event listener, registry subsets).

Exit codes: 0 ok, 1 operational error (broker unreachable, fewer events than --count before
--timeout), 2 usage error.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import click

from central.subscriber import DEFAULT_FILTER, Subscriber
from central.subsets import registry_group

__all__ = ["main"]

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Central tools for iaflash-edge sites.

    \b
    Example:
      iaflash-central listen --host 127.0.0.1 --port 1883 --count 1 --timeout 60
    """


main.add_command(registry_group)


def _line(event: dict[str, Any]) -> str:
    v = event["verdict"]
    level = f"/{v['level']}" if v.get("level") else ""
    probs = " ".join(f"{k}={v[k]:.3f}" for k in ("p_make", "p_model") if v.get(k) is not None)
    stale = " registry_stale" if v.get("registry_stale") else ""
    return (f"{event['captured_at']} {event['site_id']}/{event['device_id']} {v['outcome']}{level} "
            f"capture={event['capture_id']} event={event['event_id']} {probs}{stale}").rstrip()


@main.command(context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True, help="Broker host.")
@click.option("--port", type=click.IntRange(1, 65535), default=1883, show_default=True, help="Broker port.")
@click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True,
              help="MQTT protocol version.")
@click.option("--topic", default=DEFAULT_FILTER, show_default=True, help="Topic filter to subscribe to.")
@click.option("--client-id", default=None,
              help="Fixed client id: use a persistent session so events sent while away are kept.")
@click.option("--json", "as_json", is_flag=True, help="Print each event as one JSON line.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N distinct events.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Give up after S seconds (exit 1 if --count was not reached).")
def listen(host: str, port: int, protocol: str, topic: str, client_id: str | None, as_json: bool,
           count: int | None, timeout: float | None) -> None:
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

    sub = Subscriber(host, port, protocol="5" if protocol == "5" else "3.1.1", topic=topic,
                     client_id=client_id, on_event=show)
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
        sys.exit(1)
