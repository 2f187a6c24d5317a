"""Ed25519 signatures on model bundles and registry subset files, checked by role.

Keys are files (:mod:`iaflash.engines.keys`, re-exported here): ``<name>.key`` (PEM PKCS#8, 0600) signs,
``<name>.pub`` (64 hex characters) verifies. The trust store (:mod:`iaflash.engines.trust`, re-exported)
holds ``.pub`` files in one folder per role (``models``, ``registry``, ``commands``,
``revocation``); a key's name is the file's stem and its id (:func:`key_id`) the first 16 hex of
sha256(raw key). Bundles need a ``models`` key, registry files a ``registry`` key. With the box's
trust state (``state_file``, :mod:`iaflash.engines.trust_state`) the applied revocation list is
enforced, a bundle's version may not go back (:mod:`iaflash.engines.rollback`), and refusals are counted.

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

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

from iaflash.engines.atomic import write_atomic
from iaflash.engines.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle, load_bundle
from iaflash.engines.errors import RollbackRefused, SignatureError, UnreadableFile, WrongRole
from iaflash.engines.keys import (
    ROLE_SIGNS,
    ROLES,
    file_exists,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    public_key_bytes,
    read_file,
    sibling_role,
)
from iaflash.engines.prehash import FileDigest, HashingReader, digest_stream
from iaflash.engines.rollback import BundleMark, check_bundle_version
from iaflash.engines.sigdoc import (
    PREHASH_VERSION,
    SIGN_HINT,
    SIGNATURE_FORMAT,
    SIGNATURE_VERSION,
    Verified,
    check_document,
    claimed_digest,
    dump_signature,
    read_signature,
    sign_bytes,
    sign_digest,
    signature_path,
)
from iaflash.engines.trust import TrustedKey, TrustStore, install_revocations
from iaflash.engines.trust_state import TrustState

__all__ = [
    "PREHASH_VERSION",
    "ROLES",
    "SIGNATURE_FORMAT",
    "SIGNATURE_VERSION",
    "WHOLE_FILE_LIMIT",
    "BundleMark",
    "TrustState",
    "TrustStore",
    "TrustedFile",
    "TrustedKey",
    "Verified",
    "bundle_verifier",
    "check_bundle_version",
    "check_signing_role",
    "file_exists",
    "generate_keypair",
    "install_revocations",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_trusted_bundle",
    "open_trusted_file",
    "public_key_bytes",
    "read_signature",
    "read_trusted_file",
    "read_verified_file",
    "record_bundle",
    "sign_bundle",
    "sign_bytes",
    "sign_digest",
    "sign_file",
    "signature_path",
    "verify_bundle",
    "verify_file",
]

log = logging.getLogger(__name__)

WHOLE_FILE_LIMIT = 64 << 20  # a version-1 signed file larger than this is refused by open_trusted_file
_RESIGN = "re-sign it at central with this version's `iaflash-engines sign FILE --key PUBLISHER.key` (format 2)"


def check_signing_role(private_key_path: Path, role: str) -> None:
    """Refuse, before signing, a key whose ``.pub`` beside it (as keygen writes it) names another role.

    A box would refuse what it signs (:class:`WrongRole`); saying so at the signing desk is cheaper.
    A key without a ``.pub`` beside it, or without a ``role:`` line, is not checked.
    """
    declared = sibling_role(private_key_path)
    if declared is not None and declared != role:
        raise WrongRole(
            f"{private_key_path} is a {declared} key (its .pub says role: {declared}); {ROLE_SIGNS[role]} need a key "
            f"of role {role}, which boxes keep in trust_dir/{role}/; fix: sign with the {role} key"
        )


# ---------------------------------------------------------------- files


def sign_file(
    path: Path,
    private_key_path: Path,
    signer: str | None = None,
    *,
    version: int = PREHASH_VERSION,
    role: str | None = None,
) -> Path:
    """Sign ``path`` with the key in ``private_key_path``; writes ``<path>.sig`` atomically and returns it.

    ``version`` 2 (default) signs the file's sha256 and size, read in bounded memory; 1 signs the
    whole file (read into memory), for agents older than format 2 (docs/SIGNING.md). ``role``
    (e.g. "registry") refuses a key whose ``.pub`` says another role (:func:`check_signing_role`).
    """
    target = Path(path)
    if role is not None:
        check_signing_role(private_key_path, role)
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
    write_atomic(sig, dump_signature(doc), mode=0o644)
    return sig


def _open_file(path: Path, what: str) -> BinaryIO:
    try:
        return open(path, "rb")  # the caller closes it (a context manager or TrustedFile.close)
    except FileNotFoundError as exc:
        raise SignatureError(f"{what} {path} is missing; fix: check the path") from exc
    except OSError as exc:
        raise UnreadableFile(what, path, exc) from exc


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


def _open_verified(target: Path, trust: TrustStore, role: str | None) -> TrustedFile:
    sig = signature_path(target)
    doc = read_signature(sig, target)
    check_document(doc, str(sig))
    fh = _open_file(target, "signed file")
    try:
        if claimed_digest(doc, str(sig)) is None:  # format 1: whole file in memory, up to a limit
            size = os.fstat(fh.fileno()).st_size
            if size > WHOLE_FILE_LIMIT:
                raise SignatureError(
                    f"{target}: its signature {sig} is format 1 (Ed25519 over the whole file), which needs the "
                    f"whole file in memory; the file is {size / 2**20:.0f} MiB, above the "
                    f"{WHOLE_FILE_LIMIT >> 20} MiB this agent holds for that; fix: {_RESIGN}"
                )
            data = fh.read()
            fh.close()
            verified = trust.check(data, doc, role=role, what=str(target), source=str(sig))
            return TrustedFile(target, io.BytesIO(data), verified, None)
        digest = digest_stream(fh)
        verified = trust.check_digest(digest, doc, role=role, what=str(target), source=str(sig))
        fh.seek(0)
        return TrustedFile(target, fh, verified, digest)
    except OSError as exc:  # a read of the open file failed (an I/O error of its storage)
        fh.close()
        raise UnreadableFile("signed file", target, exc) from exc
    except BaseException:
        fh.close()
        raise


def open_trusted_file(
    path: Path,
    trust_dir: Path | None,
    allow_unsigned: bool,
    *,
    role: str = "registry",
    state_file: Path | None = None,
) -> TrustedFile:
    """What the registry import calls: ``path``, signed by a ``role`` key of ``trust_dir``, checked in bounded memory.

    Format 2 is checked in one streamed pass (memory: one 1 MiB chunk); a format-1 signature is
    checked from memory up to :data:`WHOLE_FILE_LIMIT` bytes and refused above, with the fix.
    With ``allow_unsigned``, a file without ``<path>.sig`` (or with no trust store) is opened with
    a warning and ``verified`` None; a present but bad or untrusted signature is refused all the same.
    ``state_file``: the box's trust state (revocations enforced, refusals counted).
    """
    target = Path(path)
    trust = _open_trust(trust_dir, allow_unsigned, state_file)
    if allow_unsigned and (trust is None or not file_exists(signature_path(target), "signature")):
        log.warning("%s is NOT signed or not checked; accepted because security.allow_unsigned = true", target)
        return TrustedFile(target, _open_file(target, "file"), None, None)
    if trust is None:
        raise SignatureError(f"{target}: no trust store to check its signature against; fix: set security.trust_dir")
    return _open_verified(target, trust, role)


def read_verified_file(
    path: Path, trust: TrustStore, sig_path: Path | None = None, *, role: str | None
) -> tuple[bytes, Verified]:
    """Read ``path`` once and verify its signature by a ``role`` key; returns the verified bytes (parse these)."""
    target = Path(path)
    sig = sig_path or signature_path(target)
    doc = read_signature(sig, target)
    data = read_file(target, "signed file", "check the path")
    return data, trust.check(data, doc, role=role, what=str(target), source=str(sig))


def read_trusted_file(
    path: Path,
    trust_dir: Path | None,
    allow_unsigned: bool,
    *,
    role: str = "registry",
    state_file: Path | None = None,
) -> tuple[bytes, Verified | None]:
    """The bytes of ``path``, signed by a ``role`` key of ``trust_dir`` (whole file in memory: small files).

    With ``allow_unsigned``, a file without ``<path>.sig`` (or with no trust store) is read with a
    warning and ``None``; a present but bad or untrusted signature is refused all the same.
    """
    target = Path(path)
    trust = _open_trust(trust_dir, allow_unsigned, state_file)
    if allow_unsigned and (trust is None or not file_exists(signature_path(target), "signature")):
        log.warning("%s is NOT signed or not checked; accepted because security.allow_unsigned = true", target)
        return read_file(target, "file", "check the path"), None
    if trust is None:
        raise SignatureError(f"{target}: no trust store to check its signature against; fix: set security.trust_dir")
    return read_verified_file(target, trust, role=role)


def verify_file(path: Path, trust: TrustStore, sig_path: Path | None = None, *, role: str | None) -> str:
    """The trusted signer's name of ``path`` (signature in ``<path>.sig``); raises SignatureError if none."""
    return read_verified_file(path, trust, sig_path, role=role)[1].name


