"""End-to-end latency and throughput of the real agent on this machine.

Runs the real ``Service`` (demo model, real registry, real outbox, real local broker) on
synthetic radar-sized JPEGs (2448×2048, q90), in two phases:

* burst: N captures land at once → throughput, compared with the slowest stage alone;
* paced: captures arrive at half the burst throughput → per-capture latency p50/p99.

Latency "arrival → durable" runs from the sidecar's rename into incoming/ to the verdict's
commit in the outbox; it includes the spool poll interval. Prints a table.

    ./run bench e2e            # or: .venv/bin/python benchmarks/e2e_bench.py --n 100
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from iaflash.agent.capture.preprocess import crop, decode_jpeg, preprocess
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.config import parse_config
from iaflash.agent.decision.verdict import Verdict
from iaflash.agent.demo.fleet import CLASSES, encode_jpeg, render_scene
from iaflash.agent.demo.runner import demo_config, local_broker, prepare_workdir
from iaflash.agent.demo.scenario import build_scenario
from iaflash.agent.service import Service
from iaflash.engines.bundle import load_bundle
from iaflash.engines.factory import create_backend

W, H = 2448, 2048


def make_frames(n: int, seed: int = 5) -> list[tuple[bytes, list[int]]]:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        img, (x, y, w, h) = render_scene(CLASSES[i % len(CLASSES)], rng)
        sx, sy = W / img.shape[1], H / img.shape[0]
        big = cv2.resize(img, (W, H), interpolation=cv2.INTER_LINEAR)
        frames.append((encode_jpeg(big, 90), [round(x * sx), round(y * sy), round(w * sx), round(h * sy)]))
    return frames


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Clock:
    """Arrival times (by capture id) and verdict times, filled from the service's callback."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.stages: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def __call__(self, capture: Capture, verdict: Verdict, event: dict[str, Any] | None) -> None:
        with self.lock:
            self.done[capture.capture_id] = time.perf_counter()


def drop(incoming: Path, cid: str, jpeg: bytes, box: list[int], plate: str) -> None:
    (incoming / f"{cid}.jpg").write_bytes(jpeg)
    side = {
        "schema_version": 1,
        "capture_id": cid,
        "site_id": "bench",
        "plate": plate,
        "captured_at": datetime.now(timezone.utc).isoformat(),
        "plate_confidence": 0.95,
        "vehicle_box": box,
    }
    tmp = incoming / f".{cid}.tmp"
    tmp.write_text(json.dumps(side))
    tmp.rename(incoming / f"{cid}.json")


def stage_alone(frames: list[tuple[bytes, list[int]]], bundle_dir: Path) -> dict[str, float]:
    """Median ms of each stage run alone, in this process, on the same frames."""
    bundle = load_bundle(bundle_dir)
    backend = create_backend("auto")
    backend.load(bundle)
    backend.warmup()
    pp = bundle.manifest.preprocessing
    full, reduced, prep, infer = [], [], [], []
    for data, box in frames:
        t = time.perf_counter()
        decode_jpeg(data)
        full.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        img = decode_jpeg(data, reduce=4)
        reduced.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        tensor = preprocess(crop(img, tuple(v // 4 for v in box), margin=0.1), pp)  # type: ignore[arg-type]
        prep.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        backend.infer(tensor)
        infer.append((time.perf_counter() - t) * 1e3)
    backend.close()
    return {
        "decode full (alone)": statistics.median(full),
        "decode 1/4 (alone)": statistics.median(reduced),
        "crop+preprocess (alone)": statistics.median(prep),
        "classify (alone)": statistics.median(infer),
    }


def run(n: int, workdir: Path) -> None:
    scenario = build_scenario(16)
    plates = [c.plate for c in scenario if c.plate and c.registered]
    prepare_workdir(workdir, scenario, echo=lambda _m: None)
    frames = make_frames(min(n, 24))
    alone = stage_alone(frames, workdir / "model")
    clock = Clock()
    with local_broker("auto") as (broker, protocol):
        doc = demo_config(workdir, broker.port, protocol)
        doc["spool"]["poll_interval_s"] = 0.02
        cfg = parse_config(doc)
        service = Service(cfg, on_verdict=clock)
        service.start()
        incoming = cfg.spool.dir / "incoming"
        try:
            # burst
            t0 = time.perf_counter()
            for i in range(n):
                jpeg, box = frames[i % len(frames)]
                drop(incoming, f"burst-{i:05d}", jpeg, box, plates[i % len(plates)])
            written = time.perf_counter()
            while len([k for k in clock.done if k.startswith("burst")]) < n:
                time.sleep(0.01)
            burst_s = max(v for k, v in clock.done.items() if k.startswith("burst")) - t0
            throughput = n / burst_s
            stages = {k: list(v) for k, v in _stage_samples(service).items()}
            # paced at half the burst throughput
            period = 2.0 / throughput
            for i in range(n):
                jpeg, box = frames[i % len(frames)]
                cid = f"paced-{i:05d}"
                clock.arrived[cid] = time.perf_counter()
                drop(incoming, cid, jpeg, box, plates[i % len(plates)])
                time.sleep(max(0.0, clock.arrived[cid] + period - time.perf_counter()))
            while len([k for k in clock.done if k.startswith("paced")]) < n:
                time.sleep(0.01)
            pipeline = service.pipeline
            assert pipeline is not None
            pipeline_lat = list(pipeline.latencies_ms[-n:])
        finally:
            service.stop()
    lat = [(clock.done[k] - clock.arrived[k]) * 1e3 for k in clock.arrived]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slowest_name, slowest_ms = max(
        ((k, v) for k, v in alone.items() if k != "decode full (alone)"), key=lambda kv: kv[1]
    )
    print_table(n, alone, stages, throughput, slowest_name, slowest_ms, lat, pipeline_lat, rss_mb, (written - t0))


def _stage_samples(service: Service) -> dict[str, list[float]]:
    return getattr(service.pipeline, "stage_samples", {})


def print_table(
    n: int,
    alone: dict[str, float],
    stages: dict[str, list[float]],
    throughput: float,
    slowest_name: str,
    slowest_ms: float,
    lat: list[float],
    pipeline_lat: list[float],
    rss_mb: float,
    write_s: float,
) -> None:
    rows = [("frames", f"{W}x{H} JPEG q90, demo classifier 64x64, {n} captures per phase")]
    rows += [(k, f"{v:.2f} ms") for k, v in alone.items()]
    rows += [(f"{k} (in pipeline, median)", f"{statistics.median(v):.2f} ms") for k, v in stages.items() if v]
    ratio = throughput / (1000 / slowest_ms)
    rows += [
        ("burst throughput", f"{throughput:.1f} captures/s (writing the burst took {write_s:.2f} s)"),
        ("slowest stage alone", f"{slowest_name} {slowest_ms:.2f} ms -> {1000 / slowest_ms:.1f}/s"),
        ("throughput / slowest stage", f"{ratio:.0%}"),
        ("paced latency claim->durable p50/p99", f"{pct(pipeline_lat, 0.5):.1f} / {pct(pipeline_lat, 0.99):.1f} ms"),
        ("paced latency arrival->durable p50/p99", f"{pct(lat, 0.5):.1f} / {pct(lat, 0.99):.1f} ms"),
        ("peak RSS", f"{rss_mb:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="captures per phase")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="iaflash-bench-") as tmp:
        run(args.n, Path(tmp) / "work")


if __name__ == "__main__":
    main()
