"""A box's trust state: what it applied and must never go back on, in one small JSON file.

``trust-state.json`` (beside the agent's registry cache, ``/var/lib/iaflash/`` by default; docs/SIGNING.md)
holds:

* ``revocation``: the newest revocation list the box applied, the signed document itself;
* ``bundles``: per bundle name, the version it runs and the newest it ever ran (:mod:`.rollback`);
* ``marks``: other high-water marks, by name (the agent keeps the registry's dataset and seq here);
* ``refused``: how many times each kind of trust refusal happened (wrong role, expired key,
  revoked key, rollback...), across every process that uses this file (agent, provisioning).

Every change is a locked read-modify-write (``flock`` on ``<file>.lock``) then an atomic replace,
so the agent and a technician's command can both write it. A file that cannot be read or parsed
raises :class:`SignatureError` with the fix: a box never silently forgets a revocation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from iaflash.engines.atomic import write_atomic
from iaflash.engines.errors import RollbackRefused, SignatureError
from iaflash.engines.revocation import RevocationList, parse_revocation_list
from iaflash.engines.rollback import BundleMark

__all__ = ["STATE_FILE", "TrustState"]

STATE_FILE = "trust-state.json"
FORMAT = "iaflash-trust-state"
VERSION = 1
_SECTIONS = ("revocation", "bundles", "marks", "refused")


def _empty() -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "revocation": None, "bundles": {}, "marks": {}, "refused": {}}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TrustState:
    """The trust state file at ``path`` (it need not exist yet: an absent file is an empty state)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _fix(self) -> str:
        return (
            f"fix: restore {self.path} from a backup; or, as root, move it aside (the box then forgets its applied "
            "revocation list and rollback marks: re-install the newest revocation list at once)"
        )

    def read(self) -> dict[str, Any]:
        """The whole document (a fresh empty one when the file does not exist)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return _empty()
        except OSError as exc:
            raise SignatureError(f"trust state {self.path} cannot be read ({exc.strerror}); {self._fix()}") from exc
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SignatureError(f"trust state {self.path} is not JSON ({exc}); {self._fix()}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise SignatureError(f"trust state {self.path} is not a {FORMAT} version {VERSION} file; {self._fix()}")
        if not all(isinstance(doc.get(k), dict) for k in _SECTIONS[1:]) or not isinstance(
            doc.get("revocation"), (dict, type(None))
        ):
            raise SignatureError(f"trust state {self.path} has a damaged section; {self._fix()}")
        return doc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the box's state directory, as the agent makes it
        # read-only is enough for flock, and works on a lock file created by another user (root vs the agent)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` to the document under the lock and write it atomically; the new document."""
        with self._locked():
            doc = self.read()
            change(doc)
            write_atomic(self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)
            return doc

    # ----- revocation ----------------------------------------------------------------------
    def revocation(self) -> RevocationList | None:
        """The revocation list this box applied (its shape re-checked), or None."""
        doc = self.read().get("revocation")
        return None if doc is None else parse_revocation_list(doc, f"applied in {self.path}")

    def apply_revocation(self, new: RevocationList) -> bool:
        """Make ``new`` (already verified) the applied list. False when it was already; RollbackRefused if older."""
        changed = [False]

        def change(doc: dict[str, Any]) -> None:
            old = doc.get("revocation")
            applied = None if old is None else parse_revocation_list(old, f"applied in {self.path}")
            if applied is not None and new.seq < applied.seq:
                raise RollbackRefused(
                    f"revocation list seq {new.seq} is older than the applied seq {applied.seq} "
                    f"(issued {applied.issued_at.isoformat(timespec='seconds')}); an older list never replaces a "
                    f"newer one. fix: send the newest list, or issue a new one with seq > {applied.seq}"
                )
            if applied is not None and new.seq == applied.seq:
                if new.digest != applied.digest:
                    raise RollbackRefused(
                        f"revocation list seq {new.seq} differs from the list of the same seq this box applied; "
                        f"fix: issue the new list with seq > {applied.seq}"
                    )
                return
            doc["revocation"] = dict(new.document)
            doc.setdefault("marks", {})["revocation_applied_at"] = _now()
            changed[0] = True

        self._update(change)
        return changed[0]

    # ----- bundles and marks --------------------------------------------------------------
    def bundle_mark(self, name: str) -> BundleMark | None:
        entry = self.read()["bundles"].get(name)
        if entry is None:
            return None
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("current", "highest"))):
            raise SignatureError(f"trust state {self.path}: the mark of bundle {name} is damaged; {self._fix()}")
        return BundleMark(name, entry["current"], entry["highest"])

    def record_bundle(self, mark: BundleMark) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["bundles"][mark.name] = {**mark.to_dict(), "at": _now()}

        self._update(change)

    def mark(self, name: str) -> dict[str, Any] | None:
        value = self.read()["marks"].get(name)
        return value if isinstance(value, dict) else None

    def set_mark(self, name: str, value: dict[str, Any]) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["marks"][name] = {**value, "at": _now()}

        self._update(change)

    # ----- counters ------------------------------------------------------------------------
    def count(self, kind: str) -> None:
        """Count one refusal of ``kind`` (best effort: a refusal is never hidden by a failure to count it)."""

        def change(doc: dict[str, Any]) -> None:
            doc["refused"][kind] = int(doc["refused"].get(kind, 0)) + 1

        if not self.path.parent.is_dir():  # a check on a machine that is no box (no state directory): not counted
            return
        with contextlib.suppress(OSError, SignatureError):
            self._update(change)

    def summary(self) -> dict[str, Any]:
        """For the heartbeat and ``trust list``: the applied list's seq and size, the marks, the refusals."""
        doc = self.read()
        revocation = doc.get("revocation")
        return {
            "revocation_seq": revocation.get("seq") if isinstance(revocation, dict) else None,
            "revoked": len(revocation.get("revoked", [])) if isinstance(revocation, dict) else 0,
            "bundles": {
                k: {"current": v.get("current"), "highest": v.get("highest")} for k, v in doc["bundles"].items()
            },
            "marks": doc["marks"],
            "refused": dict(doc["refused"]),
        }
