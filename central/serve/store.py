"""Central's durable flag store: SQLite by default, PostgreSQL when configured.

Every event is stored once, keyed on ``event_id`` (``INSERT … ON CONFLICT DO NOTHING``): a
redelivery, or the same event reaching two ``serve`` instances, changes nothing and is counted as a
duplicate. A refused message is stored too (``refused``: topic, reason, payload), so nothing the
broker delivered is ever lost silently. Reviewer decisions update the flag's status and append to
``audit``, which retention never purges.

One :class:`Store` owns one connection and serialises its callers with a lock; the ingester and
the web pages each open their own. Placeholders are written ``?`` and translated for psycopg.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from iaflash.central.errors import StoreError
from iaflash.central.serve.migrations import DIALECT_TYPES, MIGRATIONS

__all__ = ["ACTIONS", "Accepted", "Refused", "Store", "StoreError", "log_lr", "parse_time"]

ACTIONS = {"confirmed_clone": "closed", "false_flag": "dismissed", "cannot_tell": "cannot_tell"}
P_CLIP = 1e-6
_MIGRATION_LOCK = 7_202_612  # pg_advisory_xact_lock key: "serve migrations"
AUDIT_COLUMNS = "id, at_ts, reviewer, event_id, action, note, make, model"
_FRACTION = re.compile(r"\.(\d+)")
EVENT_COLUMNS = (
    "event_id, site_id, device_id, topic, capture_id, captured_at, captured_ts, received_ts, outcome, level, "
    "plate_key, p_registered, log_lr, status, decided_ts, payload_site, doc"
)


def parse_time(text: str) -> float:
    """Epoch seconds of an RFC 3339 time with an offset (``Z`` and any fraction length, on 3.10 too)."""
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text.replace("Z", "+00:00"), count=1)
    return datetime.fromisoformat(text).timestamp()


def p_registered(verdict: dict[str, Any]) -> float | None:
    """P(registered make/model | image) at the verdict's level (the model's when no level)."""
    if verdict.get("level") == "make":
        return verdict.get("p_make")
    return verdict.get("p_model") if verdict.get("p_model") is not None else verdict.get("p_make")


def log_lr(p: float | None) -> float:
    """Natural log of the likelihood ratio "not the registered vehicle" : "the registered one".

    With calibrated probabilities and equal priors it is the log odds ``ln((1-p)/p)``; 0 when unknown.
    """
    if p is None:
        return 0.0
    p = min(max(float(p), P_CLIP), 1 - P_CLIP)
    return math.log((1 - p) / p)


class Store:
    """One connection to the flag store (thread-safe through a lock)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        if url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            self._conn: Any = self._connect_pg(url)
        else:
            self.dialect = "sqlite"
            path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
            self.path = Path(path)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")  # a stored flag survives a power cut
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(
                    f"cannot open the SQLite store {self.path}: {exc} (fix: --db to a writable file)"
                ) from exc
            self._conn = conn

    @staticmethod
    def _connect_pg(url: str) -> Any:
        try:
            import psycopg  # noqa: PLC0415  # optional: only a PostgreSQL store needs it
        except ImportError as exc:
            raise StoreError("PostgreSQL store needs psycopg: pip install 'iaflash-edge[central]'") from exc
        try:
            return psycopg.connect(url, connect_timeout=10)
        except psycopg.Error as exc:
            where = url.rsplit("@", maxsplit=1)[-1]  # never echo a password from the URL
            raise StoreError(f"cannot connect to PostgreSQL at {where}: {exc} (fix: check --db)") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- SQL plumbing ------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One write transaction; yields a cursor. SQLite takes the write lock at once."""
        with self._lock:
            if self.dialect == "sqlite":
                cur = self._conn.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            else:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    yield cur

    def _exec(self, cur: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
        cur.execute(self._sql(sql), params)
        return cur

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows of a read query as dicts (column name → value)."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute(self._sql(sql), params)
                names = [d[0] for d in cur.description]
                rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            finally:
                cur.close()
            if self.dialect == "postgresql":
                self._conn.commit()  # end the implicit read transaction
            return rows

    # ----- migrations ---------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply the migrations not yet applied, in order; the versions applied now."""
        applied: list[int] = []
        types = DIALECT_TYPES[self.dialect]
        with self._tx() as cur:
            if self.dialect == "postgresql":
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_ts REAL)")
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            current = int(cur.fetchone()[0])
            for version, _title, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    cur.execute(statement.format(**types))
                self._exec(cur, "INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
                applied.append(version)
        return applied

    def schema_version(self) -> int:
        return int(self.query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")[0]["v"])

    # ----- ingestion ----------------------------------------------------------------------------
    def ingest(self, doc: dict[str, Any], *, site: str, device: str, topic: str, payload_site: str | None) -> bool:
        """Store one validated event under ``site``/``device`` (from the topic); False if already stored."""
        [stored] = self.write_batch([Accepted(doc, site, device, topic, payload_site)])
        return stored

    def refuse(self, *, topic: str, reason: str, message: str, payload: bytes) -> None:
        """Keep a refused message (and count it under ``refused.<reason>``)."""
        self.write_batch([Refused(topic, reason, message, payload)])

    def write_batch(self, items: Sequence[Accepted | Refused]) -> list[bool]:
        """Store accepted events and refused messages in ONE transaction (one fsync for the batch).

        For each item: True when it added a row (a new event, or a refusal kept), False for a duplicate.
        """
        results: list[bool] = []
        counts: dict[str, int] = {}
        now = time.time()
        with self._tx() as cur:
            for item in items:
                if isinstance(item, Refused):
                    self._exec(
                        cur,
                        "INSERT INTO refused (received_ts, topic, reason, message, payload) VALUES (?, ?, ?, ?, ?)",
                        (now, item.topic, item.reason, item.message[:2000], item.payload),
                    )
                    name, added = f"refused.{item.reason}", True
                else:
                    self._exec(cur, _INSERT_EVENT, _event_row(item, now))
                    added = cur.rowcount == 1
                    name = "stored" if added else "duplicates"
                    if added and item.payload_site is not None:
                        counts["identity_rewritten"] = counts.get("identity_rewritten", 0) + 1
                counts[name] = counts.get(name, 0) + 1
                results.append(bool(added))
            for name, n in sorted(counts.items()):
                self._bump(cur, name, n)
        return results

    def count(self, name: str, n: int = 1) -> None:
        with self._tx() as cur:
            self._bump(cur, name, n)

    def _bump(self, cur: Any, name: str, n: int = 1) -> None:
        self._exec(
            cur,
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
            (name, n),
        )

    def counters(self) -> dict[str, int]:
        return {r["name"]: int(r["value"]) for r in self.query("SELECT name, value FROM counters ORDER BY name")}

    # ----- the review queue ---------------------------------------------------------------------
    def flags(
        self,
        *,
        site: str | None = None,
        since: float | None = None,
        until: float | None = None,
        level: str | None = None,
        status: str | None = None,
        plate_key: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Mismatch events matching the filters, strongest evidence first."""
        where, params = ["outcome = 'mismatch'"], []
        for column, op, value in (
            ("site_id", "=", site),
            ("captured_ts", ">=", since),
            ("captured_ts", "<", until),
            ("level", "=", level),
            ("status", "=", status),
            ("plate_key", "=", plate_key),
        ):
            if value is not None:
                where.append(f"{column} {op} ?")
                params.append(value)
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY log_lr DESC, captured_ts LIMIT ?"  # noqa: S608  # columns are ours, values are bound
        )
        return [_decode(r) for r in self.query(sql, (*params, limit))]

    def flag(self, event_id: str) -> dict[str, Any] | None:
        rows = self.query(f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id = ?", (event_id,))  # noqa: S608  # bound
        return _decode(rows[0]) if rows else None

    def sightings(self, plate_key: str) -> list[dict[str, Any]]:
        """Every stored event of one plate key (any outcome), oldest first."""
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE plate_key = ? ORDER BY captured_ts"  # noqa: S608  # bound
        return [_decode(r) for r in self.query(sql, (plate_key,))]

    def decide(self, event_id: str, *, reviewer: str, action: str, note: str, make: str = "", model: str = "") -> str:
        """Record a reviewer's decision and audit it; the flag's new status.

        ``make``/``model``: what the reviewer saw in the photo, when they could tell (a training label).
        """
        if action not in ACTIONS:
            raise ValueError(f"action {action!r} is not one of {sorted(ACTIONS)}")
        status = ACTIONS[action]
        with self._tx() as cur:
            self._exec(
                cur, "UPDATE events SET status = ?, decided_ts = ? WHERE event_id = ?", (status, time.time(), event_id)
            )
            if cur.rowcount != 1:
                raise KeyError(f"no flag {event_id} in the store")
            self._audit(cur, reviewer, event_id, action, note, make.strip().upper(), model.strip().upper())
        return status

    def audit(self, *, reviewer: str, event_id: str, action: str, note: str = "") -> None:
        """Append one line to the audit log (an action other than a decision: evidence fetched, export)."""
        with self._tx() as cur:
            self._audit(cur, reviewer, event_id, action, note)

    def _audit(
        self, cur: Any, reviewer: str, event_id: str, action: str, note: str, make: str = "", model: str = ""
    ) -> None:
        self._exec(
            cur,
            "INSERT INTO audit (at_ts, reviewer, event_id, action, note, make, model) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), reviewer, event_id, action, note[:4000], make or None, model or None),
        )

    def audit_log(self, event_id: str | None = None) -> list[dict[str, Any]]:
        if event_id is None:
            return self.query(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY id")  # noqa: S608  # our columns
        return self.query(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE event_id = ? ORDER BY id", (event_id,))  # noqa: S608

    # ----- evidence -----------------------------------------------------------------------------
    def put_evidence(self, event_id: str, sidecar: dict[str, Any], jpeg: bytes) -> None:
        with self._tx() as cur:
            self._exec(cur, "DELETE FROM evidence WHERE event_id = ?", (event_id,))
            self._exec(
                cur,
                "INSERT INTO evidence (event_id, fetched_ts, sidecar, jpeg) VALUES (?, ?, ?, ?)",
                (event_id, time.time(), json.dumps(sidecar), jpeg),
            )

    def evidence(self, event_id: str) -> tuple[dict[str, Any], bytes] | None:
        rows = self.query("SELECT sidecar, jpeg FROM evidence WHERE event_id = ?", (event_id,))
        return (json.loads(rows[0]["sidecar"]), bytes(rows[0]["jpeg"])) if rows else None

    # ----- retention ----------------------------------------------------------------------------
    def purge(self, *, decided_days: float, evidence_days: float, now: float | None = None) -> dict[str, int]:
        """Delete decided flags and evidence images past their periods; the audit log is kept."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            self._exec(
                cur,
                "DELETE FROM evidence WHERE fetched_ts < ? OR event_id IN "
                "(SELECT event_id FROM events WHERE status <> 'open' AND decided_ts < ?)",
                (now - evidence_days * 86400, now - decided_days * 86400),
            )
            images = cur.rowcount
            self._exec(
                cur,
                "DELETE FROM events WHERE status IN ('closed', 'dismissed', 'cannot_tell') AND decided_ts < ?",
                (now - decided_days * 86400,),
            )
            flags = cur.rowcount
            self._bump(cur, "purged.flags", flags)
            self._bump(cur, "purged.evidence", images)
        return {"flags": flags, "evidence": images}


@dataclass(frozen=True)
class Accepted:
    """A validated event, bound to the site and device of its topic."""

    doc: dict[str, Any]
    site: str
    device: str
    topic: str
    payload_site: str | None = None  # "site/device" the payload named, when it differed


@dataclass(frozen=True)
class Refused:
    """A message kept aside with the reason it was refused."""

    topic: str
    reason: str
    message: str
    payload: bytes


_INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({', '.join('?' * 17)}) ON CONFLICT (event_id) DO NOTHING"  # noqa: S608  # bound values


def _event_row(item: Accepted, now: float) -> tuple[Any, ...]:
    doc, verdict = item.doc, item.doc["verdict"]
    p = p_registered(verdict)
    return (
        doc["event_id"], item.site, item.device, item.topic, doc["capture_id"], doc["captured_at"],
        parse_time(doc["captured_at"]), now, verdict["outcome"], verdict.get("level"), doc.get("plate_key"), p,
        log_lr(p) if verdict["outcome"] == "mismatch" else 0.0, "open", None, item.payload_site,
        json.dumps(doc, separators=(",", ":"), sort_keys=True),
    )  # fmt: skip


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["doc"] = json.loads(row["doc"])
    return row
