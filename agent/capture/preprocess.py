"""Image preprocessing: JPEG checks, decode, crop, and the model's input tensor. Pure numpy/OpenCV.

* :func:`check_jpeg` (and :func:`inspect_jpeg`, its width and height) walks every JPEG marker
  segment (no decode, :mod:`iaflash.agent.capture.jpeg`) to refuse non-JPEG, truncated, corrupt,
  huge or tiny images and those past the decode budget (``spool.max_jpeg_scans``) cheaply,
  before any pixel is decoded.
* :func:`decode_jpeg` decodes to BGR uint8, optionally at 1/2, 1/4, 1/8 size (libjpeg's DCT
  scaling: much cheaper than decoding in full and resizing). EXIF orientation is ignored so that
  pixel coordinates (vehicle boxes from the radar or the detector) match the stored image. An
  image whose last MCU row is libjpeg's grey fill (a cut file closed by a fake end marker) is refused.
* :func:`preprocess` turns a BGR image into the ``[1, 3, H, W]`` float32 tensor a bundle's
  :class:`~iaflash.engines.bundle.Preprocessing` describes.

cv2 errors are mapped to :class:`~iaflash.agent.errors.CaptureRejected` here, with a stable ``reason``.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from iaflash.agent.capture.jpeg import DEFAULT_MAX_SCANS, FIX_RADAR, JpegStructure, grey_tail, read_structure
from iaflash.agent.errors import CaptureRejected
from iaflash.engines.bundle import Preprocessing
from iaflash.engines.geometry import fit_geometry

__all__ = ["INTERPOLATIONS", "check_jpeg", "crop", "crop_region", "decode_jpeg", "inspect_jpeg", "preprocess"]

logger = logging.getLogger(__name__)

_REDUCE_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def check_jpeg(data: bytes, *, max_pixels: int, min_side: int, max_scans: int = DEFAULT_MAX_SCANS) -> JpegStructure:
    """The JPEG's structure from its markers, without decoding it (iaflash.agent.capture.jpeg).

    Raises CaptureRejected with reason ``not_jpeg``, ``truncated_jpeg``, ``corrupt_image``
    (broken marker structure, scans out of order, image data that stops early),
    ``too_many_scans`` (the decode budget), ``image_too_large`` or ``image_too_small``.
    """
    return read_structure(data, max_scans=max_scans, max_pixels=max_pixels, min_side=min_side)


def inspect_jpeg(data: bytes, *, max_pixels: int, min_side: int, max_scans: int = DEFAULT_MAX_SCANS) -> tuple[int, int]:
    """``(width, height)`` of a JPEG read from its markers, without decoding it; see :func:`check_jpeg`."""
    structure = check_jpeg(data, max_pixels=max_pixels, min_side=min_side, max_scans=max_scans)
    return structure.width, structure.height


def decode_jpeg(
    data: bytes, *, reduce: int = 1, structure: JpegStructure | None = None, max_scans: int = DEFAULT_MAX_SCANS
) -> np.ndarray:
    """Decode a JPEG to a BGR uint8 ``[H, W, 3]`` array, at 1/``reduce`` size (1, 2, 4 or 8).

    ``structure`` is :func:`check_jpeg`'s result when the caller has it (the markers are then not
    walked twice). A decoded image whose last MCU row is libjpeg's uniform grey fill (the data ended
    early) is refused. Raises CaptureRejected ``not_jpeg``/``truncated_jpeg``/``corrupt_image``/
    ``too_many_scans``.
    """
    if reduce not in _REDUCE_FLAGS:
        raise ValueError(f"reduce must be one of {sorted(_REDUCE_FLAGS)}, got {reduce}")
    if structure is None:
        structure = read_structure(data, max_scans=max_scans)
    flags = _REDUCE_FLAGS[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise CaptureRejected("corrupt_image", f"OpenCV could not decode the JPEG ({exc.err}); {FIX_RADAR}") from exc
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise CaptureRejected("corrupt_image", f"OpenCV could not decode the JPEG ({len(data)} bytes); {FIX_RADAR}")
    if grey_tail(image, structure, reduce):
        raise CaptureRejected(
            "corrupt_image",
            f"JPEG image data stops early: its last {structure.mcu_size[1]}-pixel row of blocks decodes "
            "as the decoder's uniform grey fill (the file was cut and an end-of-image marker added, or damaged "
            f"on the way); {FIX_RADAR}",
        )
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
