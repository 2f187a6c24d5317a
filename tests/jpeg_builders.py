"""Real JPEG files for the decode-budget tests: a camera-like frame, OpenCV's encoder, a repeated-scan attack."""

from __future__ import annotations

import cv2
import numpy as np

EOI = b"\xff\xd9"


def photo(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A frame with gradients and sensor-like noise (no flat region, as a camera gives)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)
    return cv2.add(image, rng.integers(0, 40, image.shape, dtype=np.uint8))


def encode(image: np.ndarray, **params: int) -> bytes:
    flags = [cv2.IMWRITE_JPEG_QUALITY, 90]
    for name, value in params.items():
        flags += [getattr(cv2, f"IMWRITE_JPEG_{name.upper()}"), value]
    ok, buf = cv2.imencode(".jpg", image, flags)
    assert ok
    return bytes(buf.tobytes())


def raw_decode(data: bytes) -> np.ndarray | None:
    """What OpenCV alone returns (libjpeg's warnings go to stderr only)."""
    result: np.ndarray | None = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return result


def repeated_scans(progressive: bytes, copies: int, width: int, height: int) -> bytes:
    """``copies`` extra luma AC scans of about 20 bytes each, appended before the end marker.

    Each one codes coefficients 1-63 again with one end-of-band run over every block (symbol EOB14
    from its own Huffman table), so it changes no pixel, and libjpeg accepts it without a word
    (the coefficients are already at bit 0), but every scan walks every block of the image: about
    1.3 ms per scan on a 5 MP frame, minutes for the ~100,000 a 2.3 MB file can hold.
    """
    dht = b"\xff\xc4" + (20).to_bytes(2, "big") + b"\x13" + bytes([1] + [0] * 15) + b"\xe0"
    blocks = -(-width // 8) * -(-height // 8)
    bits = ("0" + "1" * 14) * -(-blocks // 32767)
    bits += "1" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + b"\x01\x01\x03\x01\x3f\x00" + data
    assert progressive.endswith(EOI)
    return progressive[:-2] + dht + sos * copies + EOI


def progressive_of(jpeg: bytes) -> bytes:
    """The same picture re-encoded as a progressive JPEG (libjpeg's 10-scan progression)."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return encode(image, progressive=1)
