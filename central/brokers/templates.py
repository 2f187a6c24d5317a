"""Broker templates for central (``mosquitto-central.conf`` + ``.acl``) and ``iaflash-central broker-config``.

The templates are package data; ``@NAME@`` placeholders are replaced by :func:`render`. A
placeholder left unreplaced is an error, never a silently broken broker config.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import click

__all__ = ["broker_config_command", "render", "template"]

TEMPLATES = ("mosquitto-central.conf", "mosquitto-central.acl")
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


def template(name: str) -> str:
    """The text of a shipped template."""
    return resources.files("iaflash.central.brokers").joinpath(name).read_text(encoding="utf-8")


def render(name: str, values: dict[str, str]) -> str:
    """The template with every ``@NAME@`` replaced; ValueError naming any value missing."""
    text = template(name)
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise ValueError(f"{name}: no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


@click.command("broker-config", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--ca", "ca_file", required=True, type=click.Path(path_type=Path), help="Fleet CA certificate (PEM).")
@click.option("--cert", "cert_file", required=True, type=click.Path(path_type=Path), help="Broker certificate.")
@click.option("--key", "key_file", required=True, type=click.Path(path_type=Path), help="Broker private key.")
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535), help="TLS listener port.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Listener address.")  # noqa: S104  # a broker serves the fleet
@click.option("--data-dir", default=Path("/var/lib/mosquitto"), show_default=True, type=click.Path(path_type=Path))
@click.option("--log", "log_dest", default="syslog", show_default=True, help="mosquitto log_dest (file PATH, syslog).")
def broker_config_command(
    out: Path, ca_file: Path, cert_file: Path, key_file: Path, port: int, bind: str, data_dir: Path, log_dest: str
) -> None:
    """Write central's mosquitto config and ACL (TLS, certificate identity, per-device ACL) into OUT.

    \b
    Example:
      iaflash-central broker-config /etc/mosquitto/conf.d --ca ca.pem --cert broker.pem --key broker.key
    """
    out.mkdir(parents=True, exist_ok=True)
    values = {
        "PORT": str(port), "BIND": bind, "CA_FILE": str(ca_file), "CERT_FILE": str(cert_file),
        "KEY_FILE": str(key_file), "ACL_FILE": str(out / "mosquitto-central.acl"), "DATA_DIR": str(data_dir),
        "LOG_DEST": log_dest,
    }  # fmt: skip
    for name in TEMPLATES:
        (out / name).write_text(render(name, values), encoding="utf-8")
        click.echo(f"wrote {out / name}", err=True)
