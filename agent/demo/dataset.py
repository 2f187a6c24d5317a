"""A labelled evaluation set drawn from the demo fleet, harder than the training renders.

Each image is a radar-like scene with its true make/model and vehicle box, degraded the
way real captures are (dusk, motion blur, sensor noise, a partial occlusion), so that the
demo classifier is imperfect and the evaluation report has something to show. A few
vehicles outside the taxonomy are included. Usage:

    python -m iaflash.agent.demo.dataset OUT_DIR [--per-class N] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

from iaflash.agent.demo.fleet import CLASSES, VehicleStyle, encode_jpeg, render_scene

OUTSIDE = (
    VehicleStyle("TESLA", "MODEL 3", (150, 150, 150), 0.40, 0.25, 0.60),
    VehicleStyle("FIAT", "500", (60, 200, 120), 0.55, 0.30, 0.40),
)


def degrade(img: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator, level: float) -> np.ndarray:
    """Dusk, motion blur, noise and an occluding post, each with probability growing with ``level``."""
    out = img.astype(np.float32)
    if rng.random() < level:
        out *= rng.uniform(0.25, 0.7)  # dusk
    if rng.random() < level:
        k = int(rng.integers(9, 31))
        kernel = np.zeros((k, k), np.float32)
        kernel[k // 2, :] = 1.0 / k
        out = np.asarray(cv2.filter2D(out, -1, kernel), dtype=np.float32)  # horizontal motion blur
    out += rng.normal(0, 4 + 14 * level, out.shape)
    if rng.random() < level / 2:
        x, y, w, h = box
        px = int(x + rng.uniform(0.2, 0.8) * w)
        cv2.rectangle(out, (px, y - 20), (px + int(w * rng.uniform(0.1, 0.3)), y + h + 20), (90, 90, 90), -1)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_dataset(out: Path, *, per_class: int = 30, seed: int = 11, level: float = 0.3) -> Path:
    """Render the set into ``out`` with ``labels.csv`` (image,make,model,x,y,w,h); returns the CSV path."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    styles = [*CLASSES] * per_class + [*OUTSIDE] * max(1, per_class // 4)
    for i, style in enumerate(styles):
        img, box = render_scene(style, rng)
        name = f"img-{i:05d}.jpg"
        (out / name).write_bytes(encode_jpeg(degrade(img, box, rng, level)))
        rows.append([name, style.make, style.model, *box])
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "make", "model", "x", "y", "w", "h"])
        writer.writerows(rows)
    return csv_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    print(write_dataset(args.out, per_class=args.per_class, seed=args.seed))


if __name__ == "__main__":
    main()
