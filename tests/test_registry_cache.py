"""The SIV subset cache: subset files, snapshot/delta import in one transaction, lookups, staleness."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import iaflash.agent.registry.cache as registry_module
from iaflash.agent.errors import (
    PlateError,
    RegistryError,
    RegistryFileError,
    RegistryUnavailable,
    SignatureError,
    UntrustedKey,
)
from iaflash.agent.registry.cache import (
    Registry,
    RegistryRecord,
    RegistryState,
    check_integrity,
    import_signed_subset,
    import_subset,
    read_state,
    records_from_plates,
    write_subset,
)
from iaflash.agent.registry.plates import key_id, plate_key
from iaflash.engines.signing import generate_keypair, open_trusted_file, sign_file

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
KID = key_id(KEY)
PlateRow = tuple[str, str, str, "str | None", "str | None"]
FLEET: list[PlateRow] = [
    ("AB-123-CD", "RENAULT", "CLIO", "VP", "CI"),
    ("EF-456-GH", "PEUGEOT", "208", "VP", "CI"),
    ("1234 AB 75", "CITROEN", "2CV", "VP", None),
    ("JK-789-LM", "IVECO", "DAILY", "CTTE", "FOURGON"),
]


_OPENED: list[Registry] = []


def opened(path: Path, key: bytes = KEY) -> Registry:
    """A Registry closed at the end of the test (see _close_registries)."""
    reg = Registry(path, key)
    _OPENED.append(reg)
    return reg


@pytest.fixture(autouse=True)
def _close_registries() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


def snapshot(
    path: Path, rows: Sequence[PlateRow] = FLEET, seq: int = 1, key: bytes = KEY, dataset: str = "siv-test"
) -> Path:
    write_subset(path, dataset_id=dataset, seq=seq, key_id=key_id(key), records=records_from_plates(key, rows))
    return path


def delta(path: Path, records: list[dict[str, Any]], seq: int, base: int) -> Path:
    write_subset(path, kind="delta", dataset_id="siv-test", seq=seq, base_seq=base, key_id=KID, records=records)
    return path


def upsert(plate: str, make: str, model: str) -> dict[str, Any]:
    return {
        "op": "upsert",
        "plate_key": plate_key(KEY, plate).hex(),
        "make": make,
        "model": model,
        "genre": None,
        "body": None,
    }


def remove(plate: str) -> dict[str, Any]:
    return {"op": "delete", "plate_key": plate_key(KEY, plate).hex()}


def raw_file(path: Path, header: dict[str, Any], lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
        for line in lines:
            fh.write(line + "\n")
    return path


def header(**over: Any) -> dict[str, Any]:
    base = {
        "format": "iaflash-siv-subset",
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


def rows_of(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(str(db)) as conn:
        return conn.execute("SELECT * FROM vehicles ORDER BY plate_key").fetchall()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A cache holding FLEET at seq 1."""
    path = tmp_path / "registry.db"
    import_subset(path, snapshot(tmp_path / "snap.jsonl.gz"), expected_key_id=KID)
    return path


def test_snapshot_import_then_lookup_by_any_spelling(db: Path) -> None:
    reg = opened(db)
    assert reg.lookup("ab123cd") == RegistryRecord("RENAULT", "CLIO", "VP", "CI")
    assert reg.lookup("1234-ab-75") == RegistryRecord("CITROEN", "2CV", "VP", None)
    assert reg.lookup("ZZ-999-ZZ") is None
    state = reg.state()
    assert state is not None
    assert (state.dataset_id, state.seq, state.key_id, state.kind, state.count) == ("siv-test", 1, KID, "snapshot", 4)
    assert state.imported_at.tzinfo is not None


def test_lookup_refuses_a_bad_plate(db: Path) -> None:
    reg = opened(db)
    with pytest.raises(PlateError):
        reg.lookup("AI-123-CD")


