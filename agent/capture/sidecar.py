"""The capture contract: what one radar capture is, and the adapters that read it.

A capture is one or two JPEG images plus metadata. Two adapters build a :class:`Capture`:

- :func:`parse_sidecar` reads the JSON sidecar ``<capture_id>.json`` (schema
  ``agent/schemas/capture.v1.json``);
- :func:`parse_banner` reads the radar's ``KEY: value`` banner text (DT, CSA, NR, VOIE, VM, VLA, SENS).

Both validate through the same JSON Schema, and both raise :class:`~iaflash.agent.errors.CaptureRejected`
with a stable reason code: ``sidecar_not_json``, ``sidecar_too_deep``, ``sidecar_invalid``,
``unknown_fields``, ``bad_timestamp``. A document nested deeper than :data:`MAX_DEPTH` is refused
before validation (a 30,000-deep array used to raise ``RecursionError`` and stop the daemon).
Messages say what is wrong, in which file and how to fix it, and never contain the plate. See docs/CAPTURE.md.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

from jsonschema import (
    Draft202012Validator,
    ValidationError,
)

from iaflash.agent.errors import CaptureRejected
from iaflash.agent.schemas.loader import schema
from iaflash.agent.strictjson import loads_strict

__all__ = [
    "CAPTURE_ID_RE",
    "IMAGE_NAME_RE",
    "SCHEMA_VERSION",
    "Capture",
    "capture_schema",
    "parse_banner",
    "parse_sidecar",
    "parse_timestamp",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CAPTURE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.jpe?g")
_TIMESTAMP_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))"
)
_FIX_SIDECAR = "fix the radar's sidecar export to follow docs/CAPTURE.md (schema capture.v1.json)"
_MAX_ECHO = 120
MAX_DEPTH = 16  # a sidecar is flat: an object holding a box and a list of names


@dataclass(frozen=True, repr=False)
class Capture:
    """One radar capture. ``plate`` is None when the radar could not read it.

    ``repr()`` and :meth:`log_fields` mask the plate; :meth:`to_dict` gives the sidecar document.
    """

    capture_id: str
    site_id: str
    captured_at: datetime
    plate: str | None
    plate_confidence: float | None
    direction: str | None
    lane: int | None
    speed_kmh: float | None
    limit_kmh: float | None
    equipment: str | None
    vehicle_box: tuple[int, int, int, int] | None
    images: tuple[str, ...]

    def __repr__(self) -> str:
        plate = "None" if self.plate is None else "'***'"
        return (
            f"Capture(capture_id={self.capture_id!r}, site_id={self.site_id!r}, "
            f"captured_at={self.captured_at.isoformat()!r}, plate={plate}, "
            f"direction={self.direction!r}, lane={self.lane!r}, speed_kmh={self.speed_kmh!r}, "
            f"images={self.images!r})"
        )

    def log_fields(self) -> dict[str, Any]:
        """Fields safe to log: everything but the plate, which is reduced to whether it was read."""
        return {
            "capture_id": self.capture_id,
            "site_id": self.site_id,
            "captured_at": self.captured_at.isoformat(),
            "plate_read": self.plate is not None,
            "direction": self.direction,
            "lane": self.lane,
            "speed_kmh": self.speed_kmh,
            "limit_kmh": self.limit_kmh,
            "images": len(self.images),
        }

    def to_dict(self) -> dict[str, Any]:
        """The sidecar document (schema_version 1) for this capture; it includes the plate."""
        return {
            "schema_version": SCHEMA_VERSION,
            "capture_id": self.capture_id,
            "site_id": self.site_id,
            "captured_at": self.captured_at.isoformat(),
            "plate": self.plate,
            "plate_confidence": self.plate_confidence,
            "direction": self.direction,
            "lane": self.lane,
            "speed_kmh": self.speed_kmh,
            "limit_kmh": self.limit_kmh,
            "equipment": self.equipment,
            "vehicle_box": list(self.vehicle_box) if self.vehicle_box is not None else None,
            "images": list(self.images),
        }


@lru_cache(maxsize=1)
def capture_schema() -> dict[str, Any]:
    """The capture JSON Schema (draft 2020-12), read from the package on first use."""
    return schema("capture.v1.json")


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    return Draft202012Validator(capture_schema())


def parse_timestamp(value: str) -> datetime:
    """Parse an ISO 8601 date-time with a UTC offset ('Z' accepted); same result on Python 3.10+.

    Raises ValueError when the text is not such a date-time (an offset is required).
    """
    m = _TIMESTAMP_RE.fullmatch(value.strip())
    if m is None:
        raise ValueError("expected YYYY-MM-DDTHH:MM:SS[.fff] followed by Z or +HH:MM")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
    if m.group(8):
        tz = timezone.utc
    else:
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if offset >= timedelta(hours=24) or int(m.group(11)) >= 60:
            raise ValueError("UTC offset out of range")
        tz = timezone(-offset if m.group(9) == "-" else offset)
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "...'"


def _json_path(err: ValidationError) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in err.absolute_path]
    return ".".join(parts).replace(".[", "[") or "(document)"


def _describe(err: ValidationError, aliases: dict[str, str]) -> str:
    """One violation as 'path: problem', with the plate's value never echoed."""
    path = _json_path(err)
    top = str(err.absolute_path[0]) if err.absolute_path else ""
    where = f"{path} ({aliases[top]})" if top in aliases else path
    if not err.absolute_path and err.validator == "type":
        return f"{where}: must be a JSON object, got {type(err.instance).__name__}"
    if top == "plate":
        problem = {"maxLength": "is longer than 16 characters", "type": "must be a string or null"}.get(
            str(err.validator), "is invalid"
        )
        return f"{where}: {problem} (value not shown)"
    message = err.message
    if len(message) > 2 * _MAX_ECHO:
        message = f"{_echo(err.instance)} fails the {err.validator!s} rule"
    return f"{where}: {message}"


