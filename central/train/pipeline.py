"""From a label file to trained artefacts: taxonomy, training, ONNX export and its check, figures.

:func:`fit` writes into ``out``: ``model.onnx``, ``labels.csv`` (index, make, model, aliases),
``val_logits.npz`` (val logits and targets, for calibration) and ``report.json``. Checkpoints
and feature caches go in ``workdir`` (resumable). Bundling and signing sit above this module.
"""

from __future__ import annotations

import csv
import io
import json
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .data import Sample, Taxonomy, build_taxonomy, load_image, plain, read_folder, read_labels, to_input
from .export import check_export, export_onnx
from .lite0 import LiteNet
from .metrics import ece, make_top1, top1
from .progress import Progress
from .recipe import IMAGENET_MEAN, IMAGENET_STD, TrainConfig, TrainResult, train

__all__ = ["fit", "grey_figures", "greyscale", "labels_table", "read_samples"]


def read_samples(source: Path, root: Path | None = None, drop_duplicates: bool = False) -> list[Sample]:
    """A label CSV (``.csv``) or a ``ROOT/<MAKE>/<MODEL>/*.jpg`` folder."""
    if source.suffix.lower() == ".csv":
        return read_labels(source, root, drop_duplicates)
    return read_folder(source, drop_duplicates=drop_duplicates)


def labels_table(tax: Taxonomy) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "make", "model", "aliases"])
    for i, (make, model) in enumerate(tax.classes):
        w.writerow([i, make, model, ""])
    return buf.getvalue()


def figures(result: TrainResult, tax: Taxonomy) -> dict[str, float]:
    lg, y = result.val_logits, result.val_targets
    return {
        "val_top1": top1(lg, y),
        "val_make_top1": make_top1(lg, y, tax.makes()),
        "val_ece": ece(lg, y),
        "val_photos": float(len(y)),
    }


def greyscale(img: np.ndarray) -> np.ndarray:
    """An RGB photo as an infrared-like frame: one luminance channel repeated (what the daemon feeds)."""
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return np.repeat(grey[:, :, None], 3, axis=2)


def grey_figures(model: LiteNet, samples: Sequence[Sample], tax: Taxonomy, size: int) -> dict[str, float]:
    """Top-1 and make top-1 of the val photos turned greyscale: the evidence for ``--accept-grey``."""
    val = [s for s in samples if s.split == "val" and tax.class_of(s) is not None]
    if not val:
        return {}
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(val), 64):
            views = [plain(greyscale(load_image(s)), (size, size)) for s in val[start : start + 64]]
            out.append(model(torch.from_numpy(to_input(views, IMAGENET_MEAN, IMAGENET_STD))).numpy())
    logits = np.concatenate(out)
    y = np.asarray([tax.class_of(s) for s in val], dtype=np.int64)
    return {"val_grey_top1": top1(logits, y), "val_grey_make_top1": make_top1(logits, y, tax.makes())}


def fit(
    source: Path,
    out: Path,
    workdir: Path,
    cfg: TrainConfig,
    *,
    min_count: int = 5,
    fold_rare: bool = True,
    root: Path | None = None,
    progress: Progress | None = None,
    workers: int = 0,
    drop_duplicates: bool = False,
    stop_after: int | None = None,
) -> tuple[dict[str, Any], Taxonomy]:
    """Train and export; returns the report (also written to ``out/report.json``) and the taxonomy."""
    samples = read_samples(source, root, drop_duplicates)
    tax = build_taxonomy(samples, min_count, fold_rare)
    progress = progress or Progress(cfg.epochs)
    result = train(samples, tax, cfg, workdir, progress, workers, stop_after)
    out.mkdir(parents=True, exist_ok=True)
    grey = grey_figures(result.model, samples, tax, cfg.size)
    size = (cfg.size, cfg.size)
    onnx_path = export_onnx(result.model, out / "model.onnx", size)
    diff = check_export(result.model, onnx_path, size)
    (out / "labels.csv").write_text(labels_table(tax), encoding="utf-8")
    np.savez_compressed(out / "val_logits.npz", logits=result.val_logits, targets=result.val_targets)
    report = {
        "source": str(source),
        "classes": len(tax),
        "folded_into_other": [list(c) for c in tax.folded],
        "recipe": cfg.resolved_recipe(),
        "config": asdict(cfg),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "wall_s": result.wall_s,
        "history": result.history,
        "onnx_max_abs_diff": diff,
        "onnx_bytes": onnx_path.stat().st_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "finished_at": time.time(),
        **figures(result, tax),
        **grey,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    progress.note(
        f"wrote {onnx_path} (max |onnx - torch| {diff:.1e}), val top-1 {report['val_top1']:.4f}, "
        f"make top-1 {report['val_make_top1']:.4f}, ECE {report['val_ece']:.4f}"
        + (f", greyscale top-1 {grey['val_grey_top1']:.4f}" if grey else "")
    )
    return report, tax
