"""What the JPEG structure checks cost on the hot path, and what they save on a hostile file.

On a radar-sized frame (2448x2048, q90, baseline and progressive) it times, in one run (medians):

* the marker walk alone (``read_structure``: every segment, the scan budget, the cut checks);
* the decode alone (OpenCV, full size and 1/2), and the grey-tail check after it;
* the daemon's whole path (``check_jpeg`` then ``decode_jpeg``) against the bare decode;

then a progressive frame carrying ``--scans`` repeated ~20-byte scans: the bare decode's time
(what used to stall an intake thread) against the walk's refusal. Prints a table.

    .venv/bin/python benchmarks/decode_budget_bench.py --repeat 15 --scans 3000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np

from iaflash.agent.capture.jpeg import grey_tail, read_structure
from iaflash.agent.capture.preprocess import check_jpeg, decode_jpeg
from iaflash.agent.errors import CaptureRejected

WIDTH, HEIGHT = 2448, 2048


def frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) * 255 // (WIDTH + HEIGHT)], -1).astype(np.uint8)
    return cv2.GaussianBlur(cv2.add(image, rng.integers(0, 60, image.shape, dtype=np.uint8)), (3, 3), 0)


def encode(image: np.ndarray, progressive: bool) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    )
    assert ok
    return bytes(buf.tobytes())


def repeated_scans(progressive: bytes, copies: int) -> bytes:
    """As tests/test_capture_jpeg.py builds it: luma AC scans of one end-of-band run each."""
    dht = b"\xff\xc4" + (20).to_bytes(2, "big") + b"\x13" + bytes([1] + [0] * 15) + b"\xe0"
    blocks = -(-WIDTH // 8) * -(-HEIGHT // 8)
    bits = ("0" + "1" * 14) * -(-blocks // 32767)
    bits += "1" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + b"\x01\x01\x03\x01\x3f\x00" + data
    return progressive[:-2] + dht + sos * copies + b"\xff\xd9"


def median_ms(step: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bare(data: bytes, flag: int = cv2.IMREAD_COLOR) -> np.ndarray:
    image: np.ndarray = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--scans", type=int, default=3000, help="repeated scans in the hostile file")
    args = parser.parse_args()
    image = frame()
    limits = {"max_pixels": 60_000_000, "min_side": 64}
    print(f"{WIDTH}x{HEIGHT} q90, median of {args.repeat} (ms)")
    print(
        f"{'file':<13}{'bytes':>10}{'walk':>8}{'decode':>8}{'grey':>7}{'daemon':>8}{'added':>8}{'dec/2':>8}{'daemon/2':>10}"
    )
    for name, progressive in (("baseline", False), ("progressive", True)):
        data = encode(image, progressive)
        structure = read_structure(data)
        full = bare(data)
        walk = median_ms(lambda d=data: read_structure(d), args.repeat)
        decode = median_ms(lambda d=data: bare(d), args.repeat)
        grey = median_ms(lambda i=full, s=structure: grey_tail(i, s, 1), args.repeat)
        daemon = median_ms(lambda d=data: decode_jpeg(d, structure=check_jpeg(d, **limits)), args.repeat)
        half = median_ms(lambda d=data: bare(d, cv2.IMREAD_REDUCED_COLOR_2), args.repeat)
        daemon_half = median_ms(lambda d=data: decode_jpeg(d, reduce=2, structure=check_jpeg(d, **limits)), args.repeat)
        print(
            f"{name:<13}{len(data):>10}{walk:>8.2f}{decode:>8.1f}{grey:>7.2f}{daemon:>8.1f}"
            f"{daemon - decode:>+8.1f}{half:>8.1f}{daemon_half:>10.1f}"
        )
    hostile = repeated_scans(encode(image, True), args.scans)
    t = time.perf_counter()
    bare(hostile)
    stall = time.perf_counter() - t
    t = time.perf_counter()
    try:
        check_jpeg(hostile, **limits)
    except CaptureRejected as exc:
        reason = exc.reason
    refused = (time.perf_counter() - t) * 1e3
    print(
        f"\nhostile progressive, {args.scans} repeated scans, {len(hostile)} bytes: bare decode {stall:.1f} s "
        f"({stall / args.scans * 1e3:.2f} ms per scan); refused ({reason}) in {refused:.1f} ms"
    )


if __name__ == "__main__":
    main()
