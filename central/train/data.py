"""Labelled photos for training: reading a CSV or a folder, the taxonomy, augmentation.

A label file is a CSV with the columns ``image, make, model`` and optionally ``split``
(train/val), ``view``, and a vehicle box ``x1, y1, x2, y2`` in pixels (the photo is cropped to
it). A folder is ``ROOT/<MAKE>/<MODEL>/*.jpg``. Makes and models are upper-cased and stripped.

The taxonomy is the sorted list of (make, model) pairs seen in training. A class with fewer than
``min_count`` training photos is folded into one explicit ``OTHER``/``OTHER`` class (or refused,
when folding is off). A photo listed twice, or two rows whose files have the same content, are
refused with the line numbers. Augmentation imitates radar conditions: scale and crop jitter,
blur, JPEG re-encoding, low light with sensor noise, greyscale and horizontal flip.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from iaflash.central.errors import DataError

__all__ = [
    "OTHER",
    "Augment",
    "DataError",
    "Sample",
    "Taxonomy",
    "augment",
    "build_taxonomy",
    "load_image",
    "read_folder",
    "read_labels",
    "to_input",
]

log = logging.getLogger(__name__)

OTHER = ("OTHER", "OTHER")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Sample:
    """One labelled photo."""

    path: Path
    make: str
    model: str
    split: str = "train"
    view: str = ""
    box: tuple[int, int, int, int] | None = None
    line: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.make, self.model)


@dataclass(frozen=True)
class Taxonomy:
    """Class index -> (make, model); ``folded`` lists the rare classes merged into OTHER."""

    classes: tuple[tuple[str, str], ...]
    folded: tuple[tuple[str, str], ...] = ()
    index: dict[tuple[str, str], int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.index.update({c: i for i, c in enumerate(self.classes)})

    def __len__(self) -> int:
        return len(self.classes)

    def class_of(self, sample: Sample) -> int | None:
        """The class index of a sample; a rare (folded) class maps to OTHER, an unseen one to None."""
        if sample.key in self.index:
            return self.index[sample.key]
        if sample.key in self.folded:
            return self.index[OTHER]
        return None

    def makes(self) -> list[str]:
        return [make for make, _ in self.classes]


def _norm(text: str) -> str:
    return " ".join(text.strip().upper().split())


def _box(row: dict[str, str], where: str) -> tuple[int, int, int, int] | None:
    values = [row.get(k, "") or "" for k in ("x1", "y1", "x2", "y2")]
    if not any(v.strip() for v in values):
        return None
    try:
        x1, y1, x2, y2 = (round(float(v)) for v in values)
    except ValueError as exc:
        raise DataError(
            f"{where}: box x1,y1,x2,y2 must be numbers, got {values}; fix: pixels or leave all four empty"
        ) from exc
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{where}: box {values} is empty; fix: x2 > x1 and y2 > y1, in pixels")
    return (x1, y1, x2, y2)


def read_labels(csv_path: Path, root: Path | None = None, drop_duplicates: bool = False) -> list[Sample]:
    """Samples from a label CSV; image paths are relative to ``root`` (default: the CSV's folder)."""
    base = root if root is not None else csv_path.parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read the label file ({exc}); fix: give an existing CSV") from exc
    reader = csv.DictReader(text.splitlines())
    missing = {"image", "make", "model"} - set(reader.fieldnames or ())
    if missing:
        raise DataError(
            f"{csv_path}: missing column(s) {sorted(missing)}; "
            "fix: a header with image,make,model[,split,view,x1,y1,x2,y2]"
        )
    samples = []
    for line, row in enumerate(reader, start=2):
        where = f"{csv_path}:{line}"
        image, make, model = (row.get(k) or "" for k in ("image", "make", "model"))
        if not (image.strip() and make.strip() and model.strip()):
            raise DataError(f"{where}: image, make and model must all be given; fix: fill them or remove the row")
        split = (row.get("split") or "train").strip().lower()
        if split not in ("train", "val"):
            raise DataError(f"{where}: split {split!r} is neither train nor val; fix: one of train, val")
        samples.append(
            Sample(
                base / image.strip(),
                _norm(make),
                _norm(model),
                split,
                (row.get("view") or "").strip(),
                _box(row, where),
                line,
            )
        )
    return check_duplicates(samples, str(csv_path), drop_duplicates)


def read_folder(root: Path, val_fraction: float = 0.2, drop_duplicates: bool = False) -> list[Sample]:
    """Samples from ``ROOT/<MAKE>/<MODEL>/*.jpg``; a stable hash of each file name picks val photos."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; fix: give ROOT/<MAKE>/<MODEL>/*.jpg or a label CSV")
    samples = []
    for path in sorted(root.glob("*/*/*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        val = (zlib.crc32(path.name.encode()) % 1000) < val_fraction * 1000
        samples.append(Sample(path, _norm(path.parent.parent.name), _norm(path.parent.name), "val" if val else "train"))
    if not samples:
        raise DataError(f"{root}: no photos found as ROOT/<MAKE>/<MODEL>/*.jpg; fix: lay the folder out so")
    return check_duplicates(samples, str(root), drop_duplicates)


def _where(sample: Sample) -> str:
    return f"line {sample.line}" if sample.line else str(sample.path)


def check_duplicates(samples: Sequence[Sample], where: str, drop: bool = False) -> list[Sample]:
    """Refuse a photo listed twice, or two entries whose files have identical bytes.

    With ``drop``, identical photos are logged and removed instead: one copy is kept when their
    labels agree, none when they conflict (the label is unknowable). Returns the kept samples.
    """
    seen: dict[Path, Sample] = {}
    for s in samples:
        if s.path in seen:
            raise DataError(
                f"{where}: {s.path} is listed twice ({_where(seen[s.path])} and {_where(s)}); "
                "fix: keep one row per photo"
            )
        seen[s.path] = s
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        try:
            digest = hashlib.sha256(s.path.read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(
                f"{where}: {_where(s)}: cannot read {s.path} ({exc}); fix: image paths are relative to the CSV's folder"
            ) from exc
        groups.setdefault(digest, []).append(s)
    drop_ids: set[int] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        first, second = group[0], group[1]
        labels = {g.key for g in group}
        if not drop:
            raise DataError(
                f"{where}: {first.path} ({_where(first)}, {' '.join(first.key)}) and {second.path} "
                f"({_where(second)}, {' '.join(second.key)}) are the same photo; fix: remove the duplicate "
                "(or pass --drop-duplicates) so one photo cannot sit in both train and val"
            )
        dropped = group if len(labels) > 1 else group[1:]
        drop_ids.update(id(g) for g in dropped)
        log.warning(
            "%s: same photo %s; dropped %d copy(ies)%s",
            where,
            [str(g.path) for g in group],
            len(dropped),
            " (conflicting labels)" if len(labels) > 1 else "",
        )
    return [s for s in samples if id(s) not in drop_ids]


def build_taxonomy(samples: Sequence[Sample], min_count: int, fold_rare: bool = True) -> Taxonomy:
    """Classes from the training samples; rarer than ``min_count`` folds into OTHER (or is refused)."""
    counts = Counter(s.key for s in samples if s.split == "train")
    rare = sorted(k for k, n in counts.items() if n < min_count)
    if rare and not fold_rare:
        shown = ", ".join(f"{mk} {md} ({counts[(mk, md)]})" for mk, md in rare[:10])
        raise DataError(
            f"{len(rare)} class(es) have fewer than {min_count} training photos: {shown}; "
            "fix: add photos, lower --min-count, or allow folding them into OTHER"
        )
    kept = sorted(k for k in counts if k not in rare and k != OTHER)
    if rare or OTHER in counts:
        kept.append(OTHER)
    if len(kept) < 2:
        raise DataError(
            f"only {len(kept)} class(es) with at least {min_count} training photos; "
            "fix: a classifier needs two classes or more"
        )
    if rare:
        log.info("folded %d rare class(es) into OTHER: %s", len(rare), rare)
    return Taxonomy(tuple(kept), tuple(rare))


def load_image(sample: Sample) -> np.ndarray:
    """The photo as RGB uint8, cropped to its box when it has one."""
    img = cv2.imread(str(sample.path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{_where(sample)}: {sample.path} is not a readable image; fix: replace or remove it")
    if sample.box is not None:
        h, w = img.shape[:2]
        x1, y1, x2, y2 = sample.box
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        if x2 <= x1 or y2 <= y1:
            raise DataError(
                f"{_where(sample)}: box {sample.box} lies outside the {w}x{h} photo; fix: pixels of the photo"
            )
        img = img[y1:y2, x1:x2]
    return np.ascontiguousarray(img[:, :, ::-1])


@dataclass(frozen=True)
class Augment:
    """Probabilities and ranges of the radar-like augmentation."""

    min_area: float = 0.65
    max_aspect: float = 1.2
    p_blur: float = 0.3
    p_jpeg: float = 0.4
    p_low_light: float = 0.25
    p_grey: float = 0.1
    p_flip: float = 0.5


def augment(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator, aug: Augment | None = None) -> np.ndarray:
    """A radar-like view of an RGB photo, stretched to ``size`` = (height, width)."""
    aug = aug or Augment()
    h, w = img.shape[:2]
    area = rng.uniform(aug.min_area, 1.0)
    aspect = float(np.exp(rng.uniform(-np.log(aug.max_aspect), np.log(aug.max_aspect))))
    cw = int(min(w, round(w * np.sqrt(area * aspect))))
    ch = int(min(h, round(h * np.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < aug.p_blur:
        sigma = rng.uniform(0.5, 2.0)
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out = resize(out, size)
    if rng.random() < aug.p_low_light:
        gain = rng.uniform(0.25, 0.7)
        noise = rng.normal(0.0, rng.uniform(2.0, 8.0), out.shape)
        out = np.clip(out.astype(np.float32) * gain + noise, 0, 255).astype(np.uint8)
    if rng.random() < aug.p_jpeg:
        ok, enc = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 90))])
        if ok:
            out = cv2.imdecode(enc, cv2.IMREAD_UNCHANGED)
    if rng.random() < aug.p_grey:
        grey = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
        out = np.repeat(grey[:, :, None], 3, axis=2)
    if rng.random() < aug.p_flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stretch to ``size`` = (height, width) as the daemon does: INTER_AREA shrinking, INTER_LINEAR enlarging."""
    shrinking = img.shape[0] * img.shape[1] > size[0] * size[1]
    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def plain(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The evaluation view: the whole photo stretched to ``size`` (the bundle's "stretch" resize)."""
    return resize(img, size)


def to_input(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB uint8 HWC images -> normalised float32 NCHW: ``(pixel / 255 - mean) / std``."""
    batch = np.stack(images).astype(np.float32) / 255.0
    batch = (batch - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
