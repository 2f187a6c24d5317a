"""The SIV subset cache: subset files (JSON Lines, gzip), their import into SQLite, and lookups.

* Subset files are written by :func:`write_subset` and read by :func:`import_subset`; the format is
  in docs/REGISTRY.md. Plates appear only as HMAC-SHA256 keys (see :mod:`agent.plates`).
* An import is one SQLite transaction: on any error (bad line, gap, key mismatch, crash, SIGKILL)
  the cache stays exactly as it was. sqlite-utils owns the schema; rows go in with raw
  ``executemany`` because sqlite-utils' write methods commit on their own (3.x uses ``with conn:``),
  which would break the single transaction, and are slower (see benchmarks/registry_bench.py).
* :class:`Registry` is the per-capture read path: raw sqlite3 primary-key SELECTs.
* sqlite3 errors are mapped to :class:`RegistryError` here, in :func:`_db_errors`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import sqlite3
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeAlias

import sqlite_utils

from agent.errors import RegistryError, RegistryFileError
from agent.plates import key_id as compute_key_id
from agent.plates import plate_key

__all__ = ["FORMAT", "VERSION", "Registry", "RegistryRecord", "RegistryState",
           "import_subset", "read_state", "records_from_plates", "write_subset"]

log = logging.getLogger(__name__)

FORMAT = "iaflash-siv-subset"
VERSION = 1
_BATCH = 10_000
_HEADER_KEYS = frozenset({"format", "version", "kind", "dataset_id", "seq", "base_seq", "key_id",
                          "count", "created_at"})
_RECORD_KEYS = frozenset({"op", "plate_key", "make", "model", "genre", "body"})
_HEX = frozenset("0123456789abcdef")
_STATE_KEYS = ("dataset_id", "seq", "key_id", "kind", "imported_at", "count", "created_at")
_TABLES: dict[str, tuple[dict[str, Any], str, set[str]]] = {  # name: (columns, primary key, not null)
    "vehicles": ({"plate_key": bytes, "make": str, "model": str, "genre": str, "body": str},
                 "plate_key", {"make", "model"}),
    "meta": ({"key": str, "value": str}, "key", set()),
}
Row: TypeAlias = "tuple[bytes, str, str, str | None, str | None]"


@dataclass(frozen=True)
class RegistryRecord:
    """What the registry says about a plate: make, model, genre (J.1) and body (J.3)."""

    make: str
    model: str
    genre: str | None
    body: str | None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass(frozen=True)
class RegistryState:
    """The cache's provenance. ``count`` is the number of vehicles in the cache.

    ``created_at`` is when central wrote the last imported file (None for caches that predate it);
    the cache's age is measured from it, since that is how old the data is.
    """

    dataset_id: str
    seq: int
    key_id: str
    kind: str
    imported_at: datetime
    count: int
    created_at: datetime | None = None

    def age_hours(self, now: datetime | None = None) -> float:
        """Hours since the data was created at central (since import when created_at is unknown)."""
        since = self.created_at or self.imported_at
        return ((now or datetime.now(timezone.utc)) - since).total_seconds() / 3600

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["imported_at"] = self.imported_at.isoformat()
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        return out


@dataclass(frozen=True)
class _Header:
    kind: str
    dataset_id: str
    seq: int
    base_seq: int | None
    key_id: str
    count: int
    created_at: datetime


def _parse_time(value: str) -> datetime:
    # Python 3.10's fromisoformat refuses a trailing "Z".
    parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    if parsed.tzinfo is None:
        raise ValueError("no UTC offset")
    return parsed.astimezone(timezone.utc)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_problems(obj: dict[str, Any]) -> Iterator[str]:
    """Yield the header's problems; callers take the first (later checks rely on earlier ones)."""
    if obj.get("format") != FORMAT or obj.get("version") != VERSION:
        yield f"not a {FORMAT} version {VERSION} header"
    if not obj.keys() <= _HEADER_KEYS:
        yield f"unknown header keys {sorted(obj.keys() - _HEADER_KEYS)}"
    if obj.get("kind") not in ("snapshot", "delta"):
        yield "kind must be 'snapshot' or 'delta'"
    if not isinstance(obj.get("dataset_id"), str) or not obj["dataset_id"]:
        yield "dataset_id must be a non-empty string"
    if not (_is_int(obj.get("seq")) and _is_int(obj.get("count"))):
        yield "seq and count must be integers >= 0"
    base = obj.get("base_seq")
    if obj["kind"] == "delta" and not (_is_int(base) and base < obj["seq"]):
        yield "a delta needs an integer base_seq lower than its seq"
    if obj["kind"] == "snapshot" and base is not None:
        yield "a snapshot has base_seq null"
    kid = obj.get("key_id")
    if not (isinstance(kid, str) and len(kid) == 16 and set(kid) <= _HEX):
        yield "key_id must be 16 lowercase hex characters"


