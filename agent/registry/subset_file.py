"""Registry subset files: gzip'd JSON Lines, one header line then one record per line.

* :func:`write_subset` writes a file (central side, tests, benchmarks); :func:`records_from_plates`
  turns clear plates into HMAC-keyed upsert records.
* :class:`SubsetReader` reads one, from a path or from bytes already read (and signature-checked):
  the header, then the records in :class:`Segment` runs ready for ``executemany``.
* The format is in docs/REGISTRY.md. Every refusal is a :class:`RegistryFileError` naming the file,
  the line where there is one, and the fix.
* Rollback protection (:func:`check_not_rolled_back`): a file older than what the box applied
  (``seq`` below the applied seq, or another dataset at the same seq) is refused with
  :class:`RollbackRefused`; the cache calls it inside the import's transaction.

Records are parsed with orjson and accepted by a few type checks (:func:`_row_of`; a million of them
per import). A line that fails them is parsed again with :mod:`json` and checked field by field,
only to say exactly what is wrong with it.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import logging
import tempfile
import zlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path
from typing import IO, Any, NamedTuple, NoReturn, TypeAlias

import orjson

from iaflash.agent.errors import RegistryFileError, RollbackRefused
from iaflash.agent.registry.plates import plate_key
from iaflash.engines.atomic import open_atomic
from iaflash.engines.errors import unreadable_fix

__all__ = [
    "FORMAT",
    "VERSION",
    "Applied",
    "PlateRow",
    "Row",
    "Segment",
    "SubsetHeader",
    "SubsetReader",
    "check_not_rolled_back",
    "parse_header",
    "parse_time",
    "records_from_plates",
    "unreadable",
    "write_subset",
]

log = logging.getLogger(__name__)

FORMAT = "iaflash-siv-subset"
VERSION = 1
_CHUNK = 1 << 20  # decompressed bytes per read: gzip's readline is slow in Python
_HEADER_KEYS = frozenset(
    {"format", "version", "kind", "dataset_id", "seq", "base_seq", "key_id", "count", "created_at"}
)
_RECORD_KEYS = frozenset({"op", "plate_key", "make", "model", "genre", "body"})
_HEX = frozenset("0123456789abcdef")
_REBUILD = "fix: rebuild the file with `iaflash-central registry build`"
Row: TypeAlias = "tuple[bytes, str, str, str | None, str | None]"
PlateRow: TypeAlias = "tuple[str, str, str, str | None, str | None]"


@dataclass(frozen=True)
class SubsetHeader:
    """Line 1 of a subset file, validated."""

    kind: str
    dataset_id: str
    seq: int
    base_seq: int | None
    key_id: str
    count: int
    created_at: datetime


class Segment(NamedTuple):
    """A run of consecutive records with the same op: lines ``first_line`` .. of the file."""

    op: str
    first_line: int
    rows: list[Row]


def parse_time(value: str) -> datetime:
    """An ISO 8601 time with a UTC offset (``Z`` accepted, also on Python 3.10), in UTC."""
    parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    if parsed.tzinfo is None:
        raise ValueError("no UTC offset")
    return parsed.astimezone(timezone.utc)


@dataclass(frozen=True)
class Applied:
    """The newest registry content a box applied: its dataset and seq (the cache's, or the trust state's mark)."""

    dataset_id: str
    seq: int

    @classmethod
    def newest(cls, *marks: Applied | None) -> Applied | None:
        found = [m for m in marks if m is not None]
        return max(found, key=lambda m: m.seq) if found else None


def check_not_rolled_back(header: SubsetHeader, applied: Applied | None, file: Path) -> None:
    """Refuse a file older than ``applied``: seq never goes back on a box, across datasets (docs/REGISTRY.md).

    A file of the applied seq and dataset is accepted again (a re-import); another dataset must
    come with a higher seq. Raises :class:`RollbackRefused` with the fix; reads nothing.
    """
    if applied is None:
        return
    if header.seq < applied.seq:
        raise RollbackRefused(
            f"{file}: {header.kind} seq {header.seq} (dataset {header.dataset_id}) is older than the applied seq "
            f"{applied.seq} (dataset {applied.dataset_id}); registry content never goes back on a box. fix: import "
            f"the newest file from central (a snapshot with seq >= {applied.seq}, or a delta with base_seq "
            f"{applied.seq}); central's seq keeps rising, also across datasets"
        )
    if header.seq == applied.seq and header.dataset_id != applied.dataset_id:
        raise RollbackRefused(
            f"{file}: {header.kind} of dataset {header.dataset_id} has seq {header.seq}, the seq this box applied "
            f"for dataset {applied.dataset_id}; a new dataset needs a higher seq. fix: rebuild it at central with "
            f"--seq {applied.seq + 1} or more"
        )


# ---------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_problems(obj: dict[str, Any]) -> Iterator[str]:
    """Yield the header's problems in order; callers report the first."""
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
    if obj.get("kind") == "delta" and not (_is_int(base) and _is_int(obj.get("seq")) and base < obj["seq"]):
        yield "a delta needs an integer base_seq lower than its seq"
    if obj.get("kind") == "snapshot" and base is not None:
        yield "a snapshot has base_seq null"
    kid = obj.get("key_id")
    if not (isinstance(kid, str) and len(kid) == 16 and set(kid) <= _HEX):
        yield "key_id must be 16 lowercase hex characters"


