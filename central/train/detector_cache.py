"""The localiser's feature cache: the frozen trunk runs once per frame view (ONNX Runtime); see detector_fit.

* **Views.** Every frame is stretched to the input size (the bundle's ``stretch`` resize, area
  interpolation when shrinking, RGB, ImageNet mean/std: :mod:`iaflash.central.train.data`'s
  ``resize`` and ``to_input``). With ``cache_views`` > 1, view 1 is the mirror image and further
  views are mirrored or not (odd/even) with a random radar-like degradation (greyscale, low light,
  blur, JPEG); boxes follow the mirror. Synthetic frames are all different, so one view suffices.
* **Cache.** The trunk is exported to ``trunk.onnx`` in the work folder and run by ONNX Runtime
  (about 3x faster than eager PyTorch on a 2-core CPU); its three outputs go to float16 ``.npy``
  memory maps with a ``meta.json`` naming what they were computed from. A cache whose key differs
  is recomputed; an interrupted one resumes from its last finished chunk.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from iaflash.central.errors import DataError

from .data import resize, to_input
from .detector_data import Frame, check_boxes, load_bgr
from .detector_model import Trunk, trunk_taps
from .lite0 import LiteNet, tiny
from .recipe import IMAGENET_MEAN, IMAGENET_STD
from .weights import pretrained_lite0

__all__ = ["FitConfig", "build_trunk", "cache_features", "export_trunk", "frame_input", "ort_session"]

CHUNK = 32
INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides the trained head (``threads`` and the work folder excepted)."""

    backbone: Literal["lite0", "tiny"] = "lite0"
    weights: str = ""
    size: int = 320
    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    width: int = 64
    cache_views: int = 1
    seed: int = 0


def build_trunk(cfg: FitConfig) -> tuple[Trunk, tuple[int, ...], tuple[int, ...]]:
    """The frozen trunk (eval mode), its tapped channels and strides; the size must suit the strides."""
    backbone: LiteNet
    if cfg.backbone == "tiny":
        torch.manual_seed(cfg.seed)
        backbone = tiny(2)
    else:
        backbone = pretrained_lite0(2, path=Path(cfg.weights) if cfg.weights else None)
    taps, channels, strides = trunk_taps(backbone, cfg.size)
    if cfg.size % strides[-1]:
        raise DataError(
            f"--size {cfg.size} is not a multiple of {strides[-1]} (the trunk's deepest stride); fix: e.g. 320"
        )
    trunk = Trunk(backbone, taps).eval()
    for p in trunk.parameters():
        p.requires_grad = False
    return trunk, channels, strides


def _view(img: np.ndarray, boxes: np.ndarray, view: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """View ``view`` of a BGR frame and its boxes (module doc): 0 plain, 1 mirrored, 2+ degraded."""
    if view % 2 == 1:
        w = img.shape[1]
        img = img[:, ::-1]
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1) if len(boxes) else boxes
    if view >= 2:
        rng = np.random.default_rng([seed, index, view])
        out = img.astype(np.float32)
        if rng.random() < 0.4:
            out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.8, 2.0)))
        if rng.random() < 0.4:
            out = out * float(rng.uniform(0.2, 0.6)) + rng.normal(0, 5, out.shape).astype(np.float32)
        img = np.clip(out, 0, 255).astype(np.uint8)
        if rng.random() < 0.3:
            img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img), boxes


def frame_input(frame: Frame, view: int, size: int, seed: int, index: int) -> tuple[np.ndarray, list[list[float]]]:
    img = load_bgr(frame.path, frame.where)
    h, w = img.shape[:2]
    check_boxes(frame, (w, h))
    boxes = np.asarray(frame.boxes, dtype=np.float64).reshape(-1, 4)
    img, boxes = _view(img, boxes, view, seed, index)
    scale = np.array([size / w, size / h, size / w, size / h])
    rgb = resize(img[:, :, ::-1], (size, size))
    return rgb, (np.clip(boxes * scale, 0, size)).tolist()


