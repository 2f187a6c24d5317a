"""The durable outbox: processed captures and unsent events in one SQLite (WAL) file.

A verdict is made durable by :meth:`Outbox.record`, which marks the capture processed and
queues its event in ONE transaction, before anything is published. A row leaves the outbox
only through :meth:`Outbox.settle` (or :meth:`Outbox.delete`), which the publisher calls with the
rows whose PUBACK was a success: a drained batch of PUBACKs is settled in ONE transaction (one
fsync for the batch, not one per event). A crash before that commit leaves the rows in place:
they are published again (a duplicate, never a loss).

Each thread opens its OWN :class:`Outbox` (its own connection); WAL lets one writer and
many readers work at once and ``busy_timeout`` makes a second writer wait instead of failing.
Every :mod:`sqlite3` error is mapped here to :class:`~iaflash.agent.errors.OutboxError`.

The ``processed`` table is what recognises a capture dropped again as already processed (and a
reused id with other content as a new capture). :meth:`Outbox.prune_processed` forgets rows older
than ``outbox.processed_retention_days`` (housekeeping, hourly), never one whose event is unsent.
A corrupt file is moved aside and salvaged at start by :mod:`iaflash.agent.outbox.salvage`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from iaflash.agent.errors import OutboxError
from iaflash.agent.sqlite import fix_for

__all__ = ["SCHEMA", "Outbox", "OutboxRow", "is_corruption"]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
PRUNE_BATCH = 5000  # processed rows deleted per transaction: the commit thread never waits long for the lock
FIX_CORRUPT = (
    "restart the agent: at start it moves a corrupt state.db aside (state.db.corrupt-<time>) and salvages its "
    "unsent events into a fresh one (docs/RELIABILITY.md)"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS processed (
    capture_id   TEXT PRIMARY KEY,
    outcome      TEXT NOT NULL,
    event_id     TEXT NULL,
    processed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    topic           TEXT NOT NULL,
    payload         BLOB NOT NULL,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT NULL,
    next_attempt_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, seq);
"""


# Old processed rows, never one whose event is still in the outbox (its evidence must be kept).
_PRUNE_SQL = (
    "DELETE FROM processed WHERE rowid IN (SELECT p.rowid FROM processed p WHERE p.processed_at < ? "
    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = p.event_id) LIMIT ?)"
)

# (capture_id, outcome, event document or None, topic or None)
Recorded = tuple[str, str, dict[str, Any] | None, str | None]


@dataclass(frozen=True)
class OutboxRow:
    """One unsent event."""

    seq: int
    event_id: str
    topic: str
    payload: bytes
    attempts: int


