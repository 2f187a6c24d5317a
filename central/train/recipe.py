"""Training recipes: ``cached`` (CPU: frozen early blocks cached once, later blocks and head
fine-tuned) and ``full`` (GPU: every layer fine-tuned, mixed precision). ``auto`` picks
``full`` when CUDA is available, else ``cached``.

Runs are seeded (each epoch reseeds from ``seed + epoch``, so a resumed run draws what the
uninterrupted run would have drawn) and checkpointed after every epoch to ``workdir``:
``checkpoint.pt`` (the latest, used to resume) and ``best.pt`` (the best val top-1 so far).
A run stopped at any point therefore leaves a usable model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .cache import cache_key, feature_cache
from .data import Augment, Sample, Taxonomy, augment, load_image, plain, to_input
from .lite0 import LiteNet, lite0, tiny
from .metrics import make_top1, top1
from .progress import Progress
from .weights import LITE0_SHA256, pretrained_lite0

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TrainConfig", "TrainResult", "build_model", "train"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result (``workdir`` and ``threads`` excepted)."""

    backbone: Literal["lite0", "tiny"] = "lite0"
    weights: str = ""
    recipe: Literal["auto", "cached", "full"] = "auto"
    size: int = 224
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    head_lr_mult: float = 5.0
    weight_decay: float = 0.02
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    freeze_blocks: int = -1
    cache_views: int = 4
    seed: int = 0
    dropout: float = 0.3
    drop_path: float = 0.1
    augment: Augment = field(default_factory=Augment)

    def resolved_recipe(self) -> Literal["cached", "full"]:
        if self.recipe == "auto":
            return "full" if torch.cuda.is_available() else "cached"
        return self.recipe

    def resolved_freeze(self, model: LiteNet) -> int:
        if self.freeze_blocks >= 0:
            return min(self.freeze_blocks, model.num_blocks)
        return 11 if self.backbone == "lite0" else 2


@dataclass
class TrainResult:
    model: LiteNet
    val_logits: np.ndarray
    val_targets: np.ndarray
    history: list[dict[str, float]]
    wall_s: float


def build_model(cfg: TrainConfig, num_classes: int) -> LiteNet:
    if cfg.backbone == "tiny":
        return tiny(num_classes, dropout=cfg.dropout, drop_path=cfg.drop_path)
    path = Path(cfg.weights) if cfg.weights else None
    return pretrained_lite0(num_classes, dropout=cfg.dropout, drop_path=cfg.drop_path, path=path)


def _targets(samples: Sequence[Sample], tax: Taxonomy) -> np.ndarray:
    return np.asarray([tax.class_of(s) for s in samples], dtype=np.int64)


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> Any:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def _optimizer(cfg: TrainConfig, model: LiteNet, first_block: int) -> torch.optim.Optimizer:
    head = list(model._fc.parameters())
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("_fc.")]
    del first_block
    return torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * cfg.head_lr_mult}],
        weight_decay=cfg.weight_decay,
    )


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _config_doc(cfg: TrainConfig, tax: Taxonomy) -> dict[str, Any]:
    return {"config": asdict(cfg), "classes": [list(c) for c in tax.classes]}


