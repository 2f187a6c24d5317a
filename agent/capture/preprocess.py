"""Image preprocessing: JPEG checks, decode, crop, and the model's input tensor. Pure numpy/OpenCV.

* :func:`inspect_jpeg` reads the JPEG markers only (no decode) to refuse non-JPEG, truncated,
  huge or tiny images cheaply, before any pixel is decoded.
* :func:`decode_jpeg` decodes to BGR uint8, optionally at 1/2, 1/4, 1/8 size (libjpeg's DCT
  scaling: much cheaper than decoding in full and resizing). EXIF orientation is ignored so that
  pixel coordinates (vehicle boxes from the radar or the detector) match the stored image.
* :func:`preprocess` turns a BGR image into the ``[1, 3, H, W]`` float32 tensor a bundle's
  :class:`~iaflash.engines.bundle.Preprocessing` describes.

cv2 errors are mapped to :class:`~iaflash.agent.errors.CaptureRejected` here, with a stable ``reason``.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from iaflash.agent.errors import CaptureRejected
from iaflash.engines.bundle import Preprocessing
from iaflash.engines.geometry import fit_geometry

__all__ = ["INTERPOLATIONS", "crop", "crop_region", "decode_jpeg", "inspect_jpeg", "preprocess"]

logger = logging.getLogger(__name__)

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_SOS = 0xDA
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) are not frames.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers with no length field: TEM and RST0..RST7.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_REDUCE_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_FIX_RADAR = "check the radar's image output (baseline or progressive JPEG, written completely before the sidecar)"


def _truncated(at: int, size: int) -> CaptureRejected:
    return CaptureRejected(
        "truncated_jpeg",
        f"JPEG ends at byte {size} inside its header (segment at byte {at}): the file is incomplete; {_FIX_RADAR}",
    )


def _corrupt(problem: str) -> CaptureRejected:
    return CaptureRejected("corrupt_image", f"JPEG header is corrupt: {problem}; {_FIX_RADAR}")


def _scan_header(data: bytes) -> tuple[int, int, int]:
    """``(width, height, offset of the first scan)`` from the JPEG markers; no pixel is decoded."""
    if len(data) < 4 or data[:2] != _SOI:
        raise CaptureRejected(
            "not_jpeg",
            f"image does not start with the JPEG SOI marker FFD8 (first bytes "
            f"{data[:4].hex() or 'none'}, {len(data)} bytes); {_FIX_RADAR}",
        )
    size: tuple[int, int] | None = None
    pos = 2
    while True:
        pos, marker, length = _segment(data, pos)
        if marker == _SOS:
            if size is None:
                raise _corrupt("image data (SOS) before any frame header (SOF)")
            return size[0], size[1], pos
        if marker in _SOF:
            size = _frame_size(data, pos, length)
        pos += 2 + length


def _segment(data: bytes, pos: int) -> tuple[int, int, int]:
    """``(position, marker, length)`` of the segment at ``pos``, after fill bytes; 0 length if standalone."""
    while pos + 1 < len(data) and data[pos] == 0xFF and data[pos + 1] == 0xFF:
        pos += 1  # fill bytes before a marker
    if pos + 2 > len(data):
        raise _truncated(pos, len(data))
    if data[pos] != 0xFF:
        raise _corrupt(f"expected a marker at byte {pos}, found {data[pos]:#04x}")
    marker = data[pos + 1]
    if marker in _STANDALONE:
        return pos, marker, 0
    if marker in (0xD8, 0xD9):
        raise _corrupt(f"marker FF{marker:02X} at byte {pos} before any image data")
    if pos + 4 > len(data):
        raise _truncated(pos, len(data))
    length = int.from_bytes(data[pos + 2 : pos + 4], "big")
    if length < 2:
        raise _corrupt(f"segment FF{marker:02X} at byte {pos} has length {length}")
    if pos + 2 + length > len(data):
        raise _truncated(pos, len(data))
    return pos, marker, length


def _frame_size(data: bytes, pos: int, length: int) -> tuple[int, int]:
    if length < 8:
        raise _corrupt(f"frame header at byte {pos} is {length} bytes, needs at least 8")
    height = int.from_bytes(data[pos + 5 : pos + 7], "big")
    width = int.from_bytes(data[pos + 7 : pos + 9], "big")
    if height == 0 or width == 0:
        raise _corrupt(f"frame header at byte {pos} gives {width}x{height} (DNL-defined height is unsupported)")
    return width, height


def _check_eoi(data: bytes, scan_at: int) -> None:
    # FF D9 cannot occur inside entropy-coded data (FF is stuffed as FF 00), so an EOI after the
    # first scan means the file was written to the end; thumbnails sit before the first scan.
    if data.rfind(_EOI, scan_at) == -1:
        raise CaptureRejected(
            "truncated_jpeg",
            f"JPEG has no end-of-image marker FFD9 after its image data "
            f"({len(data)} bytes): the file is incomplete; {_FIX_RADAR}",
        )


def inspect_jpeg(data: bytes, *, max_pixels: int, min_side: int) -> tuple[int, int]:
    """``(width, height)`` of a JPEG read from its markers, without decoding it.

    Raises CaptureRejected with reason ``not_jpeg``, ``truncated_jpeg``, ``corrupt_image``
    (broken marker structure), ``image_too_large`` or ``image_too_small``.
    """
    width, height, scan_at = _scan_header(data)
    if width * height > max_pixels:
        raise CaptureRejected(
            "image_too_large",
            f"JPEG is {width}x{height} = {width * height} pixels, more than "
            f"the limit of {max_pixels}; lower the radar's resolution or "
            "raise spool.max_image_pixels",
        )
    if min(width, height) < min_side:
        raise CaptureRejected(
            "image_too_small",
            f"JPEG is {width}x{height}, a side is below the minimum of "
            f"{min_side} pixels; check the radar's output or lower "
            "spool.min_image_side",
        )
    _check_eoi(data, scan_at)
    return width, height


def decode_jpeg(data: bytes, *, reduce: int = 1) -> np.ndarray:
    """Decode a JPEG to a BGR uint8 ``[H, W, 3]`` array, at 1/``reduce`` size (1, 2, 4 or 8).

    Raises CaptureRejected ``not_jpeg``/``truncated_jpeg``/``corrupt_image``.
    """
    if reduce not in _REDUCE_FLAGS:
        raise ValueError(f"reduce must be one of {sorted(_REDUCE_FLAGS)}, got {reduce}")
    _, _, scan_at = _scan_header(data)
    _check_eoi(data, scan_at)
    flags = _REDUCE_FLAGS[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise CaptureRejected("corrupt_image", f"OpenCV could not decode the JPEG ({exc.err}); {_FIX_RADAR}") from exc
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise CaptureRejected("corrupt_image", f"OpenCV could not decode the JPEG ({len(data)} bytes); {_FIX_RADAR}")
    return image


def crop_region(
    box: tuple[int, int, int, int], margin: float, image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of ``box`` grown by ``margin`` x w/h on each side, clamped to the ``(width, height)`` image.

    A box with no area inside the image raises CaptureRejected ``invalid_box``.
    """
    x, y, w, h = box
    if w <= 0 or h <= 0 or margin < 0:
        raise CaptureRejected(
            "invalid_box",
            f"vehicle box {box} (x, y, w, h) with margin {margin} is empty or "
            "negative; fix the box's width/height in the sidecar or detector",
        )
    dx, dy = round(w * margin), round(h * margin)
    img_w, img_h = image_size
    x0, y0 = max(0, x - dx), max(0, y - dy)
    x1, y1 = min(img_w, x + w + dx), min(img_h, y + h + dy)
    if x1 <= x0 or y1 <= y0:
        raise CaptureRejected(
            "invalid_box",
            f"vehicle box {box} (x, y, w, h) lies outside the {img_w}x{img_h} "
            "image; check that the box uses this image's pixel coordinates",
        )
    return x0, y0, x1 - x0, y1 - y0


