"""Signature documents: the detached JSON that signs a file, a manifest or a command.

Format 1 is pure Ed25519 over the exact bytes; format 2 is Ed25519 over a file's sha256 and size
(:func:`iaflash.engines.prehash.signed_message`). docs/SIGNING.md describes both. This leaf module
builds and validates documents; checking one against trusted keys is
:class:`iaflash.engines.trust.TrustStore`'s job.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from iaflash.engines.errors import SignatureError
from iaflash.engines.keys import file_exists, key_id, public_key_bytes, read_file
from iaflash.engines.prehash import FileDigest, signed_message

__all__ = [
    "ALGORITHM",
    "PREHASH_VERSION",
    "SIGNATURE_FORMAT",
    "SIGNATURE_VERSION",
    "Verified",
    "canonical_bytes",
    "check_document",
    "claimed_digest",
    "dump_signature",
    "read_signature",
    "sign_bytes",
    "sign_digest",
    "signature_path",
]

SIGNATURE_FORMAT = "iaflash-signature"
SIGNATURE_VERSION = 1  # whole-message Ed25519 (manifests, commands)
PREHASH_VERSION = 2  # Ed25519 over the sha256 and size of a file (files of any size)
ALGORITHM = "ed25519"
SIGN_HINT = "iaflash-engines sign {target} --key PUBLISHER.key"


def signature_path(path: Path) -> Path:
    """Where the detached signature of ``path`` lives: ``<path>.sig``."""
    return path.with_name(path.name + ".sig")


# ---------------------------------------------------------------- signature documents


def sign_bytes(data: bytes, private_key: Ed25519PrivateKey, signer: str) -> dict[str, Any]:
    """The detached signature document of ``data`` (pure Ed25519 over the exact bytes)."""
    return {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key_id(public_key_bytes(private_key.public_key())),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
        "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "signer": signer,
    }


def sign_digest(digest: FileDigest, private_key: Ed25519PrivateKey, signer: str) -> dict[str, Any]:
    """The format-2 signature document of content with this sha256 and size."""
    doc = sign_bytes(signed_message(digest), private_key, signer)
    return {**doc, "version": PREHASH_VERSION, "digest": "sha256", "sha256": digest.sha256, "size": digest.size}


def _field(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise SignatureError(
            f"malformed signature {where}: field '{key}' must be a non-empty string, got {value!r}; fix: re-sign"
        )
    return value


def claimed_digest(doc: Mapping[str, Any], where: str) -> FileDigest | None:
    """The (sha256, size) a format-2 document claims; None for format 1."""
    if doc.get("version") == SIGNATURE_VERSION:
        return None
    if doc.get("digest") != "sha256":
        raise SignatureError(
            f"malformed signature {where}: 'digest' is {doc.get('digest')!r}, want 'sha256'; fix: re-sign"
        )
    sha, size = doc.get("sha256"), doc.get("size")
    if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= set("0123456789abcdef"):
        raise SignatureError(f"malformed signature {where}: 'sha256' is not 64 lowercase hex; fix: re-sign")
    if type(size) is not int or size < 0:
        raise SignatureError(f"malformed signature {where}: 'size' is not a byte count; fix: re-sign")
    return FileDigest(sha, size)


def check_document(doc: Any, where: str) -> tuple[str, bytes]:
    """Validate a signature document (format 1 or 2); returns (key id, raw 64-byte signature)."""
    if not isinstance(doc, Mapping):
        raise SignatureError(f"malformed signature {where}: not a JSON object; fix: re-sign")
    expected: dict[str, Any] = {"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM}
    for key, want in expected.items():
        if doc.get(key) != want:
            raise SignatureError(
                f"malformed signature {where}: field '{key}' is {doc.get(key)!r}, this agent reads {want!r}; "
                "fix: re-sign with this version's `iaflash-engines sign`"
            )
    version = doc.get("version")
    if version not in (SIGNATURE_VERSION, PREHASH_VERSION) or isinstance(version, bool):
        raise SignatureError(
            f"malformed signature {where}: field 'version' is {version!r}, this agent reads "
            f"{SIGNATURE_VERSION} or {PREHASH_VERSION}; fix: re-sign with this version's `iaflash-engines sign`"
        )
    claimed_digest(doc, where)
    kid = _field(doc, "key_id", where)
    if len(kid) != 16 or not set(kid) <= set("0123456789abcdef"):
        raise SignatureError(f"malformed signature {where}: 'key_id' {kid[:40]!r} is not 16 hex; fix: re-sign")
    signer = _field(doc, "signer", where)
    if len(signer) > 200 or not signer.isprintable():  # it reaches logs: no control characters
        raise SignatureError(f"malformed signature {where}: 'signer' must be printable, <= 200 chars; fix: re-sign")
    try:
        datetime.fromisoformat(_field(doc, "signed_at", where))
    except ValueError as exc:
        raise SignatureError(f"malformed signature {where}: 'signed_at' is not ISO 8601; fix: re-sign") from exc
    try:
        raw = base64.b64decode(_field(doc, "signature", where), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"malformed signature {where}: 'signature' is not base64; fix: re-sign") from exc
    if len(raw) != 64:
        raise SignatureError(
            f"malformed signature {where}: 'signature' is {len(raw)} bytes, Ed25519 gives 64; fix: re-sign"
        )
    return kid, raw


def read_signature(sig_path: Path, signed: Path) -> dict[str, Any]:
    """Read and decode the signature file of ``signed``; a missing or non-JSON file raises SignatureError."""
    fix = "sign it with " + SIGN_HINT.format(target=signed)
    if not file_exists(sig_path, "signature"):
        raise SignatureError(f"not signed: {sig_path} is missing; fix: {fix}")
    data = read_file(sig_path, "signature", fix)
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"malformed signature {sig_path}: not JSON ({exc}); fix: {fix}") from exc
    if not isinstance(doc, dict):
        raise SignatureError(f"malformed signature {sig_path}: not a JSON object; fix: {fix}")
    return doc


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """What an embedded ``signature`` covers (commands, revocation lists): the JSON without ``signature``,
    sorted keys, no spaces, UTF-8."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def dump_signature(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


@dataclass(frozen=True)
class Verified:
    """A signature that checked out: the trust store's name for the key, and the document's details."""

    name: str
    key_id: str
    signed_at: str
    signer: str
    role: str | None = None  # the role the key was trusted for (None: a deprecated flat-layout key)

    def to_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "key_id": self.key_id,
            "signed_at": self.signed_at,
            "signer": self.signer,
            "role": self.role,
        }
