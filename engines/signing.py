"""Ed25519 signatures on model bundles and registry subset files.

Keys are files (:mod:`iaflash.engines.keys`, re-exported here): ``<name>.key`` (PEM PKCS#8, 0600) signs,
``<name>.pub`` (64 hex characters) verifies. The trust store is a directory of ``.pub`` files; a
key's name is the file's stem and its id (:func:`key_id`) the first 16 hex of sha256(raw key).

A signature is a detached JSON document (``<file>.sig``, or ``manifest.sig`` for a bundle)::

    {"format": "iaflash-signature", "version": 1, "algorithm": "ed25519", "key_id": "…",
     "signature": "<base64>", "signed_at": "<ISO 8601>", "signer": "<name>"}

Two formats (docs/SIGNING.md):

* **version 1**: ``signature`` is pure Ed25519 over the exact bytes of the file. Verifying it needs
  the whole file in memory, so it is used for small documents (bundle manifests, commands) and
  accepted for a registry file only up to :data:`WHOLE_FILE_LIMIT` bytes.
* **version 2** (prehashed; what :func:`sign_file` writes): the document adds
  ``"digest": "sha256", "sha256": "<64 hex>", "size": <bytes>`` and ``signature`` is Ed25519 over
  :func:`iaflash.engines.prehash.signed_message` (a domain tag, the file's sha256 and size). It is
  verified in one streamed pass (:func:`open_trusted_file`), in bounded memory whatever the size.

Only ``signature`` is authenticated (the ``sha256``/``size`` fields are checked against the file
for a clearer message, and the signature covers the values computed from the file itself).
``key_id`` picks the trusted key to check it with; ``signer`` and ``signed_at`` are informational,
and the name reported on success is the trust store's, never the document's.

A bundle's signature covers ``manifest.json``; the manifest pins the sha256 of every other file,
which :func:`iaflash.engines.bundle.load_bundle` checks after the signature, so one signature covers it all.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from iaflash.engines.atomic import write_atomic
from iaflash.engines.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle, load_bundle
from iaflash.engines.errors import SignatureError, UntrustedKey
from iaflash.engines.keys import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    public_key_bytes,
    read_file,
)
from iaflash.engines.prehash import FileDigest, HashingReader, digest_bytes, digest_stream, signed_message

__all__ = [
    "PREHASH_VERSION",
    "SIGNATURE_FORMAT",
    "SIGNATURE_VERSION",
    "WHOLE_FILE_LIMIT",
    "TrustStore",
    "TrustedFile",
    "Verified",
    "bundle_verifier",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_trusted_bundle",
    "open_trusted_file",
    "public_key_bytes",
    "read_signature",
    "read_trusted_file",
    "read_verified_file",
    "sign_bundle",
    "sign_bytes",
    "sign_digest",
    "sign_file",
    "signature_path",
    "verify_bundle",
    "verify_file",
]

log = logging.getLogger(__name__)

SIGNATURE_FORMAT = "iaflash-signature"
SIGNATURE_VERSION = 1  # whole-message Ed25519 (manifests, commands)
PREHASH_VERSION = 2  # Ed25519 over the sha256 and size of a file (files of any size)
WHOLE_FILE_LIMIT = 64 << 20  # a version-1 signed file larger than this is refused by open_trusted_file
ALGORITHM = "ed25519"
_RESIGN = "re-sign it at central with this version's `iaflash-engines sign FILE --key PUBLISHER.key` (format 2)"
_SIGN_HINT = "iaflash-engines sign {target} --key PUBLISHER.key"


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


def _claimed_digest(doc: Mapping[str, Any], where: str) -> FileDigest | None:
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


def _check_document(doc: Any, where: str) -> tuple[str, bytes]:
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
    _claimed_digest(doc, where)
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
    fix = "sign it with " + _SIGN_HINT.format(target=signed)
    if not sig_path.exists():
        raise SignatureError(f"not signed: {sig_path} is missing; fix: {fix}")
    data = read_file(sig_path, "signature", fix)
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"malformed signature {sig_path}: not JSON ({exc}); fix: {fix}") from exc
    if not isinstance(doc, dict):
        raise SignatureError(f"malformed signature {sig_path}: not a JSON object; fix: {fix}")
    return doc


def _dump(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


# ---------------------------------------------------------------- trust store


@dataclass(frozen=True)
class Verified:
    """A signature that checked out: the trust store's name for the key, and the document's details."""

    name: str
    key_id: str
    signed_at: str
    signer: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "key_id": self.key_id, "signed_at": self.signed_at, "signer": self.signer}


class TrustStore:
    """The trusted publisher keys: every ``*.pub`` of one directory, by name (file stem) and key id."""

    def __init__(self, path: Path, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.path = Path(path)
        self._by_name = dict(sorted(keys.items()))
        self._by_id: dict[str, tuple[str, Ed25519PublicKey]] = {}
        for name, key in self._by_name.items():
            self._by_id.setdefault(key_id(public_key_bytes(key)), (name, key))

    @classmethod
    def from_dir(cls, path: Path) -> TrustStore:
        """Load every ``*.pub`` of ``path``; a missing directory or a bad file raises SignatureError."""
        root = Path(path)
        if not root.is_dir():
            raise SignatureError(
                f"trust store {root} is not a directory; fix: create it and copy the publishers' .pub files "
                "into it (security.trust_dir)"
            )
        if stat.S_IMODE(root.stat().st_mode) & stat.S_IWOTH:
            log.warning("trust store %s is writable by others: anyone on this machine can add a key", root)
        keys = {pub.stem: load_public_key(pub) for pub in sorted(root.glob("*.pub")) if pub.is_file()}
        log.debug("trust store %s: %d keys", root, len(keys))
        return cls(root, keys)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The key ids, in the order of :attr:`names`."""
        return tuple(key_id(public_key_bytes(k)) for k in self._by_name.values())

    def check(
        self, data: bytes, signature_doc: Mapping[str, Any], *, what: str = "the data", source: str | None = None
    ) -> Verified:
        """Verify ``signature_doc`` (read from ``source``) over ``data`` (named ``what`` in errors).

        Raises :class:`SignatureError`, or :class:`UntrustedKey` for a key outside the store.
        """
        where = source or f"of {what}"
        kid, raw_sig = _check_document(signature_doc, where)
        if _claimed_digest(signature_doc, where) is None:
            return self._verified(kid, raw_sig, data, signature_doc, what)
        return self.check_digest(digest_bytes(data), signature_doc, what=what, source=source)

    def check_digest(
        self, digest: FileDigest, signature_doc: Mapping[str, Any], *, what: str = "the data", source: str | None = None
    ) -> Verified:
        """Verify a format-2 ``signature_doc`` against the sha256 and size computed from the content.

        A format-1 document cannot be checked this way (it needs the whole content): SignatureError.
        """
        where = source or f"of {what}"
        kid, raw_sig = _check_document(signature_doc, where)
        claimed = _claimed_digest(signature_doc, where)
        if claimed is None:
            raise SignatureError(
                f"{what}: its signature {where} is format 1 (Ed25519 over the whole file), which cannot be "
                f"checked without holding the file in memory; fix: {_RESIGN}"
            )
        if claimed.size != digest.size:
            raise SignatureError(
                f"{what}: signature does not match: the file is {digest.size} bytes, it was signed at "
                f"{claimed.size} bytes (truncated or altered after signing); fix: get an intact copy from the publisher"
            )
        return self._verified(kid, raw_sig, signed_message(digest), signature_doc, what)

    def _verified(self, kid: str, raw_sig: bytes, message: bytes, doc: Mapping[str, Any], what: str) -> Verified:
        found = self._by_id.get(kid)
        if found is None:
            trusted = ", ".join(self.names) or "none"
            raise UntrustedKey(
                f"{what}: signed by key id {kid} which is not in the trust store {self.path} (trusted: {trusted}); "
                "add the publisher's .pub to the trust store or get a bundle signed by a trusted key"
            )
        name, key = found
        try:
            key.verify(raw_sig, message)
        except InvalidSignature as exc:
            raise SignatureError(
                f"{what}: signature does not match: the data was altered after signing (key {name}, id {kid}); "
                "fix: get an intact copy from the publisher"
            ) from exc
        return Verified(name, kid, str(doc["signed_at"]), str(doc["signer"]))

    def verify(self, data: bytes, signature_doc: Mapping[str, Any]) -> str:
        """The trusted key's name if ``signature_doc`` is a valid signature of ``data`` by it."""
        return self.check(data, signature_doc).name