def _parse_header(obj: object, where: str) -> _Header:
    fix = "fix: rebuild the file with `iaflash-central registry build`"
    if not isinstance(obj, dict):
        raise RegistryFileError(f"{where}: header is not a JSON object; {fix}")
    problem = next(_header_problems(obj), None)
    if problem is None:
        try:
            created = _parse_time(obj["created_at"])
        except (KeyError, TypeError, ValueError):
            problem = "created_at must be an ISO 8601 time with a UTC offset"
    if problem is not None:
        raise RegistryFileError(f"{where}: bad header: {problem}; {fix}")
    return _Header(obj["kind"], obj["dataset_id"], obj["seq"], obj.get("base_seq"), obj["key_id"],
                   obj["count"], created)


def _record_problems(obj: dict[str, Any]) -> Iterator[str]:
    """Yield the record's problems; callers take the first."""
    if not obj.keys() <= _RECORD_KEYS:
        yield f"unknown keys {sorted(obj.keys() - _RECORD_KEYS)}"
    key = obj.get("plate_key")
    if not (isinstance(key, str) and len(key) == 64 and set(key.lower()) <= _HEX):
        yield "plate_key must be 64 hex characters"
    if obj.get("op") not in ("upsert", "delete"):
        yield "op must be 'upsert' or 'delete'"
    if obj["op"] == "upsert":
        if not all(isinstance(obj.get(f), str) and obj[f] for f in ("make", "model")):
            yield "make and model must be non-empty strings for an upsert"
        if not all(obj.get(f) is None or isinstance(obj[f], str) for f in ("genre", "body")):
            yield "genre and body must be strings or null"