# ---------------------------------------------------------------- bundles


def sign_bundle(bundle_dir: Path, private_key_path: Path, signer: str | None = None) -> Path:
    """Check the bundle's integrity, then sign the exact ``manifest.json`` bytes into ``manifest.sig``.

    A key whose ``.pub`` beside it says a role other than ``models`` is refused (:func:`check_signing_role`).
    """
    root = Path(bundle_dir)
    check_signing_role(private_key_path, "models")
    key = load_private_key(private_key_path)
    seen: list[bytes] = []
    load_bundle(root, verify=lambda raw, _root: seen.append(raw))  # refuses a broken bundle before signing
    sig = root / SIGNATURE_FILE
    write_atomic(sig, dump_signature(sign_bytes(seen[0], key, signer or Path(private_key_path).stem)), mode=0o644)
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
                f"{SIGN_HINT.format(target=root)} (security.allow_unsigned = true accepts unsigned bundles, "
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
        self.result = self.trust.check(raw, doc, role="models", what=f"{root / MANIFEST_FILE}", source=str(sig))


def bundle_verifier(trust: TrustStore | None, allow_unsigned: bool) -> Callable[[bytes, Path], None]:
    """A ``verify=`` hook for :func:`load_bundle`.

    Refuses a tampered bundle or one not signed by a ``models`` key of ``trust``; refuses an
    unsigned one unless ``allow_unsigned`` (then logs a warning on each load). A bad signature is
    never accepted.
    """
    return _BundleVerifier(trust, allow_unsigned)


