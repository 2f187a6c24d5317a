"""The trust store: which keys a box trusts, for what (role), until when (``not_after``), unless revoked.

Layout (docs/SIGNING.md#roles)::

    trust_dir/models/*.pub       model publisher: bundles
    trust_dir/registry/*.pub     registry publisher: subset files (snapshots, deltas)
    trust_dir/commands/*.pub     command issuer: commands from central
    trust_dir/revocation/*.pub   revocation authority: revocation lists

A key's role is the folder it sits in; a ``role:`` line in the ``.pub`` must agree with it. A key
trusted for two roles sits in both folders, in plain sight. **The flat layout** of older versions
(``trust_dir/*.pub``, no role folder) still works, deprecated: every key there may sign everything,
as before, and each load warns with the migration. Once a role folder exists, ``.pub`` files left at
the top are trusted for nothing (warned once).

Every signature check names the role it needs (:meth:`TrustStore.check`); the store refuses, in
this order, an unknown key (:class:`UntrustedKey`), a revoked one (:class:`KeyRevoked`), one of
another role (:class:`WrongRole`), an expired one (:class:`KeyExpired`), then a signature that does
not match. With a :class:`~iaflash.engines.trust_state.TrustState`, the applied revocation list
comes from it and each refusal is counted there.
"""

from __future__ import annotations

import logging
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from iaflash.engines.errors import KeyExpired, KeyRevoked, RollbackRefused, SignatureError, UntrustedKey, WrongRole
from iaflash.engines.keys import ROLE_SIGNS, ROLES, read_public_key
from iaflash.engines.prehash import FileDigest, digest_bytes, signed_message
from iaflash.engines.revocation import RevocationList, parse_revocation_list
from iaflash.engines.sigdoc import Verified, canonical_bytes, check_document, claimed_digest
from iaflash.engines.trust_state import TrustState

__all__ = ["TrustStore", "TrustedKey", "install_revocations"]

log = logging.getLogger(__name__)

_RESIGN = "re-sign it at central with this version's `iaflash-engines sign FILE --key PUBLISHER.key` (format 2)"
_MIGRATE = (
    "fix: move each key into the folder of its role: mkdir {root}/models {root}/registry {root}/commands "
    "{root}/revocation; mv {root}/MODEL-PUBLISHER.pub {root}/models/ (and so on); see docs/SIGNING.md#migration"
)
_warned: set[tuple[str, str]] = set()  # (trust dir, what): each layout warning once per process
_warned_lock = threading.Lock()


def _warn_once(root: Path, what: str, message: str, *args: object) -> None:
    with _warned_lock:
        if (str(root), what) in _warned:
            return
        _warned.add((str(root), what))
    log.warning(message, *args)


@dataclass(frozen=True)
class TrustedKey:
    """One trusted key: name (file stem), id, role (None: flat layout, every role), expiry, file."""

    name: str
    key_id: str
    role: str | None
    not_after: datetime | None
    path: Path
    public_key: Ed25519PublicKey

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key_id": self.key_id,
            "role": self.role,
            "not_after": None if self.not_after is None else self.not_after.isoformat(timespec="seconds"),
            "file": str(self.path),
        }


def _load_role_dir(folder: Path, role: str) -> list[TrustedKey]:
    keys = []
    for pub in sorted(folder.glob("*.pub")):
        if not pub.is_file():
            continue
        parsed = read_public_key(pub)
        if parsed.role is not None and parsed.role != role:
            raise SignatureError(
                f"public key {pub}: its file says 'role: {parsed.role}' but it sits in {folder} (role {role}); "
                f"fix: move it to {folder.parent / parsed.role}/, or correct its role line if it is meant for {role}"
            )
        keys.append(TrustedKey(pub.stem, parsed.key_id, role, parsed.not_after, pub, parsed.public_key))
    return keys


