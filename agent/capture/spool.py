"""The spool folder: ``incoming/ → processing/ → done/``, and ``rejected/`` with an error JSON.

Radars write the image(s) first and the sidecar ``<id>.json`` last (or rename it into place), so
a sidecar in ``incoming/`` means the capture is complete. Dotfiles and ``*.tmp``/``*.part`` names
are never read. A capture is claimed by renaming its sidecar into ``processing/`` (atomic), then its
images. Every file that enters ``incoming/`` ends in ``done/`` or ``rejected/`` (or back in
``incoming/`` after :meth:`Spool.recover`); nothing is deleted before it is finished, and moves
never overwrite a file (a clash gets a ``~N`` suffix). See docs/CAPTURE.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from iaflash.agent.capture.sidecar import CAPTURE_ID_RE, IMAGE_NAME_RE, Capture, parse_sidecar
from iaflash.agent.config import SpoolConfig
from iaflash.agent.errors import CaptureRejected

__all__ = ["FIX_RADAR", "Claimed", "Spool", "visible"]

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


def _image_names(capture_id: str, sidecar: Path) -> tuple[str, ...]:
    """The image names a sidecar lists (a light read, no schema), or the default ``<id>.jpg``."""
    try:
        doc = json.loads(sidecar.read_bytes())
        names = doc["images"] if isinstance(doc, dict) and "images" in doc else [f"{capture_id}.jpg"]
        return tuple(n for n in names if isinstance(n, str) and IMAGE_NAME_RE.fullmatch(n))
    except (OSError, ValueError, TypeError):
        return _default_images(capture_id)


class Spool:
    """The spool under ``root``. Thread-safe for one intake thread plus one finishing thread."""

    def __init__(self, root: Path, cfg: SpoolConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(("claimed", "finished", "requeued", "purged", "rejected_total"), 0)
        self._inflight: dict[str, tuple[str, ...]] = {}

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
        for folder in (self.incoming, self.processing, self.done, self.rejected):
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def counters(self) -> dict[str, int]:
        """claimed, finished, requeued, purged, rejected_total and ``rejected.<reason>``."""
        with self._lock:
            return dict(self._counts)

    def disk_ok(self, min_free_mb: int) -> bool:
        """True while the spool's file system has at least ``min_free_mb`` MiB free."""
        return shutil.disk_usage(self.root).free >= min_free_mb * 1024 * 1024

    # --- intake ---------------------------------------------------------------------------------

    def _sidecars(self, folder: Path) -> list[tuple[int, str]]:
        out = []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(_SIDECAR) and visible(entry.name):
                    try:
                        if entry.is_file(follow_symlinks=False):
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
            capture = self._load(capture_id, sidecar, str(src))
            names = capture.images
            images, data = self._take_images(capture, str(src))
        except CaptureRejected as exc:
            self._reject_files(capture_id, exc, str(src), names)
            raise
        with self._lock:
            self._counts["claimed"] += 1
            self._inflight[capture_id] = capture.images
        return Claimed(capture=capture, sidecar=sidecar, images=images, image_bytes=data)

    def _load(self, capture_id: str, sidecar: Path, source: str) -> Capture:
        size = sidecar.stat().st_size
        if size > self.cfg.max_sidecar_bytes:
            raise CaptureRejected(
                "sidecar_too_large",
                f"{source}: sidecar is {size} bytes, more than "
                f"spool.max_sidecar_bytes = {self.cfg.max_sidecar_bytes}. "
                "Fix: check the radar's export, or raise the limit",
            )
        capture = parse_sidecar(sidecar.read_bytes(), source=source)
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
            st = dest.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise CaptureRejected(
                    "not_a_file",
                    f"{source}: image {name} is not a regular file "
                    "(a link or a folder). Fix: write plain files into incoming/",
                )
            size = st.st_size
            if size == 0 or size > limit:
                raise CaptureRejected(
                    "empty_image" if size == 0 else "image_too_large",
                    f"{source}: image {name} is {size} bytes (allowed 1..{limit}, "
                    "spool.max_image_bytes). Fix: check the radar's camera export",
                )
            paths.append(dest)
            data.append(dest.read_bytes())
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

    def _reject_files(self, capture_id: str, exc: CaptureRejected, source: str, image_names: Iterable[str]) -> Path:
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
        self._count("finished")

    def recover(self, is_processed: Callable[[str], bool]) -> tuple[int, int]:
        """At start: finish processed captures left in processing/, requeue the others (sidecar last).

        Orphan files in processing/ go back to incoming/ too. Returns (finished, requeued).
        """
        finished = requeued = 0
        for _, name in self._sidecars(self.processing):
            capture_id = name[: -len(_SIDECAR)]
            if CAPTURE_ID_RE.fullmatch(capture_id) and is_processed(capture_id):
                self.finish(capture_id)
                finished += 1
                continue
            for image in _image_names(capture_id, self.processing / name):
                if (self.processing / image).is_file():
                    _move(self.processing / image, self.incoming)
            _move(self.processing / name, self.incoming)
            requeued += 1
        for path in sorted(self.processing.iterdir()):
            if visible(path.name) and path.is_file():
                _move(path, self.incoming)
        self._count("requeued", requeued)
        if finished or requeued:
            log.info("spool recovery: %s finished, %s requeued", finished, requeued)
        return finished, requeued

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
