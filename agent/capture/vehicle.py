"""Which vehicle in the frame did the radar measure? See docs/DETECTOR.md.

:func:`detect_vehicles` runs a detector bundle on a decoded image (the one call that infers);
:func:`select_vehicle` and :func:`crop_box_with_margin` are pure functions over boxes.

A radar photo (~5 MP) shows the road; the measured vehicle is a small part of it, and other
vehicles may be in the frame. :func:`select_vehicle` picks the box to classify:

1. the radar's own box (sidecar ``vehicle_box``) when it has one inside the image;
2. else the detector's vehicles, narrowed to the radar's lane when ``lane_regions`` maps it;
3. one strong candidate left → it; several → with a known direction, the *nearest* one (lowest
   bottom edge) when it is clearly nearer; else the largest when it clearly dominates;
4. else no box: "no vehicle detected", or "several vehicles (n) …" — the verdict is then
   inconclusive rather than a guess, since classifying the wrong car can hide a clone or flag an
   innocent driver.

The nearest-vehicle heuristic: the radar photographs the vehicle it measured at its trigger
distance, so that vehicle is the closest one in the camera's field. Approaching vehicles are shot
from the front as they come near and receding ones from the rear just after they pass; in both
cases the measured one is lower (bottom edge nearer the frame's bottom) and larger than the traffic
further down the road. A box does not show which way a vehicle drives, so vehicles in opposite
directions are told apart only by lane, through ``lane_regions``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from iaflash.agent.capture.preprocess import crop_region, preprocess
from iaflash.agent.errors import CaptureRejected
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle
from iaflash.engines.detect import Detection, input_geometry, run_detector

__all__ = ["Box", "Selection", "crop_box_with_margin", "detect_vehicles", "select_vehicle"]

Box = tuple[int, int, int, int]
"""(x, y, w, h) in image pixels."""

NO_VEHICLE = "no vehicle detected"
DIRECTIONS = ("approaching", "receding")


@dataclass(frozen=True)
class Selection:
    """The chosen vehicle box (or None), why, where it came from, and how many vehicles were seen."""

    box: Box | None
    reason: str
    source: Literal["sidecar", "detector", "none"]
    candidates: int


def _clamp(box: Sequence[float], image_size: tuple[int, int]) -> Box | None:
    """``(x, y, w, h)`` clamped to the image, or None when no part of it is inside."""
    x, y, w, h = (float(v) for v in box)
    img_w, img_h = image_size
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(img_w, math.ceil(x + w)), min(img_h, math.ceil(y + h))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def crop_box_with_margin(box: Box, margin: float, image_size: tuple[int, int]) -> Box:
    """``box`` grown by ``margin`` × its width/height on each side, clamped to the ``(width, height)`` image.

    The crop the daemon cuts (:func:`iaflash.agent.capture.preprocess.crop_region`, the one copy of
    this arithmetic). Raises ValueError for a negative margin or a box with no area inside the image.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    try:
        return crop_region(box, margin, image_size)
    except CaptureRejected as exc:
        raise ValueError(
            f"box {box} (x, y, w, h) has no area inside the {image_size[0]}x{image_size[1]} image"
        ) from exc


def _in_lane(det: Detection, region: tuple[float, float], img_w: int) -> bool:
    """The box's bottom-centre (where the wheels meet the road) lies in the lane's x-range."""
    centre = (det.x1 + det.x2) / 2 / img_w
    return region[0] <= centre < region[1]


def _detector_box(det: Detection, image_size: tuple[int, int]) -> Box:
    box = _clamp(det.xywh(), image_size)
    assert box is not None  # detections from iaflash.engines.detect are clipped and non-empty
    return box


@dataclass(frozen=True)
class _Rules:
    dominance: float
    near_margin: float
    min_relative_score: float


def _lane_pool(
    vehicles: list[Detection], lane: int | None, lane_regions: Mapping[int, tuple[float, float]] | None, img_w: int
) -> tuple[list[Detection], str]:
    if lane is None or not lane_regions or lane not in lane_regions:
        return vehicles, ""
    inside = [d for d in vehicles if _in_lane(d, lane_regions[lane], img_w)]
    if not inside:
        return vehicles, f"no vehicle inside lane {lane}'s region, all {len(vehicles)} considered"
    return inside, f"in lane {lane}"


