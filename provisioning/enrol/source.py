"""A provisioning bundle as central prepares it (``iaflash-central enrolment build``), read and checked.

The layout (docs/TECHNICIAN.md, "The provisioning bundle")::

    enrol.json                    format iaflash-enrol 1: site and device ids, broker URL, sha256 of every file
    plate.key                     the deployment HMAC key (hex), the one the registry was hashed with
    ca.pem client.pem client.key  TLS: the broker's CA, this box's certificate and key (mqtts:// only)
    trust/*.pub                   public keys the box trusts (model, registry and command publishers)
    models/classifier/            the signed classifier bundle; models/detector/ (optional) the detector
    registry/<name>.jsonl.gz      the first signed registry snapshot, with <name>.jsonl.gz.sig

A folder or a ``.tar.gz`` of one. Only the files listed in ``enrol.json`` are used, each checked
against its sha256 (a copy damaged on the USB stick is refused, naming the file).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from iaflash.agent.errors import ProvisioningError as EnrolError

__all__ = ["FORMAT", "Broker", "EnrolError", "EnrolSource", "open_source", "parse_broker_url", "sha256_file"]

FORMAT, VERSION = "iaflash-enrol", 1
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_REBUILD = "ask central for a new provisioning bundle (iaflash-central enrolment build)"


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    protocol: str

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str, protocol: str = "5") -> Broker:
    """``mqtts://host[:8883]`` (TLS) or ``mqtt://host[:1883]``; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.username or parts.query:
        raise ValueError(f"broker URL {url!r}: only a scheme, a host and a port are allowed")
    tls = parts.scheme == "mqtts"
    if protocol not in ("5", "3.1.1"):
        raise ValueError(f"MQTT protocol {protocol!r} is not 5 or 3.1.1")
    return Broker(parts.hostname, parts.port or (8883 if tls else 1883), tls, protocol)


@dataclass(frozen=True)
class EnrolSource:
    """A checked bundle: ``root`` holds the files (a temporary folder when it came as an archive)."""

    origin: Path
    root: Path
    site_id: str
    device_id: str
    broker: Broker
    files: dict[str, str]  # relative POSIX path -> sha256
    created_at: str

    def path(self, rel: str) -> Path:
        return self.root / rel

    def has(self, rel: str) -> bool:
        return rel in self.files

    def under(self, folder: str) -> list[str]:
        return sorted(r for r in self.files if r.startswith(folder.rstrip("/") + "/"))

    @property
    def tls_files(self) -> dict[str, str]:
        """mqtt config key -> bundle file, for the TLS files the bundle has."""
        named = {"ca_file": "ca.pem", "cert_file": "client.pem", "key_file": "client.key"}
        return {k: v for k, v in named.items() if self.has(v)}

    @property
    def registry_snapshot(self) -> str:
        snaps = [r for r in self.under("registry") if r.endswith(".jsonl.gz")]
        return snaps[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(archive: Path, into: Path) -> Path:
    """Regular files and folders only, inside ``into``: no links, devices or paths leaving it."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise EnrolError(
                        f"{archive}: member {member.name!r} is a link, a device or leaves the archive; fix: {_REBUILD}"
                    )
                target = into.joinpath(*name.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EnrolError(f"{archive}: not a readable .tar.gz ({exc}); fix: copy it again, or {_REBUILD}") from exc
    tops = [p for p in into.iterdir()]
    if not (into / "enrol.json").is_file() and len(tops) == 1 and tops[0].is_dir():
        return tops[0]  # an archive of the folder itself
    return into


def _manifest(root: Path, origin: Path) -> dict[str, Any]:
    path = root / "enrol.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EnrolError(f"{origin}: no enrol.json ({exc.strerror}); fix: give the bundle central made") from exc
    except ValueError as exc:
        raise EnrolError(f"{origin}: enrol.json is not JSON ({exc}); fix: {_REBUILD}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise EnrolError(f"{origin}: enrol.json is not format {FORMAT} version {VERSION}; fix: {_REBUILD}")
    return doc


def _checked(doc: dict[str, Any], root: Path, origin: Path) -> EnrolSource:
    where = f"{origin}: enrol.json"
    for key in ("site_id", "device_id"):
        if not isinstance(doc.get(key), str) or not _ID.match(doc[key]):
            raise EnrolError(f"{where}: {key} must be letters, digits, '_', '.' or '-'; fix: {_REBUILD}")
    try:
        broker = parse_broker_url(str(doc.get("broker", {}).get("url", "")), str(doc["broker"].get("protocol", "5")))
    except (ValueError, AttributeError, KeyError) as exc:
        raise EnrolError(f"{where}: broker: {exc}; fix: {_REBUILD}") from exc
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise EnrolError(f"{where}: no files listed; fix: {_REBUILD}")
    for rel, digest in sorted(files.items()):
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts:
            raise EnrolError(f"{where}: file {rel!r} leaves the bundle; fix: {_REBUILD}")
        path = root.joinpath(*parts)
        if not path.is_file():
            raise EnrolError(f"{origin}: {rel} is listed in enrol.json but missing; fix: copy the whole bundle again")
        if sha256_file(path) != digest:
            raise EnrolError(
                f"{origin}: {rel} does not match its sha256 in enrol.json (damaged copy?); fix: copy it again"
            )
    source = EnrolSource(
        origin, root, doc["site_id"], doc["device_id"], broker, dict(files), str(doc.get("created_at", ""))
    )
    _require_parts(source, where)
    return source


def _require_parts(source: EnrolSource, where: str) -> None:
    missing = [r for r in ("plate.key", "models/classifier/manifest.json") if not source.has(r)]
    if not source.under("trust"):
        missing.append("trust/*.pub")
    snaps = [r for r in source.under("registry") if r.endswith(".jsonl.gz")]
    if len(snaps) != 1 or not source.has(snaps[0] + ".sig"):
        missing.append("registry/<one snapshot>.jsonl.gz with its .sig")
    if source.broker.tls and not source.has("ca.pem"):
        missing.append("ca.pem (the broker URL is mqtts://)")
    if source.has("client.pem") != source.has("client.key"):
        missing.append("client.pem and client.key together")
    if not source.broker.tls and source.tls_files:
        missing.append("an mqtts:// broker URL (the bundle has TLS files but the URL is mqtt://)")
    if missing:
        raise EnrolError(f"{where}: the bundle lacks {'; '.join(missing)}; fix: {_REBUILD}")


def open_source(origin: Path, workdir: Path | None = None) -> EnrolSource:
    """Read and check a bundle folder, or extract a ``.tar.gz`` into ``workdir`` (a new temp dir if None)."""
    origin = Path(origin)
    if origin.is_dir():
        root = origin
    elif origin.is_file():
        root = _extract(origin, workdir or Path(tempfile.mkdtemp(prefix="iaflash-enrol-")))
    else:
        raise EnrolError(f"{origin}: no such folder or archive; fix: give the path of the provisioning bundle")
    return _checked(_manifest(root, origin), root, origin)
