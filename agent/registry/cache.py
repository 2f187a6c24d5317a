"""The SIV subset cache in SQLite: import of subset files, provenance state, lookups.

* Subset files (format, reading, writing) live in :mod:`iaflash.agent.registry.subset_file`; their public names are
  re-exported here. Plates appear only as HMAC-SHA256 keys (see :mod:`iaflash.agent.registry.plates`).
* :func:`import_signed_subset` checks a file's detached Ed25519 signature (:mod:`iaflash.engines.signing`)
  and imports exactly the bytes it checked; :func:`import_subset` imports without a check.
* An import is one SQLite transaction: on any error (bad line, gap, key mismatch, crash, SIGKILL)
  the cache stays exactly as it was. sqlite-utils owns the schema; rows go in with raw
  ``executemany`` because sqlite-utils' write methods commit on their own (3.x uses ``with conn:``),
  which would break the single transaction, and are slower (see benchmarks/registry_bench.py).
* :class:`Registry` is the per-capture read path: raw sqlite3 primary-key SELECTs.
* sqlite3 errors are mapped to :class:`RegistryError` here, in :func:`_db_errors`.
* Integrity: :func:`check_integrity` runs SQLite's ``quick_check``. :class:`Registry` runs it at
  start and after any read error; a corrupt, unreadable or missing cache makes the registry
  *unavailable* (:class:`RegistryUnavailable`, verdicts ``inconclusive``/``registry_unavailable``)
  instead of crashing the agent, and it is reopened by itself (every ``REOPEN_EVERY_S``) once a
  snapshot was re-imported, or the fault was fixed. ``registry status`` and ``doctor`` report the same check.
* Each failure is told by its cause (:func:`iaflash.agent.sqlite.store_fault`): a full file system,
  a read-only one and a permission error each name the folder and their own fix, and say the
  cache is intact; only real corruption (SQLITE_CORRUPT, SQLITE_NOTADB, a failed ``quick_check``)
  advises moving the file aside and re-importing a snapshot (:func:`fix_corrupt`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import sqlite_utils

from iaflash.agent.errors import (
    AlreadyApplied,
    RegistryError,
    RegistryFileError,
    RegistryUnavailable,
    RollbackRefused,
    SignatureError,
    UnreadableFile,
)
from iaflash.agent.registry.plates import key_id as compute_key_id
from iaflash.agent.registry.plates import plate_key
from iaflash.agent.registry.record import RegistryRecord, RegistryState
from iaflash.agent.registry.subset_file import (
    FORMAT,
    VERSION,
    Applied,
    PlateRow,
    Row,
    SubsetHeader,
    SubsetReader,
    check_not_rolled_back,
    parse_time,
    records_from_plates,
    unreadable,
    write_subset,
)
from iaflash.agent.sqlite import StoreFault, store_fault
from iaflash.engines.signing import TrustedFile, TrustState, file_exists, open_trusted_file, signature_path

__all__ = [
    "FORMAT",
    "VERSION",
    "PlateRow",
    "Registry",
    "RegistryRecord",
    "RegistryState",
    "check_integrity",
    "fix_corrupt",
    "import_signed_subset",
    "import_subset",
    "read_state",
    "records_from_plates",
    "write_subset",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
_BATCH = 50_000  # rows per executemany, sorted by key: the B-tree is then walked in order (-40% time)
_PROGRESS_EVERY = 10_000
_STATE_KEYS = ("dataset_id", "seq", "key_id", "kind", "imported_at", "count", "created_at")
_TABLES: dict[str, tuple[dict[str, Any], str, set[str]]] = {  # name: (columns, primary key, not null)
    "vehicles": (
        {"plate_key": bytes, "make": str, "model": str, "genre": str, "body": str},
        "plate_key",
        {"make", "model"},
    ),
    "meta": ({"key": str, "value": str}, "key", set()),
}
_SQL = {
    "snapshot": "INSERT INTO vehicles VALUES (?, ?, ?, ?, ?)",
    "upsert": "INSERT OR REPLACE INTO vehicles VALUES (?, ?, ?, ?, ?)",
    "delete": "DELETE FROM vehicles WHERE plate_key = ?",
}
_BY_KEY = itemgetter(0)
REOPEN_EVERY_S = 30.0  # an unavailable registry is re-checked this often (a re-imported snapshot is picked up)


def fix_corrupt(db_path: Path) -> str:
    """The fix for a corrupt cache: it is a copy of central's data, so move it aside and re-import a snapshot."""
    return (
        f"move {db_path} aside (keep it for analysis: mv {db_path} {db_path}.corrupt) and re-import a snapshot "
        "with `iaflash-provision registry import SNAPSHOT.jsonl.gz`; the running agent picks it up by itself"
    )


