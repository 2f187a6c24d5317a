"""Rollback protection for model bundles: a bundle's version only goes up, per bundle name, on a box.

The box keeps, per bundle name, the version it runs (``current``) and the newest it ever ran
(``highest``) in its trust state (:mod:`iaflash.engines.trust_state`). :func:`check_bundle_version`
decides whether a new bundle may take over (docs/SIGNING.md#rollback):

* the first bundle of a name, the version it already runs, or a version above ``highest``: yes;
* anything else: no (:class:`~iaflash.engines.errors.RollbackRefused`), unless the bundle is a
  **signed rollback**: its manifest carries ``allow_rollback_from`` (signed with the manifest),
  the newest version it may replace, and the box's ``highest`` is not above it. The box then runs
  the older version and keeps ``highest``: the bundle it left cannot come back, and the rollback
  cannot undo a later upgrade.

Versions are dotted integers (``2026.11.0``, ``1.2``), compared number by number (``1.10`` > ``1.9``;
missing parts count as 0, so ``1.0`` = ``1``). A version in any other form cannot be ordered and
is refused wherever an order is needed, with the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import zip_longest

from iaflash.engines.errors import RollbackRefused
from iaflash.engines.manifest import Manifest

__all__ = ["BundleMark", "check_bundle_version", "compare_versions", "parse_version"]

_VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,7}$")
_FORM = "versions are compared as dotted integers, e.g. 2026.11.0"


def parse_version(text: str) -> tuple[int, ...] | None:
    """The numbers of a dotted-integer version, or None when ``text`` is not one."""
    if not _VERSION_RE.fullmatch(text):
        return None
    return tuple(int(part) for part in text.split("."))


def compare_versions(a: str, b: str) -> int | None:
    """-1, 0 or 1 as ``a`` is older than, equal to or newer than ``b``; None when either cannot be ordered."""
    pa, pb = parse_version(a), parse_version(b)
    if pa is None or pb is None:
        return None
    for x, y in zip_longest(pa, pb, fillvalue=0):
        if x != y:
            return -1 if x < y else 1
    return 0


@dataclass(frozen=True)
class BundleMark:
    """What a box remembers of one bundle name: the version it runs and the newest it ever ran."""

    name: str
    current: str
    highest: str

    def to_dict(self) -> dict[str, str]:
        return {"current": self.current, "highest": self.highest}


def _unordered(name: str, new: str, old: str) -> RollbackRefused:
    return RollbackRefused(
        f"bundle {name}: cannot tell whether version {new!r} is newer than {old!r}, which this box already ran "
        f"({_FORM}); fix: re-pack it with a dotted-integer version above {old}"
    )


def check_bundle_version(previous: BundleMark | None, new: Manifest) -> BundleMark:
    """May bundle ``new`` replace what the box ran under its name (``previous``, None if nothing)? The new mark.

    Raises :class:`RollbackRefused` naming both versions and the fix; the caller records the
    returned mark only once the bundle is installed or loaded. Pure: reads and writes nothing.
    """
    name, version = new.name, new.version
    if previous is None:
        return BundleMark(name, version, version)
    if version == previous.current:
        return previous
    order = compare_versions(version, previous.highest)
    if order is None:
        raise _unordered(name, version, previous.highest)
    if order > 0:
        return BundleMark(name, version, version)
    ran = f"the newest this box has run is {previous.highest}" + (
        "" if previous.current == previous.highest else f" (it runs {previous.current} after a signed rollback)"
    )
    allowed = new.allow_rollback_from
    if allowed is None:
        raise RollbackRefused(
            f"bundle {name} version {version} is older than or equal to {previous.highest}: {ran}; a bundle version "
            f"never goes back on a box. fix: install a version above {previous.highest}, or have the model publisher "
            f"sign a rollback: `iaflash-engines allow-rollback BUNDLE --from {previous.highest} --key MODELS.key`"
        )
    limit = compare_versions(previous.highest, allowed)
    if limit is None:
        raise _unordered(name, allowed, previous.highest)
    if limit > 0:
        raise RollbackRefused(
            f"bundle {name} version {version} is a signed rollback for boxes that ran at most {allowed}, but {ran}; "
            f"fix: install a version above {previous.highest}, or a rollback signed with --from {previous.highest}"
        )
    return BundleMark(name, version, previous.highest)