def parse_header(obj: object, where: str) -> SubsetHeader:
    """Validate a decoded header line; ``where`` names it in errors (``file:1``)."""
    if not isinstance(obj, dict):
        raise RegistryFileError(f"{where}: header is not a JSON object; {_REBUILD}")
    problem = next(_header_problems(obj), None)
    if problem is None:
        try:
            created = parse_time(obj["created_at"])
        except (KeyError, TypeError, ValueError):
            problem = "created_at must be an ISO 8601 time with a UTC offset"
    if problem is not None:
        raise RegistryFileError(f"{where}: bad header: {problem}; {_REBUILD}")
    return SubsetHeader(
        obj["kind"], obj["dataset_id"], obj["seq"], obj.get("base_seq"), obj["key_id"], obj["count"], created
    )


def _record_problems(obj: dict[str, Any]) -> Iterator[str]:
    """Yield the record's problems in order; callers report the first."""
    if not obj.keys() <= _RECORD_KEYS:
        yield f"unknown keys {sorted(obj.keys() - _RECORD_KEYS)}"
    key = obj.get("plate_key")
    if not (isinstance(key, str) and len(key) == 64 and set(key.lower()) <= _HEX):
        yield "plate_key must be 64 hex characters"
    if obj.get("op") not in ("upsert", "delete"):
        yield "op must be 'upsert' or 'delete'"
    if obj.get("op") == "upsert":
        if not all(isinstance(obj.get(f), str) and obj[f] for f in ("make", "model")):
            yield "make and model must be non-empty strings for an upsert"
        if not all(obj.get(f) is None or isinstance(obj[f], str) for f in ("genre", "body")):
            yield "genre and body must be strings or null"


def _row_of(obj: object) -> tuple[str, Row] | None:
    """(op, row) for a well-formed record, with the plate key as bytes; None for anything else.

    The fast path: a few type checks, no message. It accepts exactly what :func:`_record_problems`
    finds nothing wrong with.
    """
    if not ((type(obj) is dict or isinstance(obj, dict)) and obj.keys() <= _RECORD_KEYS):
        return None
    op, hexkey = obj.get("op"), obj.get("plate_key")
    make, model, genre, body = obj.get("make"), obj.get("model"), obj.get("genre"), obj.get("body")
    try:  # fromhex skips whitespace: a 64-character key with spaces gives fewer than 32 bytes
        key = bytes.fromhex(hexkey) if type(hexkey) is str and len(hexkey) == 64 else b""
    except ValueError:
        return None
    if len(key) == 32 and (
        op == "delete"
        or (
            op == "upsert"
            and type(make) is str
            and make
            and type(model) is str
            and model
            and (genre is None or type(genre) is str)
            and (body is None or type(body) is str)
        )
    ):
        return op, (key, make or "", model or "", genre, body)
    return None


def _parse_record(obj: object, file: Path | str, lineno: int) -> tuple[str, Row]:
    """Validate one decoded record; return (op, row) or raise with what is wrong and where."""
    parsed = _row_of(obj)
    if parsed is not None:
        return parsed
    problem = next(_record_problems(obj), "bad record") if isinstance(obj, dict) else "not a JSON object"
    raise RegistryFileError(f"{file}:{lineno}: bad record: {problem}; {_REBUILD}")


_JSON = json.JSONDecoder()


def _decode(file: Path, lineno: int, line: bytes) -> object:
    try:
        return _JSON.decode(line.decode("utf-8"))
    except ValueError as exc:
        raise RegistryFileError(
            f"{file}:{lineno}: not a JSON line ({exc.__class__.__name__}); fix: copy the file again or rebuild it"
        ) from exc


def _refuse_line(file: Path, lineno: int, line: bytes) -> NoReturn:
    """The slow path for a line the fast path refused: decode and check it again to say why."""
    _parse_record(_decode(file, lineno, line), file, lineno)
    # json accepted what orjson refused: a lone surrogate, a number out of range
    raise RegistryFileError(
        f"{file}:{lineno}: not a JSON line (invalid UTF-8 text or number); fix: copy the file again or rebuild it"
    )


# ---------------------------------------------------------------- reading


def _open(file: Path, data: bytes | IO[bytes] | None) -> gzip.GzipFile:
    if isinstance(data, bytes):
        return gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
    if data is not None:  # a stream of the file (e.g. hashed while read, after its signature was checked)
        return gzip.GzipFile(fileobj=data, mode="rb")
    return gzip.GzipFile(file, mode="rb")