_HEALS = "no re-import is needed: the running agent reads the registry again by itself once this is fixed"
_NOT_IMPORTED = "nothing was imported (the cache is as it was): run the import again once this is fixed"


def _fault(exc: BaseException, db_path: Path, *, reading: bool) -> StoreFault:
    """What ``exc`` on the cache means: its problem and the fix for a registry (re-import only when corrupt)."""
    fault = store_fault(exc, db_path)
    if fault.kind == "corrupt":
        return StoreFault("corrupt", f"{db_path}: corrupt ({exc})", fix_corrupt(db_path))
    problem = fault.problem if fault.problem.startswith(f"{db_path}") else f"{db_path}: {fault.problem}"
    return StoreFault(fault.kind, problem, f"{fault.fix}; {_HEALS if reading else _NOT_IMPORTED}")


def _check(db_path: Path) -> StoreFault | None:
    """None when ``db_path`` passes SQLite's ``quick_check``; else the fault, with its fix (see check_integrity)."""
    if not db_path.is_file():
        return StoreFault(
            "missing",
            f"{db_path}: no registry cache here",
            "import a snapshot with `iaflash-provision registry import SNAPSHOT.jsonl.gz` (or check [registry] db); "
            "the running agent picks it up by itself",
        )
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return _fault(exc, db_path, reading=True)
    if rows != ["ok"]:
        found = "; ".join(str(r) for r in rows)[:300]
        return StoreFault("corrupt", f"{db_path}: corrupt (quick_check: {found})", fix_corrupt(db_path))
    return None


def check_integrity(db_path: Path) -> str | None:
    """None when ``db_path`` passes SQLite's ``quick_check``; else what is wrong (the file is not changed).

    A missing file is a problem too (the agent never recreates it silently). The problem names its
    cause: "corrupt" only for real damage; a full or read-only file system or a permission error says so.
    """
    fault = _check(Path(db_path))
    return None if fault is None else fault.problem


