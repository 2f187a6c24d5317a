"""The durable outbox on real SQLite files: atomic, idempotent, ordered, shared by threads."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from iaflash.agent.errors import OutboxError
from iaflash.agent.outbox.store import Outbox

TOPIC = "iaflash/v1/s/d/events/mismatch"


def ev(n: int = 0) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "n": n, "note": "é"}


@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    with Outbox(tmp_path / "state.db") as ob:
        yield ob


def test_record_writes_processed_and_outbox_rows_together(outbox: Outbox) -> None:
    e = ev()
    assert outbox.record("cap-1", "mismatch", e, TOPIC) is True
    assert outbox.is_processed("cap-1")
    [row] = outbox.pending(10)
    assert (row.event_id, row.topic, row.attempts) == (e["event_id"], TOPIC, 0)
    assert json.loads(row.payload) == e
    assert b" " not in row.payload  # compact JSON
    with sqlite3.connect(outbox.path) as db:
        assert db.execute("SELECT outcome, event_id FROM processed").fetchall() == [("mismatch", e["event_id"])]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_record_is_idempotent_per_capture(outbox: Outbox) -> None:
    first = ev()
    assert outbox.record("cap-1", "mismatch", first, TOPIC)
    assert outbox.record("cap-1", "mismatch", ev(), TOPIC) is False
    assert [r.event_id for r in outbox.pending(10)] == [first["event_id"]]


def test_record_without_event_only_marks_processed(outbox: Outbox) -> None:
    assert outbox.record("cap-2", "match", None, None)
    assert outbox.is_processed("cap-2") and not outbox.is_processed("cap-3")
    assert outbox.depth() == 0
    with pytest.raises(ValueError, match="event and topic go together"):
        outbox.record("cap-3", "mismatch", ev(), None)
    assert not outbox.is_processed("cap-3")


def test_record_rolls_back_the_processed_row_when_the_event_insert_fails(outbox: Outbox) -> None:
    e = ev()
    outbox.record("cap-1", "mismatch", e, TOPIC)
    with pytest.raises(OutboxError, match=r"state\.db: cannot record capture cap-2: UNIQUE.*fix:"):
        outbox.record("cap-2", "mismatch", e, TOPIC)  # same event_id: the outbox insert fails
    assert not outbox.is_processed("cap-2")  # nothing half-written
    assert outbox.depth() == 1


def test_pending_is_ordered_limited_and_skips_excluded(outbox: Outbox) -> None:
    for i in range(5):
        outbox.record(f"cap-{i}", "mismatch", ev(i), TOPIC)
    seqs = [r.seq for r in outbox.pending(10)]
    assert seqs == sorted(seqs) and len(seqs) == 5
    assert [r.seq for r in outbox.pending(2)] == seqs[:2]
    assert [r.seq for r in outbox.pending(2, exclude=seqs[:3])] == seqs[3:]
    assert outbox.pending(0) == []


def test_defer_holds_a_row_back_and_counts_the_attempt(outbox: Outbox) -> None:
    outbox.record("a", "mismatch", ev(), TOPIC)
    outbox.record("b", "mismatch", ev(), TOPIC)
    first, second = outbox.pending(10)
    outbox.defer(first.seq, "135 Not authorized", delay_s=60)
    assert [r.seq for r in outbox.pending(10)] == [second.seq]
    later = outbox.pending(10, now=time.time() + 61)
    assert [(r.seq, r.attempts) for r in later] == [(first.seq, 1), (second.seq, 0)]
    assert outbox.attempts(first.seq) == 1
    assert outbox.depth() == 2  # deferred, never dropped


def test_delete_depth_and_oldest_age(outbox: Outbox) -> None:
    assert outbox.oldest_age_s() is None
    outbox.record("a", "mismatch", ev(), TOPIC)
    outbox.record("b", "mismatch", ev(), TOPIC)
    age = outbox.oldest_age_s()
    assert age is not None and 0 <= age < 60
    first = outbox.pending(1)[0]
    outbox.delete(first.seq)
    assert outbox.depth() == 1 and outbox.attempts(first.seq) is None
    assert outbox.is_processed("a")  # the processed mark stays after delivery


def test_rows_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    ob = Outbox(path)
    events = [ev(i) for i in range(3)]
    for i, e in enumerate(events):
        ob.record(f"cap-{i}", "mismatch", e, TOPIC)
    ob.close()
    ob.close()  # idempotent
    with pytest.raises(OutboxError, match="is closed"):
        ob.depth()
    with Outbox(path) as again:
        assert [r.event_id for r in again.pending(10)] == [e["event_id"] for e in events]
        assert again.is_processed("cap-2")
        assert again.record("cap-2", "mismatch", ev(), TOPIC) is False


def test_a_writer_and_a_reader_thread_share_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Outbox(path).close()
    total = 300
    done = threading.Event()
    errors: list[BaseException] = []
    delivered: list[str] = []

    def writer() -> None:
        try:
            with Outbox(path) as ob:
                for i in range(total):
                    assert ob.record(f"cap-{i}", "mismatch", ev(i), TOPIC)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        try:
            with Outbox(path) as ob:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not (done.is_set() and ob.depth() == 0):
                    for row in ob.pending(25):
                        delivered.append(row.event_id)
                        ob.delete(row.seq)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(delivered) == total == len(set(delivered))
    with Outbox(path) as ob:
        assert ob.depth() == 0
        assert all(ob.is_processed(f"cap-{i}") for i in range(total))


def test_an_unusable_path_is_an_outbox_error_with_a_fix(tmp_path: Path) -> None:
    (tmp_path / "state.db").mkdir()  # a directory where the file should be
    with pytest.raises(OutboxError, match=r"outbox .*state\.db: cannot open: .*\(fix: "):
        Outbox(tmp_path / "state.db")


def test_a_corrupt_file_is_an_outbox_error_whose_fix_is_the_salvage_at_start(tmp_path: Path) -> None:
    """The outbox never rebuilds the file itself (it holds the unsent flags): the start salvages it."""
    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match=r"not a database \(fix: restart the agent: .* salvages its unsent events"):
        Outbox(bad)
    assert bad.read_bytes() == b"this is not a database" * 100


def test_has_unsent_is_true_until_the_event_is_acknowledged(tmp_path: Path) -> None:
    """Evidence purge asks has_unsent(): true while the capture's event row exists, false after delete."""
    with Outbox(tmp_path / "state.db") as ob:
        event = {"event_id": "6f1c1d3e-0000-4000-8000-000000000001", "x": 1}
        assert ob.record("cap-1", "mismatch", event, "t/events/mismatch") is True
        assert ob.record("cap-2", "match", None, None) is True
        assert ob.has_unsent("cap-1") is True
        assert ob.has_unsent("cap-2") is False
        assert ob.has_unsent("never-seen") is False
        (row,) = ob.pending(10)
        ob.delete(row.seq)
        assert ob.has_unsent("cap-1") is False


