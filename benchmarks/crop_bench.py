"""The crop contract on real photos: colour-mode detection, and top-1 through the daemon's intake per crop setting.

Reads ``../shared/data/cars-dev`` val (see its README; the script says so and stops when it is not
there). Prints two tables:

1. **colour mode** (``iaflash.agent.capture.crop.color_mode``): how many real colour photos are
   judged ``grey`` (each would be ``inconclusive`` for a colour-only bundle: a lost judgement),
   and how many greyscale versions of the same photos (JPEG q85, stored in colour, as an infrared
   camera would) are judged ``grey`` (each one missed could be flagged by a colour model);
2. with ``--bundle DIR`` (a classifier whose labels are cars-dev's ``make``/``model``): top-1 of
   the tight photos, then of radar-like frames (each photo pasted at a random place in a
   ``--frame`` sized noisy road-grey frame, JPEG q90, its box in the sidecar) through the daemon's
   own ``Preparer.prepare_capture`` and ``score_views``, for several crop contracts (margin 0 /
   0.1, stretch / letterbox, flip TTA off / on).

    .venv/bin/python benchmarks/crop_bench.py
    .venv/bin/python benchmarks/crop_bench.py --bundle /tmp/bundle --limit 600
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from iaflash.agent.capture.crop import color_mode, prepare_crop
from iaflash.agent.capture.intake import Preparer
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.config import SpoolConfig
from iaflash.engines.bundle import Bundle, load_bundle
from iaflash.engines.manifest import CropSpec, Manifest, TtaSpec
from iaflash.engines.onnxrt import OnnxRuntimeBackend
from iaflash.engines.scores import score_views

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars-dev"


def val_rows(data: Path, limit: int) -> list[dict[str, str]]:
    rows = [r for r in csv.DictReader((data / "labels.csv").open()) if r["split"] == "val"]
    return rows[:limit] if limit else rows


def jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return bytes(buf.tobytes())


def colour_table(data: Path, rows: list[dict[str, str]]) -> None:
    grey_colour = grey_grey = grey_tinted = 0
    for r in rows:
        photo = cv2.imread(str(data / r["image"]), cv2.IMREAD_COLOR)
        grey_colour += color_mode(photo) == "grey"
        mono = cv2.cvtColor(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        decoded = cv2.imdecode(np.frombuffer(jpeg(mono, 85), np.uint8), cv2.IMREAD_COLOR)
        grey_grey += color_mode(decoded) == "grey"
        tinted = np.clip(mono.astype(np.int16) + np.array([-5, 0, 12], np.int16), 0, 255).astype(np.uint8)
        decoded = cv2.imdecode(np.frombuffer(jpeg(tinted, 80), np.uint8), cv2.IMREAD_COLOR)
        grey_tinted += color_mode(decoded) == "grey"
    n = len(rows)
    print(f"\ncolour mode on {n} cars-dev val photos (GREY_CHROMA rule, docs/CAPTURE.md)")
    print(f"  {'colour photos judged grey (lost judgements)':<52} {grey_colour:>5} / {n}  ({grey_colour / n:.2%})")
    print(f"  {'greyscale photos judged grey (refused, as wanted)':<52} {grey_grey:>5} / {n}  ({grey_grey / n:.2%})")
    tint = "greyscale with a warm cast (B-5, R+12) judged grey"
    print(f"  {tint:<52} {grey_tinted:>5} / {n}  ({grey_tinted / n:.2%})")


def radar_frame(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> tuple[bytes, tuple[int, ...]]:
    """The photo pasted at a random place in a noisy grey frame; (JPEG, box x, y, w, h)."""
    w, h = size
    frame = np.full((h, w, 3), int(rng.integers(90, 130)), np.uint8)
    frame = np.clip(frame.astype(np.int16) + rng.integers(-8, 9, size=frame.shape), 0, 255).astype(np.uint8)
    ph, pw = photo.shape[:2]
    x, y = int(rng.integers(0, w - pw)), int(rng.integers(h // 5, h - ph))
    frame[y : y + ph, x : x + pw] = photo
    return jpeg(frame, 90), (x, y, pw, ph)


def capture(box: tuple[int, ...]) -> Capture:
    return Capture(
        capture_id="bench",
        site_id="bench",
        captured_at=datetime(2026, 12, 1, tzinfo=timezone.utc),
        plate=None,
        plate_confidence=None,
        direction=None,
        lane=None,
        speed_kmh=None,
        limit_kmh=None,
        equipment=None,
        vehicle_box=(box[0], box[1], box[2], box[3]),
        images=("bench.jpg",),
    )


def contracts(manifest: Manifest) -> list[tuple[str, Manifest]]:
    out = []
    for margin in (0.0, 0.1):
        for aspect in ("stretch", "letterbox"):
            for hflip in (False, True):
                crop = CropSpec(margin=margin, aspect=aspect, interpolation="auto")  # type: ignore[arg-type]
                m = replace(
                    manifest,
                    preprocessing=replace(manifest.preprocessing, resize=aspect),  # type: ignore[arg-type]
                    crop=crop,
                    tta=TtaSpec(hflip=True) if hflip else None,
                )
                out.append((f"margin {margin:.0%}, {aspect}, flip {'on' if hflip else 'off'}", m))
    return out


def top1_table(data: Path, rows: list[dict[str, str]], bundle: Bundle, frame: tuple[int, int]) -> None:
    index = {(lb.make, lb.model): lb.index for lb in bundle.labels}
    rows = [r for r in rows if (r["make"], r["model"]) in index]
    if not rows:
        sys.exit(f"{bundle.path}: no label matches cars-dev's make/model; give a cars-dev bundle")
    rng = np.random.default_rng(0)
    photos = [cv2.imread(str(data / r["image"]), cv2.IMREAD_COLOR) for r in rows]
    frames = [radar_frame(p, frame, rng) for p in photos]
    truth = np.array([index[(r["make"], r["model"])] for r in rows])
    print(f"\ntop-1 on {len(rows)} cars-dev val photos, bundle {bundle.manifest.name} {bundle.manifest.version}")
    print(f"  {'input':<44} {'top-1':>7} {'inconclusive':>13} {'s':>6}")
    with OnnxRuntimeBackend(threads=2) as backend:
        backend.load(bundle)
        t = time.perf_counter()
        hits = abstained = 0
        tight = replace(bundle.manifest, tta=None)
        for photo, label in zip(photos, truth, strict=True):
            tensor, info = prepare_crop(photo, None, tight)
            if tensor is None:  # an achromatic studio shot (colour mode) or a quality gate
                abstained += 1
                continue
            fused, _ = score_views(np.asarray(backend.infer(tensor)), info.views, tight)
            hits += int(fused.probs.argmax() == label)
        took = time.perf_counter() - t
        print(f"  {'tight photos (the whole photo)':<44} {hits / len(rows):>7.2%} {abstained:>13} {took:>6.1f}")
        for name, manifest in contracts(bundle.manifest):
            t = time.perf_counter()
            preparer, hits, abstained = Preparer(SpoolConfig(), manifest), 0, 0
            for (data_bytes, box), label in zip(frames, truth, strict=True):
                done = preparer.prepare_capture(capture(box), [data_bytes])
                if done.tensor is None:
                    abstained += 1
                    continue
                fused, problem = score_views(np.asarray(backend.infer(done.tensor)), done.views, manifest)
                abstained += problem is not None
                hits += int(problem is None and fused.probs.argmax() == label)
            took = time.perf_counter() - t
            print(f"  {'frames, ' + name:<44} {hits / len(rows):>7.2%} {abstained:>13} {took:>6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--bundle", type=Path, help="a cars-dev classifier bundle (labels = make, model)")
    parser.add_argument("--limit", type=int, default=0, help="first N val photos only (0 = all 1,221)")
    parser.add_argument("--frame", default="1600x1200", help="radar-like frame size WxH")
    args = parser.parse_args()
    if not (args.data / "labels.csv").exists():
        sys.exit(f"{args.data}: cars-dev is not there (see the benchmark's docstring); nothing measured")
    rows = val_rows(args.data, args.limit)
    colour_table(args.data, rows)
    if args.bundle:
        w, _, h = args.frame.partition("x")
        top1_table(args.data, rows, load_bundle(args.bundle), (int(w), int(h)))


if __name__ == "__main__":
    main()