# ---------------------------------------------------------------- files


def sign_file(path: Path, private_key_path: Path, signer: str | None = None, *, version: int = PREHASH_VERSION) -> Path:
    """Sign ``path`` with the key in ``private_key_path``; writes ``<path>.sig`` atomically and returns it.

    ``version`` 2 (default) signs the file's sha256 and size, read in bounded memory; 1 signs the
    whole file (read into memory), for agents older than format 2 (docs/SIGNING.md).
    """
    target = Path(path)
    key = load_private_key(private_key_path)
    name = signer or Path(private_key_path).stem
    if version == SIGNATURE_VERSION:
        doc = sign_bytes(read_file(target, "file to sign", "check the path"), key, name)
    elif version == PREHASH_VERSION:
        with _open_file(target, "file to sign") as fh:
            doc = sign_digest(digest_stream(fh), key, name)
    else:
        raise SignatureError(f"signature version {version!r} does not exist; fix: use 2 (or 1 for older agents)")
    sig = signature_path(target)
    write_atomic(sig, _dump(doc), mode=0o644)
    return sig


def _open_file(path: Path, what: str) -> BinaryIO:
    try:
        return open(path, "rb")  # the caller closes it (a context manager or TrustedFile.close)
    except OSError as exc:
        raise SignatureError(f"cannot read {what} {path}: {exc.strerror or exc}; fix: check the path") from exc


