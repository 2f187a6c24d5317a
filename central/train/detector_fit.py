"""The localiser's CPU recipe: the head trains on the frozen trunk's cached features; export and its check.

AdamW with a warm-up and a cosine schedule; each epoch reseeds from ``(seed, epoch)`` (the batch
order and each frame's view), so a resumed run draws what an uninterrupted run would have drawn.
``checkpoint.pt`` and ``history.json`` are written after every epoch; a work folder written with
other options or other frames is refused, not mixed. The exported model is the last epoch's
(no epoch is picked on the held-out frames, so their figures stay unbiased).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iaflash.central.errors import ExportError

from .detector_cache import INPUT_NAME, OUTPUT_NAME, FitConfig, ort_session
from .detector_model import HEAD_VERSION, Head, Localiser, Trunk, box_iou, decode, losses, points
from .progress import fmt_duration

__all__ = ["Fitted", "check_export", "export_localiser", "fit_head"]

Boxes = list[list[list[list[float]]]]
"""Per frame, per view: the vehicle boxes ``[x1, y1, x2, y2]`` in input pixels."""


@dataclass
class Fitted:
    model: Localiser
    history: list[dict[str, float]]
    wall_s: float


def _gts(boxes: Boxes, idx: np.ndarray, views: np.ndarray) -> list[torch.Tensor]:
    return [torch.tensor(boxes[i][v], dtype=torch.float32).reshape(-1, 4) for i, v in zip(idx, views, strict=True)]


def _batch(feats: Sequence[np.ndarray], idx: np.ndarray, views: np.ndarray) -> list[torch.Tensor]:
    order = np.argsort(idx)  # memory maps read faster in order
    sorted_idx, sorted_views = idx[order], views[order]
    back = np.argsort(order)
    return [torch.from_numpy(f[sorted_idx, sorted_views].astype(np.float32)[back]) for f in feats]


def _schedule(cfg: FitConfig, steps: int) -> Callable[[int], float]:
    total, warm = max(1, cfg.epochs * steps), max(1, int(cfg.warmup_epochs * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def top_boxes(head: Head, feats: Sequence[np.ndarray], pts: torch.Tensor, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The best-scored box ``[F, 4]`` (input pixels) and its score ``[F]`` for every frame's first view."""
    head.eval()
    out_b, out_s = [], []
    with torch.no_grad():
        for start in range(0, len(feats[0]), 64):
            idx = np.arange(start, min(len(feats[0]), start + 64))
            logits, dist = head(_batch(feats, idx, np.zeros_like(idx)))
            best = logits.argmax(1)
            boxes = decode(dist, pts, stride)[torch.arange(len(idx)), best]
            out_b.append(boxes.numpy())
            out_s.append(torch.sigmoid(logits.max(1).values).numpy())
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0)
    return np.concatenate(out_b), np.concatenate(out_s)


def monitor(
    head: Head, feats: Sequence[np.ndarray], boxes: Boxes, pts: torch.Tensor, stride: int, threshold: float
) -> dict[str, float]:
    """Quick held-out figures of the head alone (best box per frame): median IoU, empty frames with a score."""
    if not len(feats[0]):
        return {}
    best, score = top_boxes(head, feats, pts, stride)
    ious, empty_hits, empty = [], 0, 0
    for i, b in enumerate(best):
        gt = torch.tensor(boxes[i][0], dtype=torch.float32).reshape(-1, 4)
        if len(gt) == 0:
            empty += 1
            empty_hits += int(score[i] >= threshold)
            continue
        ious.append(float(box_iou(torch.from_numpy(b).float()[None], gt).max()))
    doc = {"val_median_iou": float(np.median(ious)) if ious else 0.0}
    if empty:
        doc["val_empty_scored"] = empty_hits / empty
    return doc


