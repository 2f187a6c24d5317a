"""Pruning the ``processed`` table of state.db: old rows go, unsent events stay (real SQLite files).

The daemon's housekeeping loop running it is tested in tests/test_reliability.py.
"""

from __future__ import annotations

import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from iaflash.agent.outbox.store import PRUNE_BATCH, Outbox

TOPIC = "iaflash/v1/s/d/events/mismatch"


def age(db: Path, days: float, capture_ids: list[str] | None = None) -> None:
    """Make rows look processed ``days`` ago (all of them, or those of ``capture_ids``)."""
    when = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="milliseconds")
    with sqlite3.connect(db) as conn:
        if capture_ids is None:
            conn.execute("UPDATE processed SET processed_at = ?", (when,))
        else:
            conn.executemany(
                "UPDATE processed SET processed_at = ? WHERE capture_id = ?", [(when, c) for c in capture_ids]
            )


def event() -> dict[str, str]:
    return {"event_id": str(uuid.uuid4())}


def test_rows_older_than_the_retention_go_and_recent_ones_stay(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with Outbox(db) as ob:
        for i in range(10):
            ob.record(f"old-{i}", "match", None, None)
        age(db, 100)
        for i in range(5):
            ob.record(f"new-{i}", "match", None, None)
        assert ob.prune_processed(older_than_days=90) == 10
        assert ob.processed_count() == 5
        assert not ob.is_processed("old-0") and ob.is_processed("new-0")
        assert ob.prune_processed(older_than_days=90) == 0


def test_a_row_whose_event_is_unsent_is_kept_whatever_its_age(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with Outbox(db) as ob:
        sent, unsent = event(), event()
        ob.record("flag-sent", "mismatch", sent, TOPIC)
        ob.record("flag-unsent", "mismatch", unsent, TOPIC)
        ob.record("match", "match", None, None)
        age(db, 400)
        (sent_row,) = [r for r in ob.pending(10) if r.event_id == sent["event_id"]]
        ob.delete(sent_row.seq)  # its PUBACK came
        assert ob.prune_processed(older_than_days=30) == 2
        assert ob.is_processed("flag-unsent") and ob.has_unsent("flag-unsent")
        assert [r.event_id for r in ob.pending(10)] == [unsent["event_id"]]


def test_pruning_goes_in_batches_and_removes_every_old_row(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    total = PRUNE_BATCH * 2 + 17
    with Outbox(db) as ob:
        ob.record_many([(f"cap-{i}", "match", None, None) for i in range(total)])
        age(db, 200)
        assert ob.prune_processed(older_than_days=90) == total
        assert ob.processed_count() == 0


def test_a_capture_dropped_again_after_its_row_was_pruned_is_processed_again_as_new(tmp_path: Path) -> None:
    """The trade-off of the retention (docs/RELIABILITY.md): past it, the same capture gets a second verdict."""
    db = tmp_path / "state.db"
    with Outbox(db) as ob:
        assert ob.record("cap-1", "mismatch", event(), TOPIC) is True
        assert ob.record("cap-1", "mismatch", event(), TOPIC) is False  # within the retention: recognised
        for row in ob.pending(10):
            ob.delete(row.seq)
        age(db, 91)
        assert ob.prune_processed(older_than_days=90) == 1
        assert ob.record("cap-1", "mismatch", event(), TOPIC) is True
