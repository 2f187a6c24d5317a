"""A corrupt ``state.db`` at start: moved aside, its readable rows salvaged into a fresh file, said loudly.

``state.db`` holds the unsent flags, so it is never deleted nor rebuilt empty. At start,
:func:`check_and_salvage` runs ``PRAGMA quick_check``; when SQLite says the file is damaged:

1. a note ``state.db.corrupt-<UTC time>.json`` is written first (state ``moving``): it is the
   journal that lets the next start finish a salvage that a crash or a full disk interrupted;
2. ``state.db`` and its ``-wal``/``-shm`` are renamed to ``state.db.corrupt-<time>`` (the WAL
   travels with its file, so the copy reads as SQLite left it);
3. every readable row of ``outbox`` and ``processed`` is copied, one at a time (a read that fails
   on a damaged page is skipped, never fatal), into a new file built beside it, which then
   replaces ``state.db`` atomically. An outbox row is kept only when its payload is a JSON event
   with its own ``event_id``. An unsent event whose ``processed`` row was lost gets one back from
   its payload (its evidence is then kept until it is sent);
4. the note is rewritten (state ``salvaged``) with how many unsent events and processed captures
   were salvaged and whether every read succeeded. When outbox rows were lost, it also names the
   **flags to check**: the captures whose flag is not in the outbox and was made while a lost
   event was (either sent before the damage, or lost with it: central knows which).

The note is the persistent state: :func:`salvage_notes` lists it for the heartbeat and
``doctor`` until the operator deletes the moved file and its note (after sending them to the
developers, who can try ``sqlite3 FILE .recover`` on it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from iaflash.agent.errors import OutboxError
from iaflash.agent.outbox.store import SCHEMA, is_corruption
from iaflash.agent.sqlite import fix_for

__all__ = ["FIX_NOTE", "check_and_salvage", "describe", "integrity_problem", "mark_suspect", "salvage_notes"]

SUSPECT = ".suspect"  # beside state.db: a running agent met a corruption error there (mark_suspect)

log = logging.getLogger(__name__)

_CORRUPT = ".corrupt-"
_NOTE = ".json"
_SUFFIXES = ("-wal", "-shm", "")  # the WAL and its index first: a half-done move keeps the main file in place
_MAX_FAILED_READS = 10_000  # reads that fail on damaged pages before the copy of a table gives up
_LOWEST, _HIGHEST = -(2**63), 2**63 - 1  # SQLite's rowid range
_LISTED = 50  # flags to check named in the note (all are counted)
_OUTBOX_COLUMNS = "seq, event_id, topic, payload, created_at, attempts, last_error, next_attempt_at"
_PROCESSED_COLUMNS = "rowid, capture_id, outcome, event_id, processed_at"
FIX_NOTE = (
    "send the moved file and its note to the developers ('sqlite3 FILE .recover' may read more of it), then "
    "delete both; this warning stays until then"
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@contextlib.contextmanager
def _store_errors(path: Path, action: str) -> Iterator[None]:
    """A failure that is not the damage itself (disk full, read-only, permissions) as an OutboxError."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        fix = fix_for(exc) if isinstance(exc, sqlite3.Error) else "check the folder, its permissions and free space"
        raise OutboxError(f"outbox {path}: cannot {action}: {exc} (fix: {fix})") from exc


def integrity_problem(path: Path) -> str | None:
    """What SQLite says is wrong with ``path`` (``quick_check``), or None when it is sound or absent.

    Raises OutboxError when the file cannot even be checked for another reason (permissions, I/O).
    """
    if not path.is_file():  # absent (a first start), or not a file: the outbox's own open says so
        return None
    try:
        db = sqlite3.connect(str(path), timeout=30)
        try:
            found = [str(row[0]) for row in db.execute("PRAGMA quick_check(5)").fetchall()]
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            return str(exc)
        with _store_errors(path, "check its integrity"):
            raise
    return None if found == ["ok"] else "; ".join(found)


def mark_suspect(path: Path, problem: str) -> None:
    """Say, beside ``path``, that a running agent met a corruption error in it (before it stops).

    ``quick_check`` at the next start does not see every damage (an index that no longer matches its
    table); without this mark such a file would stop the agent at every commit, for ever. With it the
    next start salvages the file whatever the check says. Best effort: a mark that cannot be written
    is logged, and the start's check still runs.
    """
    try:
        Path(f"{path}{SUSPECT}").write_text(f"{_now().isoformat(timespec='seconds')} {problem}\n", encoding="utf-8")
    except OSError as exc:
        log.error("outbox %s: cannot write the corruption mark (%s)", path, exc)


