"""``iaflash-central serve`` and ``iaflash-central reviewer`` (registered on the group in central/cli.py)."""

from __future__ import annotations

import base64
import getpass
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from iaflash.central.commands import CommandClient
from iaflash.central.connection import BrokerOptions, broker_options
from iaflash.central.serve.config import CentralConfig, load_config
from iaflash.central.serve.ingest import DEFAULT_FILTER, Ingester
from iaflash.central.serve.store import Store, StoreError
from iaflash.engines.errors import EngineError
from iaflash.engines.signing import load_private_key

__all__ = ["review_command", "reviewer_command", "serve_command"]

CONTEXT = {"help_option_names": ["-h", "--help"]}
log = logging.getLogger(__name__)
RETENTION_EVERY_S = 3600.0


def evidence_fetcher(broker: BrokerOptions, key: Path, timeout: float = 30.0) -> Any:
    """A function (site, device, capture_id) → (sidecar, jpeg) that sends the signed send_evidence.

    The key is checked now (a SignatureError says which file and how to fix it); errors while fetching
    are RuntimeError or TimeoutError, shown to the reviewer and audited.
    """
    load_private_key(key)

    def fetch(site: str, device: str, capture_id: str) -> tuple[dict[str, Any], bytes]:
        try:
            client = CommandClient(
                broker.host, broker.port, protocol=broker.protocol, private_key_path=key, configure=broker.apply
            )
            with client:
                response = client.send(site, device, "send_evidence", {"capture_id": capture_id}, timeout=timeout)
        except EngineError as exc:
            raise RuntimeError(str(exc)) from exc
        if not response["ok"]:
            raise RuntimeError(f"{response['error']['code']}: {response['error']['message']}")
        images = response["result"]["images"]
        if not images:
            raise RuntimeError(f"{site}/{device} sent no image for {capture_id}")
        return response["result"]["sidecar"], base64.b64decode(images[0]["jpeg_b64"])

    return fetch


def _start_web(cfg: CentralConfig, db: str, users_file: Path, fetch: Any, host: str, port: int) -> Any:
    from iaflash.central.web.app import create_app, load_users  # noqa: PLC0415  # imports Flask (--no-web: never)
    from iaflash.central.web.server import WebServer  # noqa: PLC0415  # imports waitress

    try:
        users = load_users(users_file)
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"--users {users_file}: {exc}") from exc
    app = create_app(
        Store(db), users, fetch_evidence=fetch, coordinates=cfg.coordinates(), max_speed_kmh=cfg.plates.max_speed_kmh
    )
    return WebServer(app, host, port).start()