class TrustedFile:
    """A file whose signature was checked, to be read once more through :attr:`stream`.

    :func:`open_trusted_file` checked the signature on a first streamed pass over an open file;
    :attr:`stream` reads the same open file from the start again, hashing it. :meth:`confirm`
    (call it after parsing, before committing anything) proves the bytes parsed are the bytes
    whose signature was checked, and raises :class:`SignatureError` if the file changed meanwhile.
    """

    def __init__(self, path: Path, stream: IO[bytes], verified: Verified | None, expected: FileDigest | None) -> None:
        self.path = path
        self.verified = verified
        self._expected = expected
        self._hashing = HashingReader(stream) if expected is not None else None
        self.stream: IO[bytes] = io.BufferedReader(self._hashing) if self._hashing is not None else stream

    def confirm(self) -> None:
        """Raise SignatureError unless everything read since the check hashes to the checked digest."""
        if self._expected is None or self._hashing is None:
            return  # accepted unsigned, or a small format-1 file parsed from the verified bytes
        got = self._hashing.drain()
        if got != self._expected:
            raise SignatureError(
                f"{self.path}: changed while it was being read (sha256 {got.sha256[:16]}…, {got.size} bytes after "
                f"its signature was checked over {self._expected.sha256[:16]}…, {self._expected.size} bytes); nothing "
                "was imported; fix: do not write to the file during the import, copy it again"
            )

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> TrustedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_verified(target: Path, trust: TrustStore) -> TrustedFile:
    sig = signature_path(target)
    doc = read_signature(sig, target)
    _check_document(doc, str(sig))
    fh = _open_file(target, "signed file")
    try:
        if _claimed_digest(doc, str(sig)) is None:  # format 1: whole file in memory, up to a limit
            size = os.fstat(fh.fileno()).st_size
            if size > WHOLE_FILE_LIMIT:
                raise SignatureError(
                    f"{target}: its signature {sig} is format 1 (Ed25519 over the whole file), which needs the "
                    f"whole file in memory; the file is {size / 2**20:.0f} MiB, above the "
                    f"{WHOLE_FILE_LIMIT >> 20} MiB this agent holds for that; fix: {_RESIGN}"
                )
            data = fh.read()
            fh.close()
            verified = trust.check(data, doc, what=str(target), source=str(sig))
            return TrustedFile(target, io.BytesIO(data), verified, None)
        digest = digest_stream(fh)
        verified = trust.check_digest(digest, doc, what=str(target), source=str(sig))
        fh.seek(0)
        return TrustedFile(target, fh, verified, digest)
    except BaseException:
        fh.close()
        raise


def open_trusted_file(path: Path, trust_dir: Path | None, allow_unsigned: bool) -> TrustedFile:
    """What the registry import calls: ``path``, signed by a key of ``trust_dir``, checked in bounded memory.

    Format 2 is checked in one streamed pass (memory: one 1 MiB chunk); a format-1 signature is
    checked from memory up to :data:`WHOLE_FILE_LIMIT` bytes and refused above, with the fix.
    With ``allow_unsigned``, a file without ``<path>.sig`` (or with no trust store) is opened with
    a warning and ``verified`` None; a present but bad or untrusted signature is refused all the same.
    """
    target = Path(path)
    trust = _open_trust(trust_dir, allow_unsigned)
    if allow_unsigned and (trust is None or not signature_path(target).exists()):
        log.warning("%s is NOT signed or not checked; accepted because security.allow_unsigned = true", target)
        return TrustedFile(target, _open_file(target, "file"), None, None)
    if trust is None:
        raise SignatureError(f"{target}: no trust store to check its signature against; fix: set security.trust_dir")
    return _open_verified(target, trust)


def read_verified_file(path: Path, trust: TrustStore, sig_path: Path | None = None) -> tuple[bytes, Verified]:
    """Read ``path`` once and verify its signature; returns the verified bytes (parse these, not the file)."""
    target = Path(path)
    sig = sig_path or signature_path(target)
    doc = read_signature(sig, target)
    data = read_file(target, "signed file", "check the path")
    return data, trust.check(data, doc, what=str(target), source=str(sig))