def _retry_locked(step: Callable[[], None]) -> None:
    """Run ``step``, retrying while the file is locked: SQLite skips the busy handler when two
    connections first open a new file (journal mode switch, schema creation)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _enable_wal(db: sqlite3.Connection) -> None:
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL could not be enabled")


def _create_schema(db: sqlite3.Connection) -> None:
    try:
        db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class Outbox:
    """One connection to the outbox file; use one instance per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        with self._errors("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            try:
                self._setup(db)
            except BaseException:
                db.close()
                raise
            self._db = db

    @staticmethod
    def _setup(db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _retry_locked(lambda: _enable_wal(db))
        db.execute("PRAGMA synchronous = FULL")  # a committed flag survives a power cut
        _retry_locked(lambda: _create_schema(db))

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            if is_corruption(exc):
                fix = FIX_CORRUPT
            else:
                fix = fix_for(exc) if isinstance(exc, sqlite3.Error) else "check the path and permissions"
            raise OutboxError(f"outbox {self.path}: cannot {action}: {exc} (fix: {fix})") from exc

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"outbox {self.path} is closed (fix: open a new Outbox)")
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def record(self, capture_id: str, outcome: str, event: dict[str, Any] | None, topic: str | None) -> bool:
        """Mark ``capture_id`` processed and queue ``event`` on ``topic``, atomically.

        Returns False, changing nothing, when the capture was already processed (a re-run after
        a crash never creates a second event).
        """
        return self.record_many([(capture_id, outcome, event, topic)])[0]

    def record_many(self, items: Sequence[Recorded]) -> list[bool]:
        """``record`` for several captures in ONE transaction (one fsync: group commit).

        Each item is (capture_id, outcome, event, topic). Returns, per item, False when that
        capture was already processed (nothing changed for it), True otherwise.
        """
        for _, _, event, topic in items:
            if (event is None) != (topic is None):
                raise ValueError("event and topic go together: give both or neither")
        now_iso = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        done: list[bool] = []
        what = f"capture {items[0][0]}" if len(items) == 1 else f"{len(items)} captures"
        with self._errors(f"record {what}"), self._transaction() as db:
            for capture_id, outcome, event, topic in items:
                event_id = str(event["event_id"]) if event is not None else None
                cur = db.execute(
                    "INSERT OR IGNORE INTO processed (capture_id, outcome, event_id, processed_at) VALUES (?, ?, ?, ?)",
                    (capture_id, outcome, event_id, now_iso),
                )
                done.append(cur.rowcount == 1)
                if cur.rowcount == 1 and event is not None:
                    payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
                    db.execute(
                        "INSERT INTO outbox (event_id, topic, payload, created_at, attempts, next_attempt_at) "
                        "VALUES (?, ?, ?, ?, 0, 0)",
                        (event_id, topic, payload, time.time()),
                    )
        return done

    def is_processed(self, capture_id: str) -> bool:
        with self._errors(f"read capture {capture_id}"):
            row = self._conn.execute("SELECT 1 FROM processed WHERE capture_id = ?", (capture_id,)).fetchone()
        return row is not None

    def pending(self, limit: int, exclude: Collection[int] = (), now: float | None = None) -> list[OutboxRow]:
        """Up to ``limit`` rows due at ``now`` (default: now), oldest first, skipping ``exclude`` seqs."""
        if limit <= 0:
            return []
        due = time.time() if now is None else now
        skip = set(exclude)
        with self._errors("read pending events"):
            rows = self._conn.execute(
                "SELECT seq, event_id, topic, payload, attempts FROM outbox "
                "WHERE next_attempt_at <= ? ORDER BY seq LIMIT ?",
                (due, limit + len(skip)),
            ).fetchall()
        out = [OutboxRow(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), int(r[4])) for r in rows if r[0] not in skip]
        return out[:limit]

    def delete(self, seq: int) -> None:
        """Remove a delivered row (called on a successful PUBACK only)."""
        with self._errors(f"delete event seq {seq}"):
            self._conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def settle(self, acked: Collection[int], refused: Sequence[tuple[int, str, float]] = ()) -> None:
        """Settle a batch of PUBACKs in ONE transaction: all of it or, on error, none of it.

        ``acked`` are the seqs whose PUBACK was a success: their rows are deleted. ``refused`` are
        ``(seq, error, delay_s)`` for refused PUBACKs: like :meth:`defer`, each keeps its row, counts
        the attempt and is held back ``delay_s`` seconds. A seq in both is settled as acked.
        """
        delivered = set(acked)
        gone = sorted(delivered)
        now = time.time()
        held = [(error, now + delay, seq) for seq, error, delay in refused if seq not in delivered]
        if not gone and not held:
            return
        with self._errors(f"settle {len(gone)} delivered and {len(held)} refused events"), self._transaction() as db:
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in gone])
            db.executemany(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE seq = ?", held
            )

    def defer(self, seq: int, error: str, delay_s: float) -> None:
        """Count a failed attempt and hold the row back for ``delay_s`` seconds."""
        with self._errors(f"defer event seq {seq}"):
            self._conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE seq = ?",
                (error, time.time() + delay_s, seq),
            )

    def attempts(self, seq: int) -> int | None:
        """Failed attempts counted for a row, or None when the row is gone."""
        with self._errors(f"read event seq {seq}"):
            row = self._conn.execute("SELECT attempts FROM outbox WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else int(row[0])

    def has_unsent(self, capture_id: str) -> bool:
        """True while this capture's event is still waiting for a PUBACK (its evidence must be kept)."""
        with self._errors(f"read capture {capture_id}"):
            row = self._conn.execute(
                "SELECT 1 FROM processed p JOIN outbox o ON o.event_id = p.event_id WHERE p.capture_id = ?",
                (capture_id,),
            ).fetchone()
        return row is not None

    def prune_processed(self, older_than_days: float, now: float | None = None) -> int:
        """Forget captures processed more than ``older_than_days`` ago; returns how many rows went.

        A row whose event is still unsent is kept whatever its age (its evidence must stay). Rows
        go in batches of :data:`PRUNE_BATCH`, one transaction each, so commits never wait long.
        """
        cutoff = datetime.fromtimestamp((time.time() if now is None else now) - older_than_days * 86400, timezone.utc)
        before = cutoff.isoformat(timespec="milliseconds")
        removed = 0
        with self._errors(f"prune processed captures older than {older_than_days:g} days"):
            while True:
                with self._transaction() as db:
                    cur = db.execute(
                        _PRUNE_SQL,
                        (before, PRUNE_BATCH),
                    )
                removed += cur.rowcount
                if cur.rowcount < PRUNE_BATCH:
                    return removed

    def processed_count(self) -> int:
        """Number of captures remembered as processed."""
        with self._errors("count processed captures"):
            return int(self._conn.execute("SELECT COUNT(*) FROM processed").fetchone()[0])

    def depth(self) -> int:
        """Number of unsent events."""
        with self._errors("count events"):
            return int(self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def oldest_age_s(self) -> float | None:
        """Age in seconds of the oldest unsent event, or None when the outbox is empty."""
        with self._errors("read oldest event"):
            oldest = self._conn.execute("SELECT MIN(created_at) FROM outbox").fetchone()[0]
        return None if oldest is None else max(0.0, time.time() - float(oldest))

    def close(self) -> None:
        if self._db is not None:
            with self._errors("close"):
                self._db.close()
            self._db = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_corruption(exc: BaseException) -> bool:
    """True when SQLite says the file is damaged (malformed, not a database), not merely unwritable."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text)