@click.command("serve", context_settings=CONTEXT)
@broker_options
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Central's TOML config (store, web, retention, plates, site coordinates).",
)
@click.option("--db", default=None, help="SQLite file or postgresql:// URL [config store.url, central.db].")
@click.option("--group", default="central", show_default=True, help="Shared-subscription group of the instances.")
@click.option("--topic", default=DEFAULT_FILTER, show_default=True, help="Event topic filter.")
@click.option("--instance", default="1", show_default=True, help="This instance's name: its persistent session.")
@click.option(
    "--identity",
    type=click.Choice(["topic", "refuse"]),
    default="topic",
    show_default=True,
    help="A payload naming another site/device: store under the topic's, or refuse it.",
)
@click.option("--web-host", default=None, help="Review page address [config web.host, 127.0.0.1].")
@click.option("--web-port", type=click.IntRange(0, 65535), default=None, help="Review page port, 0 = any free [8080].")
@click.option(
    "--users",
    "users_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Reviewers file (name:hash lines) [config web.users_file]; no page without it.",
)
@click.option("--no-web", is_flag=True, help="Ingest only (the other instances serve the page).")
@click.option(
    "--command-key",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Central's Ed25519 command key: lets reviewers fetch evidence from the boxes.",
)
def serve_command(
    broker: BrokerOptions,
    config_path: Path | None,
    db: str | None,
    group: str,
    topic: str,
    instance: str,
    identity: str,
    web_host: str | None,
    web_port: int | None,
    users_file: Path | None,
    no_web: bool,
    command_key: Path | None,
) -> None:
    """Store every event from the sites (shared subscription) and serve the review page.

    Events are validated, bound to the site/device of their topic, deduplicated on event_id and
    stored once (SQLite by default, PostgreSQL with --db postgresql://...). Run several instances
    with different --instance names on one --group to share the load. Stops on SIGTERM/SIGINT.

    \b
    Example:
      iaflash-central serve --port 1883 --db central.db --users reviewers --command-key central.key
      iaflash-central serve --tls-ca ca.pem --tls-cert central.pem --tls-key central.key.pem \\
          --db postgresql://central@127.0.0.1/iaflash --instance 2 --no-web
    """
    try:
        cfg = load_config(config_path)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    url = db or cfg.store.url
    try:
        store = Store(url)
        applied = store.migrate()
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"store {store.dialect} schema v{store.schema_version()} (applied now: {applied or 'none'})", err=True)
    ingester = Ingester(
        store,
        broker,
        group=group,
        topic=topic,
        client_id=f"iaflash-central-{group}-{instance}",
        identity="refuse" if identity == "refuse" else "topic",
    )
    try:
        ingester.start(timeout=15)
    except TimeoutError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"ingesting {ingester.subscription} from {broker.host}:{broker.port} as {ingester.client_id}", err=True)
    server = None
    users_file = users_file or cfg.web.users_file
    if not no_web and users_file is not None:
        try:
            fetch = evidence_fetcher(broker, command_key) if command_key else None
        except EngineError as exc:
            raise click.UsageError(f"--command-key: {exc}") from exc
        server = _start_web(
            cfg, url, users_file, fetch, web_host or cfg.web.host, cfg.web.port if web_port is None else web_port
        )
        click.echo(f"review page: {server.url}", err=True)
    elif not no_web:
        click.echo("no review page: give --users FILE (see `iaflash-central reviewer -h`)", err=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(RETENTION_EVERY_S):
        purged = store.purge(decided_days=cfg.retention.decided_days, evidence_days=cfg.retention.evidence_days)
        log.info("retention purged %s", purged)
    ingester.stop()
    if server is not None:
        server.stop()
    counts = ingester.counters()
    click.echo(
        f"stopped: {counts['stored']} stored, {counts['duplicates']} duplicate(s), {counts['refused']} refused",
        err=True,
    )
    store.close()


@click.command("reviewer", context_settings=CONTEXT)
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin instead of a prompt.")
def reviewer_command(name: str, password_stdin: bool) -> None:
    """Print a reviewers-file line for NAME: 'NAME:<scrypt hash of the password>'.

    \b
    Example:
      iaflash-central reviewer alice >> /etc/iaflash-central/reviewers
    """
    from werkzeug.security import generate_password_hash  # noqa: PLC0415  # the [central] extra

    if ":" in name or not name.strip():
        raise click.UsageError(f"reviewer name {name!r} must be non-empty and without ':'")
    password = sys.stdin.readline().rstrip("\n") if password_stdin else getpass.getpass(f"password for {name}: ")
    if len(password) < 8:
        raise click.UsageError("the password must have at least 8 characters")
    click.echo(f"{name}:{generate_password_hash(password)}")


@click.command("review", context_settings=CONTEXT)
@broker_options
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Central's TOML config (store, web, plates, site coordinates).")  # fmt: skip
@click.option("--db", default=None, help="SQLite file or postgresql:// URL [config store.url, central.db].")
@click.option("--users", "users_file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Reviewers file (name:hash lines) [config web.users_file].")  # fmt: skip
@click.option("--web-host", default=None, help="Review page address [config web.host, 127.0.0.1].")
@click.option("--web-port", type=click.IntRange(0, 65535), default=None, help="Review page port, 0 = any free [8080].")
@click.option("--command-key", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Central's Ed25519 command key: lets reviewers fetch evidence through the broker.")  # fmt: skip
def review_command(
    broker: BrokerOptions,
    config_path: Path | None,
    db: str | None,
    users_file: Path | None,
    web_host: str | None,
    web_port: int | None,
    command_key: Path | None,
) -> None:
    """Serve only the review page over an existing store (no ingestion); stops on SIGTERM/SIGINT.

    \b
    Example:
      iaflash-central review --db demo-run/central.db --users demo-run/reviewers
    """
    try:
        cfg = load_config(config_path)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    url, users_file = db or cfg.store.url, users_file or cfg.web.users_file
    if users_file is None:
        raise click.UsageError("--users FILE is required (see `iaflash-central reviewer -h`)")
    try:
        Store(url).migrate()
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    try:
        fetch = evidence_fetcher(broker, command_key) if command_key else None
    except EngineError as exc:
        raise click.UsageError(f"--command-key: {exc}") from exc
    server = _start_web(
        cfg, url, users_file, fetch, web_host or cfg.web.host, cfg.web.port if web_port is None else web_port
    )
    click.echo(f"review page: {server.url}", err=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
