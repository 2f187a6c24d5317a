"""The model factory on real photos: accuracy, calibration, cost and latency of a trained bundle.

Reads ``../shared/data/cars-dev`` (train for training, val for reporting; see its README) and
either a finished ``fit`` output (``--run DIR`` with model.onnx, labels.csv, report.json) or
trains one first (``--epochs N``, CPU recipe unless CUDA is present). Prints a table:

* top-1 and make top-1 on the tight val photos, each photo put through the daemon's own
  ``preprocess`` and the agent's ONNX Runtime backend (not the training code's resize);
* ECE before and after temperature scaling (T fitted on the even val positions with the agent's
  ``fit_temperature``, every figure reported on the odd positions);
* training wall time and peak RSS (from the run's report), model size;
* ONNX Runtime CPU latency at batch 1 and 8 (2 threads), through the backend and through a raw
  ``onnxruntime.InferenceSession`` of the same file.

    .venv/bin/python benchmarks/train_bench.py --run /work/train-run/out
    .venv/bin/python benchmarks/train_bench.py --epochs 15 --workdir /tmp/train-bench   # trains first
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from iaflash.agent.capture.preprocess import preprocess
from iaflash.agent.evaluation.calibrate import calibration_summary, fit_temperature
from iaflash.engines.bundle import Bundle, Label, Preprocessing, write_bundle
from iaflash.engines.onnxrt import OnnxRuntimeBackend

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars-dev"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def bundle_of(run: Path, size: int, out: Path) -> Bundle:
    rows = list(csv.DictReader((run / "labels.csv").read_text().splitlines()))
    labels = [Label(index=int(r["index"]), make=r["make"], model=r["model"]) for r in rows]
    pp = Preprocessing(height=size, width=size, color_order="RGB", mean=MEAN, std=STD, resize="stretch")
    return write_bundle(
        out,
        onnx_bytes=(run / "model.onnx").read_bytes(),
        labels=labels,
        name="bench",
        version="0",
        input_name="input",
        input_shape=["N", 3, size, size],
        preprocessing=pp,
        output_name="logits",
    )


def val_logits(bundle: Bundle, data: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    index = {(lb.make, lb.model): lb.index for lb in bundle.labels}
    rows = [r for r in csv.DictReader((data / "labels.csv").read_text().splitlines()) if r["split"] == "val"]
    rows = [r for r in rows if (r["make"], r["model"]) in index]
    backend = OnnxRuntimeBackend(threads=2, providers=["CPUExecutionProvider"])
    backend.load(bundle)
    out, targets = [], []
    for i in range(0, len(rows), 32):
        chunk = rows[i : i + 32]
        batch = np.concatenate(
            [preprocess(cv2.imread(str(data / r["image"])), bundle.manifest.preprocessing) for r in chunk]
        )
        out.append(backend.infer(batch))
        targets += [index[(r["make"], r["model"])] for r in chunk]
    backend.close()
    return np.concatenate(out), np.asarray(targets), [lb.make for lb in bundle.labels]


def latency(fn: Any, batch: np.ndarray, repeats: int = 30) -> float:
    for _ in range(3):
        fn(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def latencies(bundle: Bundle) -> dict[str, float]:
    import onnxruntime as ort  # noqa: PLC0415 -- only when latencies are measured

    size = bundle.manifest.preprocessing.height
    backend = OnnxRuntimeBackend(threads=2, providers=["CPUExecutionProvider"])
    backend.load(bundle)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    raw = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
    res = {}
    for n in (1, 8):
        x = np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)
        res[f"backend_b{n}_ms"] = latency(backend.infer, x)
        res[f"raw_b{n}_ms"] = latency(lambda b: raw.run(None, {"input": b}), x)
    backend.close()
    return res


def train_first(args: argparse.Namespace) -> Path:
    import torch  # noqa: PLC0415 -- the [train] extra, only when training here

    from iaflash.central.train.pipeline import fit  # noqa: PLC0415
    from iaflash.central.train.recipe import TrainConfig  # noqa: PLC0415

    torch.set_num_threads(2)
    cfg = TrainConfig(epochs=args.epochs, freeze_blocks=8, cache_views=3)
    fit(args.data / "labels.csv", args.workdir / "out", args.workdir, cfg, drop_duplicates=True)
    return args.workdir / "out"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--run", type=Path, help="a finished fit output (model.onnx, labels.csv, report.json)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "iaflash-train-bench")
    args = ap.parse_args()
    if not (args.data / "labels.csv").is_file():
        print(
            f"cars-dev is absent: no {args.data / 'labels.csv'}; this benchmark needs the shared real photos "
            "(../shared/data/cars-dev); nothing measured",
            file=sys.stderr,
        )
        return 1
    run = args.run or train_first(args)
    report = json.loads((run / "report.json").read_text())
    size = int(report["config"]["size"])
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bundle_of(run, size, Path(tmp) / "bundle")
        logits, y, makes = val_logits(bundle, args.data)
        names = np.asarray(makes)
        t = fit_temperature(logits[0::2], y[0::2])
        odd_lg, odd_y = logits[1::2], y[1::2]
        before, after = calibration_summary(odd_lg, odd_y, 1.0), calibration_summary(odd_lg, odd_y, t)
        lat = latencies(bundle)
    rows = [
        ("val photos (all / odd half)", f"{len(y)} / {len(odd_y)}"),
        ("top-1, all val (daemon preprocess)", f"{np.mean(logits.argmax(1) == y):.4f}"),
        ("make top-1, all val", f"{np.mean(names[logits.argmax(1)] == names[y]):.4f}"),
        ("top-1, odd half", f"{np.mean(odd_lg.argmax(1) == odd_y):.4f}"),
        ("ECE odd half, T=1", f"{before['ece']:.4f}"),
        (f"ECE odd half, T={t:.3f} (fit on even half)", f"{after['ece']:.4f}"),
        ("NLL odd half T=1 -> T", f"{before['nll']:.4f} -> {after['nll']:.4f}"),
        ("recipe / epochs", f"{report['recipe']} / {len(report['history'])}"),
        ("training wall time", f"{report['wall_s'] / 60:.1f} min"),
        ("training peak RSS", f"{report['peak_rss_mb']:.0f} MB"),
        ("model.onnx size", f"{(run / 'model.onnx').stat().st_size / 1e6:.2f} MB"),
        ("ONNX vs PyTorch max |diff|", f"{report['onnx_max_abs_diff']:.1e}"),
        ("latency b1: backend / raw ORT", f"{lat['backend_b1_ms']:.2f} / {lat['raw_b1_ms']:.2f} ms"),
        ("latency b8: backend / raw ORT", f"{lat['backend_b8_ms']:.2f} / {lat['raw_b8_ms']:.2f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'figure':<{width}}  value\n{'-' * width}  -----")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