@contextlib.contextmanager
def _db_errors(what: str, db_path: Path, *, importing: bool = False) -> Iterator[None]:
    """sqlite3's exceptions (and OSErrors) on the cache become RegistryError, with the fix for their cause."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        fault = _fault(exc, db_path, reading=not importing)
        raise RegistryError(f"{what} failed on {fault.problem}; fix: {fault.fix}") from exc  # problem: "<db>: ..."


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
    return RegistryState(
        dataset_id=meta["dataset_id"],
        seq=int(meta["seq"]),
        key_id=meta["key_id"],
        kind=meta["kind"],
        imported_at=parse_time(meta["imported_at"]),
        count=int(meta["count"]),
        created_at=parse_time(created) if created else None,
    )


def _write_state(conn: sqlite3.Connection, state: RegistryState) -> None:
    values = state.to_dict()
    conn.executemany(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
        [(k, None if values[k] is None else str(values[k])) for k in _STATE_KEYS],
    )


def _check_against_cache(
    header: SubsetHeader,
    current: RegistryState | None,
    expected_key_id: str | None,
    file: Path,
    mark: Applied | None = None,
) -> None:
    if expected_key_id is not None and header.key_id != expected_key_id:
        raise RegistryError(
            f"{file}: hashed with key {header.key_id}, this box's key is {expected_key_id}; "
            "plates would never match — fix: request a file built with this box's key"
        )
    cached = None if current is None else Applied(current.dataset_id, current.seq)
    check_not_rolled_back(header, Applied.newest(cached, mark), file)  # RollbackRefused: older than applied
    if header.kind == "snapshot":
        return
    if current is None:
        raise RegistryError(f"{file}: gap: cache is empty, delta expects base {header.base_seq}; request a snapshot")
    if header.dataset_id != current.dataset_id or header.key_id != current.key_id:
        raise RegistryError(
            f"{file}: delta is for dataset {header.dataset_id} (key {header.key_id}), the "
            f"cache holds {current.dataset_id} (key {current.key_id}); request a snapshot"
        )
    if header.seq == current.seq:  # this very delta was applied already: nothing to do, and no gap
        raise AlreadyApplied(
            f"{file}: already at seq {current.seq}: this delta (seq {header.seq}) was applied before; "
            "nothing to import (fix: none needed; import the next delta, base_seq "
            f"{current.seq}, when central sends it)"
        )
    if header.base_seq != current.seq:
        raise RegistryError(
            f"{file}: gap: cache at seq {current.seq}, delta expects base {header.base_seq}; request a snapshot"
        )


def _flush(conn: sqlite3.Connection, how: str, rows: list[Row], first_line: int, file: Path) -> None:
    """executemany one batch (lines first_line.. of the file; ``how`` keys _SQL) under a savepoint.

    The rows go in key order, so the inserts walk the B-tree in order; the sort is stable, so it
    keeps the file's order between records of one plate and a delta's later line still wins.
    """
    if not rows:
        return
    sql, ordered = _SQL[how], sorted(rows, key=_BY_KEY)
    conn.execute("SAVEPOINT batch")
    try:
        conn.executemany(sql, [(r[0],) for r in ordered] if how == "delete" else ordered)
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK TO batch")
        for lineno, row in enumerate(rows, start=first_line):  # in file order: find the duplicate's line
            try:
                conn.execute(sql, row)
            except sqlite3.IntegrityError as exc:
                raise RegistryFileError(
                    f"{file}:{lineno}: plate_key appears twice in the snapshot; "
                    "fix: rebuild the file without duplicates"
                ) from exc
    conn.execute("RELEASE batch")


def _apply(conn: sqlite3.Connection, reader: SubsetReader, progress: Progress | None) -> None:
    """Stream the records into the open transaction: batches of one op, in file order."""
    snapshot, total = reader.header.kind == "snapshot", reader.header.count
    op, first = "", 0
    pending: list[Row] = []
    done = reported = 0
    for segment in reader.segments():
        if segment.op != op or len(pending) >= _BATCH:  # lines first.. are consecutive within a batch
            _flush(conn, "snapshot" if snapshot else op, pending, first, reader.file)
            op, first, pending = segment.op, segment.first_line, []
        pending.extend(segment.rows)
        done += len(segment.rows)
        if progress is not None and done - reported >= _PROGRESS_EVERY:
            progress(done, total)
            reported = done
    _flush(conn, "snapshot" if snapshot else op, pending, first, reader.file)
    if progress is not None:
        progress(done, total)


def _import(
    conn: sqlite3.Connection,
    reader: SubsetReader,
    expected_key_id: str | None,
    progress: Progress | None,
    mark: Applied | None = None,
) -> RegistryState:
    """Check the header against the cache (and ``mark``), replace or patch it, write meta; the caller commits."""
    header = reader.header
    _check_against_cache(header, _read_state(conn), expected_key_id, reader.file, mark)
    if header.kind == "snapshot":
        conn.execute("DELETE FROM vehicles")
    _apply(conn, reader, progress)
    (count,) = conn.execute("SELECT count(*) FROM vehicles").fetchone()
    state = RegistryState(
        header.dataset_id, header.seq, header.key_id, header.kind, datetime.now(timezone.utc), count, header.created_at
    )
    _write_state(conn, state)
    return state


def import_subset(
    db_path: Path,
    file: Path,
    *,
    expected_key_id: str | None,
    progress: Progress | None = None,
    data: bytes | IO[bytes] | None = None,
    before_commit: Callable[[], None] | None = None,
    mark: Applied | None = None,
) -> RegistryState:
    """Apply a snapshot (replaces everything) or a delta (must follow the cache's seq) in one transaction.

    No signature is checked here: see :func:`import_signed_subset`. ``data`` is the file's content
    already read, or a binary stream of it: it is parsed instead of ``file``, which then only names
    it in messages. ``before_commit`` runs after the last record, inside the transaction: if it
    raises, nothing is imported. ``progress(done, total)`` is called every 10,000 records and at the end.
    A file older than the cache's state or ``mark`` (the box's high-water mark, kept outside the
    cache) is refused with :class:`RollbackRefused` and nothing is imported.
    """
    file, db_path = Path(file), Path(db_path)
    with SubsetReader(file, data) as reader, _db_errors("registry import", db_path, importing=True):
        conn = _connect(db_path)
        try:
            conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: B-tree inserts
            conn.execute("BEGIN IMMEDIATE")
            try:
                state = _import(conn, reader, expected_key_id, progress, mark)
                if before_commit is not None:
                    before_commit()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
    log.info(
        "registry import: %s %s seq %s, %s vehicles in cache", state.kind, state.dataset_id, state.seq, state.count
    )
    return state


def _open_signed(
    file: Path, trust_dir: Path | None, allow_unsigned: bool, state_file: Path | None = None
) -> TrustedFile:
    """iaflash.engines.signing.open_trusted_file, with messages that name the subset file and the fix.

    A file or ``.sig`` this user cannot read (permission, I/O error) is RegistryFileError with the fix for
    that cause, counted ``unreadable_registry`` in the trust state like the other refusals of a registry file.
    """
    try:
        return _open_checked(file, trust_dir, allow_unsigned, state_file)
    except UnreadableFile as exc:
        if exc.path not in (file, signature_path(file)):
            raise  # a key of the trust store: its own message names it
        if state_file is not None:
            TrustState(state_file).count("unreadable_registry")
        raise unreadable(exc.path, exc.error) from exc


def _open_checked(file: Path, trust_dir: Path | None, allow_unsigned: bool, state_file: Path | None) -> TrustedFile:
    try:
        present = file.is_file()
    except OSError as exc:  # Python < 3.14: a folder above it this user may not enter
        raise UnreadableFile("subset file", file, exc) from exc
    if not present:
        raise RegistryFileError(f"{file}: no such file; fix: check the path of the subset file")
    sig = signature_path(file)
    if not allow_unsigned and not file_exists(sig, "signature"):  # the clearer message; open_trusted_file's too
        raise SignatureError(
            f"{file}: not signed ({sig} is missing); fix: sign it at central with "
            f"`iaflash-engines sign {file} --key PUBLISHER.key` and copy both files "
            "(security.allow_unsigned = true accepts unsigned files, for development only)"
        )
    try:
        return open_trusted_file(file, trust_dir, allow_unsigned, role="registry", state_file=state_file)
    except UnreadableFile:
        raise  # named and fixed by _open_signed
    except SignatureError as exc:
        if str(file) in str(exc):
            raise
        raise type(exc)(f"{file}: {exc}") from exc


def import_signed_subset(
    db_path: Path,
    file: Path,
    *,
    trust_dir: Path | None,
    allow_unsigned: bool,
    expected_key_id: str | None,
    progress: Progress | None = None,
    state_file: Path | None = None,
) -> tuple[RegistryState, str | None]:
    """Check ``file``'s detached signature (``<file>.sig``) by a ``registry`` key of ``trust_dir``, then import it.

    Memory stays bounded whatever the file size (docs/SIGNING.md, format 2): a first streamed pass
    over the open file checks the signature, a second pass over the same open file parses it while
    hashing it, and the import commits only if that second pass hashes to the checked digest, so
    the file cannot be swapped or rewritten between the check and the import. A small file signed
    in format 1 is checked and parsed from memory; a large one is refused with the fix. Returns the new state and the
    trust store's name of the signing key, or None when the file was accepted unsigned because of
    ``allow_unsigned`` (for development only; iaflash.engines.signing logs a warning).

    Raises :class:`SignatureError` (unsigned, altered after signing, malformed ``.sig``, no trust
    store), :class:`UntrustedKey` (signed by a key outside ``trust_dir``, or revoked, expired or
    of another role), :class:`RollbackRefused` (older than what the box applied), and whatever
    :func:`import_subset` raises. A refusal leaves the cache as it was.

    ``state_file``: the box's trust state (docs/SIGNING.md): its revocation list is enforced, its
    registry mark (dataset, seq: it survives a cache moved aside) is a floor, it is raised after
    the import, and refusals are counted there.
    """
    file = Path(file)
    state = None if state_file is None else TrustState(state_file)
    with _open_signed(file, trust_dir, allow_unsigned, state_file) as trusted:
        verified = trusted.verified
        if verified is not None:
            log.info(
                "registry file %s: signed by %s (key id %s) at %s",
                file,
                verified.name,
                verified.key_id,
                verified.signed_at,
            )
        try:
            imported = import_subset(
                db_path,
                file,
                expected_key_id=expected_key_id,
                progress=progress,
                data=trusted.stream,
                before_commit=trusted.confirm,
                mark=_registry_mark(state),
            )
        except RollbackRefused:
            if state is not None:
                state.count("rollback_registry")
            raise
    if state is not None:
        try:
            state.set_mark(REGISTRY_MARK, {"dataset_id": imported.dataset_id, "seq": imported.seq})
        except (OSError, SignatureError) as exc:  # imported all the same; the cache's own seq still refuses older files
            log.error("registry import: the trust state %s was not updated (%s); fix: check the disk", state_file, exc)
    return imported, None if verified is None else verified.name


REGISTRY_MARK = "registry"  # the trust state's name for the registry's high-water mark


def _registry_mark(state: TrustState | None) -> Applied | None:
    value = None if state is None else state.mark(REGISTRY_MARK)
    if value is None or not isinstance(value.get("seq"), int) or not isinstance(value.get("dataset_id"), str):
        return None
    return Applied(value["dataset_id"], value["seq"])


def read_state(db_path: Path) -> RegistryState | None:
    """The state of an existing cache without creating anything (None if never imported).

    The file passes SQLite's ``quick_check`` first: a cache it cannot read raises RegistryUnavailable
    with the fix for the cause (re-import a snapshot only when it is corrupt; free space, remount or
    fix permissions otherwise), never "all is well" on a file the agent cannot read.
    """
    db_path = Path(db_path)
    if not db_path.is_file():
        raise RegistryError(
            f"{db_path}: no registry cache here; fix: check [registry] db or --db, "
            "or import a snapshot with `iaflash-provision registry import FILE`"
        )
    fault = _check(db_path)
    if fault is not None:
        raise RegistryUnavailable(f"{fault.problem}; fix: {fault.fix}")
    with _db_errors("reading the registry state", db_path):
        conn = sqlite3.connect(str(db_path), timeout=30)
        try:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
                return None
            return _read_state(conn)
        finally:
            conn.close()


class Registry:
    """Read side of the cache: one raw sqlite3 connection, used by one thread at a time.

    Never crashes the caller on a bad file: a cache that fails ``quick_check`` at start, or any
    read error later, makes it *unavailable* (``problem`` says why); lookups then raise
    :class:`RegistryUnavailable` at once, and the file is re-checked every ``REOPEN_EVERY_S``.
    ``create=True`` (the default) creates an empty cache at the first open where none exists
    (``health()`` then says ``empty``: loud and persistent in the heartbeat); a file that goes
    missing later is never recreated behind the operator's back: it is ``unavailable`` until a
    snapshot is imported. ``reopen_every_s`` may be changed on a live instance.
    """

    def __init__(self, db_path: Path, hmac_key: bytes, *, create: bool = True) -> None:
        self._path = Path(db_path)
        self._hmac_key = hmac_key
        self._create = create
        self.key_id = compute_key_id(hmac_key)
        self._conn: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._state: RegistryState | None = None
        self.problem: str | None = None
        self._fault: StoreFault | None = None  # the problem's cause and fix
        self.unavailable_since: float | None = None
        self._checked_at = 0.0  # monotonic time of the last integrity check
        self.reopen_every_s = REOPEN_EVERY_S
        if self._create and not self._path.exists():  # only at the first open: never recreated behind a fix
            with contextlib.suppress(sqlite3.Error, OSError):
                _connect(self._path).close()
        self._open()

    def _open(self) -> bool:
        """(Re)open the file after a quick_check; on failure record the problem, log it once, return False."""
        fault = _check(self._path)
        if fault is None:
            try:
                conn = _connect(self._path)
            except sqlite3.Error as exc:
                fault = _fault(exc, self._path, reading=True)
            else:
                if self._conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.close()
                self._conn, self._data_version, self._state = conn, None, None
        if fault is not None:
            self._set_unavailable(fault)
            return False
        if self.problem is not None:
            log.warning("registry cache %s is available again (was: %s)", self._path, self.problem)
        self.problem, self._fault, self.unavailable_since = None, None, None
        return True

    def _set_unavailable(self, fault: StoreFault) -> None:
        if fault.problem != self.problem:
            log.error(
                "registry unavailable: %s; verdicts are inconclusive (registry_unavailable) until it is fixed. Fix: %s",
                fault.problem,
                fault.fix,
            )
        if self.unavailable_since is None:
            self.unavailable_since = time.time()
        self.problem, self._fault = fault.problem, fault
        self._checked_at = time.monotonic()

    @property
    def fix(self) -> str | None:
        """How to fix the problem that makes the registry unavailable (None when it is available)."""
        return None if self._fault is None else self._fault.fix

    @property
    def cause(self) -> str | None:
        """The kind of that problem (``corrupt``, ``disk_full``, ``read_only``, ``permission``, ...), or None."""
        return None if self._fault is None else self._fault.kind

    def _usable(self) -> sqlite3.Connection:
        """The open connection, or RegistryUnavailable (re-checking the file when it is time)."""
        if self.problem is not None and time.monotonic() - self._checked_at >= self.reopen_every_s:
            self._open()
        if self.problem is not None:
            raise RegistryUnavailable(f"registry unavailable: {self.problem}; fix: {self.fix}")
        if self._conn is None:
            raise RegistryUnavailable(f"registry unavailable: {self._path} was closed; fix: open a new Registry")
        return self._conn

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        """A read on the connection; a sqlite3 error re-checks the file and becomes RegistryUnavailable."""
        conn = self._usable()
        try:
            yield conn
        except sqlite3.Error as exc:
            fault = _check(self._path) or _fault(exc, self._path, reading=True)
            self._set_unavailable(fault)
            raise RegistryUnavailable(
                f"registry unavailable: {what} failed: {fault.problem}; fix: {fault.fix}"
            ) from exc

    def health(self) -> dict[str, Any]:
        """For the heartbeat and doctor: state ok / empty / unavailable, with the problem, its cause and the fix."""
        if self.problem is not None:
            return {
                "state": "unavailable",
                "problem": self.problem,
                "cause": self.cause,
                "fix": self.fix,
                "since": self.unavailable_since,
            }
        try:
            state = self.state()
        except RegistryError as exc:
            return {"state": "unavailable", "problem": str(exc), "cause": self.cause, "fix": self.fix}
        if state is None or state.count == 0:
            return {
                "state": "empty",
                "problem": f"{self._path}: no vehicles: every plate is unknown_plate",
                "fix": "import a snapshot with `iaflash-provision registry import SNAPSHOT.jsonl.gz`",
            }
        if state.key_id != self.key_id:
            return {
                "state": "key_mismatch",
                "problem": f"hashed with key {state.key_id}, this box's key is {self.key_id}: no plate matches",
                "fix": "import a snapshot built with this box's key",
            }
        return {"state": "ok", "vehicles": state.count, "seq": state.seq}

    def _current(self) -> RegistryState | None:
        # data_version changes when another connection (an import) commits: re-read state only then.
        with self._reading("reading the registry state") as conn:
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            if version != self._data_version:
                self._state = _read_state(conn)
                self._data_version = version
                if self._state is not None and self._state.key_id != self.key_id:
                    log.error(
                        "registry cache %s was hashed with key %s but this box's key is %s: no plate "
                        "will match; import a snapshot built with this box's key",
                        self._path,
                        self._state.key_id,
                        self.key_id,
                    )
        return self._state

    def lookup(self, plate: str) -> RegistryRecord | None:
        """The record for a plate, or None. PlateError on a bad plate.

        A cache hashed with another key matches nothing: that is logged once (see ``key_id``).
        """
        return self.lookup_key(plate_key(self._hmac_key, plate))

    def lookup_key(self, key: bytes) -> RegistryRecord | None:
        """The record for an HMAC plate key already computed by the caller (see ``plates.plate_key``)."""
        self._current()
        with self._reading("registry lookup") as conn:
            row = conn.execute("SELECT make, model, genre, body FROM vehicles WHERE plate_key = ?", (key,)).fetchone()
        return None if row is None else RegistryRecord(*row)

    def state(self) -> RegistryState | None:
        return self._current()

    def age_hours(self, now: datetime | None = None) -> float | None:
        """Hours since the data was created at central (see RegistryState.age_hours); None if empty."""
        state = self._current()
        return None if state is None else state.age_hours(now)

    def is_stale(self, max_age_hours: float, now: datetime | None = None) -> bool:
        """True when too old, empty or unavailable (an unreadable cache is never trusted as fresh)."""
        try:
            age = self.age_hours(now)
        except RegistryUnavailable:
            return True
        return age is None or age > max_age_hours

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