def check_and_salvage(path: Path) -> dict[str, Any] | None:
    """At start: finish a salvage left half-done, then salvage ``path`` if it is corrupt; the new note, or None.

    Corrupt means ``quick_check`` finds damage, or a running agent marked it (:func:`mark_suspect`).
    """
    for note in salvage_notes(path):
        if note.get("state") == "moving":
            log.warning("outbox %s: finishing the salvage of %s that an earlier start left", path, note["moved_to"])
            _salvage(path, note)
    suspect = Path(f"{path}{SUSPECT}")
    problem = integrity_problem(path)
    if problem is None and suspect.is_file() and path.is_file():
        problem = "the running agent met: " + suspect.read_text(encoding="utf-8", errors="replace").strip()
    if problem is None:
        suspect.unlink(missing_ok=True)
        return None
    stamp = _now()
    moved = path.with_name(f"{path.name}{_CORRUPT}{stamp.strftime('%Y%m%dT%H%M%SZ')}")
    n = 1
    while any(Path(f"{moved}{s}").exists() for s in _SUFFIXES):
        moved = path.with_name(f"{path.name}{_CORRUPT}{stamp.strftime('%Y%m%dT%H%M%SZ')}-{n}")
        n += 1
    note = {
        "state": "moving",
        "file": str(path),
        "moved_to": str(moved),
        "detected_at": stamp.isoformat(timespec="seconds"),
        "problem": problem,
    }
    done = _salvage(path, note)
    suspect.unlink(missing_ok=True)
    return done


def _salvage(path: Path, note: dict[str, Any]) -> dict[str, Any]:
    moved = Path(note["moved_to"])
    note_path = Path(f"{moved}{_NOTE}")
    with _store_errors(path, f"move the corrupt file aside to {moved.name}"):
        _write_note(note_path, note)
        for suffix in _SUFFIXES:
            src, dest = Path(f"{path}{suffix}"), Path(f"{moved}{suffix}")
            if src.exists() and not dest.exists():  # idempotent: a resumed salvage never overwrites the copy
                os.rename(src, dest)
    tmp = path.with_name(f".{path.name}.salvage.tmp")
    with _store_errors(path, f"build a fresh file from {moved.name}"):
        counts = _copy_rows(moved, tmp)
        os.replace(tmp, path)
    note.update(state="salvaged", salvaged_at=_now().isoformat(timespec="seconds"), **counts)
    with _store_errors(path, "write the salvage note"):
        _write_note(note_path, note)
    log.error(
        "outbox %s was corrupt (%s): moved to %s; %d unsent events and %d processed captures salvaged into a "
        "fresh %s%s; fix: %s",
        path,
        note["problem"],
        moved.name,
        note["unsent_salvaged"],
        note["processed_salvaged"],
        path.name,
        _doubt(note, note_path.name),
        FIX_NOTE,
        extra={"salvage": note},
    )
    return note


def _in_doubt(note: dict[str, Any]) -> bool:
    """True when an unsent flag may have been lost: outbox rows unread, and some listed or none listable."""
    return not note.get("outbox_complete", note.get("complete")) and bool(
        note.get("flags_to_check_count") or not note.get("processed_complete", True)
    )


def _doubt(note: dict[str, Any], where: str) -> str:
    """What the salvage could not read, in words."""
    if note.get("complete"):
        return " (every row was read)"
    if note.get("outbox_complete", False):
        return " (some processed rows could not be read; no flag is in doubt)"
    count = note.get("flags_to_check_count", 0)
    if not note.get("processed_complete", True):
        return (
            f" (some unsent events and processed rows could not be read: flags may be lost that cannot be listed; "
            f"{count} are listed in {where})"
        )
    if not count:
        return " (some outbox rows could not be read, but no flag is missing from it)"
    return f" (some unsent events could not be read: check {count} flags with central, listed in {where})"