def _parse_record(obj: object, file: Path | str, lineno: int) -> tuple[str, Row]:
    """Validate one record; return (op, row) with the plate key as bytes.

    The fast path accepts well-formed records in a few checks (1M of them per import); anything else
    goes through :func:`_record_problems` to say what is wrong.
    """
    if type(obj) is dict and obj.keys() <= _RECORD_KEYS:
        op, hexkey = obj.get("op"), obj.get("plate_key")
        make, model, genre, body = obj.get("make"), obj.get("model"), obj.get("genre"), obj.get("body")
        try:
            key = bytes.fromhex(hexkey) if type(hexkey) is str and len(hexkey) == 64 else b""
        except ValueError:
            key = b""
        if len(key) == 32 and (op == "delete" or (
                op == "upsert" and type(make) is str and make and type(model) is str and model
                and (genre is None or type(genre) is str) and (body is None or type(body) is str))):
            return op, (key, make or "", model or "", genre, body)
    problem = next(_record_problems(obj), "bad record") if isinstance(obj, dict) else "not a JSON object"
    raise RegistryFileError(f"{file}:{lineno}: bad record: {problem}; fix: rebuild the file with "
                            "`iaflash-central registry build`")


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def write_subset(path: Path, *, kind: str = "snapshot", dataset_id: str, seq: int, key_id: str,
                 records: Iterable[dict[str, Any]], base_seq: int | None = None) -> int:
    """Write a subset file (header + records, gzip) atomically; return the number of records."""
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, "kind": kind, "dataset_id": dataset_id, "seq": seq,
              "base_seq": base_seq, "key_id": key_id, "count": 0,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _parse_header(header, f"{path}: header")  # refuse bad arguments before consuming the records
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as body:
        count = 0
        for count, rec in enumerate(records, start=1):
            op, _ = _parse_record(rec, "(records)", count)
            out = {"op": op, "plate_key": rec["plate_key"]}
            if op == "upsert":
                out.update(make=rec["make"], model=rec["model"], genre=rec.get("genre"), body=rec.get("body"))
            body.write(_dump(out))
        header["count"] = count
        body.seek(0)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(_dump(header))
                while chunk := body.read(1 << 20):
                    gz.write(chunk)
            with open(tmp, "rb") as done:
                os.fsync(done.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    log.info("wrote subset %s: %s seq %s, %s records", path, kind, seq, count)
    return count


PlateRow: TypeAlias = "tuple[str, str, str, str | None, str | None]"


def records_from_plates(hmac_key: bytes, rows: Iterable[PlateRow]) -> Iterator[dict[str, Any]]:
    """(plate, make, model, genre, body) -> upsert records keyed by HMAC(normalised plate)."""
    for plate, make, model, genre, body in rows:
        yield {"op": "upsert", "plate_key": plate_key(hmac_key, plate).hex(), "make": make, "model": model,
               "genre": genre, "body": body}


@contextlib.contextmanager
def _db_errors(what: str, db_path: Path) -> Iterator[None]:
    """The one place where sqlite3's exceptions become RegistryError."""
    try:
        yield
    except sqlite3.Error as exc:
        raise RegistryError(f"{what} failed on {db_path}: {exc}; fix: check the path, the free disk space "
                            "and that no other process holds a write lock") from exc


def _connect(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(db_path), timeout=30, isolation_level=None, check_same_thread=False)
    db = sqlite_utils.Database(conn, execute_plugins=False)
    for name, (cols, pk, not_null) in _TABLES.items():
        if not db.table(name).exists():  # sqlite-utils has no WITHOUT ROWID option: append it
            sql = db.create_table_sql(name, cols, pk=pk, not_null=not_null, if_not_exists=True)
            conn.execute(sql.strip().rstrip(";") + " WITHOUT ROWID")
    db.enable_wal()
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _read_state(conn: sqlite3.Connection) -> RegistryState | None:
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if "seq" not in meta:
        return None
    created = meta.get("created_at")
    return RegistryState(dataset_id=meta["dataset_id"], seq=int(meta["seq"]), key_id=meta["key_id"],
                         kind=meta["kind"], imported_at=_parse_time(meta["imported_at"]),
                         count=int(meta["count"]), created_at=_parse_time(created) if created else None)


def _write_state(conn: sqlite3.Connection, state: RegistryState) -> None:
    values = state.to_dict()
    conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                     [(k, None if values[k] is None else str(values[k])) for k in _STATE_KEYS])


def _check_against_cache(header: _Header, current: RegistryState | None, expected_key_id: str | None,
                         file: Path) -> None:
    if expected_key_id is not None and header.key_id != expected_key_id:
        raise RegistryError(f"{file}: hashed with key {header.key_id}, this box's key is {expected_key_id}; "
                            "plates would never match — fix: request a file built with this box's key")
    if header.kind == "snapshot":
        if current is not None and header.seq < current.seq:
            log.warning("snapshot %s seq %s replaces a newer cache (seq %s)", file, header.seq, current.seq)
        return
    if current is None:
        raise RegistryError(f"{file}: gap: cache is empty, delta expects base {header.base_seq}; "
                            "request a snapshot")
    if header.dataset_id != current.dataset_id or header.key_id != current.key_id:
        raise RegistryError(f"{file}: delta is for dataset {header.dataset_id} (key {header.key_id}), the "
                            f"cache holds {current.dataset_id} (key {current.key_id}); request a snapshot")
    if header.base_seq != current.seq:
        raise RegistryError(f"{file}: gap: cache at seq {current.seq}, delta expects base {header.base_seq}; "
                            "request a snapshot")


