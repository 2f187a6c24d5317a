"""Per-plate evidence: flags on one plate key across captures and sites, and impossible journeys.

Cloned plates are used repeatedly, so evidence accumulates on the plate. For each plate key:

- ``count``: its mismatch flags; ``sites``: where they were seen;
- ``log_lr``: the combined likelihood ratio, the sum of each flag's ``ln((1-p)/p)`` with ``p`` the
  calibrated P(registered make/model | image) (captures treated as independent);
- ``level``: ``make`` when any flag is a make-level mismatch (the stronger kind), else ``model``;
- ``impossible``: consecutive sightings (any outcome) at two sites further apart than the time
  between them allows at ``max_speed_kmh`` — two vehicles carry the same plate.

Pure functions over stored rows; site coordinates come from central's config.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Journey", "PlateScore", "distance_km", "impossible_journeys", "plate_scores"]

EARTH_RADIUS_KM = 6371.0088
DEFAULT_MAX_SPEED_KMH = 250.0


@dataclass(frozen=True)
class Journey:
    """Two sightings of one plate that no single vehicle could have made."""

    first: str  # event ids
    second: str
    from_site: str
    to_site: str
    km: float
    hours: float
    kmh_needed: float


@dataclass
class PlateScore:
    plate_key: str
    count: int = 0
    log_lr: float = 0.0
    level: str = "model"
    sites: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    journeys: list[Journey] = field(default_factory=list)

    @property
    def score(self) -> float:
        """Ranking key: the combined log LR, plus a strong bonus for an impossible journey."""
        return self.log_lr + (20.0 if self.journeys else 0.0)


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (lat, lon) points in degrees."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, h)))


def impossible_journeys(
    sightings: Iterable[Mapping[str, Any]],
    coordinates: Mapping[str, tuple[float, float]],
    max_speed_kmh: float = DEFAULT_MAX_SPEED_KMH,
) -> list[Journey]:
    """Consecutive sightings (``event_id``, ``site_id``, ``captured_ts``) needing more than ``max_speed_kmh``.

    Sites without coordinates are skipped (they cannot be placed), never guessed.
    """
    placed = sorted((s for s in sightings if s["site_id"] in coordinates), key=lambda s: s["captured_ts"])
    found = []
    for a, b in itertools.pairwise(placed):
        if a["site_id"] == b["site_id"]:
            continue
        km = distance_km(coordinates[a["site_id"]], coordinates[b["site_id"]])
        hours = max(b["captured_ts"] - a["captured_ts"], 0.0) / 3600
        needed = math.inf if hours == 0 else km / hours
        if needed > max_speed_kmh:
            found.append(Journey(a["event_id"], b["event_id"], a["site_id"], b["site_id"], km, hours, needed))
    return found


def plate_scores(
    flags: Iterable[Mapping[str, Any]],
    sightings_of: Any = None,
    coordinates: Mapping[str, tuple[float, float]] | None = None,
    max_speed_kmh: float = DEFAULT_MAX_SPEED_KMH,
) -> list[PlateScore]:
    """Plate scores of ``flags`` (stored mismatch rows), strongest first.

    ``sightings_of(plate_key)`` returns every stored event of that plate for the journey check.
    """
    plates: dict[str, PlateScore] = {}
    for f in flags:
        key = f.get("plate_key")
        if not key:
            continue
        p = plates.setdefault(key, PlateScore(key))
        p.count += 1
        p.log_lr += float(f["log_lr"])
        p.event_ids.append(f["event_id"])
        if f.get("level") == "make":
            p.level = "make"
        if f["site_id"] not in p.sites:
            p.sites.append(f["site_id"])
    if coordinates and sightings_of is not None:
        for p in plates.values():
            p.journeys = impossible_journeys(sightings_of(p.plate_key), coordinates, max_speed_kmh)
    return sorted(plates.values(), key=lambda p: (-p.score, p.plate_key))
