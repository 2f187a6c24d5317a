"""Ed25519 key files of the publishers and the command issuer (see docs/SIGNING.md).

- private key: ``<name>.key``, PEM PKCS#8 Ed25519, unencrypted, mode 0600 (refused otherwise);
- public key: ``<name>.pub``, the raw 32-byte key as 64 hex characters on one line, optionally
  followed by a ``# comment``, and optional field lines ``role: <role>`` and
  ``not_after: <ISO 8601 with offset>`` (:func:`read_public_key`). A key's id (:func:`key_id`) is
  the first 16 hex of sha256(raw key).
- roles (:data:`ROLES`): what a key may sign. The trust store's layout decides a key's role
  (``trust_dir/<role>/*.pub``, :mod:`iaflash.engines.trust`); a ``role:`` field, when present,
  must agree with the folder, so a file copied into the wrong folder is refused, not trusted.

:mod:`iaflash.engines.signing` re-exports everything public here.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from iaflash.engines.atomic import write_atomic
from iaflash.engines.errors import SignatureError, UnreadableFile

__all__ = [
    "ROLES",
    "ROLE_SIGNS",
    "PublicKeyFile",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "parse_not_after",
    "public_key_bytes",
    "read_public_key",
    "sibling_role",
]

_HEX = frozenset("0123456789abcdef")
ROLES = ("models", "registry", "commands", "revocation")
ROLE_SIGNS = {  # what each role's keys sign: in messages and docs/SIGNING.md#roles
    "models": "model bundles",
    "registry": "registry subset files",
    "commands": "commands",
    "revocation": "revocation lists",
}
_FIELDS = ("role", "not_after")


@dataclass(frozen=True)
class PublicKeyFile:
    """A parsed ``.pub`` file: the raw key and its optional fields."""

    path: Path
    raw: bytes
    role: str | None  # the file's ``role:`` field (None: not stated)
    not_after: datetime | None  # the file's ``not_after:`` field, in UTC (None: never expires)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.raw)


def key_id(public_key_bytes: bytes) -> str:
    """The id of a raw 32-byte public key: the first 16 hex characters of its sha256."""
    return hashlib.sha256(public_key_bytes).hexdigest()[:16]


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of a public key (what :func:`key_id` hashes and ``.pub`` files hold in hex)."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_file(path: Path, what: str, fix: str) -> bytes:
    """The bytes of ``path``; a missing file raises :class:`SignatureError` with ``fix``, an unreadable one
    :class:`UnreadableFile` (the fix for its cause), both naming ``what``."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise SignatureError(f"{what} {path} is missing; fix: {fix}") from exc
    except OSError as exc:
        raise UnreadableFile(what, path, exc) from exc


def file_exists(path: Path, what: str) -> bool:
    """``path.exists()``, except that a folder above it this user may not enter raises :class:`UnreadableFile`."""
    try:
        return path.exists()  # Python < 3.14 raises PermissionError there; False would say "not signed"
    except OSError as exc:
        raise UnreadableFile(what, path, exc) from exc


# ---------------------------------------------------------------- keys


def generate_keypair(
    out_prefix: Path, *, role: str | None = None, not_after: datetime | None = None
) -> tuple[Path, Path]:
    """Write a new key pair: ``<prefix>.key`` (PEM PKCS#8, 0600) and ``<prefix>.pub`` (hex, 0644).

    ``role`` and ``not_after`` become the ``.pub``'s field lines (docs/SIGNING.md#roles). Never
    overwrites: an existing file raises :class:`SignatureError`.
    """
    if role is not None and role not in ROLES:
        raise SignatureError(f"role {role!r} does not exist; fix: use one of {', '.join(ROLES)}")
    if not_after is not None and not_after.tzinfo is None:
        raise SignatureError("not_after needs a UTC offset; fix: give e.g. 2027-06-30T23:59:59+00:00")
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
    lines = [f"{raw.hex()}  {comment}"]
    if role is not None:
        lines.append(f"role: {role}  # {ROLE_SIGNS[role]}: this file belongs in trust_dir/{role}/")
    if not_after is not None:
        lines.append(f"not_after: {not_after.astimezone(timezone.utc).isoformat(timespec='seconds')}")
    write_atomic(pub_path, ("\n".join(lines) + "\n").encode(), mode=0o644)
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


def parse_not_after(value: str, where: str) -> datetime:
    """A ``not_after`` value: ISO 8601 with a UTC offset (``Z`` accepted), in UTC."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise SignatureError(
            f"public key {where}: not_after {text[:40]!r} is not an ISO 8601 time with a UTC offset; "
            "fix: write e.g. not_after: 2027-06-30T23:59:59+00:00"
        )
    return parsed.astimezone(timezone.utc)


def _parse_fields(lines: list[str], where: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip()
        if name not in _FIELDS:
            raise SignatureError(
                f"public key {where}: unknown field {name[:40]!r}; fix: the fields are {', '.join(_FIELDS)}"
            )
        if name in fields:
            raise SignatureError(f"public key {where}: field {name!r} is given twice; fix: keep one")
        fields[name] = value.strip()
    return fields


def _parse_public(text: str, where: str) -> tuple[bytes, dict[str, str]]:
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    keys = [line for line in lines if line and ":" not in line]
    fix = "the file must hold the 64 hex characters of a raw Ed25519 public key (as written by keygen)"
    if len(keys) != 1:
        raise SignatureError(f"public key {where}: expected one key line, found {len(keys)}; fix: {fix}")
    value = keys[0].lower()
    if len(value) != 64 or not set(value) <= _HEX:
        shown = value if len(value) <= 20 else value[:20] + "…"
        raise SignatureError(f"public key {where}: {shown!r} is not 64 hex characters; fix: {fix}")
    return bytes.fromhex(value), _parse_fields([line for line in lines if ":" in line], where)


def _looks_public(data: bytes) -> bool:
    try:
        _parse_public(data.decode("ascii"), "")
    except (UnicodeDecodeError, SignatureError):
        return False
    return True


def read_public_key(path: Path) -> PublicKeyFile:
    """Read a ``.pub`` file: 64 hex characters (``# comments`` allowed) and optional ``role:``/``not_after:`` lines."""
    path = Path(path)
    data = read_file(path, "public key", "copy the publisher's .pub file there")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise SignatureError(
            f"public key {path}: not ASCII text; fix: give the .pub file written by `iaflash-engines keygen`"
        ) from exc
    raw, fields = _parse_public(text, str(path))
    role = fields.get("role")
    if role is not None and role not in ROLES:
        raise SignatureError(
            f"public key {path}: role {role[:40]!r} does not exist; fix: use one of {', '.join(ROLES)}"
        )
    not_after = parse_not_after(fields["not_after"], str(path)) if "not_after" in fields else None
    return PublicKeyFile(path, raw, role, not_after)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a ``.pub`` file (:func:`read_public_key`) and return its key."""
    return read_public_key(path).public_key


def sibling_role(private_key_path: Path) -> str | None:
    """The ``role:`` of the ``.pub`` written beside a ``.key`` by keygen, or None (no such file or no role).

    Signing tools use it to refuse, before anything reaches a box, a key of the wrong role.
    """
    pub = Path(private_key_path).with_suffix(".pub")
    if not pub.is_file():
        return None
    try:
        return read_public_key(pub).role
    except SignatureError:
        return None
