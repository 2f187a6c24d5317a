"""The anonymiser: what an image may show once it leaves the box (docs/EVIDENCE.md).

Every path that sends or exports an image calls :func:`anonymise_jpeg`; nothing else may.
The safe default needs no model: everything outside the reviewed vehicle's box is destroyed
(other vehicles, their plates, pedestrians), and so is the occupants' part of the box (the
windscreen, ``evidence.occupant_region``). An operator's detector bundle (faces, persons,
plates; :mod:`iaflash.agent.evidence.detector`) adds its boxes on top; it never removes a mask.

Masking is irreversible: a solid fill, or pixelation with noise added to each block's mean
(never a blur that can be deconvolved); a masked pixel that would by chance keep its original
value is flipped, so no pixel of a masked region keeps its source value before encoding. The
result is re-encoded from pixels (so no EXIF, thumbnail, maker note or GPS survives), and every
APPn and COM segment the encoder writes (the JFIF header) is removed and the bytes checked.
What was masked is returned beside the image: :attr:`Anonymised.record`.

Any failure raises :class:`~iaflash.agent.errors.AnonymiseError`; callers answer with an error
and never fall back to the source image.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from iaflash.agent.config import EvidenceConfig
from iaflash.agent.errors import AnonymiseError

__all__ = [
    "ANONYMISER",
    "ANONYMISER_VERSION",
    "Anonymised",
    "Found",
    "MaskFinder",
    "Region",
    "anonymise_image",
    "anonymise_jpeg",
    "encode_clean",
    "metadata_segments",
    "plan_regions",
    "strip_metadata",
]

ANONYMISER = "iaflash-anonymise"
ANONYMISER_VERSION = "1.0"
"""Bumped whenever what is masked, or how, changes; recorded beside every image and dataset."""

Box = tuple[int, int, int, int]
"""(x, y, w, h) in image pixels."""

FILL = 127  # mid-grey: one byte value, so a frame is filled by memset
FILL_BGR = (FILL, FILL, FILL)
NOISE = 48  # pixelate: each block's mean moves by up to ±NOISE per channel
_FLIP = 0x40  # a masked pixel equal to its source is XOR'd with this
_SOS, _COM = 0xDA, 0xFE
_APP = frozenset(range(0xE0, 0xF0))
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


@dataclass(frozen=True)
class Found:
    """One box a detector found: ``kind`` face, person or plate; ``box`` (x, y, w, h) in image pixels."""

    kind: str
    box: Box
    score: float


class MaskFinder(Protocol):
    """A detector of things to mask (faces, persons, plates) in a decoded BGR image."""

    @property
    def info(self) -> dict[str, Any]:
        """name, version and classes, recorded beside each image."""
        ...

    def find(self, image_bgr: np.ndarray) -> list[Found]: ...


@dataclass(frozen=True)
class Region:
    """One masked region: ``outside_vehicle`` (box None: all but the kept box), ``occupants``, or a detection."""

    kind: str
    box: Box | None
    source: str
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "box": None if self.box is None else list(self.box)}
        doc["source"] = self.source
        if self.score is not None:
            doc["score"] = round(self.score, 4)
        return doc


@dataclass(frozen=True)
class Anonymised:
    """The clean JPEG and what was done to it (JSON-able)."""

    jpeg: bytes
    record: dict[str, Any]


def _clamp(x0: float, y0: float, x1: float, y1: float, size: tuple[int, int]) -> Box | None:
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(size[0], math.ceil(x1)), min(size[1], math.ceil(y1))
    return None if ix1 <= ix0 or iy1 <= iy0 else (ix0, iy0, ix1 - ix0, iy1 - iy0)


def _grow(box: Sequence[float], margin: float, size: tuple[int, int]) -> Box | None:
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return None
    dx, dy = w * margin, h * margin
    return _clamp(x - dx, y - dy, x + w + dx, y + h + dy, size)


def _centre_inside(box: Box, outer: Box) -> bool:
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return outer[0] <= cx < outer[0] + outer[2] and outer[1] <= cy < outer[1] + outer[3]


def plan_regions(
    size: tuple[int, int], vehicle_box: Sequence[float], policy: EvidenceConfig, found: Sequence[Found] = ()
) -> tuple[Box, list[Region]]:
    """The kept box (vehicle box + ``vehicle_margin``) and the regions to mask, for a ``(width, height)`` image.

    Faces and persons are masked wherever they are; a plate whose centre lies inside the vehicle
    box is the reviewed vehicle's own (the evidence) and stays, any other plate is masked.
    """
    vehicle = _grow(vehicle_box, 0.0, size)
    kept = _grow(vehicle_box, policy.vehicle_margin, size)
    if vehicle is None or kept is None:
        raise AnonymiseError(
            f"vehicle box {tuple(vehicle_box)} (x, y, w, h) has no area inside the {size[0]}x{size[1]} image; "
            "fix: the sidecar's vehicle_box must use this image's pixel coordinates"
        )
    regions: list[Region] = []
    if policy.mask_outside_vehicle:
        regions.append(Region("outside_vehicle", None, "policy"))
    if policy.occupant_region:
        fx0, fy0, fx1, fy1 = policy.occupant_region
        x, y, w, h = vehicle
        occupants = _clamp(x + fx0 * w, y + fy0 * h, x + fx1 * w, y + fy1 * h, size)
        if occupants is not None:
            regions.append(Region("occupants", occupants, "policy"))
    wanted = set(policy.mask_classes)
    for f in found:
        if f.kind not in wanted or (f.kind == "plate" and _centre_inside(f.box, vehicle)):
            continue
        grown = _grow(f.box, policy.mask_margin, size)
        if grown is not None:
            regions.append(Region(f.kind, grown, "detector", f.score))
    return kept, regions


def _destroy(patch: np.ndarray, policy: EvidenceConfig, rng: np.random.Generator) -> np.ndarray:
    """An irreversible replacement of ``patch``: no pixel keeps its source value."""
    h, w = patch.shape[:2]
    if policy.method == "fill":
        out = np.full_like(patch, FILL)
    else:
        side = max(policy.pixel_block, math.ceil(min(h, w) / 4))  # at most ~4 blocks across a face
        small = cv2.resize(patch, (max(1, w // side), max(1, h // side)), interpolation=cv2.INTER_AREA)
        noisy = small.astype(np.int16) + rng.integers(-NOISE, NOISE + 1, small.shape, dtype=np.int16)
        small = np.clip(noisy, 0, 255).astype(np.uint8)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    same = cv2.inRange(cv2.absdiff(out, patch), (0, 0, 0), (0, 0, 0))  # 255 where all three channels equal
    if cv2.countNonZero(same):
        flip = (_FLIP, _FLIP, _FLIP, 0)
        cv2.bitwise_xor(out, flip, dst=out, mask=same)  # type: ignore[call-overload]  # a Scalar src2: the stubs omit it
    return out


def anonymise_image(
    image: np.ndarray, kept: Box, regions: Sequence[Region], policy: EvidenceConfig, seed: int | None = None
) -> np.ndarray:
    """A new BGR image with every region destroyed; pixels of ``kept`` outside any region are untouched."""
    rng = np.random.default_rng(seed)
    kx, ky, kw, kh = kept
    if any(r.box is None for r in regions):
        out = _destroy(image, policy, rng)
        out[ky : ky + kh, kx : kx + kw] = image[ky : ky + kh, kx : kx + kw]
    else:
        out = image.copy()
    for region in regions:
        if region.box is not None:
            x, y, w, h = region.box
            out[y : y + h, x : x + w] = _destroy(image[y : y + h, x : x + w], policy, rng)
    return out


def _segments(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """``[(marker, start, end)]`` of the header segments and the offset of SOS; AnonymiseError if malformed."""
    if data[:2] != b"\xff\xd8":
        raise AnonymiseError("the encoded image does not start with a JPEG SOI marker")
    out: list[tuple[int, int, int]] = []
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise AnonymiseError(f"the encoded JPEG has no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == _SOS:
            return out, pos
        if marker in _STANDALONE:
            out.append((marker, pos, pos + 2))
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        out.append((marker, pos, end))
        pos = end
    raise AnonymiseError("the encoded JPEG has no image data (SOS)")


def metadata_segments(data: bytes) -> list[str]:
    """Names of the APPn (EXIF, JFIF, XMP, ICC…) and COM segments before the image data, e.g. ``["APP0"]``."""
    segments, _ = _segments(data)
    return [("COM" if m == _COM else f"APP{m - 0xE0}") for m, _, _ in segments if m in _APP or m == _COM]


def strip_metadata(data: bytes) -> bytes:
    """The same JPEG without its APPn and COM segments (the entropy-coded data is copied as is)."""
    segments, sos = _segments(data)
    kept = [data[start:end] for m, start, end in segments if m not in _APP and m != _COM]
    return b"".join([data[:2], *kept, data[sos:]])


def encode_clean(image: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG of ``image`` with no metadata segment at all (checked on the bytes)."""
    try:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    except cv2.error as exc:
        raise AnonymiseError(f"OpenCV could not encode the anonymised image ({exc.err})") from exc
    if not ok:
        raise AnonymiseError("OpenCV could not encode the anonymised image")
    data = strip_metadata(buf.tobytes())
    left = metadata_segments(data)
    if left:
        raise AnonymiseError(f"metadata segments {left} survived re-encoding; the image is not sent")
    return data


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:
        raise AnonymiseError(f"{name}: OpenCV could not decode the JPEG ({exc.err}); fix: inspect the file") from exc
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise AnonymiseError(f"{name}: OpenCV could not decode the JPEG ({len(data)} bytes); fix: inspect the file")
    return np.asarray(image)


