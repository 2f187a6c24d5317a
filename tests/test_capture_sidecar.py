"""The capture contract: JSON sidecar and radar banner adapters, and their errors."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from iaflash.agent.capture.sidecar import Capture, capture_schema, parse_banner, parse_sidecar, parse_timestamp
from iaflash.agent.errors import CaptureRejected

SRC = "/spool/incoming/c-001.json"
BANNER = "DT: 2026-11-25 08:14:03+01:00 | CSA: 0102 | NR: AB-123-CD | VOIE: 2 | VM: 131 | VLA: 110 | SENS: E"


def minimal(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "capture_id": "c-001",
        "site_id": "site-042",
        "captured_at": "2026-11-25T08:14:03+01:00",
    }
    doc.update(extra)
    return doc


def full() -> dict[str, Any]:
    return minimal(
        plate="AB-123-CD",
        plate_confidence=0.93,
        direction="approaching",
        lane=2,
        speed_kmh=131.5,
        limit_kmh=110,
        equipment="Mesta 3000",
        vehicle_box=[10, 20, 300, 200],
        images=["c-001_1.jpg", "c-001_2.jpeg"],
    )


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def rejected(data: bytes) -> CaptureRejected:
    with pytest.raises(CaptureRejected) as info:
        parse_sidecar(data, source=SRC)
    return info.value


def test_schema_file_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(capture_schema())
    assert capture_schema()["additionalProperties"] is False


def test_full_sidecar_gives_every_field() -> None:
    c = parse_sidecar(raw(full()), source=SRC)
    assert c.capture_id == "c-001" and c.site_id == "site-042"
    assert c.captured_at == datetime(2026, 11, 25, 7, 14, 3, tzinfo=timezone.utc)
    assert c.captured_at.utcoffset() == timedelta(hours=1)
    assert (c.plate, c.plate_confidence, c.direction, c.lane) == ("AB-123-CD", 0.93, "approaching", 2)
    assert (c.speed_kmh, c.limit_kmh, c.equipment) == (131.5, 110.0, "Mesta 3000")
    assert c.vehicle_box == (10, 20, 300, 200)
    assert c.images == ("c-001_1.jpg", "c-001_2.jpeg")
    assert isinstance(c.limit_kmh, float) and isinstance(c.lane, int)


def test_minimal_sidecar_defaults_optional_fields_and_image_name() -> None:
    c = parse_sidecar(raw(minimal()), source=SRC)
    assert c.plate is None and c.plate_confidence is None and c.direction is None
    assert c.lane is None and c.speed_kmh is None and c.vehicle_box is None
    assert c.images == ("c-001.jpg",)


def test_null_plate_means_unreadable() -> None:
    assert parse_sidecar(raw(minimal(plate=None)), source=SRC).plate is None


def test_to_dict_round_trips_through_the_schema() -> None:
    c = parse_sidecar(raw(full()), source=SRC)
    assert parse_sidecar(raw(c.to_dict()), source=SRC) == c
    assert c.to_dict()["plate"] == "AB-123-CD"


def test_repr_and_log_fields_never_show_the_plate() -> None:
    c = parse_sidecar(raw(full()), source=SRC)
    assert "AB-123-CD" not in repr(c) and "***" in repr(c)
    fields = c.log_fields()
    assert "AB-123-CD" not in json.dumps(fields)
    assert fields["plate_read"] is True and fields["capture_id"] == "c-001"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T07:14:03Z", datetime(2026, 11, 25, 7, 14, 3, tzinfo=timezone.utc)),
        ("2026-11-25T07:14:03z", datetime(2026, 11, 25, 7, 14, 3, tzinfo=timezone.utc)),
        ("2026-11-25 08:14:03+0100", datetime(2026, 11, 25, 7, 14, 3, tzinfo=timezone.utc)),
        ("2026-11-25T03:14:03.5-04:00", datetime(2026, 11, 25, 7, 14, 3, 500000, tzinfo=timezone.utc)),
        ("2026-11-25T07:14:03.123456789+00:00", datetime(2026, 11, 25, 7, 14, 3, 123456, tzinfo=timezone.utc)),
    ],
)
def test_timestamps_with_an_offset_parse_the_same_on_every_python(text: str, expected: datetime) -> None:
    assert parse_timestamp(text) == expected
    assert parse_timestamp(text).tzinfo is not None


def test_z_suffix_parses_in_a_sidecar() -> None:
    c = parse_sidecar(raw(minimal(captured_at="2026-11-25T07:14:03Z")), source=SRC)
    assert c.captured_at == datetime(2026, 11, 25, 7, 14, 3, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-25T08:14:03",
        "2026-11-25",
        "yesterday",
        "2026-13-25T08:14:03Z",
        "2026-11-25T25:00:00Z",
        "2026-11-25T08:14:03+24:00",
        "",
    ],
)
def test_timestamp_without_offset_or_invalid_is_bad_timestamp(ts: str) -> None:
    err = rejected(raw(minimal(captured_at=ts)))
    assert err.reason == "bad_timestamp"
    assert "captured_at" in str(err) and SRC in str(err) and "Fix:" in str(err)


@pytest.mark.parametrize(
    "data", [b"{", b"", b"\xff\xfe{}", b'{"schema_version": NaN}', b"[1,]", b'{"capture_id": "a", "capture_id": "b"}']
)
def test_not_json_is_sidecar_not_json(data: bytes) -> None:
    err = rejected(data)
    assert err.reason == "sidecar_not_json"
    assert SRC in str(err) and "Fix:" in str(err)


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({k: v for k, v in minimal().items() if k != "site_id"}, "site_id", "required"),
        (minimal(schema_version=2), "schema_version", "1"),
        (minimal(lane="2"), "lane", "not of type"),
        (minimal(lane=True), "lane", "not of type"),
        (minimal(lane=17), "lane", "maximum"),
        (minimal(speed_kmh=9000), "speed_kmh", "9000 is greater than the maximum of 400"),
        (minimal(limit_kmh=5), "limit_kmh", "minimum"),
        (minimal(plate_confidence=1.5), "plate_confidence", "maximum"),
        (minimal(direction="sideways"), "direction", "is not one of"),
        (minimal(capture_id="a/b"), "capture_id", "does not match"),
        (minimal(capture_id="c-001\n"), "capture_id", "line break"),
        (minimal(images=["../x.jpg"]), "images[0]", "does not match"),
        (minimal(images=["dir/x.jpg"]), "images[0]", "does not match"),
        (minimal(images=["x.png"]), "images[0]", "does not match"),
        (minimal(images=[]), "images", "should be non-empty"),
        (minimal(images=["a.jpg", "b.jpg", "c.jpg"]), "images", "too long"),
        (minimal(images=["a.jpg", "a.jpg"]), "images", "non-unique"),
        (minimal(vehicle_box=[1, 2, 0, 5]), "vehicle_box[2]", "minimum"),
        (minimal(vehicle_box=[1, 2, 3]), "vehicle_box", "too short"),
        (minimal(equipment="x" * 65), "equipment", "too long"),
        ([minimal()], "(document)", "JSON object"),
    ],
)
def test_each_schema_violation_is_sidecar_invalid_naming_the_field(doc: Any, field: str, words: str) -> None:
    err = rejected(raw(doc))
    assert err.reason == "sidecar_invalid"
    assert f"{field}" in str(err) and words in str(err)
    assert SRC in str(err) and "Fix:" in str(err)


def test_every_violation_is_listed_at_once() -> None:
    err = rejected(raw(minimal(speed_kmh=-1, lane=0)))
    assert "speed_kmh:" in str(err) and "lane:" in str(err)


def test_a_too_long_plate_is_refused_without_echoing_it() -> None:
    err = rejected(raw(minimal(plate="AB-123-CD-SECRET-XYZ")))
    assert err.reason == "sidecar_invalid"
    assert "plate:" in str(err) and "16" in str(err)
    assert "SECRET" not in str(err)


def test_unknown_fields_are_named() -> None:
    err = rejected(raw(minimal(plaque="AB-123-CD", colour="red")))
    assert err.reason == "unknown_fields"
    assert "'plaque'" in str(err) and "'colour'" in str(err)
    assert "AB-123-CD" not in str(err)


# --- banner ----------------------------------------------------------------------------------------


def banner(text: str, capture_id: str = "b-1") -> Capture:
    return parse_banner(text, source="/spool/incoming/b-1.txt", site_id="site-042", capture_id=capture_id)


def banner_rejected(text: str) -> CaptureRejected:
    with pytest.raises(CaptureRejected) as info:
        banner(text)
    return info.value


def test_banner_example_gives_the_same_capture_as_a_sidecar() -> None:
    c = banner(BANNER)
    assert c.captured_at == datetime(2026, 11, 25, 7, 14, 3, tzinfo=timezone.utc)
    assert (c.equipment, c.plate, c.lane, c.speed_kmh, c.limit_kmh, c.direction) == (
        "0102",
        "AB-123-CD",
        2,
        131.0,
        110.0,
        "receding",
    )
    assert (c.capture_id, c.site_id, c.images) == ("b-1", "site-042", ("b-1.jpg",))
    assert parse_sidecar(raw(c.to_dict()), source=SRC) == c


def test_banner_on_lines_with_long_direction_words_and_unknown_keys() -> None:
    text = (
        "dt: 2026-11-25T07:14:03Z\nCSA: 0102\r\nNR: AB-123-CD\nVOIE: 02\nVM: 92,5\nVLA: 90\n"
        "SENS: RAPPROCHEMENT\nVP: 87\n\n"
    )
    c = banner(text)
    assert (c.lane, c.speed_kmh, c.direction) == (2, 92.5, "approaching")
    assert banner(BANNER.replace("SENS: E", "SENS: ELOIGNEMENT")).direction == "receding"
    assert banner(BANNER.replace("SENS: E", "SENS: r")).direction == "approaching"


@pytest.mark.parametrize("nr", ["NR: ", "NR: ?", "NR: ???????", "NR:"])
def test_banner_unreadable_plate_is_none(nr: str) -> None:
    assert banner(BANNER.replace("NR: AB-123-CD", nr)).plate is None


def test_banner_without_optional_keys() -> None:
    c = banner("DT: 2026-11-25T07:14:03Z")
    assert c.plate is None and c.lane is None and c.speed_kmh is None and c.direction is None


@pytest.mark.parametrize(
    ("old", "new", "reason", "words"),
    [
        ("VM: 131", "VM: fast", "sidecar_invalid", "speed_kmh (banner key VM)"),
        ("VM: 131", "VM: 900", "sidecar_invalid", "speed_kmh (banner key VM): 900.0 is greater"),
        ("VOIE: 2", "VOIE: 2b", "sidecar_invalid", "lane (banner key VOIE)"),
        ("VLA: 110", "VLA: 5", "sidecar_invalid", "limit_kmh (banner key VLA)"),
        ("SENS: E", "SENS: X", "sidecar_invalid", "direction (banner key SENS)"),
        ("DT: 2026-11-25 08:14:03+01:00", "DT: 25/11/2026 08:14", "bad_timestamp", "banner key DT"),
        ("DT: 2026-11-25 08:14:03+01:00", "DT: 2026-11-25 08:14:03", "bad_timestamp", "UTC offset"),
        ("DT: 2026-11-25 08:14:03+01:00 | ", "", "sidecar_invalid", "captured_at"),
        ("| VOIE: 2", "| VOIE 2", "sidecar_invalid", "KEY: value"),
        ("| VOIE: 2", "| VM: 3", "sidecar_invalid", "VM appears twice"),
        ("NR: AB-123-CD", "NR: AB-123-CD-SECRET-XYZ", "sidecar_invalid", "plate (banner key NR)"),
    ],
)
def test_banner_bad_values_give_reason_and_name_the_key(old: str, new: str, reason: str, words: str) -> None:
    err = banner_rejected(BANNER.replace(old, new))
    assert err.reason == reason
    assert words in str(err) and "b-1.txt" in str(err)
    assert "SECRET" not in str(err)


def test_banner_with_bad_capture_id_is_refused() -> None:
    with pytest.raises(CaptureRejected) as info:
        banner(BANNER, capture_id="../etc")
    assert info.value.reason == "sidecar_invalid" and "capture_id" in str(info.value)


def test_banner_unknown_keys_are_logged_by_name_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="iaflash.agent.capture.sidecar"):
        banner(BANNER + " | VP: 87")
    assert "VP" in caplog.text and "AB-123-CD" not in caplog.text


@pytest.mark.parametrize("depth", [17, 900, 30_000])
def test_a_deeply_nested_sidecar_is_rejected_as_too_deep_never_a_recursion_error(depth: int) -> None:
    """30,000 deep used to raise RecursionError (the intake thread died, then recovery at every start)."""
    for data in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        with pytest.raises(CaptureRejected) as info:
            parse_sidecar(data, source="incoming/deep.json")
        assert info.value.reason == "sidecar_too_deep"
        assert str(info.value).startswith("incoming/deep.json: lists or objects nested more than 16 deep")