def _lines(file: Path) -> Iterator[tuple[int, bytes]]:
    """Numbered lines of a gzip file, read in 1 MiB chunks (gzip's readline is slow in Python).

    gzip damage becomes RegistryFileError; a last line without a newline is still a line.
    """
    lineno, rest = 0, b""
    try:
        with gzip.open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    lineno += 1
                    yield lineno, line
    except (OSError, EOFError, zlib.error) as exc:
        raise RegistryFileError(f"{file}: unreadable after line {lineno}: {exc}; "
                                "fix: copy the file again (it is damaged or not gzip)") from exc
    if rest:
        yield lineno + 1, rest


_JSON = json.JSONDecoder()


def _decode(file: Path, lineno: int, line: bytes) -> object:
    try:
        return _JSON.decode(line.decode("utf-8"))
    except ValueError as exc:
        raise RegistryFileError(f"{file}:{lineno}: not a JSON line ({exc.__class__.__name__}); "
                                "fix: copy the file again or rebuild it") from exc


_SQL = {"upsert": "INSERT OR REPLACE INTO vehicles VALUES (?, ?, ?, ?, ?)",
        "snapshot": "INSERT INTO vehicles VALUES (?, ?, ?, ?, ?)",
        "delete": "DELETE FROM vehicles WHERE plate_key = ?"}


def _flush(conn: sqlite3.Connection, op: str, batch: list[Row], first_line: int, file: Path) -> None:
    """executemany one batch (lines first_line.. of the file) under a savepoint, then empty it."""
    if not batch:
        return
    params: list[Any] = [(r[0],) for r in batch] if op == "delete" else batch
    conn.execute("SAVEPOINT batch")
    try:
        conn.executemany(_SQL[op], params)
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK TO batch")
        for lineno, row in enumerate(batch, start=first_line):  # find the duplicate's line
            try:
                conn.execute(_SQL[op], row)
            except sqlite3.IntegrityError as exc:
                raise RegistryFileError(f"{file}:{lineno}: plate_key appears twice in the snapshot; "
                                        "fix: rebuild the file without duplicates") from exc
    conn.execute("RELEASE batch")
    batch.clear()


def _apply(conn: sqlite3.Connection, file: Path, header: _Header,
           progress: Callable[[int, int], None] | None) -> None:
    """Stream the records into the open transaction, in batches of executemany."""
    batch: list[Row] = []
    batch_op = "snapshot" if header.kind == "snapshot" else "upsert"
    done = first_line = 0
    for lineno, line in _lines(file):
        if lineno == 1:
            continue
        op, row = _parse_record(_decode(file, lineno, line), file, lineno)
        if op != batch_op and (header.kind == "delta" or op == "delete"):
            if header.kind == "snapshot":
                raise RegistryFileError(f"{file}:{lineno}: a snapshot holds upserts only; "
                                        "fix: rebuild the file")
            _flush(conn, batch_op, batch, first_line, file)
            batch_op = op
        if not batch:
            first_line = lineno
        batch.append(row)
        done += 1
        if len(batch) >= _BATCH:
            _flush(conn, batch_op, batch, first_line, file)
            if progress is not None:
                progress(done, header.count)
    _flush(conn, batch_op, batch, first_line, file)
    if done != header.count:
        raise RegistryFileError(f"{file}: header count is {header.count} but the file holds {done} records; "
                                "fix: copy the file again (truncated?) or rebuild it")
    if progress is not None:
        progress(done, header.count)


