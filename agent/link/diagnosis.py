"""Why a connection to the broker failed, and how to fix it: pure functions, no paho.

:mod:`iaflash.agent.link.mqtt` (the only module that imports paho) calls these from its callbacks;
each returns ``(what failed, how to fix it)`` for the log, the heartbeat and doctor's probe.
"""

from __future__ import annotations

import re
import socket
import ssl
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509

__all__ = ["closed_before_connack", "explain", "reason_value", "refusal"]

_FIX_TLS_VERIFY = (
    "check that mqtt.ca_file is the CA that signed the broker's certificate, that the certificate is "
    "valid now (is this box's clock right?), and that mqtt.host is a name the certificate holds"
)
_FIX_AUTH = (
    "check mqtt.username and the password (credential mqtt-password or mqtt.password_file), or the "
    "client certificate (mqtt.cert_file / key_file), against the broker's users and ACL"
)


_FIX_NETWORK = "check the network link (4G), the firewall and mqtt.host"


def explain(exc: BaseException | None, where: str) -> tuple[str, str]:
    """(what failed, how to fix it) for an exception raised while connecting to the broker."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the certificate of {where} was refused: {exc.verify_message or exc}", _FIX_TLS_VERIFY
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake with {where} failed: {exc.reason or exc}",
            "check mqtt.cert_file and mqtt.key_file (a client certificate the broker trusts, not expired) "
            "and that mqtt.port is the broker's TLS listener",
        )
    kinds: tuple[tuple[type[BaseException], str, str], ...] = (
        (
            ConnectionRefusedError,
            "refused the TCP connection",
            "check mqtt.host and mqtt.port, and that the broker runs",
        ),
        (socket.gaierror, "has a host name that does not resolve", "check mqtt.host and the DNS"),
        (TimeoutError, "did not answer (timeout)", _FIX_NETWORK),
    )
    for kind, what, fix in kinds:
        if isinstance(exc, kind):
            return f"{where} {what}", fix
    if isinstance(exc, OSError):
        return f"{where} is unreachable: {exc.strerror or exc}", _FIX_NETWORK
    return f"cannot connect to {where}: {exc}", "check the [mqtt] section and the broker"


_SSL_ALERT = re.compile(r"\[SSL: ([A-Z0-9_]+)\] ([^(]+)")
_FIX_CLIENT_CERT = (
    "give this box a certificate issued by the fleet CA that the broker trusts, valid now "
    "(mqtt.cert_file / key_file; `openssl x509 -noout -issuer -dates -in CERT`), and check the box's clock"
)


def closed_before_connack(
    socket_error: str | None, where: str, cert_file: Path | None, ca_file: Path | None
) -> tuple[str, str]:
    """(what, fix) when the broker closed the connection after the TLS handshake but before its CONNACK.

    With TLS 1.3 the broker judges the client certificate after the client's handshake is done, so
    its refusal (an alert: certificate expired, unknown CA, certificate required) only reaches the
    first read, and often not even that (the socket is closed first: "EOF occurred"). paho reports
    it only in its log (``socket_error``). What this box can check itself comes first: no
    certificate, a certificate that is not valid now, one not issued by the CA of ``mqtt.ca_file``.
    """
    alert = _SSL_ALERT.search(socket_error or "")
    said = f" (the broker said: {alert.group(2).strip()})" if alert else ""
    if cert_file is None and ca_file is not None:
        return f"TLS: {where} closed the connection: this box gave no client certificate{said}", (
            "the broker requires one (central's template does): set mqtt.cert_file and mqtt.key_file "
            "to this box's certificate and key"
        )
    local = _certificate_problem(cert_file, ca_file) if cert_file is not None else None
    if local is not None:
        return f"TLS: {where} refused this box's client certificate: {local}{said}", _FIX_CLIENT_CERT
    if alert is not None:
        return f"TLS: {where} refused this box's client certificate: {alert.group(2).strip()}", _FIX_CLIENT_CERT
    return (
        f"{where} closed the connection before answering CONNECT ({socket_error or 'no reason given'})",
        "read the broker's log; with require_certificate the broker wants a client certificate it accepts: "
        + _FIX_CLIENT_CERT,
    )


def _certificate_problem(cert_file: Path, ca_file: Path | None) -> str | None:
    """What is wrong with this box's certificate as far as the box can tell, or None."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return None  # the TLS layer read it: nothing more to say here
    now = datetime.now(timezone.utc)
    if now > cert.not_valid_after_utc:
        return f"mqtt.cert_file {cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if now < cert.not_valid_before_utc:
        return (
            f"mqtt.cert_file {cert_file} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(is this box's clock right?)"
        )
    try:
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes()) if ca_file is not None else None
    except (OSError, ValueError):
        return None
    if ca is not None and cert.issuer != ca.subject:
        return (
            f"mqtt.cert_file {cert_file} was issued by {cert.issuer.rfc4514_string()}, "
            f"not by the fleet CA of mqtt.ca_file ({ca.subject.rfc4514_string()})"
        )
    return None


def refusal(reason_code: Any, where: str) -> tuple[str, str]:
    """(what, fix) for a CONNACK refusal (MQTT 5 reason code or 3.1.1 return code)."""
    text = str(reason_code)
    code = reason_value(reason_code)
    if code in (134, 135, 140) or "not authori" in text.lower() or "bad user" in text.lower():
        return f"{where} refused the credentials: {text}", _FIX_AUTH
    if code == 133 or "identifier" in text.lower():
        return f"{where} refused the client id: {text}", "check mqtt.client_id (allowed characters, length)"
    return f"{where} refused the connection: {text}", "check the client id, the credentials and the broker's ACL"


def reason_value(reason_code: Any) -> int:
    value = getattr(reason_code, "value", reason_code)
    return int(value) if isinstance(value, int) else 0
