"""Thumbnails for the report: a frame, reduced, as an inline SVG with the classified box drawn on it.

The frame is decoded by the daemon's own :func:`~iaflash.agent.capture.preprocess.decode_jpeg`
(a reduced decode), shrunk by block averaging, and written as a PNG with zlib (no imaging library),
so the report stays one self-contained page.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence
from html import escape
from pathlib import Path

import numpy as np

from iaflash.agent.capture.preprocess import decode_jpeg
from iaflash.agent.errors import CaptureRejected

__all__ = ["png_bytes", "thumbnail_svg"]

THUMB_WIDTH = 220


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB ``[H, W, 3]`` array as PNG bytes."""
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _shrink(image: np.ndarray, width: int) -> np.ndarray:
    step = max(1, -(-image.shape[1] // width))  # ceil: never wider than ``width``
    h, w = (image.shape[0] // step) * step, (image.shape[1] // step) * step
    blocks = image[:h, :w].reshape(h // step, step, w // step, step, 3).mean(axis=(1, 3))
    out: np.ndarray = blocks[:, :, ::-1].astype(np.uint8)  # BGR → RGB
    return out


def thumbnail_svg(image: Path, box: Sequence[int] | None, frame_size: Sequence[int] | None, title: str = "") -> str:
    """An inline SVG of ``image`` about :data:`THUMB_WIDTH` px wide with ``box`` (frame pixels) outlined."""
    try:
        data = image.read_bytes()
        width = int(frame_size[0]) if frame_size else 0
        reduce = next((f for f in (8, 4, 2) if width // f >= THUMB_WIDTH), 1)
        small = _shrink(decode_jpeg(data, reduce=reduce), THUMB_WIDTH)
    except (OSError, CaptureRejected) as exc:
        return f"<span>no thumbnail: {escape(str(exc))}</span>"
    h, w = small.shape[:2]
    sx = w / (frame_size[0] if frame_size else w)
    sy = h / (frame_size[1] if frame_size else h)
    rect = ""
    if box is not None:
        x, y, bw, bh = (float(v) for v in box)
        rect = (
            f'<rect x="{x * sx:.1f}" y="{y * sy:.1f}" width="{bw * sx:.1f}" height="{bh * sy:.1f}" '
            'fill="none" stroke="#ff2a2a" stroke-width="2"/>'
        )
    href = "data:image/png;base64," + base64.b64encode(png_bytes(small)).decode("ascii")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{escape(title)}"><image href="{href}" width="{w}" height="{h}"/>{rect}</svg>'
    )