def export_trunk(trunk: Trunk, path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"tap{i}" for i in range(len(trunk.taps))]
    with warnings.catch_warnings():  # dynamo=False on purpose (one opset-17 file); its deprecation warning is known
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            trunk.eval(),
            (torch.zeros(1, 3, size, size),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={INPUT_NAME: {0: "N"}, **{n: {0: "N"} for n in names}},
            opset_version=17,
            dynamo=False,
        )
    return path


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort  # noqa: PLC0415 -- the agent's runtime, used here to run the frozen trunk fast

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cache_features(
    frames: Sequence[Frame],
    trunk_onnx: Path,
    folder: Path,
    *,
    views: int,
    cfg: FitConfig,
    threads: int,
    report: Callable[[str], None],
    trunk_key: str,
) -> tuple[list[np.ndarray], list[list[list[list[float]]]]]:
    """The trunk's outputs for every (frame, view): one array ``[F, V, C, H, W]`` per tap, and the boxes.

    ``trunk_key`` names the trunk (backbone, weights, input size); with the frames and the views it
    keys the cache.
    """
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(trunk_key.encode())
    for f in frames:
        digest.update(f"{f.path}|{f.boxes}\n".encode())
    session = ort_session(trunk_onnx, threads)
    probe = session.run(None, {INPUT_NAME: np.zeros((1, 3, cfg.size, cfg.size), np.float32)})
    shapes = [(len(frames), views, *p.shape[1:]) for p in probe]
    meta = {"key": digest.hexdigest(), "views": views, "seed": cfg.seed, "shapes": [list(s) for s in shapes]}
    meta_path, done_path, boxes_path = folder / "meta.json", folder / "done", folder / "boxes.json"
    paths = [folder / f"tap{i}.npy" for i in range(len(shapes))]
    fresh = not (meta_path.is_file() and json.loads(meta_path.read_text()) == meta and all(p.is_file() for p in paths))
    if fresh:
        arrays = [
            np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=s)
            for p, s in zip(paths, shapes, strict=True)
        ]
        meta_path.write_text(json.dumps(meta))
        done_path.write_text("0")
        boxes_path.write_text("[]")
    else:
        arrays = [np.lib.format.open_memmap(p, mode="r+") for p in paths]
    done = int(done_path.read_text())
    boxes: list[list[list[list[float]]]] = json.loads(boxes_path.read_text())[:done]
    if done < len(frames):
        report(f"caching the trunk's features of {len(frames) - done} frame(s) x {views} view(s) in {folder}")
    t0 = time.monotonic()
    for start in range(done, len(frames), CHUNK):
        chunk = frames[start : start + CHUNK]
        made = [[frame_input(f, v, cfg.size, cfg.seed, start + i) for v in range(views)] for i, f in enumerate(chunk)]
        batch = to_input([m[0] for views_ in made for m in views_], IMAGENET_MEAN, IMAGENET_STD)
        outs = [
            np.concatenate(o)
            for o in zip(
                *(session.run(None, {INPUT_NAME: batch[j : j + 8]}) for j in range(0, len(batch), 8)), strict=True
            )
        ]
        for array, out in zip(arrays, outs, strict=True):
            array[start : start + len(chunk)] = out.astype(np.float16).reshape(len(chunk), *array.shape[1:])
            array.flush()
        boxes.extend([[m[1] for m in views_] for views_ in made])
        boxes_path.write_text(json.dumps(boxes))
        done_path.write_text(str(start + len(chunk)))
        if (start // CHUNK) % 20 == 19 or start + CHUNK >= len(frames):
            rate = (time.monotonic() - t0) / max(1, start + len(chunk) - done)
            report(f"cached {start + len(chunk)}/{len(frames)} ({rate * 1000:.0f} ms per frame)")
    return [np.asarray(a) for a in arrays], boxes