class TrustStore:
    """The trusted keys of one trust directory, by role, with the revocation list the box applied."""

    def __init__(
        self,
        path: Path,
        keys: Sequence[TrustedKey],
        *,
        revocations: RevocationList | None = None,
        state: TrustState | None = None,
        flat: bool = False,
    ) -> None:
        self.path = Path(path)
        self.keys = tuple(sorted(keys, key=lambda k: (k.role or "", k.name)))
        self.revocations = revocations
        self.state = state
        self.flat = flat
        self._by_id: dict[str, list[TrustedKey]] = {}
        for key in self.keys:
            self._by_id.setdefault(key.key_id, []).append(key)

    @classmethod
    def from_dir(cls, path: Path, *, state: TrustState | None = None) -> TrustStore:
        """Load the keys of ``path`` (role folders, else the deprecated flat layout).

        ``state``: the box's trust state, whose applied revocation list is enforced and where
        refusals are counted. A missing directory or a bad ``.pub`` raises SignatureError.
        """
        root = Path(path)
        if not root.is_dir():
            raise SignatureError(
                f"trust store {root} is not a directory; fix: create it with one folder per role "
                f"({', '.join(ROLES)}) and copy the publishers' .pub files into them (security.trust_dir)"
            )
        if stat.S_IMODE(root.stat().st_mode) & stat.S_IWOTH:
            log.warning("trust store %s is writable by others: anyone on this machine can add a key", root)
        top = [p for p in sorted(root.glob("*.pub")) if p.is_file()]
        roles = [r for r in ROLES if (root / r).is_dir()]
        revocations = state.revocation() if state is not None else None
        if not roles:
            keys = []
            for pub in top:
                parsed = read_public_key(pub)
                keys.append(TrustedKey(pub.stem, parsed.key_id, None, parsed.not_after, pub, parsed.public_key))
            if keys:
                _warn_once(
                    root,
                    "flat",
                    "trust store %s uses the flat layout (deprecated): each of its %d keys may sign bundles, registry "
                    "files, commands and revocation lists; %s",
                    root,
                    len(keys),
                    _MIGRATE.format(root=root),
                )
            return cls(root, keys, revocations=revocations, state=state, flat=True)
        if top:
            _warn_once(
                root,
                "stray",
                "trust store %s: %s sit outside the role folders and are trusted for nothing; %s",
                root,
                ", ".join(p.name for p in top),
                _MIGRATE.format(root=root),
            )
        keys = [k for r in roles for k in _load_role_dir(root / r, r)]
        log.debug("trust store %s: %d keys in %s", root, len(keys), ", ".join(roles))
        return cls(root, keys, revocations=revocations, state=state)

    # ----- what is trusted -----------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The keys' names (file stems), each once."""
        return tuple(dict.fromkeys(k.name for k in self.keys))

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The key ids, in the order of :attr:`names`."""
        first = {k.name: k.key_id for k in reversed(self.keys)}
        return tuple(first[n] for n in self.names)

    def for_role(self, role: str) -> tuple[TrustedKey, ...]:
        """The keys that may sign for ``role`` (every key in the flat layout)."""
        return tuple(k for k in self.keys if k.role in (None, role))

    def status(self, key: TrustedKey, now: datetime | None = None) -> str:
        """ok, expired or revoked (for ``trust list``)."""
        if self.revocations is not None and self.revocations.find(key.key_id) is not None:
            return "revoked"
        if key.not_after is not None and key.not_after < (now or datetime.now(timezone.utc)):
            return "expired"
        return "ok"

    # ----- checks --------------------------------------------------------------------------
    def check(
        self,
        data: bytes,
        signature_doc: Mapping[str, Any],
        *,
        role: str | None,
        what: str = "the data",
        source: str | None = None,
    ) -> Verified:
        """Verify ``signature_doc`` (read from ``source``) over ``data`` (named ``what``) by a key of ``role``.

        ``role`` None accepts any role (tools that only ask "who signed this?"). Raises
        :class:`SignatureError`, or an :class:`UntrustedKey` (unknown, revoked, wrong role, expired).
        """
        where = source or f"of {what}"
        kid, raw_sig = check_document(signature_doc, where)
        if claimed_digest(signature_doc, where) is None:
            return self._verified(kid, raw_sig, data, signature_doc, what, role)
        return self.check_digest(digest_bytes(data), signature_doc, role=role, what=what, source=source)

    def check_digest(
        self,
        digest: FileDigest,
        signature_doc: Mapping[str, Any],
        *,
        role: str | None,
        what: str = "the data",
        source: str | None = None,
    ) -> Verified:
        """Verify a format-2 ``signature_doc`` against the sha256 and size computed from the content.

        A format-1 document cannot be checked this way (it needs the whole content): SignatureError.
        """
        where = source or f"of {what}"
        kid, raw_sig = check_document(signature_doc, where)
        claimed = claimed_digest(signature_doc, where)
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
        return self._verified(kid, raw_sig, signed_message(digest), signature_doc, what, role)

    def verify(self, data: bytes, signature_doc: Mapping[str, Any], *, role: str | None) -> str:
        """The trusted key's name if ``signature_doc`` is a valid signature of ``data`` by it."""
        return self.check(data, signature_doc, role=role).name

    def _refuse(self, kind: str, exc: UntrustedKey) -> UntrustedKey:
        if self.state is not None:
            self.state.count(kind)
        return exc

    def _select(self, kid: str, role: str | None, what: str) -> TrustedKey:
        """The key of id ``kid`` trusted for ``role``, or the refusal that applies, in the documented order."""
        found = self._by_id.get(kid)
        if not found:
            held = self.for_role(role) if role else self.keys
            trusted = ", ".join(dict.fromkeys(k.name for k in held)) or "none"
            folder = f"{self.path / role}" if role and not self.flat else str(self.path)
            raise self._refuse(
                "untrusted_key",
                UntrustedKey(
                    f"{what}: signed by key id {kid} which is not in the trust store {self.path} "
                    f"(trusted{' for ' + role if role else ''}: {trusted}); add the publisher's .pub to {folder} "
                    "or get it signed by a trusted key"
                ),
            )
        revoked = self.revocations.find(kid) if self.revocations is not None else None
        if revoked is not None:
            raise self._refuse(
                "revoked_key",
                KeyRevoked(
                    f"{what}: signed by key {found[0].name} (id {kid}), which is revoked by the revocation list seq "
                    f"{self.revocations.seq if self.revocations else '?'} this box applied ({revoked.reason}); "
                    "fix: get it re-signed by a current key"
                ),
            )
        match = next((k for k in found if role is None or k.role in (None, role)), None)
        if match is None:
            roles = ", ".join(sorted({k.role or "any" for k in found}))
            needs = ROLE_SIGNS.get(role or "", role)
            raise self._refuse(
                "wrong_role",
                WrongRole(
                    f"{what}: signed by key {found[0].name} (id {kid}, role {roles}), but {needs} need a key of role "
                    f"{role} ({self.path / str(role)}/); fix: sign it with the {role} key, not the {roles} one"
                ),
            )
        now = datetime.now(timezone.utc)
        if match.not_after is not None and match.not_after < now:
            raise self._refuse(
                "expired_key",
                KeyExpired(
                    f"{what}: signed by key {match.name} (id {kid}, role {match.role or 'any'}), which expired at "
                    f"{match.not_after.isoformat(timespec='seconds')} (not_after in {match.path}; box time "
                    f"{now.isoformat(timespec='seconds')}); fix: get it re-signed with a current key, or renew the "
                    "key's not_after (and check the box's clock)"
                ),
            )
        return match

    def _verified(
        self, kid: str, raw_sig: bytes, message: bytes, doc: Mapping[str, Any], what: str, role: str | None
    ) -> Verified:
        key = self._select(kid, role, what)
        try:
            key.public_key.verify(raw_sig, message)
        except InvalidSignature as exc:
            raise SignatureError(
                f"{what}: signature does not match: the data was altered after signing (key {key.name}, id {kid}); "
                "fix: get an intact copy from the publisher"
            ) from exc
        return Verified(key.name, kid, str(doc["signed_at"]), str(doc["signer"]), key.role)

    def verify_revocations(self, doc: Any, where: str) -> RevocationList:
        """A revocation list whose shape and signature (by a key of role ``revocation``) check out."""
        parsed = parse_revocation_list(doc, where)
        self.check(canonical_bytes(parsed.document), parsed.document["signature"], role="revocation", what=where)
        return parsed


def install_revocations(doc: Any, trust_dir: Path, state: TrustState, *, where: str) -> tuple[RevocationList, bool]:
    """Verify a revocation list against ``trust_dir`` (and the list already applied), then apply it.

    Returns the list and whether it changed anything (False: the same list was already applied).
    Raises SignatureError/UntrustedKey (bad or untrusted signature) or RollbackRefused (older than
    the applied list); both are counted in ``state``, and the applied list is then unchanged.
    """
    trust = TrustStore.from_dir(trust_dir, state=state)
    try:
        parsed = trust.verify_revocations(doc, where)
        changed = state.apply_revocation(parsed)
    except UntrustedKey:
        raise  # counted by the store
    except RollbackRefused:
        state.count("rollback_revocation")
        raise
    except SignatureError:
        state.count("bad_revocation_list")
        raise
    if changed:
        log.warning(
            "revocation list seq %d applied from %s: %d key(s) revoked (%s)",
            parsed.seq,
            where,
            len(parsed.revoked),
            ", ".join(parsed.key_ids) or "none",
        )
    return parsed, changed
