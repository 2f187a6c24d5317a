"""Intake stage: from a claimed capture to the classifier's input views (CPU work, no file I/O).

Per image: JPEG structure checks (every marker, the scan budget) → reduced decode where safe →
find the vehicle (first image: the sidecar box, else the detector; second image: the detector) →
:func:`~iaflash.agent.capture.crop.prepare_crop` (the bundle's crop contract, colour mode,
quality gates, preprocessing, flip view). Runs in the
intake thread so that it overlaps classification in the inference thread.

:meth:`Preparer.prepare_capture` is the daemon's whole intake for one capture given its image
bytes; ``evaluate`` and ``calibrate`` call it (or :func:`prepare_crop` on a decoded photo) so
that offline figures are figures of the daemon.

A capture's second image (when the sidecar lists two) is extra evidence: its crop is classified
and fused with the first (docs/CAPTURE.md) when the detector finds the vehicle in it and its crop
passes the same gates; otherwise it is not used and the evidence says why. The first image alone
decides whether the capture can be judged at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from iaflash.agent.capture.crop import CropInfo, prepare_crop
from iaflash.agent.capture.preprocess import check_jpeg, decode_jpeg
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.capture.spool import Claimed
from iaflash.agent.capture.vehicle import Box, Selection, detect_vehicles, select_vehicle
from iaflash.agent.config import SpoolConfig
from iaflash.agent.errors import CaptureRejected, EngineError
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle
from iaflash.engines.detect import Detection
from iaflash.engines.manifest import LEGACY_CROP_MARGIN, Manifest

log = logging.getLogger(__name__)

# With a detector, the vehicle's size is unknown before decoding: never decode below half size.
MAX_REDUCTION_WITH_DETECTOR = 2

CROP_MARGIN = LEGACY_CROP_MARGIN  # kept for callers of the old constant; the bundle's crop.margin rules


@dataclass
class Work:
    """One capture between intake and inference."""

    claimed: Claimed
    tensor: np.ndarray | None
    image_problem: str | None
    started: float
    timings: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, object] = field(default_factory=dict)
    views: tuple[str, ...] = ()  # one name per row of ``tensor``: "original", "hflip", "image2", "image2/hflip"


@dataclass(frozen=True)
class Prepared:
    """One capture's intake result: the classifier input views (or why there are none) and the evidence."""

    tensor: np.ndarray | None
    problem: str | None
    views: tuple[str, ...]
    crops: tuple[CropInfo, ...]
    evidence: dict[str, object]


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


def _in_frame(info: CropInfo, sidecar_box: Box | None, frame: tuple[int, int]) -> CropInfo:
    """The crop info with the radar's own box (exact, not rescaled) and the region clipped to the frame."""

    def clip(b: Box) -> Box:
        x0, y0 = max(0, b[0]), max(0, b[1])
        return x0, y0, max(1, min(frame[0], b[0] + b[2]) - x0), max(1, min(frame[1], b[1] + b[3]) - y0)

    box = info.box if sidecar_box is None else sidecar_box
    return replace(info, box=None if box is None else clip(box), region=clip(info.region))