class _Run:
    """The state shared by both recipes: model, optimiser, schedule, checkpoints, evaluation."""

    def __init__(
        self, cfg: TrainConfig, tax: Taxonomy, workdir: Path, progress: Progress, steps: int, first_trainable: int
    ) -> None:
        self.cfg, self.tax, self.workdir, self.progress = cfg, tax, workdir, progress
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, len(tax))
        for n, p in self.model.named_parameters():
            p.requires_grad = not _frozen(n, first_trainable)
        self.first_trainable = first_trainable
        self.opt = _optimizer(cfg, self.model, first_trainable)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg, steps))
        self.history: list[dict[str, float]] = []
        self.start_epoch = 0
        self.best = -1.0
        self.doc = _config_doc(cfg, tax)

    def resume(self) -> None:
        path = self.workdir / "checkpoint.pt"
        if not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("doc") != self.doc:
            raise RuntimeError(
                f"{path} was written by a run with another configuration or taxonomy; "
                "fix: use a new --workdir, or the same options as that run"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.history, self.start_epoch, self.best = state["history"], state["epoch"], state["best"]
        self.progress.first_epoch = self.start_epoch
        self.progress.note(f"resumed from {path} after epoch {self.start_epoch}")

    def checkpoint(self, epoch: int, top: float) -> None:
        state = {
            "doc": self.doc,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "history": self.history,
            "epoch": epoch + 1,
            "best": max(self.best, top),
        }
        if top > self.best:
            self.best = top
            _save(
                self.workdir / "best.pt",
                {"doc": self.doc, "model": self.model.state_dict(), "epoch": epoch + 1, "val_top1": top},
            )
        _save(self.workdir / "checkpoint.pt", state)
        (self.workdir / "history.json").write_text(json.dumps(self.history, indent=1))

    def train_mode(self) -> None:
        self.model.train()
        if self.first_trainable > 0:  # frozen blocks keep their ImageNet batch-norm statistics
            self.model._bn0.eval()
            for block in self.model._blocks[: self.first_trainable]:
                block.eval()

    def step(self, loss: torch.Tensor, scaler: Any = None) -> None:
        self.opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            self.opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(self.opt)
            scaler.update()
        self.sched.step()

    def end_epoch(self, epoch: int, losses: list[float], logits: np.ndarray, targets: np.ndarray) -> None:
        t1, m1 = top1(logits, targets), make_top1(logits, targets, self.tax.makes())
        loss = float(np.mean(losses)) if losses else 0.0
        self.history.append(
            {"epoch": epoch + 1, "loss": loss, "val_top1": t1, "val_make_top1": m1, "time": time.time()}
        )
        self.progress.epoch(epoch, loss, t1, m1)
        self.checkpoint(epoch, t1)


def _frozen(name: str, first_trainable: int) -> bool:
    if name.startswith(("_conv_stem.", "_bn0.")):
        return first_trainable > 0
    if name.startswith("_blocks."):
        return int(name.split(".")[1]) < first_trainable
    return False


def _batches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i : i + size] for i in range(0, n, size)]


def _predict_cached(model: LiteNet, feats: np.ndarray, start: int, batch: int) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(feats), batch):
            x = torch.from_numpy(feats[i : i + batch].astype(np.float32))
            out.append(model.forward_from(x, start).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model._fc.bias)), np.float32)


def _train_cached(
    cfg: TrainConfig,
    train_s: Sequence[Sample],
    val_s: Sequence[Sample],
    tax: Taxonomy,
    workdir: Path,
    progress: Progress,
    stop: int,
) -> tuple[_Run, np.ndarray]:
    size = (cfg.size, cfg.size)
    steps = math.ceil(len(train_s) / cfg.batch_size)
    freeze = cfg.resolved_freeze(tiny(2) if cfg.backbone == "tiny" else lite0(2))
    run = _Run(cfg, tax, workdir, progress, steps, freeze)
    run.resume()
    weights = cfg.weights or (LITE0_SHA256 if cfg.backbone == "lite0" else "random")
    common = {
        "size": size,
        "freeze": freeze,
        "weights": weights,
        "seed": cfg.seed,
        "aug": asdict(cfg.augment),
        "backbone": cfg.backbone,
    }
    frozen_model = run.model  # its blocks below ``freeze`` never change (no gradient, batch norm in eval)
    kw: dict[str, Any] = {
        "size": size,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "seed": cfg.seed,
        "aug": cfg.augment,
        "report": progress.note,
    }
    tr = feature_cache(
        frozen_model,
        freeze,
        train_s,
        workdir / "cache-train",
        views=cfg.cache_views,
        key=cache_key(train_s, views=cfg.cache_views, **common),
        **kw,
    )
    va = feature_cache(
        frozen_model, freeze, val_s, workdir / "cache-val", views=1, key=cache_key(val_s, views=1, **common), **kw
    )[:, 0]
    y_tr, y_va = torch.from_numpy(_targets(train_s, tax)), _targets(val_s, tax)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    progress.start_epochs()
    for epoch in range(run.start_epoch, stop):
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1000 + epoch)
        run.train_mode()
        losses: list[float] = []
        batches = _batches(len(train_s), cfg.batch_size, rng)
        view = rng.integers(0, cfg.cache_views, len(train_s))
        for b, idx in enumerate(batches):
            x = torch.from_numpy(tr[idx, view[idx]].astype(np.float32))
            loss = loss_fn(run.model.forward_from(x, freeze), y_tr[idx])
            run.step(loss)
            losses.append(loss.item())
            progress.batch(epoch, b + 1, len(batches), float(np.mean(losses[-20:])))
        run.end_epoch(epoch, losses, _predict_cached(run.model, va, freeze, 128), y_va)
    return run, _predict_cached(run.model, va, freeze, 128)


