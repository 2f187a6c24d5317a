"""Pipeline throughput and latency with model-sized networks, on radar-sized frames.

For a ResNet-50-shaped and an EfficientNet-B0-shaped classifier (random weights: the
architecture sets the cost) behind a small YOLO-style detector, on synthetic 2448×2048 JPEG
captures with sensor noise (so they decode like photos, not like flat drawings), it measures
in ONE run:

* each stage alone (median wall ms and CPU ms): decode, detect, crop+preprocess, classify;
* the real daemon (``Service``: spool → detector → classifier → registry → outbox → MQTT),
  fed a burst (throughput) and then a steady load at half that throughput (latency p50/p99);
* peak RSS.

It prints one table per classifier. Two references for throughput are given, because on a
CPU-only box every stage competes for the same cores: the slowest stage alone (the issue's
limit), and the CPU limit (cores ÷ CPU-ms per capture summed over the stages).

    ./run bench pipeline            # or: .venv/bin/python benchmarks/pipeline_bench.py --n 40
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # the benchmark's own model builders, beside this file

from iaflash.agent.capture.intake import CROP_MARGIN
from iaflash.agent.capture.preprocess import crop, decode_jpeg, preprocess
from iaflash.agent.capture.vehicle import detect_vehicles
from iaflash.agent.config import parse_config
from iaflash.agent.demo.broker import MosquittoBroker, find_mosquitto
from iaflash.agent.demo.fleet import CLASSES, draw_vehicle, road_background
from iaflash.agent.registry.cache import import_subset, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.agent.service import Service
from iaflash.engines.bundle import DetectorSpec, Label, Preprocessing, load_bundle, write_bundle
from iaflash.engines.factory import create_backend

W, H = 2448, 2048
IMAGENET = Preprocessing(height=224, width=224)


def frames(n: int, seed: int = 3) -> list[bytes]:
    """Radar-sized JPEGs: a vehicle near the centre (where the benchmark detector puts its box)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = road_background(rng, W, H)
        draw_vehicle(img, CLASSES[i % len(CLASSES)], (int(W * 0.3), int(H * 0.3), int(W * 0.4), int(H * 0.4)), rng)
        noisy = np.clip(img.astype(np.int16) + rng.normal(0, 9, img.shape), 0, 255).astype(np.uint8)
        out.append(cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def write_models(root: Path, name: str) -> tuple[Path, Path]:
    build = {"resnet50": models.resnet50, "efficientnet_b0": models.efficientnet_b0}[name]
    labels = [Label(i, f"MAKE{i // 10}", f"MODEL{i}") for i in range(1000)]
    cls = write_bundle(
        root / name,
        onnx_bytes=build().SerializeToString(),
        labels=labels,
        name=name,
        version="bench",
        input_name="input",
        input_shape=("N", 3, 224, 224),
        preprocessing=IMAGENET,
        output_name="output",
    )
    det = write_bundle(
        root / "detector",
        onnx_bytes=models.tiny_yolo().SerializeToString(),
        labels=[Label(i, f"class{i}", f"class{i}") for i in range(8)],
        name="tiny-yolo",
        version="bench",
        task="detector",
        input_name="input",
        input_shape=(1, 3, 320, 320),
        preprocessing=Preprocessing(height=320, width=320, mean=(0, 0, 0), std=(1, 1, 1)),
        output_name="output",
        output_kind="probabilities",
        detector=DetectorSpec(
            format="yolo", box_format="cxcywh", normalized=True, vehicle_classes=(0,), outputs=("output",)
        ),
    )
    return cls.path, det.path


def timed(fn: Callable[[], Any], reps: list[float], cpu: list[float]) -> Any:
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    reps.append((time.perf_counter() - t) * 1e3)
    cpu.append((time.process_time() - c) * 1e3)
    return out


def stages_alone(jpegs: list[bytes], cls_dir: Path, det_dir: Path, threads: int) -> dict[str, tuple[float, float]]:
    """(median wall ms, median CPU ms) of each stage run alone, as the pipeline runs it."""
    cls_bundle, det_bundle = load_bundle(cls_dir), load_bundle(det_dir)
    cls, det = create_backend("onnxruntime", threads=threads), create_backend("onnxruntime", threads=threads)
    cls.load(cls_bundle)
    det.load(det_bundle)
    cls.warmup()
    det.warmup()
    wall: dict[str, list[float]] = {k: [] for k in ("decode", "detect", "crop+preprocess", "classify")}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    for data in jpegs:
        image = timed(lambda d=data: decode_jpeg(d, reduce=2), wall["decode"], cpu["decode"])
        dets = timed(lambda i=image: detect_vehicles(i, det, det_bundle), wall["detect"], cpu["detect"])
        box = dets[0].xywh() if dets else (0, 0, image.shape[1], image.shape[0])
        tensor = timed(
            lambda i=image, b=box: preprocess(crop(i, b, margin=CROP_MARGIN), IMAGENET),
            wall["crop+preprocess"],
            cpu["crop+preprocess"],
        )
        timed(lambda t=tensor: cls.infer(t), wall["classify"], cpu["classify"])
    cls.close()
    det.close()
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in wall}


