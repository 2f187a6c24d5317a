"""Event documents: one verdict on one capture, as published over MQTT.

The contract is the versioned JSON Schema ``agent/schemas/event.v1.json`` (draft 2020-12,
strict: unknown keys are refused at the top level and in the verdict). The schema is read
lazily through :mod:`importlib.resources`; importing this module does no I/O.

Events carry ``plate_key`` (an HMAC of the normalised plate), never the plate in clear.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, cast

from jsonschema import Draft202012Validator

from iaflash.agent.schemas.loader import validator

__all__ = ["SCHEMA_ID", "build_event", "event_schema", "topic_for", "validate_event"]

SCHEMA_ID = "iaflash.event/1"
_SCHEMA_FILE = "event.v1.json"


def event_schema() -> dict[str, Any]:
    """The event JSON Schema (a fresh copy; the cached original is never handed out)."""
    return cast(dict[str, Any], json.loads(json.dumps(_validator().schema)))


def _validator() -> Draft202012Validator:
    return validator(_SCHEMA_FILE)


def validate_event(doc: dict[str, Any]) -> None:
    """Check ``doc`` against the event schema.

    Raises ValueError listing every violation as ``<json path>: <message>``.
    """
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{e.json_path}: {e.message}" for e in errors]
        raise ValueError(f"event does not match {SCHEMA_ID} ({len(errors)} problem(s)):\n" + "\n".join(lines))


def build_event(
    *,
    verdict: dict[str, Any],
    site_id: str,
    device_id: str,
    capture_id: str,
    captured_at: str,
    plate_key: str | None,
    timings_ms: dict[str, float],
    equipment: str | None = None,
    lane: int | None = None,
) -> dict[str, Any]:
    """Wrap a verdict into a new event with a fresh UUID4 ``event_id``; validated before return.

    ``equipment`` and ``lane`` are the sidecar's: with several radars on one box, they tell central
    which radar (and lane) took the capture. They are sent as ``radar`` (both may be null).
    """
    doc: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "event_id": str(uuid.uuid4()),
        "site_id": site_id,
        "device_id": device_id,
        "capture_id": capture_id,
        "captured_at": captured_at,
        "processed_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "plate_key": plate_key,
        "verdict": verdict,
        "timings_ms": {k: round(float(v), 3) for k, v in timings_ms.items()},
        "radar": {"equipment": equipment, "lane": lane},
    }
    validate_event(doc)
    return doc


def topic_for(topic_root: str, outcome: str) -> str:
    """The event topic for an outcome, e.g. ``iaflash/v1/s1/b1/events/mismatch``."""
    return f"{topic_root}/events/{outcome}"