class _Checkpoints:
    def __init__(self, workdir: Path, doc: dict[str, Any]) -> None:
        self.path, self.doc = workdir / "checkpoint.pt", doc
        self.history_path = workdir / "history.json"

    def load(self, head: Head, opt: torch.optim.Optimizer, sched: Any) -> tuple[int, list[dict[str, float]]]:
        if not self.path.is_file():
            return 0, []
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("doc") != self.doc:
            raise RuntimeError(
                f"{self.path} was written by a run with other options or other frames; "
                "fix: use a new --workdir, or the same options and labels as that run"
            )
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        return int(state["epoch"]), list(state["history"])

    def save(
        self, head: Head, opt: torch.optim.Optimizer, sched: Any, epoch: int, history: list[dict[str, float]]
    ) -> None:
        state = {
            "doc": self.doc,
            "head": head.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch,
            "history": history,
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.history_path.write_text(json.dumps(history, indent=1))


def fit_head(
    trunk: Trunk,
    channels: Sequence[int],
    strides: Sequence[int],
    train: tuple[Sequence[np.ndarray], Boxes],
    val: tuple[Sequence[np.ndarray], Boxes],
    cfg: FitConfig,
    workdir: Path,
    *,
    data_key: str,
    threshold: float,
    report: Callable[[str], None],
    stop_after: int | None = None,
) -> Fitted:
    """Train the head on cached features; returns trunk + head as one exportable :class:`Localiser`."""
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    stride = strides[1]  # the head's points are the middle tap's cells
    pts = points(cfg.size, stride)
    torch.manual_seed(cfg.seed)
    head = Head(channels, cfg.width, prior_distance=cfg.size * 0.2 / stride)
    feats, boxes = train
    n, views = len(feats[0]), feats[0].shape[1]
    steps = max(1, math.ceil(n / cfg.batch_size))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps))
    ckpt = _Checkpoints(workdir, {"config": asdict(cfg), "data": data_key, "head": HEAD_VERSION})
    start, history = ckpt.load(head, opt, sched)
    if start:
        report(f"resumed from {ckpt.path} after epoch {start}")
    stop = cfg.epochs if stop_after is None else max(0, min(cfg.epochs, stop_after))
    epochs_t0 = time.monotonic()
    for epoch in range(start, stop):
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1000 + epoch)
        head.train()
        order, view = rng.permutation(n), rng.integers(0, views, n)
        sums: dict[str, float] = {}
        for b in range(steps):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            logits, dist = head(_batch(feats, idx, view[idx]))
            loss, parts = losses(logits, dist, _gts(boxes, idx, view[idx]), pts, stride)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v / steps
        row = {"epoch": float(epoch + 1), **sums, **monitor(head, val[0], val[1], pts, stride, threshold)}
        history.append({**row, "time": time.time()})
        ckpt.save(head, opt, sched, epoch + 1, history)
        per_epoch = (time.monotonic() - epochs_t0) / (epoch + 1 - start)
        shown = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
        report(f"epoch {epoch + 1}/{cfg.epochs} {shown} ETA {fmt_duration(per_epoch * (cfg.epochs - epoch - 1))}")
    model = Localiser(trunk, head.eval(), cfg.size, stride).eval()
    return Fitted(model, history, time.monotonic() - t0)


def export_localiser(model: Localiser, path: Path) -> Path:
    """One opset-17 ONNX file, input ``[N, 3, S, S]``, output ``[N, 5, P]`` (the yolo contract)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # dynamo=False on purpose (one opset-17 file); its deprecation warning is known
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 3, model.size, model.size),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
        )
    return path


def check_export(model: Localiser, path: Path, example: np.ndarray, atol: float = 1e-4) -> float:
    """The largest |ONNX Runtime - PyTorch| on ``example`` (normalised corners, scores); ExportError above atol."""
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(example)).numpy()
    got = ort_session(path, 2).run([OUTPUT_NAME], {INPUT_NAME: example})[0]
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= atol:
        raise ExportError(
            f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} (> {atol:.0e}); "
            "fix: report it with the torch and onnxruntime versions"
        )
    return diff
