"""The spool folder: ``incoming/ → processing/ → done/``, and ``rejected/`` with an error JSON.

Radars write the image(s) first and the sidecar ``<id>.json`` last (or rename it into place), so
a sidecar in ``incoming/`` means the capture is complete. Dotfiles and ``*.tmp``/``*.part`` names
are never read. A capture is claimed by renaming its sidecar into ``processing/`` (atomic), then its
images. Every file that enters ``incoming/`` ends in ``done/`` or ``rejected/`` (or back in
``incoming/`` after :meth:`Spool.recover`); nothing is deleted before it is finished, and moves
never overwrite a file (a clash gets a ``~N`` suffix). See docs/CAPTURE.md.

Defensive by construction (docs/RELIABILITY.md): files are opened without following links and
without blocking (``O_NOFOLLOW | O_NONBLOCK``) and checked as regular files on the opened
descriptor, so a link to ``/dev/zero`` or a FIFO swapped in after listing is refused, never read;
a symlinked sidecar is rejected (``not_a_file``), not ignored. Every claim is counted per capture
id in ``.attempts/`` (it survives restarts): a capture whose handling killed the agent
``spool.max_attempts`` times is quarantined to ``rejected/`` (``quarantined``). An unexpected
exception while handling one capture rejects it (``internal_error``, with an error id that is
also in the log) through :meth:`Spool.reject_internal`, and the daemon goes on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from iaflash.agent.capture.sidecar import CAPTURE_ID_RE, IMAGE_NAME_RE, Capture, parse_sidecar
from iaflash.agent.config import SpoolConfig
from iaflash.agent.errors import CaptureRejected

__all__ = ["FIX_RADAR", "Claimed", "Spool", "content_sha256", "read_regular", "visible"]

log = logging.getLogger(__name__)

_SIDECAR = ".json"
_ERROR_SUFFIX = ".error.json"
FIX_RADAR = "the radar must write its image(s) before the sidecar (or rename the sidecar into place)"


@dataclass
class Claimed:
    """A claimed capture: its files are in ``processing/`` and their bytes are read."""

    capture: Capture
    sidecar: Path
    images: list[Path]
    image_bytes: list[bytes]
    sidecar_bytes: bytes = b""

    @property
    def content_sha256(self) -> str:
        """The capture's identity beside its id: sha256 over the sidecar and image bytes."""
        return content_sha256(self.sidecar_bytes, self.image_bytes)


