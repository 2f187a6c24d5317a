"""The trained localiser judged through the daemon's own detector path, on frames it was not trained on.

Each held-out frame goes through exactly what the daemon runs when a capture has no sidecar box:
the backend from ``iaflash.engines.factory.create_backend`` (ONNX Runtime here), loaded and warmed
up as the service does, then ``iaflash.agent.capture.vehicle.detect_vehicles`` (the agent's
preprocessing, the engines' yolo decoding and NMS) and ``select_vehicle`` (which box the daemon
would classify). This is the one module of central that imports the agent's capture code
(pyproject's import contract names it): a figure of the model factory must come from the
daemon's code, never from a re-implementation.

Figures: recall of the vehicles at IoU 0.5 and 0.9 (best detection per vehicle), the median of
that IoU (0 for a missed vehicle), the same for the box the daemon selects against the frame's
largest vehicle, false detections (on no-vehicle frames, and unmatched ones on vehicle frames),
and the latency of ``detect_vehicles`` per frame (preprocess + inference + decoding).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from iaflash.agent.capture.vehicle import detect_vehicles, select_vehicle
from iaflash.engines.bundle import Bundle
from iaflash.engines.detect import Detection, detector_spec, iou_matrix
from iaflash.engines.factory import create_backend

from .detector_data import Frame, check_boxes, load_bgr

__all__ = ["evaluate_frames"]


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


class _Tally:
    def __init__(self) -> None:
        self.best_iou: list[float] = []
        self.selected_iou: list[float] = []
        self.no_box = 0
        self.frames = self.vehicle_frames = self.empty_frames = 0
        self.empty_with_detection = self.empty_detections = self.unmatched = 0
        self.latency_ms: list[float] = []
        self.sizes: set[tuple[int, int]] = set()

    def add(self, frame: Frame, detections: Sequence[Detection], selected: tuple[int, int, int, int] | None) -> None:
        self.frames += 1
        found = np.array([[d.x1, d.y1, d.x2, d.y2] for d in detections]).reshape(-1, 4)
        if not frame.boxes:
            self.empty_frames += 1
            self.empty_with_detection += int(len(detections) > 0)
            self.empty_detections += len(detections)
            return
        self.vehicle_frames += 1
        truth = np.asarray(frame.boxes, dtype=np.float64)
        ious = iou_matrix(truth, found) if len(found) else np.zeros((len(truth), 0))
        self.best_iou.extend(ious.max(axis=1).tolist() if ious.shape[1] else [0.0] * len(truth))
        self.unmatched += int((ious.max(axis=0) < 0.5).sum()) if ious.shape[1] else 0
        main = truth[np.argmax((truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1]))]
        if selected is None:
            self.no_box += 1
            self.selected_iou.append(0.0)
        else:
            x, y, w, h = selected
            self.selected_iou.append(float(iou_matrix(main[None], np.array([[x, y, x + w, y + h]]))[0, 0]))

    def figures(self) -> dict[str, Any]:
        best, sel = np.asarray(self.best_iou), np.asarray(self.selected_iou)
        return {
            "frames": self.frames,
            "vehicle_frames": self.vehicle_frames,
            "vehicles": len(best),
            "empty_frames": self.empty_frames,
            "recall_iou50": float((best >= 0.5).mean()) if len(best) else None,
            "recall_iou90": float((best >= 0.9).mean()) if len(best) else None,
            "median_iou": float(np.median(best)) if len(best) else None,
            "selected_median_iou": float(np.median(sel)) if len(sel) else None,
            "selected_iou90": float((sel >= 0.9).mean()) if len(sel) else None,
            "selected_none": self.no_box,
            "empty_frames_with_detection": self.empty_with_detection,
            "false_detections_empty": self.empty_detections,
            "unmatched_detections": self.unmatched,
            "latency_ms_p50": _percentile(self.latency_ms, 50),
            "latency_ms_p90": _percentile(self.latency_ms, 90),
        }


def evaluate_frames(
    bundle: Bundle,
    frames: Sequence[Frame],
    *,
    threads: int,
    report: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run every frame through the daemon's detector path (module doc); the figures as a dict."""
    spec = detector_spec(bundle)
    backend = create_backend("onnxruntime", threads=threads)
    backend.load(bundle)
    tally = _Tally()
    try:
        backend.warmup()
        for n, frame in enumerate(frames):
            image = load_bgr(frame.path, frame.where)
            size = (image.shape[1], image.shape[0])
            check_boxes(frame, size)
            tally.sizes.add(size)
            t = time.perf_counter()
            detections = detect_vehicles(image, backend, bundle)
            tally.latency_ms.append((time.perf_counter() - t) * 1e3)
            selection = select_vehicle(
                detections,
                image_size=size,
                sidecar_box=None,
                lane=None,
                direction=None,
                vehicle_classes=spec.vehicle_classes,
            )
            tally.add(frame, detections, selection.box)
            if (n + 1) % 200 == 0:
                report(f"checked {n + 1}/{len(frames)} frame(s) through the daemon's detector path")
    finally:
        backend.close()
    doc = tally.figures()
    doc["frame_sizes"] = [list(s) for s in sorted(tally.sizes)]
    doc["score_threshold"] = spec.score_threshold
    doc["threads"] = threads
    return doc