def crop(image: np.ndarray, box: tuple[int, int, int, int], margin: float = 0.0) -> np.ndarray:
    """The :func:`crop_region` of ``image`` (a view, no copy); CaptureRejected ``invalid_box`` if empty."""
    x0, y0, w, h = crop_region(box, margin, (image.shape[1], image.shape[0]))
    return image[y0 : y0 + h, x0 : x0 + w]


_INTERPOLATION = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}
INTERPOLATIONS = ("auto", *_INTERPOLATION)
"""``auto``: area when shrinking, linear when enlarging (what the agent always did)."""


def _resize(image: np.ndarray, width: int, height: int, interpolation: str = "auto") -> np.ndarray:
    src_h, src_w = image.shape[:2]
    if (src_w, src_h) == (width, height):
        return image
    if interpolation == "auto":
        shrinking = width < src_w or height < src_h
        flag = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    else:
        flag = _INTERPOLATION[interpolation]
    return cv2.resize(image, (width, height), interpolation=flag)


def _fit(image: np.ndarray, pp: Preprocessing, interpolation: str) -> tuple[np.ndarray, int, int]:
    """The resized image and its (x, y) offset in the H x W input (iaflash.engines.geometry)."""
    geometry = fit_geometry((image.shape[1], image.shape[0]), (pp.width, pp.height), pp.resize)
    x, y, w, h = geometry.region
    region = image[y : y + h, x : x + w]
    new_w, new_h = geometry.resized
    return _resize(region, new_w, new_h, interpolation), geometry.pad_x, geometry.pad_y


def preprocess(image_bgr: np.ndarray, pp: Preprocessing, *, interpolation: str = "auto") -> np.ndarray:
    """The model input ``[1, 3, H, W]`` float32: resize, colour order, then ``(px * scale - mean) / std``.

    Letterbox padding is 0 in the normalised tensor, i.e. the mean colour. ``interpolation`` is
    one of :data:`INTERPOLATIONS` (a bundle's ``crop.interpolation``).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8 or 0 in image_bgr.shape:
        raise ValueError(
            f"preprocess expects a non-empty BGR uint8 [H, W, 3] image, got {image_bgr.dtype} {list(image_bgr.shape)}"
        )
    fitted, off_x, off_y = _fit(image_bgr, pp, interpolation)
    if pp.color_order == "RGB":
        fitted = fitted[:, :, ::-1]
    mean = np.asarray(pp.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(pp.std, dtype=np.float32)
    values = (fitted.astype(np.float32) * np.float32(pp.scale) - mean) * inv_std
    out = np.zeros((1, 3, pp.height, pp.width), dtype=np.float32)
    h, w = values.shape[:2]
    out[0, :, off_y : off_y + h, off_x : off_x + w] = values.transpose(2, 0, 1)
    return out