def _unknown_fields(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return []
    known = capture_schema()["properties"]
    return sorted(k for k in doc if k not in known)


def _validate(doc: Any, *, source: str, aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """Check ``doc`` against the schema; raise CaptureRejected listing every violation."""
    aliases = aliases or {}
    errors = [e for e in _validator().iter_errors(doc) if e.validator != "additionalProperties"]
    problems = sorted(_describe(e, aliases) for e in errors)
    unknown = _unknown_fields(doc)
    if unknown:
        allowed = ", ".join(sorted(capture_schema()["properties"]))
        extra = f"; also: {'; '.join(problems)}" if problems else ""
        raise CaptureRejected(
            "unknown_fields",
            f"{source}: unknown field(s) {', '.join(repr(k) for k in unknown)}{extra}. "
            f"Fix: remove them or correct their spelling; allowed fields: {allowed}",
        )
    if problems:
        raise CaptureRejected(
            "sidecar_invalid", f"{source}: invalid capture: {'; '.join(problems)}. Fix: {_FIX_SIDECAR}"
        )
    assert isinstance(doc, dict)  # the schema's "type": "object" passed
    if not CAPTURE_ID_RE.fullmatch(doc["capture_id"]):
        raise CaptureRejected("sidecar_invalid", f"{source}: capture_id: contains a line break. Fix: {_FIX_SIDECAR}")
    for name in doc.get("images", []):
        if not IMAGE_NAME_RE.fullmatch(name):
            raise CaptureRejected(
                "sidecar_invalid", f"{source}: images: {_echo(name)} has a line break. Fix: {_FIX_SIDECAR}"
            )
    return doc


def _to_capture(doc: dict[str, Any], *, source: str, ts_label: str = "captured_at") -> Capture:
    raw_ts = doc["captured_at"]
    try:
        captured_at = parse_timestamp(raw_ts)
    except ValueError as exc:
        raise CaptureRejected(
            "bad_timestamp",
            f"{source}: {ts_label} {_echo(raw_ts)} is not an ISO 8601 date-time with a UTC offset ({exc}). "
            "Fix: write e.g. 2026-11-25T08:14:03+01:00 or 2026-11-25T07:14:03Z",
        ) from exc
    box = doc.get("vehicle_box")
    speed, limit, conf = doc.get("speed_kmh"), doc.get("limit_kmh"), doc.get("plate_confidence")
    lane = doc.get("lane")
    return Capture(
        capture_id=doc["capture_id"],
        site_id=doc["site_id"],
        captured_at=captured_at,
        plate=doc.get("plate"),
        plate_confidence=None if conf is None else float(conf),
        direction=doc.get("direction"),
        lane=None if lane is None else int(lane),
        speed_kmh=None if speed is None else float(speed),
        limit_kmh=None if limit is None else float(limit),
        equipment=doc.get("equipment"),
        vehicle_box=None if box is None else (int(box[0]), int(box[1]), int(box[2]), int(box[3])),
        images=tuple(doc.get("images") or (f"{doc['capture_id']}.jpg",)),
    )


def _depth(doc: Any) -> int:
    """How deeply ``doc`` nests lists and objects, measured without recursion (stops past MAX_DEPTH)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _too_deep(source: str) -> CaptureRejected:
    return CaptureRejected(
        "sidecar_too_deep",
        f"{source}: lists or objects nested more than {MAX_DEPTH} deep; a capture sidecar is a flat object. "
        f"Fix: {_FIX_SIDECAR}",
    )


def parse_sidecar(data: bytes, *, source: str) -> Capture:
    """Parse and validate a JSON sidecar; ``source`` (its file path) is named in every error."""
    try:
        doc = loads_strict(data.decode("utf-8"))
    except RecursionError:  # json's C scanner recurses per nesting level
        raise _too_deep(source) from None
    except UnicodeDecodeError as exc:
        raise CaptureRejected(
            "sidecar_not_json", f"{source}: not UTF-8 text (byte {exc.start}). Fix: {_FIX_SIDECAR}"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CaptureRejected(
            "sidecar_not_json",
            f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}. Fix: {_FIX_SIDECAR}",
        ) from exc
    except ValueError as exc:
        raise CaptureRejected("sidecar_not_json", f"{source}: not valid JSON: {exc}. Fix: {_FIX_SIDECAR}") from exc
    if _depth(doc) > MAX_DEPTH:
        raise _too_deep(source)
    return _to_capture(_validate(doc, source=source), source=source)


# --- the radar banner adapter --------------------------------------------------------------------

_BANNER_KEYS = {
    "DT": "captured_at",
    "CSA": "equipment",
    "NR": "plate",
    "VOIE": "lane",
    "VM": "speed_kmh",
    "VLA": "limit_kmh",
    "SENS": "direction",
}
_BANNER_ALIASES = {field: f"banner key {key}" for key, field in _BANNER_KEYS.items()}
_BANNER_SPLIT_RE = re.compile(r"[|\r\n]+")
_DIRECTIONS = {
    "E": "receding",
    "ELOIGNEMENT": "receding",
    "ÉLOIGNEMENT": "receding",
    "R": "approaching",
    "RAPPROCHEMENT": "approaching",
}


def _banner_fields(text: str, source: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for raw in _BANNER_SPLIT_RE.split(text):
        part = raw.strip()
        if not part:
            continue
        key, sep, value = part.partition(":")
        key = key.strip().upper()
        if not sep or not key:
            raise CaptureRejected(
                "sidecar_invalid",
                f"{source}: banner field {_echo(part[:40])} has no "
                "'KEY: value' form. Fix: separate fields with '|' or new lines",
            )
        if key in fields:
            raise CaptureRejected(
                "sidecar_invalid", f"{source}: banner key {key} appears twice. Fix: give each key once"
            )
        fields[key] = value.strip()
    return fields


def _number(value: str, kind: type[int] | type[float]) -> Any:
    """The number in ``value``, or the text itself so that the schema reports the type error."""
    try:
        return kind(value.replace(",", ".")) if kind is float else kind(value)
    except ValueError:
        return value


def _banner_doc(fields: dict[str, str], site_id: str, capture_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "capture_id": capture_id, "site_id": site_id}
    if "DT" in fields:
        doc["captured_at"] = fields["DT"]
    if "CSA" in fields:
        doc["equipment"] = fields["CSA"] or None
    if "NR" in fields:
        plate = fields["NR"]
        doc["plate"] = None if plate.strip("?-* ") == "" else plate
    if fields.get("VOIE"):
        doc["lane"] = _number(fields["VOIE"], int)
    if fields.get("VM"):
        doc["speed_kmh"] = _number(fields["VM"], float)
    if fields.get("VLA"):
        doc["limit_kmh"] = _number(fields["VLA"], float)
    if fields.get("SENS"):
        sens = fields["SENS"].upper()
        doc["direction"] = _DIRECTIONS.get(sens, sens)
    return doc


def parse_banner(text: str, *, source: str, site_id: str, capture_id: str) -> Capture:
    """Parse the radar's ``KEY: value`` banner (fields split by ``|`` or new lines).

    DT = date-time with offset, CSA = equipment code, NR = plate ('' or '?' = unreadable), VOIE = lane,
    VM = measured km/h, VLA = limit km/h, SENS = E/ELOIGNEMENT (receding) or R/RAPPROCHEMENT
    (approaching). Unknown keys are ignored (logged by name at DEBUG). The result is validated
    through the sidecar schema, so the same reason codes apply.
    """
    fields = _banner_fields(text, source)
    unknown = sorted(k for k in fields if k not in _BANNER_KEYS)
    if unknown:
        log.debug("banner %s: ignoring unknown keys %s", source, unknown)
    doc = _validate(_banner_doc(fields, site_id, capture_id), source=source, aliases=_BANNER_ALIASES)
    return _to_capture(doc, source=source, ts_label="captured_at (banner key DT)")
