"""The CPU recipe's feature cache: the frozen early blocks run once per photo view, to disk.

Each training photo gets ``views`` views (view 0 the plain photo, the others radar-like
augmentations drawn from a generator seeded by (seed, photo, view)), each val photo its plain
view. The features are float16 ``.npy`` memory maps in the work folder, with a ``meta.json``
that says what they were computed from; a cache whose meta differs is recomputed, and an
interrupted one resumes from its last finished chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .data import Augment, Sample, augment, load_image, plain, to_input
from .lite0 import LiteNet

__all__ = ["cache_key", "feature_cache"]

CHUNK = 64
DEFAULT_AUGMENT = Augment()


def cache_key(samples: Sequence[Sample], **params: object) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for s in samples:
        h.update(f"{s.path}|{s.box}\n".encode())
    return h.hexdigest()


def _views(sample: Sample, index: int, views: int, size: tuple[int, int], seed: int, aug: Augment) -> list[np.ndarray]:
    img = load_image(sample)
    out = [plain(img, size)]
    for v in range(1, views):
        out.append(augment(img, size, np.random.default_rng([seed, index, v]), aug))
    return out


def feature_cache(
    model: LiteNet,
    stop: int,
    samples: Sequence[Sample],
    folder: Path,
    *,
    views: int,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    key: str,
    aug: Augment = DEFAULT_AUGMENT,
    report: Callable[[str], None] = lambda _: None,
) -> np.ndarray:
    """Features of blocks ``0..stop-1`` for every (photo, view): an array [len(samples), views, C, H, W]."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_path, data_path, done_path = folder / "meta.json", folder / "features.npy", folder / "done"
    with torch.no_grad():
        probe = model.eval().features(torch.zeros(1, 3, *size), 0, stop)
    shape = (len(samples), views, *probe.shape[1:])
    meta = {"key": key, "shape": list(shape)}
    done = 0
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta and data_path.is_file():
        done = int(done_path.read_text()) if done_path.is_file() else 0
        array = np.lib.format.open_memmap(data_path, mode="r+")
    else:
        array = np.lib.format.open_memmap(data_path, mode="w+", dtype=np.float16, shape=shape)
        meta_path.write_text(json.dumps(meta))
        done_path.write_text("0")
    if done >= len(samples):
        return np.asarray(array)
    report(f"caching features of blocks 0..{stop - 1} for {len(samples) - done} photo(s) x {views} view(s) in {folder}")
    model.eval()
    for start in range(done, len(samples), CHUNK):
        chunk = samples[start : start + CHUNK]
        images = [v for i, s in enumerate(chunk) for v in _views(s, start + i, views, size, seed, aug)]
        with torch.no_grad():
            feats = model.features(torch.from_numpy(to_input(images, mean, std)), 0, stop)
        array[start : start + len(chunk)] = feats.numpy().astype(np.float16).reshape(len(chunk), *shape[1:])
        array.flush()
        done_path.write_text(str(start + len(chunk)))
        report(f"cached {start + len(chunk)}/{len(samples)}")
    return np.asarray(array)
