"""Versioned schema of central's flag store, for SQLite and PostgreSQL.

Each migration is applied once, in order, inside one transaction that also records its version in
``schema_version``; several ``serve`` instances starting at once serialise on a lock (SQLite
``BEGIN IMMEDIATE``, PostgreSQL ``pg_advisory_xact_lock``), so a migration never runs twice.
Add a migration by appending to :data:`MIGRATIONS`; never edit one that has shipped.
``{id}``, ``{blob}`` and ``{real}`` are replaced by each dialect's types.
"""

from __future__ import annotations

__all__ = ["DIALECT_TYPES", "MIGRATIONS"]

DIALECT_TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "real": "REAL"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA", "real": "DOUBLE PRECISION"},
}

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "events, refusals, decisions' audit log, evidence, counters",
        [
            """CREATE TABLE events (
                event_id TEXT PRIMARY KEY,
                site_id TEXT NOT NULL,
                device_id TEXT NOT NULL,
                topic TEXT NOT NULL,
                capture_id TEXT NOT NULL,
                captured_at TEXT NOT NULL,
                captured_ts {real} NOT NULL,
                received_ts {real} NOT NULL,
                outcome TEXT NOT NULL,
                level TEXT,
                plate_key TEXT,
                p_registered {real},
                log_lr {real} NOT NULL,
                status TEXT NOT NULL DEFAULT 'open',
                decided_ts {real},
                payload_site TEXT,
                doc TEXT NOT NULL
            )""",
            "CREATE INDEX events_queue ON events (status, outcome, log_lr)",
            "CREATE INDEX events_plate ON events (plate_key, captured_ts)",
            """CREATE TABLE refused (
                id {id},
                received_ts {real} NOT NULL,
                topic TEXT NOT NULL,
                reason TEXT NOT NULL,
                message TEXT NOT NULL,
                payload {blob} NOT NULL
            )""",
            """CREATE TABLE audit (
                id {id},
                at_ts {real} NOT NULL,
                reviewer TEXT NOT NULL,
                event_id TEXT NOT NULL,
                action TEXT NOT NULL,
                note TEXT NOT NULL,
                make TEXT,
                model TEXT
            )""",
            """CREATE TABLE evidence (
                event_id TEXT PRIMARY KEY,
                fetched_ts {real} NOT NULL,
                sidecar TEXT NOT NULL,
                jpeg {blob} NOT NULL
            )""",
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        ],
    ),
]