def test_the_cache_holds_no_plate_in_clear(db: Path) -> None:
    blob = db.read_bytes() + b"".join(p.read_bytes() for p in db.parent.glob("registry.db-*"))
    for plate, *_ in FLEET:
        assert plate.encode() not in blob
        assert plate.replace(" ", "-").encode() not in blob
    assert rows_of(db)[0][0] in {plate_key(KEY, p) for p, *_ in FLEET}


def test_snapshot_replaces_everything(db: Path, tmp_path: Path) -> None:
    state = import_subset(
        db, snapshot(tmp_path / "s2.gz", [("XY-321-ZT", "BMW", "X1", None, None)], seq=5), expected_key_id=KID
    )
    reg = opened(db)
    assert (state.seq, state.count) == (5, 1)
    assert reg.lookup("AB-123-CD") is None
    assert reg.lookup("XY-321-ZT") == RegistryRecord("BMW", "X1", None, None)


def test_delta_applies_upserts_and_deletes_in_order(db: Path, tmp_path: Path) -> None:
    records = [
        upsert("AB-123-CD", "RENAULT", "MEGANE"),
        remove("EF-456-GH"),
        upsert("NP-111-QR", "KIA", "CEED"),
        remove("NP-111-QR"),
        upsert("NP-111-QR", "KIA", "NIRO"),
    ]
    state = import_subset(db, delta(tmp_path / "d2.gz", records, seq=2, base=1), expected_key_id=KID)
    reg = opened(db)
    assert (state.seq, state.kind, state.count) == (2, "delta", 4)
    assert reg.lookup("AB-123-CD") == RegistryRecord("RENAULT", "MEGANE", None, None)
    assert reg.lookup("EF-456-GH") is None
    assert reg.lookup("NP-111-QR") == RegistryRecord("KIA", "NIRO", None, None)


def test_an_open_registry_sees_a_later_import(db: Path, tmp_path: Path) -> None:
    reg = opened(db)
    assert reg.state() is not None and reg.state().seq == 1  # type: ignore[union-attr]  # checked just before
    import_subset(db, delta(tmp_path / "d2.gz", [remove("AB-123-CD")], seq=2, base=1), expected_key_id=KID)
    assert reg.lookup("AB-123-CD") is None
    assert reg.state().seq == 2  # type: ignore[union-attr]  # imported above


# (seq 1, base 0) against a cache at seq 1 is "already at seq 1" (AlreadyApplied), not a gap
@pytest.mark.parametrize(("seq", "base", "expected_base"), [(3, 2, 2), (2, 0, 0)])
def test_delta_gap_is_refused_and_the_cache_is_unchanged(
    db: Path, tmp_path: Path, seq: int, base: int, expected_base: int
) -> None:
    before = rows_of(db)
    file = delta(tmp_path / "gap.gz", [remove("AB-123-CD")], seq=seq, base=base)
    with pytest.raises(
        RegistryError, match=f"gap: cache at seq 1, delta expects base {expected_base}; request a snapshot"
    ):
        import_subset(db, file, expected_key_id=KID)
    assert rows_of(db) == before
    assert read_state(db).seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1


def test_delta_on_an_empty_cache_asks_for_a_snapshot(tmp_path: Path) -> None:
    file = delta(tmp_path / "d.gz", [remove("AB-123-CD")], seq=2, base=1)
    with pytest.raises(RegistryError, match=r"cache is empty.*request a snapshot"):
        import_subset(tmp_path / "new.db", file, expected_key_id=KID)
    assert read_state(tmp_path / "new.db") is None


def test_key_id_mismatch_is_refused_and_the_cache_is_unchanged(db: Path, tmp_path: Path) -> None:
    before = rows_of(db)
    file = snapshot(tmp_path / "other.gz", key=OTHER_KEY, seq=9)
    with pytest.raises(RegistryError, match=f"hashed with key {key_id(OTHER_KEY)}, this box's key is {KID}"):
        import_subset(db, file, expected_key_id=KID)
    assert rows_of(db) == before
    assert read_state(db).seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1


