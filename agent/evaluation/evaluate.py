"""Evaluate a classifier bundle on a labelled dataset: the figures that decide its thresholds.

* :func:`load_dataset` reads a CSV (``image,make,model`` [+ ``x,y,w,h``], paths relative to the
  CSV) or a ``<make>/<model>/*.jpg`` folder; a bad row raises :class:`DatasetError` naming it.
* :func:`run_inference` prepares each image as the daemon does (iaflash.agent.capture.intake's reduced decode, crop
  margin, quality gate, the bundle's preprocessing) and runs batches through a backend.
  Samples whose label is outside the bundle's taxonomy are kept aside as *unsupported*.
* :func:`accuracy` and :func:`operating_curve` compute the figures; :func:`evaluate` assembles
  the stable JSON document that ``iaflash-agent evaluate --json`` prints and the HTML report shows.

The clone simulation and the operating curve are :mod:`iaflash.agent.evaluation.simulate`'s (its public names are
re-exported here).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from iaflash.agent.capture.intake import CROP_MARGIN, choose_reduction, scale_box
from iaflash.agent.capture.preprocess import crop, decode_jpeg, inspect_jpeg, preprocess
from iaflash.agent.capture.quality import quality_problem
from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy, norm_make
from iaflash.agent.decision.verdict import softmax, thresholds_of
from iaflash.agent.errors import CaptureRejected, DatasetError
from iaflash.agent.evaluation.calibrate import ECE_BINS, calibration_summary, reliability
from iaflash.agent.evaluation.simulate import (
    THRESHOLD_GRID,
    CurvePoint,
    Pair,
    Progress,
    flag_rates,
    operating_curve,
    outcome_rates,
    pair_outcomes,
    recommend,
    simulate_pairs,
    sweep_config,
)
from iaflash.engines.bundle import Bundle
from iaflash.engines.factory import create_backend

__all__ = [
    "IMAGE_SUFFIXES",
    "THRESHOLD_GRID",
    "CurvePoint",
    "DatasetError",
    "Inference",
    "Pair",
    "Sample",
    "accuracy",
    "evaluate",
    "flag_rates",
    "load_dataset",
    "operating_curve",
    "outcome_rates",
    "pair_outcomes",
    "recommend",
    "require_supported",
    "run_inference",
    "simulate_pairs",
    "sweep_config",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg"})
SCHEMA = "iaflash.evaluation/1"


@dataclass(frozen=True)
class Sample:
    """One labelled image; ``where`` says where it was listed (``data.csv:7`` or its path)."""

    image: Path
    make: str
    model: str
    box: tuple[int, int, int, int] | None
    where: str


# ---------------------------------------------------------------- dataset

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


def _csv_sample(row: dict[str, str], base: Path, where: str) -> Sample:
    image, make, model = ((row.get(k) or "").strip() for k in ("image", "make", "model"))
    if not image or not make or not model:
        raise DatasetError(f"{where}: image, make and model must all be filled")
    path = base / image
    if not path.is_file():
        raise DatasetError(f"{where}: image {image!r} not found at {path}; fix: paths are relative to the CSV")
    return Sample(path, make, model, _csv_box(row, where), where)


def _load_csv(path: Path) -> list[Sample]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    columns = {c.strip() for c in reader.fieldnames or ()}
    missing = [c for c in ("image", "make", "model") if c not in columns]
    if missing:
        raise DatasetError(f"{path}:1: missing column(s) {', '.join(missing)}; fix: header image,make,model[,x,y,w,h]")
    partial = [c for c in _BOX if c in columns]
    if partial and len(partial) != 4:
        raise DatasetError(f"{path}:1: box columns must be all of x,y,w,h or none, got {', '.join(partial)}")
    rows = ({(k or "").strip(): v for k, v in row.items()} for row in reader)
    return [_csv_sample(row, path.parent, f"{path}:{reader.line_num}") for row in rows]


def _load_folder(root: Path) -> list[Sample]:
    samples = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        parts = image.relative_to(root).parts
        if len(parts) != 3:
            raise DatasetError(f"{image}: not at <make>/<model>/<image>.jpg under {root}; fix: move it or remove it")
        samples.append(Sample(image, parts[0], parts[1], None, str(image)))
    return samples


def load_dataset(path: Path) -> list[Sample]:
    """The samples of a dataset CSV or ``<make>/<model>/*.jpg`` folder, in listing order."""
    path = Path(path)
    if path.is_dir():
        samples = _load_folder(path)
    elif path.is_file():
        samples = _load_csv(path)
    else:
        raise DatasetError(f"{path}: no such file or directory; fix: give a dataset CSV or folder")
    if not samples:
        raise DatasetError(f"{path}: holds no labelled image; fix: add rows or <make>/<model>/*.jpg files")
    return samples


# ---------------------------------------------------------------- inference


@dataclass(frozen=True)
class Inference:
    """Raw logits ``[N, C]`` (``log p`` for probability outputs) of the supported samples."""

    samples: tuple[Sample, ...]
    logits: np.ndarray
    labels: np.ndarray
    image_problems: tuple[str | None, ...]
    unsupported: tuple[Sample, ...]


def load_input(sample: Sample, bundle: Bundle) -> tuple[np.ndarray, str | None]:
    """The ``[3, H, W]`` model input of a sample, prepared as the daemon does, and its quality problem."""
    pp = bundle.manifest.preprocessing
    try:
        data = sample.image.read_bytes()
        width, height = inspect_jpeg(data, max_pixels=1 << 40, min_side=1)
        factor = choose_reduction(width, height, sample.box, max(pp.height, pp.width))
        image = decode_jpeg(data, reduce=factor)
        region = image
        if sample.box is not None:
            box = scale_box(sample.box, image.shape[1] / width, image.shape[0] / height)
            region = crop(image, box, margin=CROP_MARGIN)
    except OSError as exc:
        raise DatasetError(f"{sample.where}: cannot read {sample.image} ({exc.strerror})") from exc
    except CaptureRejected as exc:
        raise DatasetError(f"{sample.where}: {sample.image}: {exc}") from exc
    return preprocess(region, pp)[0], quality_problem(region)


def _chunks(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_inference(
    bundle: Bundle,
    samples: Sequence[Sample],
    *,
    backend_kind: str = "onnxruntime",
    batch_size: int = 16,
    threads: int = 0,
    progress: Progress | None = None,
) -> Inference:
    """Classify every sample whose label the bundle's taxonomy knows; see :class:`Inference`."""
    taxonomy = Taxonomy(bundle.labels)
    indices = [taxonomy.resolve(s.make, s.model) for s in samples]
    kept = [s for s, i in zip(samples, indices, strict=True) if i is not None]
    outputs: list[np.ndarray] = []
    problems: list[str | None] = []
    with create_backend(backend_kind, threads=threads) as backend:
        backend.load(bundle)
        size = batch_size if backend.input_spec.batch_dynamic else int(backend.input_spec.shape[0] or 1)
        for chunk in _chunks(kept, size):
            inputs = [load_input(s, bundle) for s in chunk]
            problems.extend(p for _, p in inputs)
            outputs.append(np.asarray(backend.infer(np.stack([t for t, _ in inputs])), dtype=np.float64))
            if progress is not None:
                progress(len(problems), len(kept))
    logits = np.concatenate(outputs) if outputs else np.zeros((0, len(bundle.labels)))
    if logits.shape[1:] != (len(bundle.labels),):
        raise DatasetError(
            f"{bundle.path}: model outputs {list(logits.shape[1:])} scores per image, "
            f"labels.csv has {len(bundle.labels)} classes; fix: re-pack the bundle"
        )
    if bundle.manifest.output_kind == "probabilities":
        logits = np.log(np.clip(logits, 1e-12, 1.0))
    return Inference(
        samples=tuple(kept),
        logits=logits,
        labels=np.array([i for i in indices if i is not None], dtype=np.int64),
        image_problems=tuple(problems),
        unsupported=tuple(s for s, i in zip(samples, indices, strict=True) if i is None),
    )


# ---------------------------------------------------------------- figures


def accuracy(scores: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, k: int = 5) -> dict[str, float]:
    """Top-1, top-k and make accuracy (make of the top-1 label = true make) of scores ``[N, C]``."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0]
    makes = np.array([norm_make(lb.make) for lb in taxonomy.labels])
    return {
        "top1": float((top1 == labels).mean()),
        f"top{k}": float((order[:, :k] == labels[:, None]).any(axis=1).mean()),
        "make": float((makes[top1] == makes[labels]).mean()),
    }


def require_supported(inference: Inference, dataset: Path | None = None) -> None:
    """Refuse an inference in which no sample has a label of the bundle's taxonomy."""
    if not inference.samples:
        where = f"{dataset}: " if dataset is not None else ""
        raise DatasetError(
            f"{where}none of the {len(inference.unsupported)} samples has a label in the bundle's "
            "taxonomy; fix: check the make/model spellings against the bundle's labels.csv"
        )


def as_probs(inference: Inference, temperature: float) -> np.ndarray:
    """The calibrated probabilities the daemon would compute."""
    out: np.ndarray = softmax(inference.logits, temperature)
    return out


def supported_summary(inference: Inference) -> dict[str, Any]:
    """How many samples were evaluated, set aside as unsupported (by label), or had a poor image."""
    unsupported = Counter(f"{s.make} {s.model}" for s in inference.unsupported)
    return {
        "samples": len(inference.samples) + len(inference.unsupported),
        "evaluated": len(inference.samples),
        "unsupported": len(inference.unsupported),
        "unsupported_labels": dict(sorted(unsupported.items())),
        "poor_image": sum(p is not None for p in inference.image_problems),
    }


def _recommendation(
    best: CurvePoint | None, curve: Sequence[CurvePoint], target: float, cfg: DecisionConfig, genuine: int
) -> dict[str, Any]:
    if best is None:
        low = min(curve, key=lambda p: (p.false_flag_rate, -p.detection_rate))
        sentence = (
            f"No recommended operating point: no threshold in the sweep keeps the genuine false-flag "
            f"rate at or below the target {target:.2%}; the lowest reached is {low.false_flag_rate:.2%} "
            f"at threshold {low.threshold:g}."
        )
    else:
        sentence = (
            f"Recommended operating point: make_threshold = model_threshold = {best.threshold:g} "
            f"(min_top1 {cfg.min_top1:g} kept) detects {best.detection_rate:.1%} of simulated clones "
            f"at a genuine false-flag rate of {best.false_flag_rate:.2%} (target ≤ {target:.2%})."
        )
    notes = []
    if genuine < 3 / target:
        notes.append(
            f"With {genuine} genuine pairs, a false-flag rate of 0 only shows the true rate is below "
            f"{3 / genuine:.2%} (95%, rule of three); showing ≤ {target:.2%} needs at least "
            f"{math.ceil(3 / target)} genuine images."
        )
    return {
        "target_false_flag_rate": target,
        "met": best is not None,
        "threshold": None if best is None else best.threshold,
        "false_flag_rate": None if best is None else best.false_flag_rate,
        "detection_rate": None if best is None else best.detection_rate,
        "sentence": sentence,
        "notes": notes,
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def evaluate(
    bundle: Bundle,
    inference: Inference,
    cfg: DecisionConfig,
    *,
    target: float = 0.001,
    clones_per_image: int = 5,
    seed: int = 0,
    thresholds: Sequence[float] = THRESHOLD_GRID,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The evaluation document (schema ``iaflash.evaluation/1``): every figure of the report."""
    require_supported(inference)
    taxonomy, temperature = Taxonomy(bundle.labels), bundle.manifest.temperature
    probs = as_probs(inference, temperature)
    pairs = simulate_pairs(inference.labels, taxonomy, clones_per_image, seed)
    curve = operating_curve(probs, pairs, inference.image_problems, taxonomy, cfg, thresholds, progress)
    configured = pair_outcomes(probs, pairs, inference.image_problems, taxonomy, cfg)
    ffr, detection = flag_rates(configured, pairs)
    genuine = sum(not p.clone for p in pairs)
    return cast(
        dict[str, Any],
        _rounded(
            {
                "schema": SCHEMA,
                "bundle": {
                    "name": bundle.manifest.name,
                    "version": bundle.manifest.version,
                    "temperature": temperature,
                    "classes": len(bundle.labels),
                },
                "dataset": supported_summary(inference),
                "accuracy": accuracy(probs, inference.labels, taxonomy),
                "calibration": {
                    "bins": ECE_BINS,
                    **calibration_summary(inference.logits, inference.labels, temperature),
                    "reliability": [dict(vars(b)) for b in reliability(probs, inference.labels)],
                },
                "simulation": {
                    "clones_per_image": clones_per_image,
                    "seed": seed,
                    "genuine_pairs": genuine,
                    "clone_pairs": len(pairs) - genuine,
                },
                "operating_curve": [dict(vars(p)) for p in curve],
                "configured": {
                    "thresholds": thresholds_of(cfg),
                    "false_flag_rate": ffr,
                    "detection_rate": detection,
                    "outcomes": outcome_rates(configured, pairs),
                },
                "recommended": _recommendation(recommend(curve, target), curve, target, cfg, genuine),
            }
        ),
    )