def _read_header(file: Path) -> _Header:
    if not file.is_file():
        raise RegistryFileError(f"{file}: no such file; fix: check the path of the subset file")
    for lineno, line in _lines(file):
        return _parse_header(_decode(file, lineno, line), f"{file}:1")
    raise RegistryFileError(f"{file}: empty file; fix: copy the file again or rebuild it")


def import_subset(db_path: Path, file: Path, *, expected_key_id: str | None,
                  progress: Callable[[int, int], None] | None = None) -> RegistryState:
    """Apply a snapshot (replaces everything) or a delta (must follow the cache's seq) in one transaction."""
    file, db_path = Path(file), Path(db_path)
    header = _read_header(file)
    with _db_errors("registry import", db_path):
        conn = _connect(db_path)
        try:
            conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: random-order B-tree inserts
            conn.execute("BEGIN IMMEDIATE")
            try:
                _check_against_cache(header, _read_state(conn), expected_key_id, file)
                if header.kind == "snapshot":
                    conn.execute("DELETE FROM vehicles")
                _apply(conn, file, header, progress)
                (count,) = conn.execute("SELECT count(*) FROM vehicles").fetchone()
                state = RegistryState(header.dataset_id, header.seq, header.key_id, header.kind,
                                      datetime.now(timezone.utc), count, header.created_at)
                _write_state(conn, state)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
    log.info("registry import: %s %s seq %s, %s vehicles in cache", header.kind, header.dataset_id,
             header.seq, state.count)
    return state


def read_state(db_path: Path) -> RegistryState | None:
    """The state of an existing cache without creating anything (None if never imported)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise RegistryError(f"{db_path}: no registry cache here; fix: check [registry] db or --db, "
                            "or import a snapshot with `iaflash-provision registry import FILE`")
    with _db_errors("reading the registry state", db_path):
        conn = sqlite3.connect(str(db_path), timeout=30)
        try:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
                return None
            return _read_state(conn)
        finally:
            conn.close()


class Registry:
    """Read side of the cache: one raw sqlite3 connection, used by one thread at a time."""

    def __init__(self, db_path: Path, hmac_key: bytes) -> None:
        self._path = Path(db_path)
        self._hmac_key = hmac_key
        self.key_id = compute_key_id(hmac_key)
        with _db_errors("opening the registry", self._path):
            self._conn = _connect(self._path)
        self._data_version: int | None = None
        self._state: RegistryState | None = None

    def _current(self) -> RegistryState | None:
        # data_version changes when another connection (an import) commits: re-read state only then.
        with _db_errors("reading the registry state", self._path):
            (version,) = self._conn.execute("PRAGMA data_version").fetchone()
            if version != self._data_version:
                self._state = _read_state(self._conn)
                self._data_version = version
                if self._state is not None and self._state.key_id != self.key_id:
                    log.error("registry cache %s was hashed with key %s but this box's key is %s: no plate "
                              "will match; import a snapshot built with this box's key",
                              self._path, self._state.key_id, self.key_id)
        return self._state

    def lookup(self, plate: str) -> RegistryRecord | None:
        """The record for a plate, or None. PlateError on a bad plate.

        A cache hashed with another key matches nothing: that is logged once (see ``key_id``).
        """
        key = plate_key(self._hmac_key, plate)
        self._current()
        with _db_errors("registry lookup", self._path):
            row = self._conn.execute("SELECT make, model, genre, body FROM vehicles WHERE plate_key = ?",
                                     (key,)).fetchone()
        return None if row is None else RegistryRecord(*row)

    def state(self) -> RegistryState | None:
        return self._current()

    def age_hours(self, now: datetime | None = None) -> float | None:
        """Hours since the data was created at central (see RegistryState.age_hours); None if empty."""
        state = self._current()
        return None if state is None else state.age_hours(now)

    def is_stale(self, max_age_hours: float, now: datetime | None = None) -> bool:
        age = self.age_hours(now)
        return age is None or age > max_age_hours

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