def read_trusted_file(path: Path, trust_dir: Path | None, allow_unsigned: bool) -> tuple[bytes, Verified | None]:
    """What the registry import calls: the bytes of ``path``, signed by a key of ``trust_dir``.

    With ``allow_unsigned``, a file without ``<path>.sig`` (or with no trust store) is read with a
    warning and ``None``; a present but bad or untrusted signature is refused all the same.
    """
    target = Path(path)
    trust = _open_trust(trust_dir, allow_unsigned)
    if allow_unsigned and (trust is None or not signature_path(target).exists()):
        log.warning("%s is NOT signed or not checked; accepted because security.allow_unsigned = true", target)
        return read_file(target, "file", "check the path"), None
    if trust is None:
        raise SignatureError(f"{target}: no trust store to check its signature against; fix: set security.trust_dir")
    return read_verified_file(target, trust)


def verify_file(path: Path, trust: TrustStore, sig_path: Path | None = None) -> str:
    """The trusted signer's name of ``path`` (signature in ``<path>.sig``); raises SignatureError if none."""
    return read_verified_file(path, trust, sig_path)[1].name


# ---------------------------------------------------------------- bundles


def sign_bundle(bundle_dir: Path, private_key_path: Path, signer: str | None = None) -> Path:
    """Check the bundle's integrity, then sign the exact ``manifest.json`` bytes into ``manifest.sig``."""
    root = Path(bundle_dir)
    key = load_private_key(private_key_path)
    seen: list[bytes] = []
    load_bundle(root, verify=lambda raw, _root: seen.append(raw))  # refuses a broken bundle before signing
    sig = root / SIGNATURE_FILE
    write_atomic(sig, _dump(sign_bytes(seen[0], key, signer or Path(private_key_path).stem)), mode=0o644)
    return sig


class _BundleVerifier:
    """The ``verify=`` hook of :func:`load_bundle`; keeps what it verified in :attr:`result`."""

    def __init__(self, trust: TrustStore | None, allow_unsigned: bool) -> None:
        self.trust = trust
        self.allow_unsigned = allow_unsigned
        self.result: Verified | None = None

    def __call__(self, raw: bytes, root: Path) -> None:
        sig = root / SIGNATURE_FILE
        if not sig.exists():
            if self.allow_unsigned:
                log.warning("bundle %s is NOT signed; accepted because security.allow_unsigned = true", root)
                return
            raise SignatureError(
                f"bundle {root} is not signed: {sig} is missing; fix: sign it with "
                f"{_SIGN_HINT.format(target=root)} (security.allow_unsigned = true accepts unsigned bundles, "
                "for development only)"
            )
        doc = read_signature(sig, root)
        if self.trust is None:
            if self.allow_unsigned:
                log.warning(
                    "bundle %s signature NOT checked (no trust store); accepted because security.allow_unsigned = true",
                    root,
                )
                return
            raise SignatureError(f"bundle {root}: no trust store to check {sig} against; fix: set security.trust_dir")
        self.result = self.trust.check(raw, doc, what=f"{root / MANIFEST_FILE}", source=str(sig))


def bundle_verifier(trust: TrustStore | None, allow_unsigned: bool) -> Callable[[bytes, Path], None]:
    """A ``verify=`` hook for :func:`load_bundle`.

    Refuses a tampered bundle or one signed by a key outside ``trust``; refuses an unsigned one
    unless ``allow_unsigned`` (then logs a warning on each load). A bad signature is never accepted.
    """
    return _BundleVerifier(trust, allow_unsigned)


def verify_bundle(
    path: Path, trust: TrustStore | None, *, allow_unsigned: bool = False
) -> tuple[Bundle, Verified | None]:
    """Load the bundle, checking its signature then every file's sha256; ``None`` when accepted unsigned."""
    verifier = _BundleVerifier(trust, allow_unsigned)
    bundle = load_bundle(path, verify=verifier)
    return bundle, verifier.result


def _open_trust(trust_dir: Path | None, allow_unsigned: bool) -> TrustStore | None:
    if trust_dir is None:
        return None
    if not Path(trust_dir).exists() and allow_unsigned:
        log.warning(
            "trust store %s does not exist; signatures cannot be checked (security.allow_unsigned = true)", trust_dir
        )
        return None
    return TrustStore.from_dir(trust_dir)


def load_trusted_bundle(path: Path, trust_dir: Path | None, allow_unsigned: bool) -> Bundle:
    """What the agent calls: load the bundle at ``path``, signed by a key of ``trust_dir``.

    Raises :class:`SignatureError` (a :class:`BundleError`) for an unsigned, tampered or untrusted
    bundle and :class:`BundleError` for a file that fails its sha256.
    """
    bundle, verified = verify_bundle(path, _open_trust(trust_dir, allow_unsigned), allow_unsigned=allow_unsigned)
    if verified is not None:
        log.info(
            "bundle %s %s %s: signed by %s (key id %s) at %s",
            path,
            bundle.manifest.name,
            bundle.manifest.version,
            verified.name,
            verified.key_id,
            verified.signed_at,
        )
    return bundle