def anonymise_jpeg(
    data: bytes,
    *,
    vehicle_box: Sequence[float],
    policy: EvidenceConfig,
    finder: MaskFinder | None = None,
    name: str = "image",
    seed: int | None = None,
) -> Anonymised:
    """Decode ``data``, mask it as ``policy`` says (plus ``finder``'s boxes), re-encode it without metadata.

    ``vehicle_box`` is the reviewed vehicle's (x, y, w, h) in the stored image's pixels (EXIF
    orientation ignored, as at intake). ``seed`` fixes the pixelation noise (tests only).
    Raises AnonymiseError; the caller must then send nothing.
    """
    image = _decode(data, name)
    size = (image.shape[1], image.shape[0])
    found: list[Found] = []
    if finder is not None:
        try:
            found = finder.find(image)
        except AnonymiseError:
            raise
        except Exception as exc:  # any detector failure withholds the image, whatever its type
            raise AnonymiseError(f"{name}: the mask detector failed ({type(exc).__name__}: {exc})") from exc
    kept, regions = plan_regions(size, vehicle_box, policy, found)
    clean = encode_clean(anonymise_image(image, kept, regions, policy, seed), policy.jpeg_quality)
    record = {
        "anonymiser": ANONYMISER,
        "version": ANONYMISER_VERSION,
        "method": policy.method,
        "image": name,
        "image_size": list(size),
        "vehicle_box": [round(float(v)) for v in vehicle_box],
        "kept_box": list(kept),
        "masked": [r.to_dict() for r in regions],
        "detector": None if finder is None else finder.info,
        "metadata": "none: re-encoded from pixels, APPn/COM segments removed",
        "jpeg_quality": policy.jpeg_quality,
        "source_sha256": hashlib.sha256(data).hexdigest(),
    }
    return Anonymised(clean, record)
