"""Strict JSON for documents that cross a trust boundary (radar sidecars, central's commands).

A key given twice is an error (not "the last one wins"), and NaN/Infinity are refused (they
are not JSON and cannot be signed canonically).
"""

from __future__ import annotations

import json
from typing import Any


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json.loads: a key given twice is an error."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(data: str | bytes) -> Any:
    """json.loads with both rules; raises ValueError (JSONDecodeError, UnicodeDecodeError included)."""
    return json.loads(data, parse_constant=_no_constant, object_pairs_hook=reject_duplicate_keys)