def _write_note(note_path: Path, note: dict[str, Any]) -> None:
    tmp = note_path.with_name(f".{note_path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(note, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, note_path)


def salvage_notes(path: Path) -> list[dict[str, Any]]:
    """Every salvage note beside ``path`` (state.db), oldest first; an unreadable note is reported as such."""
    notes = []
    for note_path in sorted(path.parent.glob(f"{path.name}{_CORRUPT}*{_NOTE}")):
        try:
            doc = json.loads(note_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            doc = {"state": "unreadable", "moved_to": str(note_path).removesuffix(_NOTE), "problem": str(exc)}
        if isinstance(doc, dict):
            notes.append({**doc, "note": str(note_path)})
    return notes


# ------------------------------------------------------------------------------- the row-by-row copy


Span = tuple[int | None, int | None]  # keys of the readable rows around a damaged stretch (None: the table's end)


def _readable(
    db: sqlite3.Connection, table: str, key: str, columns: str
) -> tuple[dict[int, tuple[Any, ...]], list[Span]]:
    """Every row of ``table`` that can be read, by ``key``; and the damaged stretches (none: every read succeeded).

    Each row is fetched by its own seek (``key > last``). A read that fails on a damaged page skips
    ahead (1, 2, 4... key values); once a read succeeds again, the rows just before it are read
    backwards down to the damage, so only the rows on damaged pages are left behind.
    """
    rows: dict[int, tuple[Any, ...]] = {}
    spans: list[Span] = []
    forward = f"SELECT {columns} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT 1"  # noqa: S608  # our names
    last, step, failed = _LOWEST, 1, 0
    damaged_from: int | None = None  # the key after which reads began to fail
    while failed < _MAX_FAILED_READS and last < _HIGHEST:
        try:
            row = db.execute(forward, (last,)).fetchone()
        except sqlite3.DatabaseError:
            failed += 1
            damaged_from = last if damaged_from is None else damaged_from
            last, step = max(last, 0) + step, step * 2
            continue
        upper = _HIGHEST if row is None else int(row[0])
        if damaged_from is not None:
            spans.append(_back_fill(db, table, key, columns, (damaged_from, upper), rows))
            damaged_from, step = None, 1
        if row is None:
            break
        rows[upper] = tuple(row)
        last = upper
    if damaged_from is not None:  # the damage reached the last key tried: read down from the top
        spans.append(_back_fill(db, table, key, columns, (damaged_from, _HIGHEST), rows))
    return rows, spans


def _back_fill(
    db: sqlite3.Connection, table: str, key: str, columns: str, between: tuple[int, int], rows: dict[int, Any]
) -> Span:
    """Read the rows with ``between[0] < key < between[1]`` downwards until a read fails; the damaged span."""
    backward = f"SELECT {columns} FROM {table} WHERE {key} < ? AND {key} > ? ORDER BY {key} DESC LIMIT 1"  # noqa: S608
    floor, upper = between
    while True:
        try:
            row = db.execute(backward, (upper, floor)).fetchone()
        except sqlite3.DatabaseError:
            break
        if row is None:
            break
        upper = int(row[0])
        rows[upper] = tuple(row)
    return (None if floor <= _LOWEST else floor), (None if upper >= _HIGHEST else upper)


def _event_of(row: tuple[Any, ...]) -> dict[str, Any] | None:
    """The event document of an outbox row, or None when the row did not survive intact."""
    seq, event_id, topic, payload, created_at, attempts = row[:6]
    if not (isinstance(seq, int) and isinstance(event_id, str) and isinstance(topic, str) and topic):
        return None
    if not (isinstance(payload, bytes) and isinstance(created_at, (int, float)) and isinstance(attempts, int)):
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("event_id") == event_id else None


def _copy_rows(src: Path, dest: Path) -> dict[str, Any]:
    """Copy the readable rows of ``src`` into a new file ``dest``; the counts for the note."""
    for leftover in (dest, Path(f"{dest}-journal")):
        leftover.unlink(missing_ok=True)
    old = sqlite3.connect(str(src), timeout=30)  # opening reads nothing: damage shows on the first read
    try:
        outbox, out_spans = _read_table(old, "outbox", "seq", _OUTBOX_COLUMNS)
        processed, proc_spans = _read_table(old, "processed", "rowid", _PROCESSED_COLUMNS)
    finally:
        old.close()
    events = [(row, doc) for row in outbox.values() if (doc := _event_of(row)) is not None]
    new = sqlite3.connect(str(dest), isolation_level=None)  # rollback journal: one file to rename into place
    try:
        new.executescript(f"BEGIN;\n{SCHEMA}\nCOMMIT;")
        new.execute("BEGIN")
        _insert(new, events, list(processed.values()))
        new.execute("COMMIT")
        to_check = _flags_to_check(new, [_window(outbox, span) for span in out_spans])
    finally:
        new.close()
    return {
        "unsent_salvaged": len(events),
        "processed_salvaged": len(processed),
        "complete": not out_spans and not proc_spans and len(events) == len(outbox),
        "outbox_complete": not out_spans and len(events) == len(outbox),
        "processed_complete": not proc_spans,
        "flags_to_check_count": len(to_check),
        "flags_to_check": to_check[:_LISTED],
    }


def _read_table(db: sqlite3.Connection, table: str, key: str, columns: str) -> tuple[dict[int, Any], list[Span]]:
    try:
        return _readable(db, table, key, columns)
    except sqlite3.Error:  # the schema itself is unreadable: nothing of this table can be salvaged
        return {}, [(None, None)]


def _window(outbox: dict[int, tuple[Any, ...]], span: Span) -> tuple[str, str]:
    """The processed_at window (ISO text, UTC) in which the events lost in a damaged outbox span were made."""

    def at(seq: int | None, default: str, margin: float) -> str:
        if seq is None or seq not in outbox or not isinstance(outbox[seq][4], (int, float)):
            return default
        when = datetime.fromtimestamp(float(outbox[seq][4]) + margin, timezone.utc)
        return when.isoformat(timespec="milliseconds")

    return at(span[0], "", -1.0), at(span[1], "~", 1.0)  # "" and "~" sort before and after any ISO time


def _flags_to_check(db: sqlite3.Connection, windows: list[tuple[str, str]]) -> list[str]:
    """Captures with a flag whose event is not in the outbox and was made while a lost event was: sent, or lost."""
    found: dict[str, None] = {}
    for low, high in windows:
        for (capture_id,) in db.execute(
            "SELECT capture_id FROM processed WHERE event_id IS NOT NULL AND processed_at BETWEEN ? AND ? "
            "AND event_id NOT IN (SELECT event_id FROM outbox) ORDER BY processed_at",
            (low, high),
        ):
            found[str(capture_id)] = None
    return list(found)


def _insert(
    db: sqlite3.Connection, events: list[tuple[tuple[Any, ...], dict[str, Any]]], processed: list[tuple[Any, ...]]
) -> None:
    good = [r[1:] for r in processed if isinstance(r[1], str) and isinstance(r[2], str) and isinstance(r[4], str)]
    db.executemany(
        "INSERT OR IGNORE INTO processed (capture_id, outcome, event_id, processed_at) VALUES (?, ?, ?, ?)", good
    )
    for row, doc in events:
        db.execute(
            "INSERT OR IGNORE INTO outbox (seq, event_id, topic, payload, created_at, attempts, last_error, "
            "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
            row[:7],
        )
        capture_id = doc.get("capture_id")
        known = db.execute("SELECT 1 FROM processed WHERE event_id = ?", (row[1],)).fetchone() is not None
        if isinstance(capture_id, str) and not known:  # its processed row was lost: rebuilt from the event
            verdict = doc.get("verdict")
            outcome = verdict.get("outcome") if isinstance(verdict, dict) else None
            db.execute(
                "INSERT OR IGNORE INTO processed (capture_id, outcome, event_id, processed_at) VALUES (?, ?, ?, ?)",
                (capture_id, str(outcome or "unknown"), row[1], str(doc.get("processed_at") or _now().isoformat())),
            )


def describe(note: dict[str, Any]) -> tuple[bool, str]:
    """(flags in doubt?, one sentence) for a salvage note: what the heartbeat's reader and doctor show."""
    moved = Path(str(note.get("moved_to", "?"))).name
    where = Path(str(note.get("note", f"{moved}{_NOTE}"))).name
    if note.get("state") != "salvaged":
        return True, f"a salvage of {moved} did not finish (state {note.get('state')}): start the agent to finish it"
    text = (
        f"state.db was corrupt at {note.get('detected_at')} ({note.get('problem')}): moved to {moved}, "
        f"{note.get('unsent_salvaged')} unsent events and {note.get('processed_salvaged')} processed captures "
        f"salvaged into a fresh one{_doubt(note, where)}"
    )
    return _in_doubt(note), text
