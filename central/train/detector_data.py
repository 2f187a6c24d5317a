"""Label files of the vehicle localiser: frames with boxes, and tight vehicle photos to paste.

**Frames** (the LABELS argument of ``iaflash-central train-detector``): a CSV with the columns
``image, x1, y1, x2, y2`` and optionally ``split`` (train/val). Boxes are corners in the frame's
pixels (``x2``/``y2`` exclusive edges). A frame with several vehicles has one row per vehicle; a
frame with no vehicle has one row with the four box cells empty. Image paths are relative to the
CSV's folder (or ``root``).

**Photos** (``--synthesise-from``): a CSV with an ``image`` column and optionally ``split`` and a
box ``x1, y1, x2, y2`` (the photo is cut to it); other columns (make, model...) are ignored. Each
photo must show one vehicle, cut tightly: the pasted photo's edges become the box.

Every refusal names the file, the line and the fix (:class:`~iaflash.central.errors.DataError`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from iaflash.central.errors import DataError

__all__ = ["BoxF", "Frame", "Photo", "load_bgr", "read_frames", "read_photos"]

BoxF = tuple[float, float, float, float]
"""(x1, y1, x2, y2) in pixels, x2/y2 exclusive."""

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Frame:
    """One frame and the boxes of the vehicles in it (none: no vehicle)."""

    path: Path
    boxes: tuple[BoxF, ...]
    split: str = "train"
    line: int = 0
    source: str = "labels"
    csv: str = ""

    @property
    def where(self) -> str:
        return f"{self.csv}:{self.line} (line {self.line}, {self.path})" if self.line else str(self.path)


@dataclass(frozen=True)
class Photo:
    """One tight vehicle photo, optionally cut to a box."""

    path: Path
    split: str = "train"
    box: tuple[int, int, int, int] | None = None
    line: int = 0


def _read_csv(csv_path: Path, required: set[str], fix: str) -> list[tuple[int, dict[str, str]]]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read the label file ({exc}); fix: give an existing UTF-8 CSV") from exc
    reader = csv.DictReader(text.splitlines())
    missing = required - set(reader.fieldnames or ())
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {sorted(missing)}; fix: {fix}")
    return [(line, row) for line, row in enumerate(reader, start=2)]


def _split(row: dict[str, str], where: str) -> str:
    split = (row.get("split") or "train").strip().lower()
    if split not in SPLITS:
        raise DataError(
            f"{where}: split {split!r} is neither train nor val; fix: one of train, val (or leave it empty)"
        )
    return split


def _box(row: dict[str, str], where: str) -> BoxF | None:
    values = [(row.get(k) or "").strip() for k in ("x1", "y1", "x2", "y2")]
    if not any(values):
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except ValueError as exc:
        raise DataError(
            f"{where}: box x1,y1,x2,y2 must be four numbers, got {values}; "
            "fix: pixels of the frame, or all four empty for a frame with no vehicle"
        ) from exc
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or min(x1, y1) < 0:
        raise DataError(f"{where}: box {values} has a negative or non-finite corner; fix: pixels inside the frame")
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{where}: box {values} is empty; fix: x2 > x1 and y2 > y1 (corners, in pixels)")
    return (x1, y1, x2, y2)


def _image(row: dict[str, str], base: Path, where: str) -> Path:
    name = (row.get("image") or "").strip()
    if not name:
        raise DataError(
            f"{where}: the image cell is empty; fix: a path relative to the CSV's folder, or remove the row"
        )
    path = base / name
    if not path.is_file():
        raise DataError(
            f"{where}: {path} does not exist; fix: image paths are relative to the CSV's folder (or --root)"
        )
    return path


def read_frames(csv_path: Path, root: Path | None = None) -> list[Frame]:
    """Frames from a LABELS CSV (module doc): one Frame per image, its rows' boxes gathered."""
    base = root if root is not None else csv_path.parent
    rows = _read_csv(csv_path, {"image", "x1", "y1", "x2", "y2"}, "a header with image,x1,y1,x2,y2[,split]")
    gathered: dict[Path, tuple[int, str, list[BoxF], bool]] = {}
    for line, row in rows:
        where = f"{csv_path}:{line}"
        path, split, box = _image(row, base, where), _split(row, where), _box(row, where)
        if path not in gathered:
            gathered[path] = (line, split, [] if box is None else [box], box is None)
            continue
        first, first_split, boxes, empty = gathered[path]
        if split != first_split:
            raise DataError(
                f"{where}: {path} is in split {split!r} here and {first_split!r} on line {first}; "
                "fix: one split per frame"
            )
        if box is None or empty:
            raise DataError(
                f"{where}: {path} is listed again (first on line {first}) and one of its rows has empty box cells; "
                "fix: a frame with no vehicle has exactly one row, with the four box cells empty"
            )
        boxes.append(box)
    if not gathered:
        raise DataError(f"{csv_path}: no frames listed; fix: one row per vehicle box (or per empty frame)")
    return [Frame(p, tuple(b), s, line, "labels", str(csv_path)) for p, (line, s, b, _) in gathered.items()]


