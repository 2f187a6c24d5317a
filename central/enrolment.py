"""``iaflash-central enrolment build``: the provisioning bundle a technician enrols one box with.

It gathers central's files for one box into the layout ``iaflash-provision enrol`` reads
(docs/TECHNICIAN.md, "The provisioning bundle"), and checks them first, as the box will: the
registry snapshot is signed by a key of the trust store and hashed with this plate key, and the
model bundles are signed by a key of the trust store. ``enrol.json`` lists the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from iaflash.agent.errors import IaflashError
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.agent.registry.subset_file import SubsetReader
from iaflash.central.errors import CentralError
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR, fail
from iaflash.engines.errors import EngineError
from iaflash.engines.signing import load_trusted_bundle, open_trusted_file, signature_path

__all__ = ["build_enrolment", "enrolment_group"]

FORMAT, VERSION = "iaflash-enrol", 1


def _check_broker(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
        raise CentralError(
            f"--broker {url!r}: not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; fix: e.g. mqtts://mqtt.example.fr:8883"
        )


def _copy(src: Path, dst: Path, mode: int = 0o644) -> None:
    """Copy ``src`` to ``dst`` created with ``mode``: a secret (0600) is never readable by others, even mid-copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    os.fchmod(fd, mode)  # the umask narrows the mode at creation, and an existing file keeps its own
    with os.fdopen(fd, "wb") as out, src.open("rb") as source:
        shutil.copyfileobj(source, out, 1 << 20)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_trust(trust: list[Path], out: Path) -> None:
    """Each .pub file, or each whole trust store (flat, or with role folders), into ``out``."""
    for pub in trust:
        if pub.is_dir():
            for f in sorted(pub.rglob("*.pub")):
                _copy(f, out / f.relative_to(pub))
        else:
            _copy(pub, out / pub.name)


def _check_registry(snapshot: Path, plate_kid: str, trust: Path) -> str:
    with SubsetReader(snapshot) as reader:
        header = reader.header
    if header.kind != "snapshot":
        raise CentralError(f"{snapshot}: is a {header.kind}; fix: give a snapshot (the box starts from one)")
    if header.key_id != plate_kid:
        raise CentralError(
            f"{snapshot}: hashed with key {header.key_id}, but --plate-key is {plate_kid}; "
            "fix: give the plate key this snapshot was built with, or rebuild it (iaflash-central registry build)"
        )
    with open_trusted_file(snapshot, trust, False) as trusted:
        signer = trusted.verified.signer if trusted.verified is not None else "nobody"
    return f"{header.dataset_id} seq {header.seq} ({header.count} vehicles), signed by {signer}"


def _check_bundle(path: Path, trust: Path, task: str) -> str:
    bundle = load_trusted_bundle(path, trust, False)
    if bundle.manifest.task != task:
        raise CentralError(
            f"{path}: is a {bundle.manifest.task} bundle, a {task} is needed here; fix: swap the options"
        )
    return f"{bundle.manifest.name} {bundle.manifest.version}"


def build_enrolment(
    out: Path,
    *,
    site_id: str,
    device_id: str,
    broker: str,
    protocol: str,
    plate_key: Path,
    trust: list[Path],
    classifier: Path,
    registry: Path,
    detector: Path | None = None,
    tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
) -> dict[str, Any]:
    """Write the bundle into the empty folder ``out``; returns its ``enrol.json`` document."""
    _check_broker(broker)
    ca, cert, key = tls
    if broker.startswith("mqtts:") and ca is None:
        raise CentralError("--broker is mqtts:// but no --ca; fix: give the broker's CA certificate with --ca")
    if (cert is None) != (key is None):
        raise CentralError("--cert and --key go together; fix: give both (this box's certificate and key) or neither")
    if out.exists() and any(out.iterdir()):
        raise CentralError(f"{out}: not empty; fix: give a new folder")
    try:
        kid = key_id(load_hmac_key(plate_key.read_bytes().strip()))
    except OSError as exc:
        raise CentralError(f"{plate_key}: cannot read the plate key ({exc.strerror}); fix: check --plate-key") from exc
    out.mkdir(parents=True, exist_ok=True)
    _copy_trust(trust, out / "trust")
    notes = {"registry": _check_registry(registry, kid, out / "trust"), "plate_key": kid}
    _copy(plate_key, out / "plate.key", 0o600)
    _copy(registry, out / "registry" / registry.name)
    _copy(signature_path(registry), out / "registry" / signature_path(registry).name)
    for kind, path in (("classifier", classifier), ("detector", detector)):
        if path is None:
            continue
        notes[kind] = _check_bundle(path, out / "trust", kind)
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            _copy(f, out / "models" / kind / f.relative_to(path))
    for name, path, mode in (("ca.pem", ca, 0o644), ("client.pem", cert, 0o644), ("client.key", key, 0o600)):
        if path is not None:
            _copy(path, out / name, mode)
    files = {str(p.relative_to(out).as_posix()): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "site_id": site_id,
        "device_id": device_id,
        "broker": {"url": broker, "protocol": protocol},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "checked": notes,
    }
    (out / "enrol.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return doc


def _archive(folder: Path, archive: Path) -> None:
    """``archive`` (0600: it holds the plate key and the box's TLS key) of ``folder``."""
    fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # an older archive of that name keeps its mode otherwise
    with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)


