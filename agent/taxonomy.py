"""Map registry make/model strings onto the model bundle's label taxonomy.

This first version normalises spelling (case, accents, punctuation, a few make
aliases) and matches against each label's canonical name and its aliases.
A registered vehicle that does not map is *unsupported*: the classifier has
never seen it, so its prediction says nothing about a clone.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from engines.bundle import Label

# Registry spellings of the same make; the value is the canonical make key.
MAKE_ALIASES = {
    "MERCEDES BENZ": "MERCEDES",
    "MERCEDESBENZ": "MERCEDES",
    "MB": "MERCEDES",
    "VW": "VOLKSWAGEN",
    "VOLKSWAGEN VW": "VOLKSWAGEN",
    "ALFA": "ALFA ROMEO",
    "LAND ROVER": "LAND ROVER",
    "LANDROVER": "LAND ROVER",
    "DS AUTOMOBILES": "DS",
}

# Labels whose make is one of these are an explicit "not a known vehicle" class.
OTHER_MAKES = frozenset({"OTHER", "UNKNOWN", "AUTRE"})

_NON_ALNUM = re.compile(r"[^A-Z0-9]+")


def norm_text(text: str) -> str:
    """Upper case, no accents, words separated by one space."""
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_only = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _NON_ALNUM.sub(" ", ascii_only.upper()).strip()


def norm_make(make: str) -> str:
    key = norm_text(make)
    return MAKE_ALIASES.get(key, key)


class Taxonomy:
    """Lookup tables built once from a bundle's labels."""

    def __init__(self, labels: Sequence[Label]) -> None:
        self.labels = tuple(labels)
        self._by_name: dict[tuple[str, str], int] = {}
        self._by_make: dict[str, list[int]] = {}
        self.other_indices = tuple(i for i, lb in enumerate(self.labels) if norm_make(lb.make) in OTHER_MAKES)
        for i, label in enumerate(self.labels):
            make = norm_make(label.make)
            if make in OTHER_MAKES:
                continue
            self._by_make.setdefault(make, []).append(i)
            self._by_name[(make, norm_text(label.model))] = i
            for alias in label.aliases:
                self._by_name[(make, norm_text(alias))] = i

    def resolve(self, make: str, model: str) -> int | None:
        """Index of the label for a registered make/model, or None if outside the taxonomy."""
        return self._by_name.get((norm_make(make), norm_text(model)))

    def make_indices(self, make: str) -> tuple[int, ...]:
        """Indices of every label of this make (empty if the make is unknown)."""
        return tuple(self._by_make.get(norm_make(make), ()))