class Preparer:
    """Turns a claimed capture into a Work item; raises CaptureRejected on a bad first image."""

    def __init__(
        self, spool_cfg: SpoolConfig, manifest: Manifest, detector: tuple[Backend, Bundle] | None = None
    ) -> None:
        self.spool_cfg = spool_cfg
        self.manifest = manifest
        self.pp = manifest.preprocessing
        self.detector = detector
        self.input_side = max(self.pp.height, self.pp.width)
        self.detector_errors = 0
        # One detector runner shared by the intake workers: TensorRT contexts are not thread-safe.
        self._detector_lock = threading.Lock()

    def prepare(self, claimed: Claimed, started: float) -> Work:
        timings: dict[str, float] = {"claim": (time.perf_counter() - started) * 1e3}
        done = self.prepare_capture(claimed.capture, claimed.image_bytes, timings)
        return Work(claimed, done.tensor, done.problem, started, timings, done.evidence, done.views)

    def prepare_capture(
        self, capture: Capture, images: Sequence[bytes], timings: dict[str, float] | None = None
    ) -> Prepared:
        """The daemon's intake of one capture: its views, or the problem that stops the judgement.

        Raises CaptureRejected when the first image is not a usable JPEG (the spool rejects it).
        """
        timings = {} if timings is None else timings
        tensor, info, problem, evidence = self._one_image(images[0], capture, capture.vehicle_box, timings)
        crops = [] if info is None else [info]
        views = () if info is None or tensor is None else info.views
        if tensor is not None and len(images) > 1:
            second, note = self._second_image(images[1], capture)
            if second is not None:
                tensor = np.concatenate([tensor, second[0]])
                views = (*views, *(("image2" if v == "original" else f"image2/{v}") for v in second[1].views))
                crops.append(second[1])
            evidence["second_image"] = note if second is None else "fused"
        if crops:
            evidence["crop"] = crops[0].to_dict()
        if len(crops) > 1:
            evidence["crop_image2"] = crops[1].to_dict()
        return Prepared(tensor, problem, views, tuple(crops), evidence)

    def _one_image(
        self, data: bytes, capture: Capture, box: tuple[int, int, int, int] | None, timings: dict[str, float]
    ) -> tuple[np.ndarray | None, CropInfo | None, str | None, dict[str, object]]:
        """One image's views, crop and problem (None when it can be classified), and its evidence."""
        t = time.perf_counter()
        cfg = self.spool_cfg
        structure = check_jpeg(
            data, max_pixels=cfg.max_image_pixels, min_side=cfg.min_image_side, max_scans=cfg.max_jpeg_scans
        )
        width, height = structure.width, structure.height
        factor = self._reduction(width, height, box)
        image = decode_jpeg(data, reduce=factor, structure=structure)
        timings["decode"] = timings.get("decode", 0.0) + (time.perf_counter() - t) * 1e3
        selection = self._find_vehicle(image, capture, box, (width, height), timings)
        t = time.perf_counter()
        evidence: dict[str, object] = {
            "decode_reduction": factor,
            "vehicle_source": selection.source,
            "vehicle_reason": selection.reason,
            "vehicles_seen": selection.candidates,
        }
        if selection.box is None:  # no vehicle, or several and no way to choose: inconclusive
            return None, None, selection.reason, evidence
        whole = selection.source == "none"  # no box and no detector: the whole frame
        tensor, info = prepare_crop(image, None if whole else selection.box, self.manifest, reduction=factor)
        info = _in_frame(info, box if selection.source == "sidecar" else None, (width, height))
        timings["preprocess"] = timings.get("preprocess", 0.0) + (time.perf_counter() - t) * 1e3
        return tensor, info, info.problem, evidence

    def _second_image(self, data: bytes, capture: Capture) -> tuple[tuple[np.ndarray, CropInfo] | None, str]:
        """The second image's views, or why it is not used (it never rejects nor blocks the capture)."""
        if self.detector is None:
            return None, "not used: no detector to find the vehicle in it (the sidecar box is the first image's)"
        try:
            tensor, info, problem, _ = self._one_image(data, capture, None, {})
        except CaptureRejected as exc:
            return None, f"not used: {exc.reason}: {exc}"
        if tensor is None or info is None:
            return None, f"not used: {problem}"
        return (tensor, info), "fused"

    def _reduction(self, width: int, height: int, box: tuple[int, int, int, int] | None) -> int:
        factor = choose_reduction(width, height, box, self.input_side)
        if box is None and self.detector is not None:
            factor = min(factor, MAX_REDUCTION_WITH_DETECTOR)
        return factor

    def _find_vehicle(
        self,
        image: np.ndarray,
        capture: Capture,
        box: tuple[int, int, int, int] | None,
        original: tuple[int, int],
        timings: dict[str, float],
    ) -> Selection:
        """The sidecar's box if given, else the detector's choice; box None means inconclusive."""
        size = (image.shape[1], image.shape[0])
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
                timings["detect"] = timings.get("detect", 0.0) + (time.perf_counter() - t) * 1e3
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
