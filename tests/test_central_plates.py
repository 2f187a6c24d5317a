"""Per-plate evidence on generated sightings: combined likelihood ratio, level, impossible journeys."""

from __future__ import annotations

import math
from typing import Any

import pytest

from iaflash.central.serve.plates import distance_km, impossible_journeys, plate_scores
from iaflash.central.serve.store import log_lr

SITES = {"paris": (48.8566, 2.3522), "lyon": (45.7640, 4.8357), "orly": (48.7262, 2.3652)}


def flag(event_id: str, plate: str, site: str, ts: float, p: float, level: str = "model") -> dict[str, Any]:
    return {"event_id": event_id, "plate_key": plate, "site_id": site, "captured_ts": ts,
            "log_lr": log_lr(p), "level": level}  # fmt: skip


def test_distance_between_paris_and_lyon_is_about_392_km() -> None:
    assert distance_km(SITES["paris"], SITES["lyon"]) == pytest.approx(392, abs=2)


def test_flags_on_one_plate_combine_their_likelihood_ratios_and_the_make_level_wins() -> None:
    flags = [
        flag("a", "p1", "paris", 0, 0.01),
        flag("b", "p1", "lyon", 86400, 0.1, level="make"),
        flag("c", "p2", "paris", 0, 0.001),
        flag("d", None, "paris", 0, 0.0001),  # type: ignore[arg-type]  # unreadable plate: no plate score
    ]
    p1, p2 = sorted(plate_scores(flags), key=lambda p: p.plate_key)
    assert (p1.count, p1.level, p1.sites, p1.event_ids) == (2, "make", ["paris", "lyon"], ["a", "b"])
    assert p1.log_lr == pytest.approx(math.log(99) + math.log(9))
    assert (p2.count, p2.level) == (1, "model") and p2.log_lr == pytest.approx(math.log(999))
    # ranked by combined evidence: p2's one strong flag (ln 999 = 6.91) beats p1's two (ln 99 + ln 9 = 6.80)
    assert [p.plate_key for p in plate_scores(flags)] == ["p2", "p1"]


def test_an_impossible_journey_is_found_between_far_sites_and_not_between_near_ones() -> None:
    sightings = [
        flag("a", "p", "paris", 0, 0.5),
        flag("b", "p", "orly", 600, 0.5),  # 15 km in 10 min = 90 km/h: possible
        flag("c", "p", "lyon", 3600, 0.5),  # 392 km in 50 min: impossible
        flag("d", "p", "nowhere", 3700, 0.5),  # no coordinates: skipped, never guessed
        flag("e", "p", "lyon", 7200, 0.5),  # same site: no journey
    ]
    [j] = impossible_journeys(sightings, SITES)
    assert (j.first, j.second, j.from_site, j.to_site) == ("b", "c", "orly", "lyon")
    assert j.hours == pytest.approx(50 / 60) and j.kmh_needed == pytest.approx(j.km / j.hours) and j.kmh_needed > 400
    assert impossible_journeys(sightings, SITES, max_speed_kmh=1000) == []
    [scored] = plate_scores(sightings, lambda key: sightings, SITES)
    assert scored.journeys == [j] and scored.score == pytest.approx(scored.log_lr + 20)
