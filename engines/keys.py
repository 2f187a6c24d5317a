"""Ed25519 key files of the model and registry publishers (see docs/SIGNING.md).

- private key: ``<name>.key``, PEM PKCS#8 Ed25519, unencrypted, mode 0600 (refused otherwise);
- public key: ``<name>.pub``, the raw 32-byte key as 64 hex characters on one line, optionally
  followed by a ``# comment``. A key's id (:func:`key_id`) is the first 16 hex of sha256(raw key).

:mod:`iaflash.engines.signing` re-exports everything public here.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from iaflash.engines.atomic import write_atomic
from iaflash.engines.errors import SignatureError

__all__ = ["generate_keypair", "key_id", "load_private_key", "load_public_key", "public_key_bytes"]

_HEX = frozenset("0123456789abcdef")


def key_id(public_key_bytes: bytes) -> str:
    """The id of a raw 32-byte public key: the first 16 hex characters of its sha256."""
    return hashlib.sha256(public_key_bytes).hexdigest()[:16]


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of a public key (what :func:`key_id` hashes and ``.pub`` files hold in hex)."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_file(path: Path, what: str, fix: str) -> bytes:
    """The bytes of ``path``; a missing or unreadable file raises :class:`SignatureError` naming ``what``."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise SignatureError(f"{what} {path} is missing; fix: {fix}") from exc
    except OSError as exc:
        raise SignatureError(f"{what} {path} cannot be read ({exc.strerror}); fix: check its permissions") from exc


# ---------------------------------------------------------------- keys


def generate_keypair(out_prefix: Path) -> tuple[Path, Path]:
    """Write a new key pair: ``<prefix>.key`` (PEM PKCS#8, 0600) and ``<prefix>.pub`` (hex, 0644).

    Never overwrites: an existing file raises :class:`SignatureError`.
    """
    prefix = Path(out_prefix)
    key_path, pub_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists():
            raise SignatureError(f"{path} already exists; fix: choose another prefix or move the old key away")
    if not prefix.parent.is_dir():
        raise SignatureError(f"{prefix.parent} is not a directory; fix: create it first")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw = public_key_bytes(private.public_key())
    write_atomic(key_path, pem, mode=0o600)
    comment = f"# iaflash ed25519 public key {prefix.name}, key id {key_id(raw)}"
    write_atomic(pub_path, f"{raw.hex()}  {comment}\n".encode(), mode=0o644)
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM PKCS#8 Ed25519 private key from a file readable by its owner only."""
    path = Path(path)
    data = read_file(path, "private key", "give the .key file written by `iaflash-engines keygen`")
    if _looks_public(data):
        raise SignatureError(f"{path} is a public key; fix: sign with the matching .key file (the private key)")
    if stat.S_IMODE(path.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
        raise SignatureError(
            f"private key {path} is readable by group/others (mode {stat.S_IMODE(path.stat().st_mode):o}); "
            f"fix: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # the PEM is encrypted
        raise SignatureError(
            f"private key {path} is encrypted; fix: give an unencrypted PKCS#8 key (protect it with mode 0600)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(
            f"private key {path} is not a PEM private key ({exc}); fix: give the .key file written by "
            "`iaflash-engines keygen` (not the .pub)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"private key {path} is a {type(key).__name__}, not Ed25519; fix: make one with `iaflash-engines keygen`"
        )
    return key


def _parse_public(text: str, where: str) -> bytes:
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    keys = [line for line in lines if line]
    fix = "the file must hold the 64 hex characters of a raw Ed25519 public key (as written by keygen)"
    if len(keys) != 1:
        raise SignatureError(f"public key {where}: expected one key line, found {len(keys)}; fix: {fix}")
    value = keys[0].lower()
    if len(value) != 64 or not set(value) <= _HEX:
        shown = value if len(value) <= 20 else value[:20] + "…"
        raise SignatureError(f"public key {where}: {shown!r} is not 64 hex characters; fix: {fix}")
    return bytes.fromhex(value)


def _looks_public(data: bytes) -> bool:
    try:
        _parse_public(data.decode("ascii"), "")
    except (UnicodeDecodeError, SignatureError):
        return False
    return True


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a ``.pub`` file: 64 hex characters, optionally followed by a ``# comment``."""
    data = read_file(Path(path), "public key", "copy the publisher's .pub file there")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise SignatureError(
            f"public key {path}: not ASCII text; fix: give the .pub file written by `iaflash-engines keygen`"
        ) from exc
    return Ed25519PublicKey.from_public_bytes(_parse_public(text, str(path)))
