"""Subset files: writing, reading from a path or from bytes, the record fast path and its error messages."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from iaflash.agent.errors import RegistryFileError
from iaflash.agent.registry.plates import key_id, plate_key
from iaflash.agent.registry.subset_file import (
    FORMAT,
    Segment,
    SubsetReader,
    _record_problems,
    _row_of,
    records_from_plates,
    write_subset,
)

KEY = bytes(range(32))
KID = key_id(KEY)
HEX = "ab" * 32
GOOD: dict[str, Any] = {"op": "upsert", "plate_key": HEX, "make": "FIAT", "model": "PANDA", "genre": None, "body": None}


def header(**over: Any) -> dict[str, Any]:
    base = {
        "format": FORMAT,
        "version": 1,
        "kind": "snapshot",
        "dataset_id": "siv-test",
        "seq": 1,
        "base_seq": None,
        "key_id": KID,
        "count": 1,
        "created_at": "2026-11-20T10:00:00Z",
    }
    return {**base, **over}


def gz(head: dict[str, Any], lines: Sequence[str | bytes], *, last_newline: bool = True) -> bytes:
    raw = [json.dumps(head).encode(), *(line.encode() if isinstance(line, str) else line for line in lines)]
    return gzip.compress(b"\n".join(raw) + (b"\n" if last_newline else b""), mtime=0)


def read_all(file: Path, data: bytes | None = None) -> list[Segment]:
    with SubsetReader(file, data) as reader:
        return list(reader.segments())


def test_write_subset_round_trips_through_the_reader(tmp_path: Path) -> None:
    rows = [("AB-123-CD", "RENAULT", "CLIO", "VP", "CI"), ("1234 AB 75", "CITROEN", "2CV", None, None)]
    file = tmp_path / "s.jsonl.gz"
    assert write_subset(file, dataset_id="d", seq=3, key_id=KID, records=records_from_plates(KEY, rows)) == 2
    with SubsetReader(file) as reader:
        head = reader.header
        segments = list(reader.segments())
    assert (head.kind, head.dataset_id, head.seq, head.base_seq, head.key_id, head.count) == (
        "snapshot",
        "d",
        3,
        None,
        KID,
        2,
    )
    assert segments == [
        Segment(
            "upsert",
            2,
            [
                (plate_key(KEY, "AB-123-CD"), "RENAULT", "CLIO", "VP", "CI"),
                (plate_key(KEY, "1234-AB-75"), "CITROEN", "2CV", None, None),
            ],
        )
    ]


def test_write_subset_is_deterministic_and_the_header_accepts_a_trailing_z(tmp_path: Path) -> None:
    records = [GOOD, {**GOOD, "plate_key": "cd" * 32}]
    write_subset(tmp_path / "a.gz", dataset_id="d", seq=1, key_id=KID, records=records)
    write_subset(tmp_path / "b.gz", dataset_id="d", seq=1, key_id=KID, records=records)
    a, b = (gzip.decompress((tmp_path / name).read_bytes()).split(b"\n", 1) for name in ("a.gz", "b.gz"))
    assert a[1] == b[1]  # the records; the headers differ only if created_at ticked between the two
    assert json.loads(a[0])["count"] == json.loads(b[0])["count"] == 2
    with SubsetReader(tmp_path / "z.gz", gz(header(), [json.dumps(GOOD)])) as reader:
        assert reader.header.created_at == datetime(2026, 11, 20, 10, tzinfo=timezone.utc)


def test_write_subset_refuses_a_bad_record_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryFileError, match="plate_key"):
        write_subset(
            tmp_path / "x.gz",
            dataset_id="d",
            seq=1,
            key_id=KID,
            records=[{"op": "upsert", "plate_key": "xyz", "make": "A", "model": "B"}],
        )
    assert list(tmp_path.iterdir()) == []


def test_reading_bytes_gives_what_reading_the_file_gives(tmp_path: Path) -> None:
    file = tmp_path / "s.gz"
    write_subset(file, dataset_id="d", seq=1, key_id=KID, records=[GOOD])
    assert read_all(tmp_path / "elsewhere.gz", file.read_bytes()) == read_all(file)


def test_a_delta_comes_in_runs_of_one_op_with_their_first_line() -> None:
    up, gone = json.dumps(GOOD), json.dumps({"op": "delete", "plate_key": "cd" * 32})
    data = gz(header(kind="delta", seq=2, base_seq=1, count=5), [up, up, gone, up, gone])
    segments = read_all(Path("d.gz"), data)
    assert [(s.op, s.first_line, len(s.rows)) for s in segments] == [
        ("upsert", 2, 2),
        ("delete", 4, 1),
        ("upsert", 5, 1),
        ("delete", 6, 1),
    ]
    assert segments[1].rows[0][0] == bytes.fromhex("cd" * 32)


def test_a_last_line_without_newline_is_a_record() -> None:
    segments = read_all(Path("n.gz"), gz(header(), [json.dumps(GOOD)], last_newline=False))
    assert [len(s.rows) for s in segments] == [1]


def test_line_numbers_stay_right_across_read_chunks() -> None:
    """Records span several 1 MiB chunks; a bad line far in still gets its own number."""
    lines = [json.dumps({**GOOD, "plate_key": f"{i:064x}"}) for i in range(20_000)]
    lines[14_999] = lines[14_999].replace('"FIAT"', '""')
    with pytest.raises(RegistryFileError, match=r"^big\.gz:15001: bad record: make and model must be non-empty"):
        read_all(Path("big.gz"), gz(header(count=20_000), lines))


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('{"op":"upsert","plate_key":"' + HEX + '","make":"\\ud800","model":"X"}', "not a JSON line"),
        (b'{"op":"upsert","plate_key":"' + HEX.encode() + b'","make":"\xff","model":"X"}', "not a JSON line"),
        ("{not json", r"not a JSON line \(JSONDecodeError\)"),
        ("", r"not a JSON line \(JSONDecodeError\)"),
        ("[]", "bad record: not a JSON object"),
        ('"text"', "bad record: not a JSON object"),
    ],
)
def test_lines_the_fast_path_refuses_are_explained_with_their_number(line: str | bytes, what: str) -> None:
    data = gz(header(count=2), [json.dumps(GOOD), line])
    with pytest.raises(RegistryFileError, match=what) as info:
        read_all(Path("f.gz"), data)
    assert str(info.value).startswith("f.gz:3: ")
    assert "fix:" in str(info.value)


VARIANTS: list[dict[str, Any]] = [
    GOOD,
    {**GOOD, "genre": "VP", "body": "CI"},
    {"op": "delete", "plate_key": HEX},
    {"op": "delete", "plate_key": HEX.upper()},
    {**GOOD, "plate_key": HEX.upper()},
    {k: v for k, v in GOOD.items() if k not in ("genre", "body")},
    {**GOOD, "plate_key": "ab" * 31 + "  "},
    {**GOOD, "plate_key": "gg" * 32},
    {**GOOD, "plate_key": "ab" * 33},
    {**GOOD, "plate_key": 12},
    {**GOOD, "op": "merge"},
    {**GOOD, "op": None},
    {k: v for k, v in GOOD.items() if k != "op"},
    {**GOOD, "make": ""},
    {**GOOD, "model": None},
    {**GOOD, "make": 1},
    {**GOOD, "genre": 3},
    {**GOOD, "body": ["CI"]},
    {**GOOD, "colour": "red"},
    {"op": "delete", "plate_key": HEX, "make": 1},
]


@pytest.mark.parametrize("record", VARIANTS, ids=lambda r: json.dumps(r)[:60])
def test_the_fast_path_accepts_exactly_the_records_without_problems(record: dict[str, Any]) -> None:
    problems = list(_record_problems(record))
    parsed = _row_of(record)
    assert (parsed is not None) == (not problems), problems
    if parsed is not None:
        assert parsed[1][0] == bytes.fromhex(record["plate_key"])


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (gzip.compress(b""), "empty file"),
        (gzip.compress(b"hello\n"), r"z\.gz:1: not a JSON line"),
        (gzip.compress(b"hello\n")[:-6], "unreadable after line 0"),
    ],
)
def test_empty_or_damaged_files_are_refused_naming_the_file(data: bytes, what: str) -> None:
    with pytest.raises(RegistryFileError, match=what) as info:
        read_all(Path("z.gz"), data)
    assert str(info.value).startswith("z.gz")


def test_a_count_that_differs_from_the_lines_is_refused() -> None:
    with pytest.raises(RegistryFileError, match="header count is 3 but the file holds 1 records"):
        read_all(Path("c.gz"), gz(header(count=3), [json.dumps(GOOD)]))


def test_a_missing_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RegistryFileError, match="no such file; fix: check the path"):
        SubsetReader(tmp_path / "absent.gz")
