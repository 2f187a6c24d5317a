"""The anonymiser on 5 MP frames: its cost beside the JPEG decode of the same run, and what it masks.

    .venv/bin/python benchmarks/anonymise_bench.py [--repeat 10] [--frames 5] [--face-bundle B] [--json]

Frames are generated (tests/anonymise_scenes.py) at 2448×2048, JPEG q92: the reviewed vehicle,
its driver behind the windscreen, its own plate, a third-party car's plate, a parked car's
plate and two pedestrians' faces, all at known places. For each method (fill, pixelate) it
times, as medians over ``--repeat`` runs: the plain decode (what intake pays anyway), then the
anonymiser's steps: plan + mask, re-encode without metadata, and the whole
``anonymise_jpeg`` call. Then, over ``--frames`` frames with different layouts, the share of known
boxes of which no pixel keeps its original value in the JPEG that leaves the box, and the share of
own plates left readable (mean drift under 6 grey levels).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from anonymise_scenes import make_scene  # the generated frames the tests use

from iaflash.agent.config import EvidenceConfig, parse_config
from iaflash.agent.evidence.anonymise import (
    ANONYMISER_VERSION,
    anonymise_image,
    anonymise_jpeg,
    encode_clean,
    plan_regions,
)
from iaflash.agent.evidence.detector import load_finder

W, H = 2448, 2048


def median_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION))


def timings(method: str, repeat: int) -> dict[str, float]:
    scene = make_scene(W, H)
    data, policy = scene.jpeg, EvidenceConfig(method=method)  # type: ignore[arg-type]
    image = decode(data)
    kept, regions = plan_regions((W, H), scene.vehicle, policy)
    masked = anonymise_image(image, kept, regions, policy)
    return {
        "decode_ms": median_ms(lambda: decode(data), repeat),
        "mask_ms": median_ms(lambda: anonymise_image(image, kept, regions, policy), repeat),
        "encode_ms": median_ms(lambda: encode_clean(masked, policy.jpeg_quality), repeat),
        "anonymise_jpeg_ms": median_ms(lambda: anonymise_jpeg(data, vehicle_box=scene.vehicle, policy=policy), repeat),
        "jpeg_in_kb": len(data) / 1024,
        "jpeg_out_kb": len(anonymise_jpeg(data, vehicle_box=scene.vehicle, policy=policy).jpeg) / 1024,
    }


def untouched(source: np.ndarray, sent: np.ndarray, box: tuple[int, int, int, int]) -> int:
    """Pixels of ``box`` whose three values are exactly the source's."""
    x, y, w, h = box
    return int(np.all(source[y : y + h, x : x + w] == sent[y : y + h, x : x + w], axis=2).sum())


def coverage(method: str, frames: int) -> dict[str, float]:
    masked = {"third_plates": [0, 0], "bystander_faces": [0, 0], "occupant_faces": [0, 0], "own_plate_kept": [0, 0]}
    policy = EvidenceConfig(method=method)  # type: ignore[arg-type]
    for seed in range(frames):
        scene = make_scene(W, H, seed=seed)
        source = decode(scene.jpeg)
        sent = decode(anonymise_jpeg(scene.jpeg, vehicle_box=scene.vehicle, policy=policy).jpeg)

        for key, boxes in (
            ("third_plates", scene.third_plates),
            ("bystander_faces", scene.bystander_faces),
            ("occupant_faces", (scene.occupant_face,)),
        ):
            for box in boxes:
                masked[key][0] += untouched(source, sent, box) == 0
                masked[key][1] += 1
        x, y, w, h = scene.own_plate
        drift = np.abs(source[y : y + h, x : x + w].astype(int) - sent[y : y + h, x : x + w].astype(int)).mean()
        masked["own_plate_kept"][0] += bool(drift < 6)
        masked["own_plate_kept"][1] += 1
    return {k: v[0] / v[1] for k, v in masked.items()} | {"boxes": sum(v[1] for v in masked.values())}


def face_timing(bundle: Path, repeat: int) -> dict[str, Any]:
    """Median ms of one face-detector pass on the 5 MP frame (its own ONNX Runtime CPU session, 1 thread)."""
    cfg = parse_config(
        {
            "security": {"trust_dir": "/nonexistent", "allow_unsigned": True},
            "evidence": {"detector_bundle": str(bundle)},
        }
    )
    finder = load_finder(cfg)
    assert finder is not None
    image = make_scene(W, H).image
    ms = median_ms(lambda: finder.find(image), repeat)
    info = finder.info
    finder.close()
    return {**info, "input": list(finder.bundle.manifest.input_shape), "find_ms": ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--face-bundle",
        type=Path,
        default=None,
        help="also time this face detector bundle (e.g. packed by iaflash.agent.evidence.centerface), unsigned ok",
    )
    args = parser.parse_args()
    cv2.setNumThreads(1)
    results = {m: {**timings(m, args.repeat), **coverage(m, args.frames)} for m in ("fill", "pixelate")}
    faces = None if args.face_bundle is None else face_timing(args.face_bundle, max(3, args.repeat // 3))
    doc = {
        "face_detector": faces,
        "anonymiser_version": ANONYMISER_VERSION,
        "frame": f"{W}x{H}",
        "repeat": args.repeat,
        "frames": args.frames,
        "opencv": cv2.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"anonymiser {ANONYMISER_VERSION}, {W}x{H} JPEG q92, OpenCV {cv2.__version__}, 1 OpenCV thread")
    print(
        f"{'method':<9}{'decode':>9}{'mask':>8}{'encode':>9}{'total':>9}{'×decode':>9}  "
        "masked: 3rd-party plates / bystander faces / occupants, own plate kept"
    )
    if faces is not None:
        print(
            f"face detector {faces['name']} {faces['version']}, input {faces['input']}: {faces['find_ms']:.0f} ms/frame"
        )
    for m, r in results.items():
        total = r["anonymise_jpeg_ms"]
        print(
            f"{m:<9}{r['decode_ms']:>9.1f}{r['mask_ms']:>8.1f}{r['encode_ms']:>9.1f}"
            f"{total:>9.1f}{total / r['decode_ms']:>9.2f}  "
            f"{r['third_plates']:.0%} / {r['bystander_faces']:.0%} / {r['occupant_faces']:.0%}, "
            f"{r['own_plate_kept']:.0%}"
            f"  ({r['jpeg_in_kb']:.0f} kB in, {r['jpeg_out_kb']:.0f} kB out)"
        )


if __name__ == "__main__":
    main()