def _choose(pool: list[Detection], direction: str | None, img_h: int, rules: _Rules) -> tuple[Detection | None, str]:
    """The one vehicle the rules single out among several, with the rule's name."""
    best_score = max(d.score for d in pool)
    strong = [d for d in pool if d.score >= rules.min_relative_score * best_score]
    if len(strong) == 1:
        return strong[0], "the only confident vehicle"
    if direction in DIRECTIONS:
        by_bottom = sorted(strong, key=lambda d: -d.y2)
        near, other = by_bottom[0], by_bottom[1]
        if near.y2 - other.y2 >= rules.near_margin * img_h and near.area * rules.dominance >= other.area:
            return near, f"the nearest vehicle (lowest in frame, {direction})"
    by_area = sorted(strong, key=lambda d: -d.area)
    if by_area[0].area >= rules.dominance * by_area[1].area:
        return by_area[0], "the largest vehicle"
    return None, f"several vehicles ({len(strong)}) and nothing to tell which one the radar measured"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _sidecar(
    sidecar_box: Sequence[float] | None, image_size: tuple[int, int], candidates: int
) -> tuple[Selection | None, str]:
    """The radar's box as a Selection, or why it was ignored ("" when there was none)."""
    if sidecar_box is None:
        return None, ""
    box = _clamp(sidecar_box, image_size)
    if box is None:
        return None, f"sidecar box {tuple(sidecar_box)} lies outside the {image_size[0]}x{image_size[1]} image, ignored"
    note = "" if tuple(box) == tuple(sidecar_box) else f" (clamped to the image from {tuple(sidecar_box)})"
    return Selection(box, f"radar sidecar box{note}", "sidecar", candidates), ""


def select_vehicle(
    detections: Sequence[Detection],
    *,
    image_size: tuple[int, int],
    sidecar_box: Sequence[float] | None,
    lane: int | None,
    direction: str | None,
    vehicle_classes: Sequence[int],
    lane_regions: Mapping[int, tuple[float, float]] | None = None,
    dominance: float = 1.5,
    near_margin: float = 0.05,
    min_relative_score: float = 0.5,
) -> Selection:
    """The box of the vehicle the radar measured, in the ``(width, height)`` image's pixels (module doc).

    ``lane_regions`` maps a lane number to its ``(left, right)`` x-range in fractions of the
    width. ``dominance``: how many times larger the largest (or nearest) box must be than the
    next; ``near_margin``: how much lower, as a fraction of the height, the nearest box's bottom
    edge must be; ``min_relative_score``: detections below this fraction of the best score are
    treated as weak and do not make the choice ambiguous.
    """
    wanted = set(vehicle_classes)
    vehicles = [d for d in detections if d.cls in wanted and d.area > 0]
    sidecar, ignored = _sidecar(sidecar_box, image_size, len(vehicles))
    if sidecar is not None:
        return sidecar
    if not vehicles:
        return Selection(None, _join(NO_VEHICLE, ignored), "none", 0)
    if len(vehicles) == 1:
        return Selection(_detector_box(vehicles[0], image_size), _join("one vehicle detected", ignored), "detector", 1)
    pool, lane_note = _lane_pool(vehicles, lane, lane_regions, image_size[0])
    if len(pool) == 1:
        return Selection(
            _detector_box(pool[0], image_size),
            _join(f"the only vehicle {lane_note}", ignored),
            "detector",
            len(vehicles),
        )
    chosen, rule = _choose(pool, direction, image_size[1], _Rules(dominance, near_margin, min_relative_score))
    if chosen is None:
        return Selection(None, _join(rule, lane_note, ignored), "none", len(vehicles))
    return Selection(_detector_box(chosen, image_size), _join(rule, lane_note, ignored), "detector", len(vehicles))


def detect_vehicles(image_bgr: np.ndarray, backend: Backend, bundle: Bundle) -> list[Detection]:
    """Run a loaded detector bundle on a BGR image; detections in that image's pixels, best first."""
    pp = bundle.manifest.preprocessing
    tensor = preprocess(image_bgr, pp)
    geometry = input_geometry((image_bgr.shape[1], image_bgr.shape[0]), pp)
    return run_detector(backend, bundle, tensor, geometry)
