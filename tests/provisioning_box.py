"""Central's files for one box, and its provisioning bundle, built for real (used by the enrol/selftest/tail tests).

A tiny signed classifier (tests/onnx_builders), the signed demo detector, a plate key, a signed
registry snapshot hashed with it, and the bundle written by ``iaflash-central enrolment build``.
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from onnx_builders import make_bundle

from iaflash.agent.demo.detector import build_demo_detector_bundle
from iaflash.agent.registry.cache import records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.central.cli import main as central
from iaflash.engines.signing import generate_keypair, sign_bundle, sign_file

PLATES = [("AB-123-CD", "RENAULT", "CLIO", "VP", "CI"), ("EF-456-GH", "PEUGEOT", "208", "VP", "CI")]


@dataclass
class CentralFiles:
    root: Path
    publisher: Path  # private key
    public: Path
    plate_key: Path
    key: bytes
    classifier: Path
    detector: Path
    snapshot: Path

    def build(self, out: Path, broker: str, *extra: str) -> Path:
        """``iaflash-central enrolment build OUT`` as central runs it; returns OUT."""
        args = [
            "enrolment", "build", str(out), "--site", "A13-PK42", "--device", "box-01", "--broker", broker,
            "--plate-key", str(self.plate_key), "--trust", str(self.public), "--classifier", str(self.classifier),
            "--detector", str(self.detector), "--registry", str(self.snapshot), *extra,
        ]  # fmt: skip
        result = CliRunner().invoke(central, args)
        assert result.exit_code == 0, result.output
        return out


def snapshot(path: Path, key: bytes, publisher: Path, seq: int = 1, plates: list[tuple[str, ...]] = PLATES) -> Path:
    rows = [tuple(p) for p in plates]
    records = records_from_plates(key, rows)  # type: ignore[arg-type]  # plate rows of five fields
    write_subset(path, kind="snapshot", dataset_id="siv-A13", seq=seq, key_id=key_id(key), records=records)
    sign_file(path, publisher, signer="registry-publisher")
    return path


def central_files(root: Path) -> CentralFiles:
    root.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair(root / "publisher")
    key = secrets.token_bytes(32)
    plate_key = root / "site-A13.key"
    plate_key.write_text(key.hex())
    os.chmod(plate_key, 0o600)
    make_bundle(root / "classifier", height=16, width=16)
    sign_bundle(root / "classifier", private, signer="model-publisher")
    build_demo_detector_bundle(root / "detector")
    sign_bundle(root / "detector", private, signer="model-publisher")
    snap = snapshot(root / "siv-A13-0001.jsonl.gz", key, private)
    return CentralFiles(root, private, public, plate_key, key, root / "classifier", root / "detector", snap)


def tls_files(root: Path) -> tuple[Path, Path, Path]:
    """A CA certificate, and a box certificate and key signed by it (PEM), for an mqtts:// bundle."""
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey) -> bytes:
        built = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(signer, hashes.SHA256())
        )
        return built.public_bytes(serialization.Encoding.PEM)

    ca_key, box_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (root / "ca.pem").write_bytes(cert("test-ca", ca_key, "test-ca", ca_key))
    (root / "box.pem").write_bytes(cert("A13-PK42/box-01", box_key, "test-ca", ca_key))
    pem = box_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (root / "box.key").write_bytes(pem)
    os.chmod(root / "box.key", 0o600)
    return root / "ca.pem", root / "box.pem", root / "box.key"