@click.group("enrolment", context_settings=CONTEXT)
def enrolment_group() -> None:
    """Provisioning bundles: everything one box needs to be enrolled by a technician.

    \b
    Example:
      iaflash-central enrolment build enrol-A13-box-01.tar.gz --site A13 --device box-01 ...
    """


@enrolment_group.command("build", context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--site", "site_id", required=True, help="The box's site id.")
@click.option("--device", "device_id", required=True, help="The box's device id.")
@click.option("--broker", required=True, help="mqtts://HOST[:PORT] (TLS) or mqtt://HOST[:PORT].")
@click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True, help="MQTT version.")
@click.option("--plate-key", type=click.Path(path_type=Path, dir_okay=False, exists=True), required=True,
              help="The deployment HMAC key (hex) the registry snapshot was built with.")  # fmt: skip
@click.option("--trust", type=click.Path(path_type=Path, exists=True), multiple=True, required=True,
              help="A public key (.pub) the box trusts, or a trust store folder (repeatable).")  # fmt: skip
@click.option("--classifier", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="The signed classifier bundle folder.")  # fmt: skip
@click.option("--detector", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="The signed vehicle detector bundle folder (optional).")  # fmt: skip
@click.option("--registry", type=click.Path(path_type=Path, dir_okay=False, exists=True), required=True,
              help="The signed registry snapshot (its .sig beside it).")  # fmt: skip
@click.option("--ca", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="The broker's CA (PEM).")
@click.option("--cert", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="This box's certificate.")
@click.option("--key", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="This box's private key.")
def build_command(
    out: Path,
    site_id: str,
    device_id: str,
    broker: str,
    protocol: str,
    plate_key: Path,
    trust: tuple[Path, ...],
    classifier: Path,
    detector: Path | None,
    registry: Path,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
) -> None:
    """Write the provisioning bundle of one box into OUT (a new folder, or OUT.tar.gz).

    Checks what the box will check: the snapshot is hashed with --plate-key and signed by a
    --trust key, the bundles are signed by a --trust key.

    \b
    Example:
      iaflash-central enrolment build enrol-A13-box-01.tar.gz --site A13 --device box-01 \\
        --broker mqtts://mqtt.example.fr:8883 --ca ca.pem --cert box-01.pem --key box-01.key \\
        --plate-key site-A13.key --trust publisher.pub --classifier classifier/ \\
        --registry siv-A13-0001.jsonl.gz
    """
    archive = out.name.endswith(".tar.gz")
    target = Path(tempfile.mkdtemp(prefix="iaflash-enrolment-")) / out.name[: -len(".tar.gz")] if archive else out
    try:
        doc = build_enrolment(
            target, site_id=site_id, device_id=device_id, broker=broker, protocol=protocol, plate_key=plate_key,
            trust=list(trust), classifier=classifier, detector=detector, registry=registry, tls=(ca, cert, key),
        )  # fmt: skip
        if archive:
            _archive(target, out)
    except (IaflashError, EngineError) as exc:
        fail(str(exc), EXIT_ERROR)
    except OSError as exc:
        fail(f"{exc.filename}: {exc.strerror}; fix: check the paths and the free space", EXIT_ERROR)
    finally:
        if archive:
            shutil.rmtree(target.parent, ignore_errors=True)
    checked = doc["checked"]
    click.echo(f"wrote {out}: {site_id}/{device_id}, {len(doc['files'])} files, broker {broker}", err=False)
    for what, note in checked.items():
        click.echo(f"  {what}: {note}")
    sys.exit(0)