class _Photos(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __init__(
        self, samples: Sequence[Sample], targets: np.ndarray, size: int, aug: Augment | None, seed: int
    ) -> None:
        self.samples, self.targets, self.size, self.aug, self.seed = samples, targets, (size, size), aug, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = load_image(self.samples[i])
        if self.aug is None:
            view = plain(img, self.size)
        else:
            view = augment(img, self.size, np.random.default_rng([self.seed, self.epoch, i]), self.aug)
        return torch.from_numpy(to_input([view], IMAGENET_MEAN, IMAGENET_STD)[0]), int(self.targets[i])


def _predict_photos(model: LiteNet, data: _Photos, batch: int, device: torch.device, workers: int) -> np.ndarray:
    model.eval()
    out = []
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, num_workers=workers)
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for x, _ in loader:
            out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model._fc.bias)), np.float32)


def _train_full(
    cfg: TrainConfig,
    train_s: Sequence[Sample],
    val_s: Sequence[Sample],
    tax: Taxonomy,
    workdir: Path,
    progress: Progress,
    workers: int,
    stop: int,
) -> tuple[_Run, np.ndarray]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = math.ceil(len(train_s) / cfg.batch_size)
    run = _Run(cfg, tax, workdir, progress, steps, 0)
    run.model.to(device)  # before resume, so the optimiser state loads onto the parameters' device
    run.resume()
    y_va = _targets(val_s, tax)
    train_data = _Photos(train_s, _targets(train_s, tax), cfg.size, cfg.augment, cfg.seed)
    val_data = _Photos(val_s, y_va, cfg.size, None, cfg.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    progress.start_epochs()
    for epoch in range(run.start_epoch, stop):
        torch.manual_seed(cfg.seed * 1000 + epoch)
        train_data.epoch = epoch
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(
            train_data,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=workers,
            drop_last=len(train_s) > cfg.batch_size,
        )
        run.train_mode()
        losses: list[float] = []
        for b, (x, y) in enumerate(loader):
            with torch.autocast(device.type, enabled=scaler is not None):
                loss = loss_fn(run.model(x.to(device)), y.to(device))
            run.step(loss, scaler)
            losses.append(loss.item())
            progress.batch(epoch, b + 1, len(loader), float(np.mean(losses[-20:])))
        run.end_epoch(epoch, losses, _predict_photos(run.model, val_data, 64, device, workers), y_va)
    logits = _predict_photos(run.model, val_data, 64, device, workers)
    run.model.cpu()
    return run, logits


def train(
    samples: Sequence[Sample],
    tax: Taxonomy,
    cfg: TrainConfig,
    workdir: Path,
    progress: Progress | None = None,
    workers: int = 0,
    stop_after: int | None = None,
) -> TrainResult:
    """Train on the ``train`` samples, report on ``val``; checkpoints and caches go in ``workdir``.

    ``stop_after`` ends this call after that many epochs in all (the schedule stays the one of
    ``cfg.epochs``); a later call with the same ``workdir`` resumes from the checkpoint.
    """
    stop = cfg.epochs if stop_after is None else max(0, min(cfg.epochs, stop_after))
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress(cfg.epochs)
    train_s = [s for s in samples if s.split == "train" and tax.class_of(s) is not None]
    val_s = [s for s in samples if s.split == "val" and tax.class_of(s) is not None]
    recipe = cfg.resolved_recipe()
    progress.note(
        f"recipe {recipe}: {len(train_s)} train / {len(val_s)} val photos, {len(tax)} classes, "
        f"backbone {cfg.backbone}, {cfg.epochs} epoch(s)"
    )
    if recipe == "cached":
        run, logits = _train_cached(cfg, train_s, val_s, tax, workdir, progress, stop)
    else:
        run, logits = _train_full(cfg, train_s, val_s, tax, workdir, progress, workers, stop)
    run.model.eval()
    return TrainResult(run.model, logits, _targets(val_s, tax), run.history, time.monotonic() - t0)