def test_lookup_with_another_key_than_the_cache_matches_nothing_and_says_so_once(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = opened(db, OTHER_KEY)
    with caplog.at_level(logging.ERROR, logger="iaflash.agent.registry.cache"):
        assert reg.lookup("AB-123-CD") is None
        assert reg.lookup("EF-456-GH") is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"hashed with key {KID} but this box's key is {key_id(OTHER_KEY)}" in errors[0]
    assert reg.state().key_id != reg.key_id  # type: ignore[union-attr]  # db fixture imported seq 1


GOOD = json.dumps(
    {"op": "upsert", "plate_key": "ab" * 32, "make": "FIAT", "model": "PANDA", "genre": None, "body": None}
)


@pytest.mark.parametrize(
    ("lines", "count", "line_no", "what"),
    [
        ([GOOD, "{not json"], 2, 3, "not a JSON line"),
        ([GOOD, GOOD.replace("ab" * 32, "cd" * 31)], 2, 3, "plate_key must be 64 hex"),
        ([GOOD, GOOD.replace('"FIAT"', "null")], 2, 3, "make and model must be non-empty"),
        ([GOOD, GOOD.replace('"upsert"', '"merge"')], 2, 3, "op must be 'upsert' or 'delete'"),
        ([GOOD, GOOD.replace('"genre"', '"colour"')], 2, 3, "unknown keys"),
        ([GOOD, "[]"], 2, 3, "not a JSON object"),
        ([GOOD, ""], 2, 3, "not a JSON line"),
        ([GOOD.replace("ab" * 32, "ef" * 32), GOOD, GOOD], 3, 4, "appears twice"),
        ([GOOD, json.dumps({"op": "delete", "plate_key": "cd" * 32})], 2, 3, "snapshot holds upserts only"),
    ],
)
def test_malformed_line_is_refused_with_its_number_and_the_cache_is_unchanged(
    db: Path, tmp_path: Path, lines: list[str], count: int, line_no: int, what: str
) -> None:
    before = rows_of(db)
    file = raw_file(tmp_path / "bad.gz", header(seq=7, count=count), lines)
    with pytest.raises(RegistryFileError, match=what) as info:
        import_subset(db, file, expected_key_id=KID)
    assert f"{file}:{line_no}:" in str(info.value)
    assert "fix:" in str(info.value)
    assert rows_of(db) == before
    assert read_state(db).seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1


@pytest.mark.parametrize(
    ("over", "what"),
    [
        ({"format": "csv"}, "not a iaflash-siv-subset version 1 header"),
        ({"version": 2}, "version 1"),
        ({"kind": "diff"}, "kind must be"),
        ({"seq": -1}, "integers >= 0"),
        ({"seq": True}, "integers >= 0"),
        ({"kind": "delta", "base_seq": None}, "base_seq"),
        ({"base_seq": 0}, "snapshot has base_seq null"),
        ({"key_id": "XYZ"}, "key_id must be 16"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": "2026-11-20T10:00:00"}, "UTC offset"),
        ({"signed_by": "me"}, "unknown header keys"),
    ],
)
def test_bad_header_is_refused(db: Path, tmp_path: Path, over: dict[str, Any], what: str) -> None:
    file = raw_file(tmp_path / "bad.gz", header(**over), [GOOD])
    with pytest.raises(RegistryFileError, match=what):
        import_subset(db, file, expected_key_id=KID)
    assert read_state(db).seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1


@pytest.mark.parametrize("count", [0, 2, 5])
def test_count_mismatch_is_refused_and_the_cache_is_unchanged(db: Path, tmp_path: Path, count: int) -> None:
    before = rows_of(db)
    file = raw_file(tmp_path / "bad.gz", header(seq=3, count=count), [GOOD])
    with pytest.raises(RegistryFileError, match=f"header count is {count} but the file holds 1 records"):
        import_subset(db, file, expected_key_id=KID)
    assert rows_of(db) == before


def test_truncated_gzip_is_refused_and_the_cache_is_unchanged(db: Path, tmp_path: Path) -> None:
    before = rows_of(db)
    good = snapshot(tmp_path / "big.gz", [(f"AB-{i:03d}-CD", "FIAT", "PANDA", None, None) for i in range(1, 999)])
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RegistryFileError, match="unreadable after line"):
        import_subset(db, cut, expected_key_id=KID)
    assert rows_of(db) == before


def test_missing_file_and_non_gzip_file_name_the_file(db: Path, tmp_path: Path) -> None:
    with pytest.raises(RegistryFileError, match=f"{tmp_path / 'nope.gz'}: no such file"):
        import_subset(db, tmp_path / "nope.gz", expected_key_id=KID)
    (tmp_path / "plain.txt").write_text("hello\n")
    with pytest.raises(RegistryFileError, match=r"plain\.txt: unreadable"):
        import_subset(db, tmp_path / "plain.txt", expected_key_id=KID)


def test_progress_is_reported_up_to_the_total(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    rows = [(f"{n}-{lets}-75", "FIAT", "PANDA", None, None) for n in range(1, 10_000) for lets in ("A", "B", "C")]
    import_subset(
        tmp_path / "p.db",
        snapshot(tmp_path / "p.gz", rows),
        expected_key_id=KID,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[-1] == (29_997, 29_997)
    assert len(seen) >= 3
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_missing_db_opens_empty_and_is_stale(tmp_path: Path) -> None:
    reg = opened(tmp_path / "fresh.db", KEY)
    assert reg.state() is None
    assert reg.lookup("AB-123-CD") is None
    assert reg.age_hours() is None
    assert reg.is_stale(72)
    assert read_state(tmp_path / "fresh.db") is None


def test_read_state_of_a_missing_cache_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no registry cache here; fix:"):
        read_state(tmp_path / "absent.db")


def test_staleness_is_measured_from_the_data_creation_time(tmp_path: Path) -> None:
    file = raw_file(tmp_path / "s.gz", header(count=1, created_at="2026-11-20T10:00:00+01:00"), [GOOD])
    import_subset(tmp_path / "s.db", file, expected_key_id=KID)
    reg = opened(tmp_path / "s.db", KEY)
    created = datetime(2026, 11, 20, 9, tzinfo=timezone.utc)
    assert reg.age_hours(created + timedelta(hours=10)) == pytest.approx(10)
    assert not reg.is_stale(72, now=created + timedelta(hours=71))
    assert reg.is_stale(72, now=created + timedelta(hours=73))


def test_state_to_dict_is_json_ready(db: Path) -> None:
    state = read_state(db)
    assert state is not None
    doc = json.loads(json.dumps(state.to_dict()))
    assert doc["seq"] == 1 and doc["imported_at"].endswith("+00:00")


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from iaflash.agent.registry.cache import import_subset

    def progress(done, total):
        print("progress", done, total, flush=True)

    import_subset(Path(sys.argv[1]), Path(sys.argv[2]), expected_key_id=None, progress=progress)
    print("finished", flush=True)
""")


@pytest.fixture(scope="module")
def big_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300k records: long enough to be killed mid-import."""
    records = (
        {
            "op": "upsert",
            "plate_key": hashlib.sha256(i.to_bytes(4, "big")).hexdigest(),
            "make": "FIAT",
            "model": "PANDA",
            "genre": "VP",
            "body": "CI",
        }
        for i in range(300_000)
    )
    path = tmp_path_factory.mktemp("big") / "big.jsonl.gz"
    write_subset(path, dataset_id="siv-test", seq=2, key_id=KID, records=records)
    return path


def test_sigkill_mid_import_leaves_the_cache_at_its_previous_seq(db: Path, big_snapshot: Path) -> None:
    before = rows_of(db)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(db), str(big_snapshot)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("progress "), first
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(str(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert rows_of(db) == before
    reg = opened(db)
    assert reg.state().seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1
    assert reg.lookup("AB-123-CD") == RegistryRecord("RENAULT", "CLIO", "VP", "CI")
    state = import_subset(db, big_snapshot, expected_key_id=KID)  # the cache still takes the next import
    assert (state.seq, state.count) == (2, 300_000)


# ---------------------------------------------------------------- signed imports


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """keys/ holds publisher.key/.pub and stranger.key/.pub."""
    root = tmp_path / "keys"
    root.mkdir()
    generate_keypair(root / "publisher")
    generate_keypair(root / "stranger")
    return root


@pytest.fixture
def trust(tmp_path: Path, keys: Path) -> Path:
    """A trust store holding only the publisher's public key."""
    root = tmp_path / "trust"
    root.mkdir()
    (root / "publisher.pub").write_bytes((keys / "publisher.pub").read_bytes())
    return root


def signed(file: Path, keys: Path, signer: str = "publisher") -> Path:
    sign_file(file, keys / f"{signer}.key")
    return file


def signed_import(
    db: Path, file: Path, trust: Path, *, allow_unsigned: bool = False
) -> tuple[RegistryState, str | None]:
    return import_signed_subset(db, file, trust_dir=trust, allow_unsigned=allow_unsigned, expected_key_id=KID)


def test_signed_snapshot_imports_and_names_the_trusted_signer(tmp_path: Path, keys: Path, trust: Path) -> None:
    file = signed(snapshot(tmp_path / "s.jsonl.gz"), keys)
    state, signer = signed_import(tmp_path / "r.db", file, trust)
    assert signer == "publisher"
    assert (state.kind, state.seq, state.count) == ("snapshot", 1, 4)
    assert opened(tmp_path / "r.db").lookup("ab-123-cd") == RegistryRecord("RENAULT", "CLIO", "VP", "CI")
    assert sorted(p.name for p in tmp_path.glob("r.db*")) == ["r.db", "r.db-shm", "r.db-wal"]  # no temp copy


def test_signed_deltas_apply_in_seq_order_and_a_skipped_one_is_a_gap(
    db: Path, tmp_path: Path, keys: Path, trust: Path
) -> None:
    d2 = signed(delta(tmp_path / "d2.gz", [upsert("AB-123-CD", "RENAULT", "MEGANE")], seq=2, base=1), keys)
    d3 = signed(delta(tmp_path / "d3.gz", [remove("EF-456-GH")], seq=3, base=2), keys)
    with pytest.raises(RegistryError, match="gap: cache at seq 1, delta expects base 2"):
        signed_import(db, d3, trust)
    assert signed_import(db, d2, trust)[0].seq == 2
    state, signer = signed_import(db, d3, trust)
    assert (state.seq, state.kind, state.count, signer) == (3, "delta", 3, "publisher")
    reg = opened(db)
    assert reg.lookup("AB-123-CD") == RegistryRecord("RENAULT", "MEGANE", None, None)
    assert reg.lookup("EF-456-GH") is None


def test_a_file_altered_after_signing_is_refused_and_the_cache_is_unchanged(
    db: Path, tmp_path: Path, keys: Path, trust: Path
) -> None:
    before = rows_of(db)
    file = signed(snapshot(tmp_path / "s.gz", seq=5), keys)
    sig = (tmp_path / "s.gz.sig").read_bytes()
    snapshot(file, [("XY-321-ZT", "BMW", "X1", None, None)], seq=5)  # same name, other content, old .sig
    (tmp_path / "s.gz.sig").write_bytes(sig)
    with pytest.raises(SignatureError, match="altered after signing") as info:
        signed_import(db, file, trust)
    assert str(file) in str(info.value) and "fix:" in str(info.value)
    assert rows_of(db) == before
    assert read_state(db).seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1


def test_a_file_signed_by_an_untrusted_key_is_refused_and_the_cache_is_unchanged(
    db: Path, tmp_path: Path, keys: Path, trust: Path
) -> None:
    before = rows_of(db)
    file = signed(snapshot(tmp_path / "s.gz", seq=5), keys, signer="stranger")
    with pytest.raises(UntrustedKey, match="not in the trust store") as info:
        signed_import(db, file, trust, allow_unsigned=True)  # a bad signature is never waved through
    assert str(file) in str(info.value)
    assert rows_of(db) == before
    assert read_state(db).seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1


def test_an_unsigned_file_is_refused_with_the_fix(db: Path, tmp_path: Path, trust: Path) -> None:
    before = rows_of(db)
    file = snapshot(tmp_path / "s.gz", seq=5)
    with pytest.raises(SignatureError, match="not signed") as info:
        signed_import(db, file, trust)
    message = str(info.value)
    assert message.startswith(f"{file}: ")
    assert f"iaflash-engines sign {file} --key" in message and "allow_unsigned" in message
    assert rows_of(db) == before


def test_an_unsigned_file_is_accepted_with_a_warning_when_allowed(
    db: Path, tmp_path: Path, trust: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = snapshot(tmp_path / "s.gz", [("XY-321-ZT", "BMW", "X1", None, None)], seq=5)
    with caplog.at_level(logging.WARNING):
        state, signer = signed_import(db, file, trust, allow_unsigned=True)
    assert (state.seq, state.count, signer) == (5, 1, None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(file) in w and "NOT signed" in w for w in warnings), warnings


def test_no_trust_store_refuses_a_signed_file_naming_it(db: Path, tmp_path: Path, keys: Path) -> None:
    file = signed(snapshot(tmp_path / "s.gz", seq=5), keys)
    with pytest.raises(SignatureError, match=r"trust store .* is not a directory") as info:
        signed_import(db, file, tmp_path / "no-trust")
    assert str(info.value).startswith(f"{file}: ")
    assert read_state(db).seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1


def test_signed_import_parses_the_bytes_it_checked_not_the_file_again(
    tmp_path: Path, keys: Path, trust: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file swapped on disk (renamed over) right after its signature was checked does not get
    imported: the import reads the file it opened and checked."""
    file = signed(snapshot(tmp_path / "s.gz"), keys)

    def check_then_swap(path: Path, trust_dir: Path | None, allow: bool, **kwargs: Any) -> Any:
        result = open_trusted_file(path, trust_dir, allow, **kwargs)
        snapshot(path, [("XY-321-ZT", "BMW", "X1", None, None)], seq=9)  # an attacker's file
        return result

    monkeypatch.setattr(
        registry_module, "open_trusted_file", check_then_swap
    )  # iaflash.agent.registry.cache's name for it
    state, _ = signed_import(tmp_path / "r.db", file, trust)
    assert (state.seq, state.count) == (1, 4)
    assert opened(tmp_path / "r.db").lookup("XY-321-ZT") is None


def test_import_subset_parses_data_when_given_and_names_the_file(db: Path, tmp_path: Path) -> None:
    good = snapshot(tmp_path / "good.gz", [("XY-321-ZT", "BMW", "X1", None, None)], seq=4).read_bytes()
    state = import_subset(db, tmp_path / "absent.gz", expected_key_id=KID, data=good)
    assert (state.seq, state.count) == (4, 1)
    with pytest.raises(RegistryFileError, match=r"absent\.gz: unreadable after line 0"):
        import_subset(db, tmp_path / "absent.gz", expected_key_id=KID, data=b"not gzip")


def test_lookup_key_finds_the_same_record_as_lookup_by_plate(tmp_path: Path) -> None:
    """The pipeline hashes the plate once and looks up by key: same answer as lookup(plate)."""
    from iaflash.agent.registry.cache import Registry, import_subset, records_from_plates, write_subset
    from iaflash.agent.registry.plates import plate_key as _plate_key

    key = bytes(range(32))
    subset = tmp_path / "s.jsonl.gz"
    write_subset(
        subset,
        dataset_id="d",
        seq=1,
        key_id=key_id(key),
        records=records_from_plates(key, [("AB-123-CD", "RENAULT", "CLIO", "VP", "CI")]),
    )
    import_subset(tmp_path / "r.db", subset, expected_key_id=key_id(key))
    with Registry(tmp_path / "r.db", key) as reg:
        found = reg.lookup_key(_plate_key(key, "ab 123 cd"))
        assert found is not None and (found.make, found.model) == ("RENAULT", "CLIO")
        assert found == reg.lookup("AB-123-CD")
        assert reg.lookup_key(_plate_key(key, "ZZ-999-ZZ")) is None


def test_signed_import_refuses_a_file_rewritten_in_place_after_its_check(
    db: Path, tmp_path: Path, keys: Path, trust: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signature is checked on a first streamed pass; the import's own pass is hashed too and
    must match, so bytes written into the same file in between are refused before the commit."""
    file = signed(snapshot(tmp_path / "s.gz", seq=5), keys)
    attacker = snapshot(tmp_path / "evil.gz", [("XY-321-ZT", "BMW", "X1", None, None)], seq=9).read_bytes()

    def check_then_rewrite(path: Path, trust_dir: Path | None, allow: bool, **kwargs: Any) -> Any:
        result = open_trusted_file(path, trust_dir, allow, **kwargs)
        with open(path, "r+b") as fh:  # same inode, new content
            fh.write(attacker)
            fh.truncate()
        return result

    monkeypatch.setattr(registry_module, "open_trusted_file", check_then_rewrite)
    with pytest.raises(SignatureError, match=r"s\.gz: changed while it was being read .*nothing was imported; fix:"):
        signed_import(db, file, trust)
    assert read_state(db).seq == 1  # type: ignore[union-attr]  # db fixture imported seq 1
    assert opened(db).lookup("XY-321-ZT") is None


# ---------------------------------------------------------------- integrity (docs/RELIABILITY.md)


def corrupt(db: Path) -> None:
    """Garbage over every page after the first: what a failing SD card leaves."""
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(4096)
        f.write(bytes(range(256)) * ((size - 4096) // 256 + 1))


def test_check_integrity_passes_a_good_cache_and_names_a_corrupt_or_missing_one(db: Path, tmp_path: Path) -> None:
    assert check_integrity(db) is None
    corrupt(db)
    problem = check_integrity(db)
    assert problem is not None and problem.startswith(f"{db}: corrupt")
    assert check_integrity(tmp_path / "none.db") == f"{tmp_path / 'none.db'}: no registry cache here"


def test_read_state_of_a_corrupt_cache_raises_with_the_fix_re_import_a_snapshot(db: Path) -> None:
    corrupt(db)
    with pytest.raises(RegistryUnavailable, match="corrupt") as info:
        read_state(db)
    assert "re-import a snapshot" in str(info.value) and "iaflash-provision registry import" in str(info.value)


def test_a_corrupt_cache_makes_the_registry_unavailable_instead_of_raising_at_open(
    db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt(db)
    with caplog.at_level(logging.ERROR):
        reg = opened(db)  # used to raise at the first lookup and crash the agent
        for _ in range(3):
            with pytest.raises(RegistryUnavailable, match="re-import a snapshot"):
                reg.lookup("AB-123-CD")
    health = reg.health()
    assert health["state"] == "unavailable" and "corrupt" in health["problem"]
    assert reg.is_stale(48) is True  # never trusted as fresh
    assert len([r for r in caplog.records if "registry unavailable" in r.getMessage()]) == 1  # once


def test_an_unavailable_registry_heals_by_itself_after_a_re_import(db: Path, tmp_path: Path) -> None:
    corrupt(db)
    reg = opened(db)
    reg.reopen_every_s = 0.0
    assert reg.health()["state"] == "unavailable"
    db.rename(tmp_path / "registry.db.corrupt")
    import_subset(db, snapshot(tmp_path / "again.jsonl.gz"), expected_key_id=KID)
    assert reg.lookup("AB-123-CD") == RegistryRecord("RENAULT", "CLIO", "VP", "CI")
    assert reg.health() == {"state": "ok", "vehicles": len(FLEET), "seq": 1}


def test_an_empty_cache_is_a_persistent_state_in_health(tmp_path: Path) -> None:
    reg = opened(tmp_path / "new.db")
    assert reg.lookup("AB-123-CD") is None
    health = reg.health()
    assert health["state"] == "empty" and "unknown_plate" in health["problem"]
    assert "registry import" in health["fix"]
