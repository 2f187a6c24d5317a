"""Intake stage: from a claimed capture to a model-ready tensor (pure CPU work, no I/O).

JPEG header checks → reduced decode where safe → vehicle crop → quality gates → preprocess.
Runs in the intake thread so that it overlaps inference in the other thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from agent.config import SpoolConfig
from agent.preprocess import crop, decode_jpeg, inspect_jpeg, preprocess
from agent.quality import quality_problem
from agent.spool import Claimed
from engines.bundle import Preprocessing

CROP_MARGIN = 0.1


@dataclass
class Work:
    """One capture between intake and inference."""

    claimed: Claimed
    tensor: np.ndarray | None
    image_problem: str | None
    started: float
    timings: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, object] = field(default_factory=dict)


def choose_reduction(width: int, height: int, box: tuple[int, int, int, int] | None, input_side: int) -> int:
    """Largest JPEG decode reduction (1, 2, 4, 8) that keeps the crop ≥ 2× the model input."""
    if box is None:
        region = min(width, height)
    else:  # only the part of the box inside the frame counts
        x, y, w, h = box
        region = max(0, min(min(x + w, width) - x, min(y + h, height) - y))
    for factor in (8, 4, 2):
        if region / factor >= 2 * input_side:
            return factor
    return 1


def scale_box(box: tuple[int, int, int, int], sx: float, sy: float) -> tuple[int, int, int, int]:
    x, y, w, h = box
    return round(x * sx), round(y * sy), max(1, round(w * sx)), max(1, round(h * sy))


class Preparer:
    """Turns a claimed capture into a Work item; raises CaptureRejected on bad images."""

    def __init__(self, spool_cfg: SpoolConfig, pp: Preprocessing) -> None:
        self.spool_cfg = spool_cfg
        self.pp = pp
        self.input_side = max(pp.height, pp.width)

    def prepare(self, claimed: Claimed, started: float) -> Work:
        timings: dict[str, float] = {"claim": (time.perf_counter() - started) * 1e3}
        data = claimed.image_bytes[0]
        t = time.perf_counter()
        width, height = inspect_jpeg(data, max_pixels=self.spool_cfg.max_image_pixels,
                                     min_side=self.spool_cfg.min_image_side)
        box = claimed.capture.vehicle_box
        factor = choose_reduction(width, height, box, self.input_side)
        image = decode_jpeg(data, reduce=factor)
        timings["decode"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        if box is not None:
            box = scale_box(box, image.shape[1] / width, image.shape[0] / height)
            region = crop(image, box, margin=CROP_MARGIN)
        else:
            region = image
        problem = quality_problem(region)
        tensor = None if problem else preprocess(region, self.pp)
        timings["preprocess"] = (time.perf_counter() - t) * 1e3
        evidence: dict[str, object] = {"decode_reduction": factor, "vehicle_box_source": "sidecar" if box else "none"}
        return Work(claimed, tensor, problem, started, timings, evidence)