def test_threads_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """SQLite skips the busy handler for the first WAL switch; Outbox retries instead of failing."""
    for n in range(50):
        path = tmp_path / f"state-{n}.db"
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def open_it(p: Path = path, b: threading.Barrier = start, errs: list[BaseException] = errors) -> None:
            b.wait(5)
            try:
                Outbox(p).close()
            except BaseException as exc:
                errs.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []


def test_settle_deletes_acknowledged_rows_and_defers_refused_ones_together(outbox: Outbox) -> None:
    for i in range(5):
        outbox.record(f"cap-{i}", "mismatch", ev(i), TOPIC)
    a, b, c, d, e = (r.seq for r in outbox.pending(10))
    outbox.settle([a, b, e], [(c, "broker refused: 135 Not authorized", 60.0), (e, "refused copy", 60.0)])
    assert outbox.depth() == 2  # a, b and e delivered (e: one copy succeeded, the success wins)
    assert [r.seq for r in outbox.pending(10)] == [d]  # c is held back 60 s
    assert [(r.seq, r.attempts) for r in outbox.pending(10, now=time.time() + 61)] == [(c, 1), (d, 0)]
    with sqlite3.connect(outbox.path) as db:
        assert db.execute("SELECT last_error FROM outbox WHERE seq = ?", (c,)).fetchone() == (
            "broker refused: 135 Not authorized",
        )
    outbox.settle([], [])  # an empty batch changes nothing
    assert outbox.depth() == 2


def test_a_settle_that_fails_changes_nothing_and_names_the_batch(outbox: Outbox) -> None:
    """One transaction per batch: when one row cannot be deleted, no row of the batch is settled."""
    for i in range(4):
        outbox.record(f"cap-{i}", "mismatch", ev(i), TOPIC)
    a, b, c, d = (r.seq for r in outbox.pending(10))
    with sqlite3.connect(outbox.path) as db:  # a real SQLite failure on the third delete of the batch
        db.execute(
            f"CREATE TRIGGER refuse BEFORE DELETE ON outbox WHEN old.seq = {c} "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
    with pytest.raises(OutboxError, match=r"cannot settle 3 delivered and 1 refused events: disk says no.*fix:"):
        outbox.settle([a, b, c], [(d, "135", 60.0)])
    assert outbox.depth() == 4
    assert [(r.seq, r.attempts) for r in outbox.pending(10)] == [(a, 0), (b, 0), (c, 0), (d, 0)]
    with sqlite3.connect(outbox.path) as db:
        db.execute("DROP TRIGGER refuse")
    outbox.settle([a, b, c], [(d, "135", 60.0)])  # the same batch, retried, goes through whole
    assert outbox.depth() == 1 and outbox.attempts(d) == 1