def read_photos(csv_path: Path, root: Path | None = None) -> list[Photo]:
    """Tight vehicle photos from a photo CSV (module doc); the box cells, when given, cut the photo."""
    base = root if root is not None else csv_path.parent
    rows = _read_csv(csv_path, {"image"}, "a header with image[,split,x1,y1,x2,y2] (cars-dev's labels.csv has it)")
    photos = []
    for line, row in rows:
        where = f"{csv_path}:{line}"
        box = _box(row, where)
        cut = None if box is None else (round(box[0]), round(box[1]), round(box[2]), round(box[3]))
        photos.append(Photo(_image(row, base, where), _split(row, where), cut, line))
    if not photos:
        raise DataError(f"{csv_path}: no photos listed; fix: one row per tight vehicle photo")
    return photos


def load_bgr(path: Path, where: str) -> np.ndarray:
    """A BGR uint8 image, or a DataError naming ``where``."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{where}: {path} is not a readable image; fix: replace or remove it")
    return img


def load_photo(photo: Photo) -> np.ndarray:
    """The photo as BGR uint8, cut to its box when it has one."""
    where = f"line {photo.line}" if photo.line else str(photo.path)
    img = load_bgr(photo.path, where)
    if photo.box is not None:
        h, w = img.shape[:2]
        x1, y1, x2, y2 = photo.box
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        if x2 <= x1 or y2 <= y1:
            raise DataError(f"{where}: box {photo.box} lies outside the {w}x{h} photo; fix: pixels of the photo")
        img = img[y1:y2, x1:x2]
    return np.ascontiguousarray(img)


def image_size(path: Path, where: str) -> tuple[int, int]:
    """``(width, height)`` of a JPEG (from its SOF header) or PNG (IHDR) without decoding; else decoded."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{where}: cannot read {path} ({exc}); fix: replace or remove it") from exc
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    pos = 2
    while data[:2] == b"\xff\xd8" and pos + 9 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            return int.from_bytes(data[pos + 7 : pos + 9], "big"), int.from_bytes(data[pos + 5 : pos + 7], "big")
        pos += 2 + length
    img = load_bgr(path, where)
    return img.shape[1], img.shape[0]


def check_boxes(frame: Frame, size: tuple[int, int]) -> None:
    """Refuse a box that reaches outside its ``(width, height)`` frame (by more than one pixel)."""
    w, h = size
    for box in frame.boxes:
        if box[2] > w + 1 or box[3] > h + 1:
            raise DataError(
                f"{frame.where}: box {list(box)} reaches outside the {w}x{h} frame; "
                "fix: corners in the frame's own pixels (x2 <= width, y2 <= height)"
            )
