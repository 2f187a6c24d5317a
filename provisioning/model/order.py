"""Which version is newer, and the refusal to install an older one (rollback protection, local rule).

The rule: a bundle whose version is lower than the highest this box ever installed under the same
name is refused, unless the technician says ``--allow-downgrade`` (logged and recorded). Going back to
a version that is still installed is ``model rollback``, which is always allowed: it is the
technician's own, local decision, and nothing new enters the box.

:func:`check_not_older` is the one place this rule lives, so it can be replaced by the engines'
signed rollback rules when they exist (a publisher-signed permission to go back).

Versions compare part by part, splitting on ``.``, ``-``, ``+`` and ``_``: numbers numerically
(``2026.11.0`` < ``2026.12.0`` < ``2026.12.10``), other parts as text, and a number beats text
(``1.0.0`` > ``1.0.0-rc1``, ``1.0`` < ``1.0.1``).
"""

from __future__ import annotations

import re

from iaflash.agent.errors import ModelStoreError

__all__ = ["check_not_older", "is_older", "version_key"]

_PARTS = re.compile(r"[.\-+_]")


VersionKey = tuple[tuple[int, ...], int, tuple[tuple[int, int, str], ...]]


def version_key(version: str) -> VersionKey:
    """A sort key: the leading numbers (trailing zeros dropped), then 1 for a release or 0 for a
    pre-release (text follows the numbers), then the rest part by part (a number beats text)."""
    parts = [p for p in _PARTS.split(version.strip()) if p]
    numbers: list[int] = []
    while parts and parts[0].isdigit():
        numbers.append(int(parts.pop(0)))
    while numbers and numbers[-1] == 0:
        numbers.pop()
    rest = tuple((1, int(p), "") if p.isdigit() else (0, 0, p.lower()) for p in parts)
    return tuple(numbers), 0 if rest else 1, rest


def is_older(version: str, than: str) -> bool:
    """True when ``version`` sorts strictly before ``than``."""
    return version_key(version) < version_key(than)


def check_not_older(name: str, version: str, highest: str | None, *, allow_downgrade: bool) -> str | None:
    """Refuse ``version`` of ``name`` when it is older than ``highest`` (the newest ever installed here).

    Returns a note to report when the downgrade was allowed, else None. Raises ModelStoreError.
    """
    if highest is None or not is_older(version, highest):
        return None
    if allow_downgrade:
        return f"{name} {version} is older than {highest}, installed before: allowed by --allow-downgrade"
    raise ModelStoreError(
        f"{name} {version} is older than {name} {highest}, which this box already installed: an older bundle "
        "is refused, so that a known-bad model cannot be brought back unnoticed; fix: install a newer version, "
        f"or go back to one still installed with `iaflash-provision model rollback VERSION`, or (on site, on "
        "purpose) add --allow-downgrade"
    )
