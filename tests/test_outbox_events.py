"""Event documents: built events validate; the versioned schema refuses bad ones with the path."""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any

import pytest

from iaflash.agent.config import OUTCOMES
from iaflash.agent.outbox.events import SCHEMA_ID, build_event, event_schema, topic_for, validate_event

PLATE_KEY = "0f" * 32


def verdict(outcome: str = "mismatch", level: str | None = "make") -> dict[str, Any]:
    return {
        "outcome": outcome,
        "level": level,
        "reason": "P(registered make) 0.010 < 0.05",
        "registry_stale": False,
        "p_make": 0.01,
        "p_model": 0.002,
        "top_k": [{"make": "VOLKSWAGEN", "model": "GOLF", "p": 0.91}],
        "registry": {"make": "RENAULT", "model": "CLIO", "genre": "VP", "body": None},
        "thresholds": {"make": 0.05, "model": 0.05, "match": 0.3},
        "model": {"name": "demo", "version": "1.0", "backend": "onnxruntime", "device": "cpu"},
    }


def event(**overrides: Any) -> dict[str, Any]:
    doc = build_event(
        verdict=verdict(),
        site_id="site-1",
        device_id="box-1",
        capture_id="cap-1",
        captured_at="2026-11-02T08:15:00+01:00",
        plate_key=PLATE_KEY,
        timings_ms={"decode": 21.5, "infer": 8.25},
    )
    doc.update(overrides)
    return doc


def test_build_event_fills_the_envelope_and_validates() -> None:
    doc = event()
    assert doc["schema"] == SCHEMA_ID == "iaflash.event/1"
    assert uuid.UUID(doc["event_id"]).version == 4
    assert doc["processed_at"].endswith("+00:00")
    assert doc["plate_key"] == PLATE_KEY
    assert doc["verdict"] == verdict()
    assert doc["timings_ms"] == {"decode": 21.5, "infer": 8.25}
    validate_event(doc)  # the returned document passes the schema again
    assert event()["event_id"] != doc["event_id"]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_every_outcome_is_a_valid_event(outcome: str) -> None:
    level = "model" if outcome == "mismatch" else None
    doc = build_event(
        verdict=verdict(outcome, level),
        site_id="s",
        device_id="d",
        capture_id="c",
        captured_at="2026-11-02T07:15:00Z",
        plate_key=None,
        timings_ms={},
    )
    assert doc["verdict"]["outcome"] == outcome


def _drop(doc: dict[str, Any], *path: str) -> None:
    for key in path[:-1]:
        doc = doc[key]
    del doc[path[-1]]


def _set(doc: dict[str, Any], value: Any, *path: str) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


BAD = [
    ("missing capture_id", lambda d: _drop(d, "capture_id"), "$", "'capture_id' is a required property"),
    ("missing verdict.reason", lambda d: _drop(d, "verdict", "reason"), "$.verdict", "'reason'"),
    ("extra top-level key", lambda d: _set(d, "AB-123-CD", "plate"), "$", "'plate' was unexpected"),
    ("extra verdict key", lambda d: _set(d, 1, "verdict", "score"), "$.verdict", "'score' was unexpected"),
    ("unknown outcome", lambda d: _set(d, "clone", "verdict", "outcome"), "$.verdict.outcome", "'clone'"),
    ("mismatch without level", lambda d: _set(d, None, "verdict", "level"), "$.verdict.level", "None"),
    ("probability above 1", lambda d: _set(d, 1.5, "verdict", "p_make"), "$.verdict.p_make", "1.5"),
    ("plate in clear as plate_key", lambda d: _set(d, "AB-123-CD", "plate_key"), "$.plate_key", "AB-123-CD"),
    ("time without offset", lambda d: _set(d, "2026-11-02 08:15", "captured_at"), "$.captured_at", "08:15"),
    ("wrong schema id", lambda d: _set(d, "iaflash.event/2", "schema"), "$.schema", "iaflash.event/1"),
    ("top_k entry without p", lambda d: _drop(d, "verdict", "top_k", 0, "p"), "$.verdict.top_k[0]", "'p'"),
]


@pytest.mark.parametrize(("mutate", "path", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_event_is_refused_naming_the_path(mutate: Any, path: str, fragment: str) -> None:
    doc = copy.deepcopy(event())
    mutate(doc)
    with pytest.raises(ValueError, match=r"does not match iaflash\.event/1") as info:
        validate_event(doc)
    lines = str(info.value).splitlines()[1:]
    assert any(line.startswith(f"{path}: ") and fragment in line for line in lines), lines


def test_every_violation_is_listed() -> None:
    doc = event()
    del doc["site_id"]
    doc["verdict"]["outcome"] = "nope"
    with pytest.raises(ValueError, match=re.escape("(2 problem(s))")):
        validate_event(doc)


def test_build_event_refuses_an_invalid_verdict() -> None:
    bad = verdict()
    bad["extra"] = True
    with pytest.raises(ValueError, match=r"\$\.verdict: .*'extra' was unexpected"):
        build_event(
            verdict=bad,
            site_id="s",
            device_id="d",
            capture_id="c",
            captured_at="2026-11-02T07:15:00Z",
            plate_key=None,
            timings_ms={},
        )


def test_schema_is_draft_2020_12_strict_and_a_copy() -> None:
    schema = event_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["verdict"]["additionalProperties"] is False
    schema["additionalProperties"] = True
    assert event_schema()["additionalProperties"] is False


def test_topic_for_puts_the_outcome_last() -> None:
    assert topic_for("iaflash/v1/site-1/box-1", "mismatch") == "iaflash/v1/site-1/box-1/events/mismatch"


def test_the_radar_equipment_and_lane_travel_in_the_event() -> None:
    """Two radars on one box: the sidecar's equipment and lane tell central which one took the capture."""
    base = {
        "verdict": verdict(),
        "site_id": "site-1",
        "device_id": "box-1",
        "capture_id": "cap-1",
        "captured_at": "2026-11-02T08:15:00+01:00",
        "plate_key": PLATE_KEY,
        "timings_ms": {},
    }
    assert build_event(**base, equipment="MESTA-FUSION", lane=2)["radar"] == {"equipment": "MESTA-FUSION", "lane": 2}
    assert build_event(**base)["radar"] == {"equipment": None, "lane": None}  # a sidecar without them
    with pytest.raises(ValueError, match=r"\$.radar.lane"):
        build_event(**base, lane=17)
    older = event()
    del older["radar"]
    validate_event(older)  # events from before 1.2 have no radar: still valid
