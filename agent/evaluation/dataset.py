"""Labelled datasets for ``evaluate`` and ``calibrate``: photos, or captures with their truth.

Three forms (docs/EVALUATION.md):

* **photos, CSV** — ``image,make,model`` [+ ``x,y,w,h``], paths relative to the CSV;
* **photos, folder** — ``<make>/<model>/*.jpg``;
* **captures** — a folder of radar captures as the daemon receives them (``<id>.json`` sidecars
  and their images) plus ``truth.csv``: ``capture,make,model,truth,registered_make,registered_model``
  where make/model is the vehicle actually photographed, ``truth`` is ``genuine``,
  ``clone_make`` or ``clone_model``, and the registered columns are the registry text of the
  plate (empty for a genuine capture: the vehicle's own make/model).

A bad row raises :class:`DatasetError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from iaflash.agent.capture.sidecar import Capture, parse_sidecar
from iaflash.agent.decision.taxonomy import norm_make
from iaflash.agent.errors import CaptureRejected, DatasetError

__all__ = ["IMAGE_SUFFIXES", "TRUTHS", "TRUTH_FILE", "DatasetError", "Sample", "dataset_digest", "load_dataset"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg"})
TRUTH_FILE = "truth.csv"
TRUTHS = {"genuine": "genuine", "clone_make": "make", "clone_model": "model"}
"""truth.csv spelling → pair kind."""


@dataclass(frozen=True)
class Sample:
    """One labelled item; ``where`` says where it was listed (``data.csv:7`` or its path).

    A photo has no ``capture``; a capture carries its parsed sidecar, its truth kind
    (``genuine``, ``make`` or ``model`` clone) and the registry text read for its plate.
    """

    image: Path
    make: str
    model: str
    box: tuple[int, int, int, int] | None
    where: str
    capture: Capture | None = None
    kind: str = "genuine"
    registered: tuple[str, str] | None = None


# ---------------------------------------------------------------- photos

_BOX = ("x", "y", "w", "h")


def _csv_box(row: dict[str, str], where: str) -> tuple[int, int, int, int] | None:
    values = [(row.get(k) or "").strip() for k in _BOX]
    if not any(values):
        return None
    try:
        x, y, w, h = (int(float(v)) for v in values)
    except ValueError as exc:
        raise DatasetError(f"{where}: box x,y,w,h = {values} must be four integers (or all empty)") from exc
    if w <= 0 or h <= 0:
        raise DatasetError(f"{where}: box width and height must be > 0, got w={w} h={h}")
    return x, y, w, h


def _read_csv(path: Path, required: tuple[str, ...], header_hint: str) -> tuple[list[dict[str, str]], list[str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    columns = {c.strip() for c in reader.fieldnames or ()}
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetError(f"{path}:1: missing column(s) {', '.join(missing)}; fix: header {header_hint}")
    rows, wheres = [], []
    for row in reader:
        rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
        wheres.append(f"{path}:{reader.line_num}")
    return rows, wheres


def _load_csv(path: Path) -> list[Sample]:
    rows, wheres = _read_csv(path, ("image", "make", "model"), "image,make,model[,x,y,w,h]")
    partial = [c for c in _BOX if rows and c in rows[0]]
    if partial and len(partial) != 4:
        raise DatasetError(f"{path}:1: box columns must be all of x,y,w,h or none, got {', '.join(partial)}")
    samples = []
    for row, where in zip(rows, wheres, strict=True):
        image, make, model = row.get("image", ""), row.get("make", ""), row.get("model", "")
        if not image or not make or not model:
            raise DatasetError(f"{where}: image, make and model must all be filled")
        file = path.parent / image
        if not file.is_file():
            raise DatasetError(f"{where}: image {image!r} not found at {file}; fix: paths are relative to the CSV")
        samples.append(Sample(file, make, model, _csv_box(row, where), where))
    return samples


def _load_folder(root: Path) -> list[Sample]:
    samples = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        parts = image.relative_to(root).parts
        if len(parts) != 3:
            raise DatasetError(f"{image}: not at <make>/<model>/<image>.jpg under {root}; fix: move it or remove it")
        samples.append(Sample(image, parts[0], parts[1], None, str(image)))
    return samples


# ---------------------------------------------------------------- captures


def _sidecar(root: Path, capture_id: str, where: str) -> tuple[Capture, Path]:
    path = root / f"{capture_id}.json"
    try:
        capture = parse_sidecar(path.read_bytes(), source=str(path))
    except OSError as exc:
        raise DatasetError(f"{where}: capture {capture_id!r}: cannot read {path} ({exc.strerror})") from exc
    except CaptureRejected as exc:
        raise DatasetError(f"{where}: capture {capture_id!r}: {exc}") from exc
    names = capture.images or (f"{capture_id}.jpg",)
    image = root / names[0]
    if not image.is_file():
        raise DatasetError(f"{where}: capture {capture_id!r}: image {names[0]!r} not found at {image}")
    return capture, image


def _capture_sample(row: dict[str, str], root: Path, where: str) -> Sample:
    capture_id, make, model, truth = (row.get(k, "") for k in ("capture", "make", "model", "truth"))
    if not capture_id or not make or not model:
        raise DatasetError(f"{where}: capture, make and model must all be filled")
    if truth not in TRUTHS:
        raise DatasetError(f"{where}: truth {truth!r} is not one of {', '.join(TRUTHS)}")
    kind = TRUTHS[truth]
    reg_make, reg_model = row.get("registered_make", ""), row.get("registered_model", "")
    if kind == "genuine" and not reg_make:
        reg_make, reg_model = make, model
    if not reg_make or not reg_model:
        raise DatasetError(f"{where}: a {truth} capture needs registered_make and registered_model")
    same_make = norm_make(reg_make) == norm_make(make)
    if kind == "make" and same_make:
        raise DatasetError(f"{where}: clone_make but the registered make {reg_make!r} is the vehicle's own")
    if kind == "model" and not same_make:
        raise DatasetError(f"{where}: clone_model but the registered make {reg_make!r} differs; fix: use clone_make")
    capture, image = _sidecar(root, capture_id, where)
    return Sample(image, make, model, capture.vehicle_box, where, capture, kind, (reg_make, reg_model))


def _load_captures(root: Path) -> list[Sample]:
    truth = root / TRUTH_FILE
    header = "capture,make,model,truth,registered_make,registered_model"
    rows, wheres = _read_csv(truth, ("capture", "make", "model", "truth"), header)
    return [_capture_sample(row, root, where) for row, where in zip(rows, wheres, strict=True)]


def load_dataset(path: Path) -> list[Sample]:
    """The samples of a dataset CSV, a ``<make>/<model>/*.jpg`` folder or a captures folder (truth.csv)."""
    path = Path(path)
    if path.is_dir():
        samples = _load_captures(path) if (path / TRUTH_FILE).is_file() else _load_folder(path)
    elif path.is_file():
        samples = _load_csv(path)
    else:
        raise DatasetError(f"{path}: no such file or directory; fix: give a dataset CSV or folder")
    if not samples:
        raise DatasetError(f"{path}: holds no labelled image; fix: add rows or <make>/<model>/*.jpg files")
    return samples


def dataset_digest(samples: list[Sample], image_digests: list[str]) -> str:
    """sha256 over each sample's label, truth, registered text and image sha256, in order."""
    h = hashlib.sha256()
    for s, digest in zip(samples, image_digests, strict=True):
        h.update(f"{s.make}\t{s.model}\t{s.kind}\t{s.registered}\t{s.box}\t{digest}\n".encode())
    return h.hexdigest()