def verify_bundle(
    path: Path, trust: TrustStore | None, *, allow_unsigned: bool = False
) -> tuple[Bundle, Verified | None]:
    """Load the bundle, checking its signature then every file's sha256; ``None`` when accepted unsigned."""
    verifier = _BundleVerifier(trust, allow_unsigned)
    bundle = load_bundle(path, verify=verifier)
    return bundle, verifier.result


def _open_trust(trust_dir: Path | None, allow_unsigned: bool, state_file: Path | None = None) -> TrustStore | None:
    if trust_dir is None:
        return None
    if not Path(trust_dir).exists() and allow_unsigned:
        log.warning(
            "trust store %s does not exist; signatures cannot be checked (security.allow_unsigned = true)", trust_dir
        )
        return None
    return TrustStore.from_dir(trust_dir, state=None if state_file is None else TrustState(state_file))


def record_bundle(state_file: Path, bundle: Bundle) -> BundleMark:
    """Remember that the box now runs ``bundle`` (after it loaded, warmed and took over): its new mark.

    Raises RollbackRefused if the bundle may not replace what the box ran (:func:`check_bundle_version`);
    a trust state that cannot be written is logged, not raised: the bundle already runs.
    """
    state = TrustState(state_file)
    previous = state.bundle_mark(bundle.manifest.name)
    mark = check_bundle_version(previous, bundle.manifest)
    if mark == previous:
        return mark
    try:
        state.record_bundle(mark)
    except (OSError, SignatureError) as exc:
        log.error("bundle %s %s: the trust state %s was not updated (%s)", mark.name, mark.current, state_file, exc)
    if previous is not None and mark.highest == previous.highest:
        log.warning("bundle %s: signed rollback from %s to %s accepted", mark.name, previous.current, mark.current)
    return mark


def load_trusted_bundle(
    path: Path,
    trust_dir: Path | None,
    allow_unsigned: bool,
    *,
    state_file: Path | None = None,
    record: bool = False,
) -> Bundle:
    """What the agent calls: load the bundle at ``path``, signed by a ``models`` key of ``trust_dir``.

    Raises :class:`SignatureError` (a :class:`BundleError`) for an unsigned, tampered or untrusted
    bundle and :class:`BundleError` for a file that fails its sha256. With ``state_file`` (the
    box's trust state) the applied revocation list is enforced and the bundle's version is checked
    against what the box ran under its name (:func:`check_bundle_version`; RollbackRefused, counted);
    ``record`` then remembers this version at once (:func:`record_bundle`; the agent records once a
    whole model set took over, checks never record).
    """
    state = None if state_file is None else TrustState(state_file)
    bundle, verified = verify_bundle(
        path, _open_trust(trust_dir, allow_unsigned, state_file), allow_unsigned=allow_unsigned
    )
    if state is not None:
        previous = state.bundle_mark(bundle.manifest.name)
        try:
            check_bundle_version(previous, bundle.manifest)
        except RollbackRefused as exc:
            state.count("rollback_bundle")
            raise RollbackRefused(f"{path}: {exc}") from exc
        if record:
            record_bundle(state.path, bundle)
    if verified is not None:
        log.info(
            "bundle %s %s %s: signed by %s (key id %s, role %s) at %s",
            path,
            bundle.manifest.name,
            bundle.manifest.version,
            verified.name,
            verified.key_id,
            verified.role or "any",
            verified.signed_at,
        )
    return bundle
