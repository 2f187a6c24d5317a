"""A throw-away fleet CA and central's shipped mosquitto template on a free 127.0.0.1 port.

Shared by the TLS tests (tests/test_link_tls.py, tests/test_central_tls.py). Everything is real:
EC P-256 certificates made with ``cryptography`` and a mosquitto process started from
``central/brokers/mosquitto-central.conf`` and ``.acl`` as ``iaflash-central broker-config`` renders them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iaflash.agent.demo.broker import find_mosquitto, free_port, wait_port
from iaflash.central.brokers.templates import TEMPLATES, render

BROKER_NAMES = ("127.0.0.1", "localhost")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


class Pki:
    """A CA whose certificate is ``root/<label>-ca.pem``; :meth:`issue` writes leaf certificates beside it."""

    def __init__(self, root: Path, label: str = "fleet") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.label = label
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = _name(f"iaflash {label} CA")
        self.ca = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )  # fmt: skip
        self.ca_file = root / f"{label}-ca.pem"
        self.ca_file.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, cn: str, name: str, *, server_names: Sequence[str] = (), valid_days: tuple[int, int] = (-1, 30)
    ) -> tuple[Path, Path]:
        """A certificate for ``cn`` (a server one when ``server_names`` are given) and its 0600 key file.

        ``valid_days`` is (not before, not after) in days from now: ``(-30, -1)`` is an expired certificate.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=valid_days[0]))
            .not_valid_after(now + dt.timedelta(days=valid_days[1]))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )  # fmt: skip
        if server_names:
            builder = builder.add_extension(_san(server_names), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file, key_file = self.root / f"{name}.pem", self.root / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(key_file, 0o600)
        return cert_file, key_file


class CentralBroker:
    """mosquitto run from central's shipped templates (TLS, certificate identity, per-device ACL)."""

    def __init__(self, workdir: Path, pki: Pki, server_names: Sequence[str] = BROKER_NAMES) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise FileNotFoundError("mosquitto is required by the TLS tests: ./run test installs it")
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary, self.workdir, self.pki = binary, workdir, pki
        self.port = free_port()
        self.log_path = workdir / "mosquitto.log"
        cert, key = pki.issue("broker", f"broker-{self.port}", server_names=server_names)
        values = {
            "PORT": str(self.port), "BIND": "127.0.0.1", "CA_FILE": str(pki.ca_file), "CERT_FILE": str(cert),
            "KEY_FILE": str(key), "ACL_FILE": str(workdir / TEMPLATES[1]), "DATA_DIR": str(workdir),
            "LOG_DEST": f"file {self.log_path}",
        }  # fmt: skip
        for name in TEMPLATES:
            (workdir / name).write_text(render(name, values))
        self.conf = workdir / TEMPLATES[0]
        if os.geteuid() == 0:  # as root mosquitto drops to user mosquitto, which cannot read the 0600 keys
            self.conf.write_text(self.conf.read_text() + "user root\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CentralBroker:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(f"mosquitto did not start from the shipped template: {log[-800:]}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
