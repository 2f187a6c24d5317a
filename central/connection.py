"""How central's MQTT clients reach the broker: address, protocol, TLS and credentials.

Shared by ``serve``, ``listen`` and ``cmd`` so they accept the same options as the agent's
``[mqtt]`` section: a CA file, a client certificate and key, a username and a password file
(mode 0600 recommended; the password is read when the client connects, never logged).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

__all__ = ["BrokerOptions", "broker_options"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class BrokerOptions:
    """Where and how to connect; ``apply`` configures a paho client accordingly."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Literal["5", "3.1.1"] = "5"
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise click.UsageError("--tls-cert and --tls-key go together: give both or neither")
        if self.password_file is not None and self.username is None:
            raise click.UsageError("--password-file needs --username")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise click.UsageError(
                f"--password-file {self.password_file}: {exc.strerror} (fix: a readable file holding the password)"
            ) from exc

    def apply(self, client: Any) -> None:
        """TLS and credentials on a paho ``Client`` before it connects."""
        if self.uses_tls:
            for flag, path in (
                ("--tls-ca", self.ca_file),
                ("--tls-cert", self.cert_file),
                ("--tls-key", self.key_file),
            ):
                if path is not None and not path.is_file():
                    raise click.UsageError(f"{flag} {path}: no such file (fix: the path of the PEM file)")
            client.tls_set(
                ca_certs=str(self.ca_file) if self.ca_file else None,
                certfile=str(self.cert_file) if self.cert_file else None,
                keyfile=str(self.key_file) if self.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if self.username is not None:
            client.username_pw_set(self.username, self.password())


def broker_options(func: F) -> F:
    """Click options for :class:`BrokerOptions`; the command receives ``broker: BrokerOptions``."""
    options = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Broker host."),
        click.option("--port", type=click.IntRange(1, 65535), default=None, help="Broker port [1883, 8883 with TLS]."),
        click.option(
            "--protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True, help="MQTT version."
        ),
        click.option("--tls", is_flag=True, help="Use TLS (implied by --tls-ca or --tls-cert)."),
        click.option(
            "--tls-ca", "ca_file", type=click.Path(path_type=Path, dir_okay=False), help="CA certificate (PEM)."
        ),
        click.option("--tls-cert", "cert_file", type=click.Path(path_type=Path, dir_okay=False), help="Client cert."),
        click.option(
            "--tls-key", "key_file", type=click.Path(path_type=Path, dir_okay=False), help="Client key (PEM)."
        ),
        click.option("--username", default=None, help="MQTT username (use with TLS)."),
        click.option(
            "--password-file", type=click.Path(path_type=Path, dir_okay=False), help="File holding the password."
        ),
    ]

    def collect(**kwargs: Any) -> Any:
        names = ("host", "port", "protocol", "tls", "ca_file", "cert_file", "key_file", "username", "password_file")
        values = {n: kwargs.pop(n) for n in names}
        tls = values["tls"] or values["ca_file"] is not None or values["cert_file"] is not None
        values["port"] = values["port"] or (8883 if tls else 1883)
        kwargs["broker"] = BrokerOptions(**values)
        return func(**kwargs)

    collect.__name__, collect.__doc__ = func.__name__, func.__doc__
    wrapped: Any = collect
    wrapped.__click_params__ = list(getattr(func, "__click_params__", []))  # options declared below this one
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped  # type: ignore[no-any-return]  # click decorators keep the callable
