"""Revocation lists: a small signed JSON document naming the key ids a box must no longer trust.

The document (docs/SIGNING.md#revocation)::

    {"format": "iaflash-revocation-list", "version": 1, "seq": 3,
     "issued_at": "2026-12-02T10:00:00+00:00",
     "revoked": [{"key_id": "176f808f64b32a16", "reason": "laptop stolen"}],
     "signature": {<a format-1 signature document (engines.signing.sign_bytes)>}}

``signature`` covers :func:`canonical_bytes` of the document without ``signature`` (sorted keys, no
spaces, UTF-8), like a command's. It must be by a key of role ``revocation``
(:meth:`iaflash.engines.trust.TrustStore.verify_revocations`). A list is complete, not a delta: the
newest list a box applied is the whole set of revoked keys. ``seq`` orders lists; a box never
replaces a list with one of a lower seq (:class:`~iaflash.engines.errors.RollbackRefused`).

This module parses and builds lists; it checks no signature (that needs a trust store).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from iaflash.engines.errors import SignatureError
from iaflash.engines.prehash import digest_bytes
from iaflash.engines.sigdoc import canonical_bytes, sign_bytes

__all__ = ["FORMAT", "VERSION", "Revocation", "RevocationList", "build_revocation_list", "parse_revocation_list"]

FORMAT = "iaflash-revocation-list"
VERSION = 1
_KEYS = frozenset({"format", "version", "seq", "issued_at", "revoked", "signature"})
_HEX = frozenset("0123456789abcdef")
MAX_ENTRIES = 10_000
_FIX = "fix: build it with `iaflash-engines trust sign-revocations` and do not edit it after signing"


@dataclass(frozen=True)
class Revocation:
    """One revoked key: its id and why."""

    key_id: str
    reason: str


@dataclass(frozen=True)
class RevocationList:
    """A parsed (not yet verified) revocation list; ``document`` is the JSON it came from, signature included."""

    seq: int
    issued_at: datetime
    revoked: tuple[Revocation, ...]
    document: Mapping[str, Any]

    def find(self, kid: str) -> Revocation | None:
        return next((r for r in self.revoked if r.key_id == kid), None)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(r.key_id for r in self.revoked)

    @property
    def digest(self) -> str:
        """sha256 of the signed bytes: two lists of one seq are the same list only if these match."""
        return digest_bytes(canonical_bytes(self.document)).sha256

    def summary(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "issued_at": self.issued_at.isoformat(timespec="seconds"),
            "revoked": [{"key_id": r.key_id, "reason": r.reason} for r in self.revoked],
        }


def _bad(where: str, problem: str) -> SignatureError:
    return SignatureError(f"revocation list {where}: {problem}; {_FIX}")


def _entry(item: Any, where: str, index: int) -> Revocation:
    if not isinstance(item, Mapping) or set(item) != {"key_id", "reason"}:
        raise _bad(where, f"revoked[{index}] must be an object with exactly key_id and reason")
    kid, reason = item["key_id"], item["reason"]
    if not (isinstance(kid, str) and len(kid) == 16 and set(kid) <= _HEX):
        raise _bad(where, f"revoked[{index}].key_id is not 16 lowercase hex characters")
    if not (isinstance(reason, str) and 0 < len(reason) <= 200 and reason.isprintable()):
        raise _bad(where, f"revoked[{index}].reason must be printable text of 1 to 200 characters")
    return Revocation(kid, reason)


def parse_revocation_list(doc: Any, where: str) -> RevocationList:
    """Validate the document's shape (not its signature); SignatureError names the problem."""
    if not isinstance(doc, Mapping):
        raise _bad(where, "not a JSON object")
    if doc.get("format") != FORMAT or doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
        raise _bad(where, f"not a {FORMAT} version {VERSION} document")
    if not doc.keys() <= _KEYS:
        raise _bad(where, f"unknown keys {sorted(doc.keys() - _KEYS)}")
    if "signature" not in doc:
        raise SignatureError(
            f"revocation list {where} is not signed; fix: sign it with "
            "`iaflash-engines trust sign-revocations --key REVOCATION.key ...`"
        )
    seq = doc.get("seq")
    if type(seq) is not int or seq < 1:
        raise _bad(where, "seq must be an integer >= 1")
    text = str(doc.get("issued_at"))
    try:
        issued = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)  # Z: Python 3.10 too
    except ValueError:
        issued = None
    if issued is None or issued.tzinfo is None:
        raise _bad(where, "issued_at must be an ISO 8601 time with a UTC offset")
    revoked = doc.get("revoked")
    if not isinstance(revoked, list) or len(revoked) > MAX_ENTRIES:
        raise _bad(where, f"revoked must be a list of at most {MAX_ENTRIES} entries")
    entries = tuple(_entry(item, where, i) for i, item in enumerate(revoked))
    if len({e.key_id for e in entries}) != len(entries):
        raise _bad(where, "a key id is listed twice")
    return RevocationList(seq, issued.astimezone(timezone.utc), entries, dict(doc))


def build_revocation_list(
    seq: int, revoked: Iterable[tuple[str, str]], private_key: Ed25519PrivateKey, signer: str
) -> dict[str, Any]:
    """A signed revocation list document: ``revoked`` is (key id, reason) pairs; the list replaces any older one."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "seq": seq,
        "issued_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "revoked": [{"key_id": kid, "reason": reason} for kid, reason in revoked],
    }
    doc["signature"] = {}  # parsed below with a placeholder, so a bad argument never gets signed
    parse_revocation_list(doc, "(being built)")
    doc["signature"] = sign_bytes(canonical_bytes(doc), private_key, signer)
    return doc
