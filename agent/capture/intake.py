"""Intake stage: from a claimed capture to a model-ready tensor (CPU work, no file I/O).

JPEG header checks → reduced decode where safe → find the vehicle (sidecar box, else the
detector) → crop with a margin → quality gates → preprocess. Runs in the intake thread so
that it overlaps classification in the inference thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from iaflash.agent.capture.preprocess import crop, decode_jpeg, inspect_jpeg, preprocess
from iaflash.agent.capture.quality import quality_problem
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.capture.spool import Claimed
from iaflash.agent.capture.vehicle import Selection, detect_vehicles, select_vehicle
from iaflash.agent.config import SpoolConfig
from iaflash.agent.errors import EngineError
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle, Preprocessing
from iaflash.engines.detect import Detection

log = logging.getLogger(__name__)

# With a detector, the vehicle's size is unknown before decoding: never decode below half size.
MAX_REDUCTION_WITH_DETECTOR = 2

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

    def __init__(
        self, spool_cfg: SpoolConfig, pp: Preprocessing, detector: tuple[Backend, Bundle] | None = None
    ) -> None:
        self.spool_cfg = spool_cfg
        self.pp = pp
        self.detector = detector
        self.input_side = max(pp.height, pp.width)
        self.detector_errors = 0
        # One detector runner shared by the intake workers: TensorRT contexts are not thread-safe.
        self._detector_lock = threading.Lock()

    def prepare(self, claimed: Claimed, started: float) -> Work:
        timings: dict[str, float] = {"claim": (time.perf_counter() - started) * 1e3}
        capture = claimed.capture
        data = claimed.image_bytes[0]
        t = time.perf_counter()
        width, height = inspect_jpeg(
            data, max_pixels=self.spool_cfg.max_image_pixels, min_side=self.spool_cfg.min_image_side
        )
        factor = self._reduction(width, height, capture.vehicle_box)
        image = decode_jpeg(data, reduce=factor)
        timings["decode"] = (time.perf_counter() - t) * 1e3
        selection = self._find_vehicle(image, capture, (width, height), timings)
        t = time.perf_counter()
        evidence: dict[str, object] = {
            "decode_reduction": factor,
            "vehicle_source": selection.source,
            "vehicle_reason": selection.reason,
            "vehicles_seen": selection.candidates,
        }
        if selection.box is None:  # no vehicle, or several and no way to choose: inconclusive
            return Work(claimed, None, selection.reason, started, timings, evidence)
        region = crop(image, selection.box, margin=CROP_MARGIN)
        problem = quality_problem(region)
        tensor = None if problem else preprocess(region, self.pp)
        timings["preprocess"] = (time.perf_counter() - t) * 1e3
        return Work(claimed, tensor, problem, started, timings, evidence)

    def _reduction(self, width: int, height: int, box: tuple[int, int, int, int] | None) -> int:
        factor = choose_reduction(width, height, box, self.input_side)
        if box is None and self.detector is not None:
            factor = min(factor, MAX_REDUCTION_WITH_DETECTOR)
        return factor

    def _find_vehicle(
        self, image: np.ndarray, capture: Capture, original: tuple[int, int], timings: dict[str, float]
    ) -> Selection:
        """The sidecar's box if given, else the detector's choice; box None means inconclusive."""
        size = (image.shape[1], image.shape[0])
        box = capture.vehicle_box
        sidecar = None if box is None else scale_box(box, size[0] / original[0], size[1] / original[1])
        detections: list[Detection] = []
        classes: tuple[int, ...] = ()
        if sidecar is None and self.detector is not None:
            backend, bundle = self.detector
            assert bundle.manifest.detector is not None  # checked when the service loads it
            classes = bundle.manifest.detector.vehicle_classes
            t = time.perf_counter()
            try:
                with self._detector_lock:
                    detections = detect_vehicles(image, backend, bundle)
            except EngineError as exc:
                self.detector_errors += 1  # shown in the heartbeat's errors; the verdict says why
                log.error("detector failed: %s", exc)
                return Selection(None, f"detector failed: {exc}", "none", 0)
            finally:
                timings["detect"] = (time.perf_counter() - t) * 1e3
        if sidecar is None and self.detector is None:
            return Selection((0, 0, *size), "no vehicle box and no detector: whole frame classified", "none", 0)
        return select_vehicle(
            detections,
            image_size=size,
            sidecar_box=sidecar,
            lane=capture.lane,
            direction=capture.direction,
            vehicle_classes=classes,
        )
