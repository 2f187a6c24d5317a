"""A corrupt state.db: moved aside, its readable rows salvaged into a fresh file, the note left for the operator.

Real SQLite files, damaged as a failing SD card leaves them: whole pages in the middle overwritten
with garbage. The daemon's side (flags salvaged, then sent) is tested in tests/test_reliability.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from iaflash.agent.errors import OutboxError
from iaflash.agent.outbox.salvage import check_and_salvage, integrity_problem, mark_suspect, salvage_notes
from iaflash.agent.outbox.store import Outbox

TOPIC = "iaflash/v1/s/d/events/mismatch"
PAGE = 4096


def build_state(db: Path, flags: int = 300, matches: int = 2000) -> dict[str, bytes]:
    """A state.db with ``flags`` unsent events (about 700 bytes each) and ``matches`` processed captures.

    Returns event_id -> payload as stored. Closing the last connection checkpoints the WAL into the file.
    """
    stored = {}
    with Outbox(db) as ob:
        for i in range(flags):
            event = {
                "event_id": str(uuid.uuid4()),
                "capture_id": f"flag-{i}",
                "processed_at": f"2026-12-01T10:{i // 60:02d}:{i % 60:02d}.000+00:00",
                "verdict": {"outcome": "mismatch"},
                "pad": f"payload-{i}#" + "x" * 600,  # in the outbox row only
            }
            ob.record(f"flag-{i}", "mismatch", event, TOPIC)
        ob.record_many([(f"match-{i}", "match", None, None) for i in range(matches)])
        for row in ob.pending(flags):
            stored[row.event_id] = row.payload
    assert not Path(f"{db}-wal").exists()
    return stored


def page_of(db: Path, needle: str) -> int:
    offset = db.read_bytes().find(needle.encode())
    assert offset > 0
    return offset // PAGE


def smash(db: Path, pages: set[int]) -> None:
    """Garbage over whole pages (0-based page numbers): what a failing SD card leaves."""
    with db.open("r+b") as f:
        for page in pages:
            f.seek(page * PAGE)
            f.write(bytes(range(256)) * (PAGE // 256))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_sound_file_is_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    build_state(db, flags=5, matches=5)
    before = sha(db)
    assert integrity_problem(db) is None
    assert check_and_salvage(db) is None
    assert sha(db) == before and salvage_notes(db) == []
    assert check_and_salvage(tmp_path / "never-created.db") is None


def test_a_file_the_running_agent_marked_is_salvaged_even_when_quick_check_passes(tmp_path: Path) -> None:
    """Damage quick_check does not see (an index out of step with its table) made commits fail at run
    time: the committer's mark makes the next start salvage the file, so the agent does not stop at
    every commit for ever; every row is kept and the mark is cleared."""
    db = tmp_path / "state.db"
    stored = build_state(db, flags=20, matches=50)
    mark_suspect(db, "database disk image is malformed")
    assert integrity_problem(db) is None  # what quick_check says of it
    note = check_and_salvage(db)
    assert note is not None and note["state"] == "salvaged" and "the running agent met" in note["problem"]
    assert not Path(f"{db}.suspect").exists()
    with Outbox(db) as ob:
        assert {r.event_id: r.payload for r in ob.pending(1000)} == stored
    assert check_and_salvage(db) is None  # once, not at every start


def test_a_corrupt_file_is_moved_aside_and_every_readable_unsent_event_salvaged(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    stored = build_state(db)
    ids = list(stored)
    damaged = {page_of(db, "payload-100#"), page_of(db, "payload-200#")}
    smash(db, damaged)
    raw = db.read_bytes()
    lost = {e for i, e in enumerate(ids) if f"payload-{i}#".encode() not in raw}  # gone with the smashed pages
    assert lost and len(lost) < 20
    smashed = sha(db)
    assert integrity_problem(db) is not None

    note = check_and_salvage(db)

    assert note is not None and note["state"] == "salvaged" and note["complete"] is False
    moved = Path(note["moved_to"])
    assert moved.name.startswith("state.db.corrupt-") and sha(moved) == smashed  # kept as it was found
    assert json.loads(Path(f"{moved}.json").read_text()) == note
    assert integrity_problem(db) is None
    with Outbox(db) as ob:
        salvaged = {r.event_id: r.payload for r in ob.pending(1000)}
        assert set(salvaged) == set(ids) - lost
        assert all(salvaged[e] == stored[e] for e in salvaged)  # byte for byte
        assert note["unsent_salvaged"] == len(salvaged) == ob.depth()
        assert note["processed_salvaged"] <= ob.processed_count()
        assert all(ob.has_unsent(f"flag-{ids.index(e)}") for e in salvaged)  # their evidence stays
    # None was sent: the flags to check are exactly those whose event was lost (their processed rows survived).
    assert set(note["flags_to_check"]) == {f"flag-{ids.index(e)}" for e in lost}
    assert note["flags_to_check_count"] == len(lost)
    assert salvage_notes(db) == [{**note, "note": f"{moved}.json"}]


def test_an_unsent_event_whose_processed_row_was_lost_gets_it_back_from_its_payload(tmp_path: Path) -> None:
    """has_unsent (the evidence purge's guard) joins processed and outbox: the row must exist."""
    db = tmp_path / "state.db"
    stored = build_state(db, flags=40, matches=3000)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM processed WHERE capture_id = 'flag-7'")  # as if its page were lost
    smash(db, {page_of(db, "match-2500")})  # damage elsewhere, so that the salvage runs
    assert all(page_of(db, f"payload-{i}#") for i in range(len(stored)))  # every event survived
    note = check_and_salvage(db)
    assert note is not None
    with Outbox(db) as ob:
        assert ob.has_unsent("flag-7") and ob.depth() == 40
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT outcome, processed_at FROM processed WHERE capture_id = 'flag-7'").fetchone()
    assert row == ("mismatch", "2026-12-01T10:00:07.000+00:00")


def test_a_file_that_is_not_a_database_at_all_is_moved_aside_and_a_fresh_one_used(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"this is not a database" * 300)
    note = check_and_salvage(db)
    assert note is not None
    assert "not a database" in note["problem"]
    assert (note["unsent_salvaged"], note["processed_salvaged"], note["complete"]) == (0, 0, False)
    with Outbox(db) as ob:
        assert ob.depth() == 0 and ob.record("cap-1", "match", None, None)
    assert Path(note["moved_to"]).read_bytes() == b"this is not a database" * 300


def test_a_salvage_a_crash_left_half_done_is_finished_at_the_next_start(tmp_path: Path) -> None:
    """The note is written first: the next start finds it in state "moving" and completes the move and the copy."""
    db = tmp_path / "state.db"
    stored = build_state(db, flags=30, matches=100)
    smash(db, {page_of(db, "match-50")})
    moved = tmp_path / "state.db.corrupt-20261201T100000Z"
    note: dict[str, Any] = {"state": "moving", "file": str(db), "moved_to": str(moved), "problem": "malformed"}
    Path(f"{moved}.json").write_text(json.dumps(note))  # the crash came before any rename
    assert check_and_salvage(db) is None  # resumed; the fresh file is sound, nothing more to do
    (done,) = salvage_notes(db)
    assert done["state"] == "salvaged" and done["moved_to"] == str(moved) and moved.exists()
    with Outbox(db) as ob:
        assert {r.event_id for r in ob.pending(100)} == set(stored)


def test_an_unreadable_note_is_still_listed(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    Path(f"{db}.corrupt-20261201T100000Z.json").write_text("{not json")
    (note,) = salvage_notes(db)
    assert note["state"] == "unreadable" and note["moved_to"].endswith("state.db.corrupt-20261201T100000Z")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the mode says")
def test_a_file_that_cannot_be_read_at_all_is_an_outbox_error_not_a_salvage(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    build_state(db, flags=1, matches=1)
    db.chmod(0)
    try:
        with pytest.raises(OutboxError, match="cannot check its integrity"):
            check_and_salvage(db)
    finally:
        db.chmod(0o600)
    assert salvage_notes(db) == []