def content_sha256(sidecar: bytes, images: Iterable[bytes]) -> str:
    """sha256 over the sidecar bytes, then each image's length and bytes (a reused id is told apart)."""
    h = hashlib.sha256(len(sidecar).to_bytes(8, "big") + sidecar)
    for data in images:
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def read_regular(path: Path, limit: int, what: str, source: str) -> bytes:
    """Read ``path`` without following a link and without blocking; only a regular file of ≤ ``limit`` bytes.

    The type and size are checked on the opened descriptor (``fstat``), so a file swapped for a
    link, a FIFO or a device after it was listed is refused, never read. Raises CaptureRejected
    (``not_a_file``, ``*_too_large``) or OSError (the file is gone, the disk failed).
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or (exc.errno == errno.ENXIO and path.is_symlink()):
            raise CaptureRejected(
                "not_a_file",
                f"{source}: {what} {path.name} is a symbolic link; links are never followed. "
                "Fix: write plain files into incoming/",
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CaptureRejected(
                "not_a_file",
                f"{source}: {what} {path.name} is not a regular file (a FIFO, device or folder). "
                "Fix: write plain files into incoming/",
            )
        if st.st_size > limit:
            raise CaptureRejected(
                f"{what}_too_large",
                f"{source}: {what} {path.name} is {st.st_size} bytes, more than {limit}. "
                "Fix: check the radar's export, or raise the limit in [spool]",
            )
        chunks, left = [], limit + 1  # a file that grows while read is still capped
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CaptureRejected(
            f"{what}_too_large", f"{source}: {what} {path.name} grew past {limit} bytes while read. Fix: {FIX_RADAR}"
        )
    return data


def visible(name: str) -> bool:
    """False for names a writer may still be writing: dotfiles, ``*.tmp``, ``*.part``."""
    return not name.startswith(".") and not name.endswith((".tmp", ".part"))


def _safe_name(capture_id: str) -> str:
    """A file name for a sidecar whose stem is not a valid capture id."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", capture_id).lstrip("._-")[:80]
    digest = hashlib.sha256(capture_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"badid-{cleaned}-{digest}" if cleaned else f"badid-{digest}"


def _free_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/<stem>~N<suffix>`` when that name is taken."""
    dest = folder / name
    stem, dot, suffix = name.rpartition(".")
    n = 1
    while dest.exists():
        dest = folder / (f"{stem}~{n}.{suffix}" if dot else f"{name}~{n}")
        n += 1
    return dest


def _move(src: Path, folder: Path, name: str | None = None) -> Path:
    """Rename ``src`` into ``folder`` without overwriting anything; return the new path."""
    dest = _free_path(folder, name or src.name)
    os.rename(src, dest)
    if dest.name != (name or src.name):
        log.warning(
            "spool: %s already existed in %s; kept both, the new one as %s", name or src.name, folder.name, dest.name
        )
    return dest


def _default_images(capture_id: str) -> tuple[str, str]:
    """The image names a capture has by convention when its sidecar lists none (or cannot be read)."""
    return (f"{capture_id}.jpg", f"{capture_id}.jpeg")


_LIGHT_READ_LIMIT = 1 << 20


def _image_names(capture_id: str, sidecar: Path) -> tuple[str, ...]:
    """The image names a sidecar lists (a light read, no schema), or the default ``<id>.jpg``.

    Never raises: it runs on the recovery and rejection paths, which must survive any file
    (a 30,000-deep sidecar raises RecursionError in json, a link may point anywhere).
    """
    try:
        doc = json.loads(read_regular(sidecar, _LIGHT_READ_LIMIT, "sidecar", str(sidecar)))
        names = doc["images"] if isinstance(doc, dict) and "images" in doc else [f"{capture_id}.jpg"]
        return tuple(n for n in names if isinstance(n, str) and IMAGE_NAME_RE.fullmatch(n))[:8]
    except Exception:  # noqa: BLE001  # any content (RecursionError included) falls back to the default names
        return _default_images(capture_id)


class Spool:
    """The spool under ``root``. Thread-safe for one intake thread plus one finishing thread."""

    def __init__(self, root: Path, cfg: SpoolConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(("claimed", "finished", "requeued", "purged", "rejected_total"), 0)
        self._inflight: dict[str, tuple[str, ...]] = {}
        self.max_attempts = cfg.max_attempts
        # Every file system the agent writes to (the service adds state.db's and registry.db's folders).
        self.watched: list[Path] = [self.root]

    @property
    def attempts_dir(self) -> Path:
        """``<root>/.attempts/<id>``: how many times a capture was claimed (survives restarts)."""
        return self.root / ".attempts"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def processing(self) -> Path:
        return self.root / "processing"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    def ensure_layout(self) -> None:
        """Create the four folders (mode 0750 for new ones)."""
        for folder in (self.incoming, self.processing, self.done, self.rejected, self.attempts_dir):
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def counters(self) -> dict[str, int]:
        """claimed, finished, requeued, purged, rejected_total and ``rejected.<reason>``."""
        with self._lock:
            return dict(self._counts)

    def disk_ok(self, min_free_mb: int) -> bool:
        """True while every watched file system is writable with at least ``min_free_mb`` MiB free."""
        return self.disk_problem(min_free_mb) is None

    def disk_problem(self, min_free_mb: int) -> str | None:
        """Why intake must pause, or None: a watched file system read-only, full past the guard, or gone.

        ``watched`` holds the spool root and (set by the service) the folders of state.db and
        registry.db: one check per distinct file system.
        """
        seen: set[int] = set()
        for path in self.watched:
            try:
                st = os.statvfs(path)
                dev = os.stat(path).st_dev
            except OSError as exc:
                return f"{path}: cannot be read ({exc.strerror}); fix: check the mount and the folder"
            if dev in seen:
                continue
            seen.add(dev)
            if st.f_flag & os.ST_RDONLY:
                return (
                    f"{path} is on a read-only file system (remounted after an I/O error?); "
                    "fix: check the disk (dmesg, fsck) and remount it read-write"
                )
            free_mb = st.f_bavail * st.f_frsize // (1024 * 1024)
            if free_mb < min_free_mb:
                return (
                    f"{path} has {free_mb} MiB free, less than spool.min_free_mb = {min_free_mb}; "
                    "fix: free space there (unsent flags are never deleted)"
                )
        return None

    # --- intake ---------------------------------------------------------------------------------

    def _sidecars(self, folder: Path) -> list[tuple[int, str]]:
        """Sidecar names in ``folder`` (anything but a folder: a linked or FIFO sidecar is listed, then refused)."""
        out = []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(_SIDECAR) and visible(entry.name):
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            out.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                    except FileNotFoundError:  # claimed meanwhile
                        continue
        return sorted(out)

    def ready(self, limit: int | None = None) -> list[str]:
        """Capture ids with a sidecar in incoming/, oldest first (by mtime, then name)."""
        ids = [name[: -len(_SIDECAR)] for _, name in self._sidecars(self.incoming)]
        return ids if limit is None else ids[:limit]

    def claim(self, capture_id: str) -> Claimed | None:
        """Claim a capture by atomic rename; None if another claimer took it or it is in flight.

        Raises CaptureRejected after moving its files to rejected/ with an error JSON.
        """
        if "/" in capture_id or "\0" in capture_id or not capture_id:
            raise ValueError(f"spool: {capture_id!r} is not a capture id from ready()")
        src = self.incoming / f"{capture_id}{_SIDECAR}"
        if not CAPTURE_ID_RE.fullmatch(capture_id):
            self._reject_bad_name(capture_id, src)  # raises unless another claimer took it
            return None
        sidecar = self.processing / src.name
        if sidecar.exists():
            log.debug("spool: %s is already in processing/; claim later", capture_id)
            return None
        try:
            os.rename(src, sidecar)
        except FileNotFoundError:
            return None
        names: tuple[str, ...] = ()  # _reject_files adds the default names
        try:
            self._count_attempt(capture_id, str(src))
            raw = read_regular(sidecar, self.cfg.max_sidecar_bytes, "sidecar", str(src))
            capture = self._load(capture_id, raw, str(src))
            names = capture.images
            images, data = self._take_images(capture, str(src))
        except CaptureRejected as exc:
            self._reject_files(capture_id, exc, str(src), names)
            raise
        with self._lock:
            self._counts["claimed"] += 1
            self._inflight[capture_id] = capture.images
        return Claimed(capture=capture, sidecar=sidecar, images=images, image_bytes=data, sidecar_bytes=raw)

    def _count_attempt(self, capture_id: str, source: str) -> None:
        """Count this claim in ``.attempts/<id>``; quarantine a capture already tried ``max_attempts`` times.

        The count is cleared when the capture is finished or rejected, so only a claim whose
        handling never ended (the agent was killed: a crash in a native decoder, the watchdog
        after a stall, the OOM killer) is left counted for the next start.
        """
        marker = self.attempts_dir / capture_id
        try:
            before = int(marker.read_text(encoding="ascii").strip() or 0)
        except FileNotFoundError:
            before = 0
        except (OSError, ValueError):  # unreadable counter: count this claim as the second
            before = 1
        if before >= self.max_attempts:
            raise CaptureRejected(
                "quarantined",
                f"{source}: handling this capture stopped the agent {before} times (killed, crashed or stalled "
                f"past the watchdog), spool.max_attempts = {self.max_attempts}; it is quarantined so the site goes "
                "on. Fix: send its files from rejected/ with the agent's log to the developers",
            )
        self.attempts_dir.mkdir(mode=0o750, exist_ok=True)
        marker.write_text(f"{before + 1}\n", encoding="ascii")

    def attempts(self, capture_id: str) -> int:
        """Claims counted for a capture that is not finished or rejected (0 when none)."""
        try:
            return int((self.attempts_dir / capture_id).read_text(encoding="ascii").strip() or 0)
        except (OSError, ValueError):
            return 0

    def _clear_attempts(self, capture_id: str) -> None:
        try:
            (self.attempts_dir / capture_id).unlink(missing_ok=True)
        except OSError as exc:  # the count only matters after a crash; say so and go on
            log.warning("spool: cannot clear the attempt count of %s: %s", capture_id, exc)

    def _load(self, capture_id: str, raw: bytes, source: str) -> Capture:
        capture = parse_sidecar(raw, source=source)
        if capture.capture_id != capture_id:
            raise CaptureRejected(
                "capture_id_mismatch",
                f"{source}: capture_id {capture.capture_id!r} "
                f"differs from the file name {capture_id!r}. "
                "Fix: name the sidecar <capture_id>.json",
            )
        return capture

    def _take_images(self, capture: Capture, source: str) -> tuple[list[Path], list[bytes]]:
        paths, data = [], []
        limit = self.cfg.max_image_bytes
        for name in capture.images:
            dest = self.processing / name
            if not dest.exists():
                try:
                    os.rename(self.incoming / name, dest)
                except FileNotFoundError:
                    raise CaptureRejected(
                        "missing_image",
                        f"{source}: image {name} listed by the sidecar is not in incoming/. Fix: {FIX_RADAR}",
                    ) from None
            if stat.S_ISDIR(dest.lstat().st_mode):
                raise CaptureRejected(
                    "not_a_file",
                    f"{source}: image {name} is not a regular file (a folder). Fix: write plain files into incoming/",
                )
            try:
                blob = read_regular(dest, limit, "image", source)
            except CaptureRejected as exc:
                if exc.reason != "image_too_large":
                    raise
                raise CaptureRejected(
                    "image_too_large",
                    f"{source}: image {name} is more than {limit} bytes (spool.max_image_bytes). "
                    "Fix: check the radar's camera export",
                ) from None
            if not blob:
                raise CaptureRejected(
                    "empty_image",
                    f"{source}: image {name} is 0 bytes (allowed 1..{limit}, "
                    "spool.max_image_bytes). Fix: check the radar's camera export",
                )
            paths.append(dest)
            data.append(blob)
        return paths, data

    # --- rejection ------------------------------------------------------------------------------

    def _reject_bad_name(self, capture_id: str, src: Path) -> None:
        """Move a sidecar with an invalid name to rejected/ under a safe name, then raise."""
        safe = _safe_name(capture_id)
        try:
            _move(src, self.rejected, f"{safe}{_SIDECAR}")
        except FileNotFoundError:
            return None
        exc = CaptureRejected(
            "bad_capture_id",
            f"{src}: the sidecar name {capture_id!r} is not a valid "
            "capture id (letters, digits, '_', '.', '-'; at most 128; starting with a "
            f"letter or digit). It was moved to rejected/{safe}{_SIDECAR}. "
            "Fix: name sidecars <capture_id>.json with a valid id",
        )
        self._record(safe, exc, str(src), [f"{safe}{_SIDECAR}"], original_name=src.name)
        raise exc

    def reject(self, capture_id: str, exc: CaptureRejected) -> Path:
        """Move a claimed capture's files from processing/ to rejected/; return its error JSON."""
        with self._lock:
            names = self._inflight.pop(capture_id, None)
        sidecar = self.processing / f"{capture_id}{_SIDECAR}"
        if names is None:
            names = _image_names(capture_id, sidecar)
        return self._reject_files(capture_id, exc, str(sidecar), names)

    def reject_internal(self, capture_id: str, stage: str, exc: BaseException) -> str:
        """An unexpected exception while handling one capture: reject it (``internal_error``); return the error id.

        The traceback goes to the log under the error id, the error JSON names it, and the
        daemon goes on. Never raises: if the files cannot be moved either (the disk failed),
        that is logged and counted (``internal_error_unmoved``) and the capture stays in
        processing/ for the next start, where its attempt count quarantines it eventually.
        """
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "capture %s: unexpected %s while %s (error id %s); it is rejected as internal_error and the agent goes on",
            capture_id,
            type(exc).__name__,
            stage,
            error_id,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"capture_id": capture_id, "error_id": error_id, "stage": stage},
        )
        rejection = CaptureRejected(
            "internal_error",
            f"{self.processing / capture_id}.json: unexpected {type(exc).__name__} while {stage} "
            f"(error id {error_id}, traceback in the agent log). Fix: send this capture's files from "
            "rejected/ and the log lines with that error id to the developers",
        )
        try:
            self.reject(capture_id, rejection)
        except Exception as again:  # noqa: BLE001  # the rejection path must never stop the daemon
            self._count("internal_error_unmoved")
            log.error(
                "capture %s: cannot move it to rejected/ either (%s); it stays for the next start", capture_id, again
            )
        return error_id

    def _reject_files(self, capture_id: str, exc: CaptureRejected, source: str, image_names: Iterable[str]) -> Path:
        self._clear_attempts(capture_id)
        moved = []
        # The default names are by convention this capture's too.
        names = dict.fromkeys((*image_names, *_default_images(capture_id), f"{capture_id}{_SIDECAR}"))
        for name in names:
            for folder in (self.processing, self.incoming):
                # lexists, not is_file: a folder or link claimed as an image (not_a_file) goes too
                if os.path.lexists(folder / name):
                    moved.append(_move(folder / name, self.rejected).name)
                    break
        return self._record(capture_id, exc, source, moved)

    def _record(
        self, capture_id: str, exc: CaptureRejected, source: str, files: list[str], original_name: str | None = None
    ) -> Path:
        doc: dict[str, object] = {
            "capture_id": capture_id,
            "reason": exc.reason,
            "message": str(exc),
            "source": source,
            "rejected_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        if original_name is not None:
            doc["original_name"] = original_name
        tmp = self.rejected / f".{capture_id}{_ERROR_SUFFIX}.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        dest = _move(tmp, self.rejected, f"{capture_id}{_ERROR_SUFFIX}")
        with self._lock:
            self._counts["rejected_total"] += 1
            key = f"rejected.{exc.reason}"
            self._counts[key] = self._counts.get(key, 0) + 1
        log.warning(
            "capture %s rejected (%s): %s [files: %s, details: %s]", capture_id, exc.reason, exc, len(files), dest
        )
        return dest

    def reject_orphans(self, *, older_than_s: float = 3600.0, now: float | None = None) -> int:
        """Reject files in incoming/ that no sidecar there claims and that are older than ``older_than_s``.

        They are left-overs (a sidecar that never came, or a rejected sidecar's custom-named
        images). Each goes to rejected/ with reason ``orphan_file``. Returns how many.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        referenced: set[str] = set()
        for _, name in self._sidecars(self.incoming):
            referenced.update(_image_names(name[: -len(_SIDECAR)], self.incoming / name))
        count = 0
        for path in sorted(self.incoming.iterdir()):
            name = path.name
            if (
                not visible(name)
                or name.endswith(_SIDECAR)
                or name in referenced
                or not path.is_file()
                or path.stat().st_mtime >= cutoff
            ):
                continue
            safe = name if CAPTURE_ID_RE.fullmatch(name) else _safe_name(name)
            exc = CaptureRejected(
                "orphan_file", f"{path}: no sidecar claimed this file for {older_than_s:.0f} s. Fix: {FIX_RADAR}"
            )
            moved = _move(path, self.rejected, None if safe == name else safe)
            self._record(safe, exc, str(path), [moved.name])
            count += 1
        return count

    # --- completion, recovery, retention ------------------------------------------------------

    def finish(self, capture_id: str) -> None:
        """Move a claimed capture processing/ → done/ (call once its verdict is durable)."""
        sidecar = self.processing / f"{capture_id}{_SIDECAR}"
        if not sidecar.is_file():
            raise FileNotFoundError(f"spool: {capture_id} is not in processing/ (finish called twice?)")
        with self._lock:
            names = self._inflight.pop(capture_id, None)
        for name in names if names is not None else _image_names(capture_id, sidecar):
            if (self.processing / name).is_file():
                _move(self.processing / name, self.done)
        os.utime(sidecar)  # retention counts from the verdict
        _move(sidecar, self.done)
        self._clear_attempts(capture_id)
        self._count("finished")

    def recover(self, is_processed: Callable[[str], bool]) -> tuple[int, int]:
        """At start: finish processed captures left in processing/, requeue the others (sidecar last).

        A processed id whose finished capture in done/ has OTHER content is a reused id: it is
        requeued (the committer gives it a derived id), never finished without a verdict.
        Orphan files in processing/ go back to incoming/ too. Returns (finished, requeued).
        As defensive as intake: a capture that cannot be recovered is rejected (``internal_error``)
        and the others go on.
        """
        finished = requeued = 0
        for _, name in self._sidecars(self.processing):
            capture_id = name[: -len(_SIDECAR)]
            try:
                if CAPTURE_ID_RE.fullmatch(capture_id) and is_processed(capture_id):
                    prior = self.done_sha256(capture_id)
                    if prior is None or prior == self._content_on_disk(capture_id):
                        self.finish(capture_id)
                        finished += 1
                        continue
                self.requeue(capture_id)
                requeued += 1
            except CaptureRejected as exc:
                self.reject(capture_id, exc)
            except Exception as exc:  # noqa: BLE001  # one bad capture must not stop the start
                self.reject_internal(capture_id, "recovering it at start", exc)
        for path in sorted(self.processing.iterdir()):
            if visible(path.name) and not path.is_dir():
                try:
                    _move(path, self.incoming)
                except OSError as exc:
                    log.error("spool recovery: cannot move %s back to incoming/: %s", path, exc)
        self._count("requeued", requeued)
        if finished or requeued:
            log.info("spool recovery: %s finished, %s requeued", finished, requeued)
        return finished, requeued

    def requeue(self, capture_id: str) -> None:
        """Move a claimed capture processing/ → incoming/ (images first, sidecar last), to be claimed again."""
        with self._lock:
            names = self._inflight.pop(capture_id, None)
        sidecar = self.processing / f"{capture_id}{_SIDECAR}"
        for image in names if names is not None else _image_names(capture_id, sidecar):
            if os.path.lexists(self.processing / image):
                _move(self.processing / image, self.incoming)
        if os.path.lexists(sidecar):
            _move(sidecar, self.incoming)

    def _content_on_disk(self, capture_id: str) -> str:
        """content_sha256 of a capture in processing/ (as claim computes it)."""
        sidecar = self.processing / f"{capture_id}{_SIDECAR}"
        raw = read_regular(sidecar, self.cfg.max_sidecar_bytes, "sidecar", str(sidecar))
        images = [
            read_regular(self.processing / n, self.cfg.max_image_bytes, "image", str(sidecar))
            for n in _image_names(capture_id, sidecar)
            if os.path.lexists(self.processing / n)
        ]
        return content_sha256(raw, images)

    def done_sha256(self, capture_id: str) -> str | None:
        """content_sha256 of the finished capture ``capture_id`` in done/, or None when it is not there (purged)."""
        sidecar = self.done / f"{capture_id}{_SIDECAR}"
        try:
            raw = read_regular(sidecar, self.cfg.max_sidecar_bytes, "sidecar", str(sidecar))
            images = [
                read_regular(self.done / n, self.cfg.max_image_bytes, "image", str(sidecar))
                for n in _image_names(capture_id, sidecar)
                if os.path.lexists(self.done / n)
            ]
        except (OSError, CaptureRejected):
            return None
        return content_sha256(raw, images)

    def purge_rejected(self, *, older_than_days: float, now: float | None = None) -> int:
        """Delete files in rejected/ older than ``older_than_days`` (their sidecars may hold plates in clear)."""
        cutoff = (time.time() if now is None else now) - older_than_days * 86400
        count = 0
        with os.scandir(self.rejected) as it:
            for entry in it:
                try:
                    if not entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        count += 1
                except FileNotFoundError:
                    continue
        self._count("rejected_purged", count)
        if count:
            log.info("spool: purged %s files older than %s days from rejected/", count, older_than_days)
        return count

    def purge(
        self, *, older_than_days: float, keep: Callable[[str], bool] = lambda _: False, now: float | None = None
    ) -> int:
        """Delete captures in done/ finished more than ``older_than_days`` ago, unless ``keep(id)``.

        Returns how many captures were deleted.
        """
        cutoff = (time.time() if now is None else now) - older_than_days * 86400
        count = 0
        for mtime_ns, name in self._sidecars(self.done):
            capture_id = name[: -len(_SIDECAR)]
            if mtime_ns / 1e9 >= cutoff or keep(capture_id.split("~")[0]):
                continue
            # A "<id>~N" sidecar is a duplicate id renamed on arrival: its images carry the same ~N.
            images = _default_images(capture_id) if "~" in capture_id else _image_names(capture_id, self.done / name)
            for image in images:
                (self.done / image).unlink(missing_ok=True)
            (self.done / name).unlink(missing_ok=True)
            count += 1
        self._count("purged", count)
        if count:
            log.info("spool: purged %s captures older than %s days from done/", count, older_than_days)
        return count