def unreadable(file: Path, exc: OSError) -> RegistryFileError:
    """A subset file (or its ``.sig``) the import cannot read: the cause and its fix (a copy fixes no permission)."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = (
            f"let the user running the import read it and enter every folder above it (`namei -l {file}` shows the "
            "owners and modes), or run the import with sudo; the file itself is not damaged"
        )
    else:
        fix = f"{unreadable_fix(file, exc)}; nothing was imported"
    return RegistryFileError(f"{file}: cannot be read: {exc}; fix: {fix}")


def _chunks(file: Path, data: bytes | IO[bytes] | None) -> Generator[tuple[int, list[bytes]], None, None]:
    """(number of the first line, lines) for each chunk of the decompressed file.

    gzip damage becomes RegistryFileError; a last line without a newline is still a line.
    """
    lineno, rest = 0, b""
    try:
        with _open(file, data) as fh:
            while chunk := fh.read(_CHUNK):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                if lines:
                    yield lineno + 1, lines
                    lineno += len(lines)
    except PermissionError as exc:  # not damage: copying it again would not help
        raise unreadable(file, exc) from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise RegistryFileError(
            f"{file}: unreadable after line {lineno}: {exc}; fix: copy the file again (it is damaged or not gzip)"
        ) from exc
    if rest:
        yield lineno + 1, [rest]


def _segments(file: Path, first: int, lines: list[bytes], snapshot: bool) -> Iterator[Segment]:
    """The records of one chunk, in runs of the same op."""
    loads, row_of, decode_error = orjson.loads, _row_of, orjson.JSONDecodeError
    run_op, start = ("upsert" if snapshot else ""), first
    rows: list[Row] = []
    for lineno, line in enumerate(lines, first):
        try:
            parsed = row_of(loads(line))
        except decode_error:
            parsed = None
        if parsed is None:
            _refuse_line(file, lineno, line)
        op, row = parsed
        if op != run_op:
            if snapshot:
                raise RegistryFileError(f"{file}:{lineno}: a snapshot holds upserts only; fix: rebuild the file")
            if rows:
                yield Segment(run_op, start, rows)
            run_op, start, rows = op, lineno, []
        rows.append(row)
    if rows:
        yield Segment(run_op, start, rows)


class SubsetReader:
    """One pass over a subset file: :attr:`header` at once, then :meth:`segments`.

    ``data`` is the file's content already read, or a binary stream of it (for instance after
    checking its signature): it is parsed instead of the file, and ``file`` only names it in
    messages. Use it as a context manager, or call :meth:`close`, to release the file.
    """

    def __init__(self, file: Path, data: bytes | IO[bytes] | None = None) -> None:
        self.file = Path(file)
        if data is None and not self.file.is_file():
            raise RegistryFileError(f"{self.file}: no such file; fix: check the path of the subset file")
        self._chunks = _chunks(self.file, data)
        try:
            first, lines = next(self._chunks)
            self.header = parse_header(_decode(self.file, first, lines[0]), f"{self.file}:1")
        except StopIteration:
            raise RegistryFileError(f"{self.file}: empty file; fix: copy the file again or rebuild it") from None
        except BaseException:
            self.close()
            raise
        self._rest = (first + 1, lines[1:])

    def segments(self) -> Iterator[Segment]:
        """The records in file order, in runs of one op; checks the header's count at the end."""
        snapshot, done = self.header.kind == "snapshot", 0
        for first, lines in chain([self._rest], self._chunks):
            for segment in _segments(self.file, first, lines, snapshot):
                done += len(segment.rows)
                yield segment
        if done != self.header.count:
            raise RegistryFileError(
                f"{self.file}: header count is {self.header.count} but the file holds "
                f"{done} records; fix: copy the file again (truncated?) or rebuild it"
            )

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> SubsetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- writing


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _write_gzip(path: Path, header: dict[str, Any], body: IO[bytes]) -> None:
    """Header then body, gzip'd with mtime=0, written atomically (:func:`iaflash.engines.atomic.open_atomic`)."""
    with open_atomic(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(_dump(header))
        while chunk := body.read(_CHUNK):
            gz.write(chunk)


def write_subset(
    path: Path,
    *,
    kind: str = "snapshot",
    dataset_id: str,
    seq: int,
    key_id: str,
    records: Iterable[dict[str, Any]],
    base_seq: int | None = None,
) -> int:
    """Write a subset file (header + records, gzip) atomically; return the number of records."""
    path = Path(path)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "dataset_id": dataset_id,
        "seq": seq,
        "base_seq": base_seq,
        "key_id": key_id,
        "count": 0,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    parse_header(header, f"{path}: header")  # refuse bad arguments before consuming the records
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
        _write_gzip(path, header, body)
    log.info("wrote subset %s: %s seq %s, %s records", path, kind, seq, count)
    return count


def records_from_plates(hmac_key: bytes, rows: Iterable[PlateRow]) -> Iterator[dict[str, Any]]:
    """(plate, make, model, genre, body) -> upsert records keyed by HMAC(normalised plate)."""
    for plate, make, model, genre, body in rows:
        yield {
            "op": "upsert",
            "plate_key": plate_key(hmac_key, plate).hex(),
            "make": make,
            "model": model,
            "genre": genre,
            "body": body,
        }