class Clock:
    def __init__(self) -> None:
        self.done: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, capture: Any, verdict: Any, event: Any) -> None:
        with self.lock:
            self.done[capture.capture_id] = time.perf_counter()

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(k.startswith(prefix) for k in self.done)


def drop(incoming: Path, cid: str, jpeg: bytes, plate: str) -> None:
    (incoming / f"{cid}.jpg").write_bytes(jpeg)
    side = {
        "schema_version": 1,
        "capture_id": cid,
        "site_id": "bench",
        "plate": plate,
        "plate_confidence": 0.95,
        "captured_at": datetime.now(timezone.utc).isoformat(),
    }
    (incoming / f".{cid}.tmp").write_text(json.dumps(side))
    (incoming / f".{cid}.tmp").rename(incoming / f"{cid}.json")


def wait_for(clock: Clock, prefix: str, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while clock.count(prefix) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {clock.count(prefix)}/{n} {prefix} captures done")
        time.sleep(0.005)


def site(
    root: Path, port: int, cls_dir: Path, det_dir: Path, intake_threads: int, threads: int
) -> tuple[dict[str, Any], str]:
    key = secrets.token_bytes(32)
    (root / "hmac.key").write_text(key.hex())
    os.chmod(root / "hmac.key", 0o600)
    plate = "AB-123-CD"
    write_subset(
        root / "snap.jsonl.gz",
        dataset_id="bench",
        seq=1,
        key_id=key_id(key),
        records=records_from_plates(key, [(plate, "MAKE0", "MODEL0", "VP", "CI")]),
    )
    import_subset(root / "registry.db", root / "snap.jsonl.gz", expected_key_id=key_id(key))
    doc = {
        "site": {"site_id": "bench", "device_id": "box"},
        "spool": {"dir": str(root / "spool"), "poll_interval_s": 0.01, "intake_threads": intake_threads},
        "model": {
            "bundle": str(cls_dir),
            "detector_bundle": str(det_dir),
            "backend": "onnxruntime",
            "max_batch": 4,
            "max_wait_ms": 0,
            "threads": threads,
        },
        "registry": {"db": str(root / "registry.db"), "hmac_key_file": str(root / "hmac.key")},
        "security": {"allow_unsigned": True},
        "outbox": {"db": str(root / "state.db")},
        "mqtt": {"host": "127.0.0.1", "port": port, "publish": ["match", "mismatch", "inconclusive"]},
        "log": {"level": "ERROR", "format": "text"},
    }
    return doc, plate


def run_service(
    root: Path, port: int, cls_dir: Path, det_dir: Path, jpegs: list[bytes], n: int, intake_threads: int, threads: int
) -> dict[str, Any]:
    doc, plate = site(root, port, cls_dir, det_dir, intake_threads, threads)
    clock = Clock()
    service = Service(parse_config(doc), on_verdict=clock)
    service.start()
    incoming = root / "spool" / "incoming"
    try:
        t0 = time.perf_counter()
        for i in range(n):
            drop(incoming, f"burst-{i:05d}", jpegs[i % len(jpegs)], plate)
        wait_for(clock, "burst", n)
        throughput = n / (max(clock.done.values()) - t0)
        assert service.pipeline is not None
        stages = {k: statistics.median(v[-n:]) for k, v in service.pipeline.stage_samples.items()}
        arrived: dict[str, float] = {}
        period = 2.0 / throughput
        for i in range(n):
            cid = f"paced-{i:05d}"
            arrived[cid] = time.perf_counter()
            drop(incoming, cid, jpegs[i % len(jpegs)], plate)
            time.sleep(max(0.0, arrived[cid] + period - time.perf_counter()))
        wait_for(clock, "paced", n)
        lat = sorted((clock.done[c] - arrived[c]) * 1e3 for c in arrived)
        paced = {k: statistics.median(v[-n:]) for k, v in service.pipeline.stage_samples.items()}
    finally:
        service.stop()
    return {
        "throughput": throughput,
        "stages": stages,
        "paced": paced,
        "p50": lat[len(lat) // 2],
        "p99": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
    }


def report(name: str, alone: dict[str, tuple[float, float]], runs: dict[int, dict[str, Any]], threads: int) -> None:
    slow_name, (slow_ms, _) = max(alone.items(), key=lambda kv: kv[1][0])
    stage_limit = 1000 / slow_ms
    cpu_limit = 1000 * (os.cpu_count() or 1) / sum(c for _, c in alone.values())
    rows = [(f"{k} alone: wall / CPU ms", f"{w:.1f} / {c:.1f}") for k, (w, c) in alone.items()]
    rows += [
        ("slowest stage alone", f"{slow_name} -> {stage_limit:.1f}/s"),
        ("CPU limit (cores / CPU-ms per capture)", f"{cpu_limit:.1f}/s"),
    ]
    for intake, r in runs.items():
        tag = f"[{intake} intake thread{'s' if intake > 1 else ''}]"
        p = r["paced"]
        core = sum(p.get(k, 0.0) for k in ("decode", "detect", "preprocess", "infer"))
        overhead = max(0.0, p["total"] - core)
        rows += [
            (
                f"{tag} burst throughput",
                f"{r['throughput']:.1f}/s = {r['throughput'] / stage_limit:.0%} of slowest "
                f"stage, {r['throughput'] / cpu_limit:.0%} of CPU limit",
            ),
            (
                f"{tag} latency at half load p50 / p99",
                f"{r['p50']:.0f} / {r['p99']:.0f} ms (p99/p50 = {r['p99'] / r['p50']:.2f})",
            ),
            (f"{tag} in-pipeline stages at half load", ", ".join(f"{k} {v:.1f}" for k, v in p.items()) + " ms"),
            (
                f"{tag} overhead outside decode/detect/preprocess/infer",
                f"{overhead:.1f} ms = {overhead / p['total']:.0%} of {p['total']:.1f} ms",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    print(
        f"\n{name}: {W}x{H} noisy JPEG q90, tiny YOLO 320 detector, decode at 1/2, "
        f"ONNX Runtime threads {threads or 'one per core'}"
    )
    print(f"{'metric':<{width}}  value\n{'-' * width}  {'-' * 50}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="captures per phase")
    ap.add_argument("--models", default="efficientnet_b0,resnet50")
    ap.add_argument("--intake-threads", default="1,2")
    ap.add_argument("--ort-threads", default="0", help="comma list; 0 = one per core (the default config)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the bundles are deliberately unsigned here
    if find_mosquitto() is None:
        sys.exit("mosquitto is needed: apt-get install -y mosquitto")
    jpegs = frames(12)
    with tempfile.TemporaryDirectory(prefix="iaflash-pbench-") as tmp, MosquittoBroker() as broker:
        for name in args.models.split(","):
            cls_dir, det_dir = write_models(Path(tmp) / name, name)
            for ort_threads in (int(t) for t in args.ort_threads.split(",")):
                alone = stages_alone(jpegs, cls_dir, det_dir, ort_threads)
                runs = {}
                for intake in (int(t) for t in args.intake_threads.split(",")):
                    root = Path(tmp) / f"{name}-{ort_threads}-{intake}"
                    root.mkdir()
                    runs[intake] = run_service(root, broker.port, cls_dir, det_dir, jpegs, args.n, intake, ort_threads)
                report(name, alone, runs, ort_threads)
    print(
        f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
        f"(whole benchmark process, both models loaded in turn)"
    )


if __name__ == "__main__":
    main()
