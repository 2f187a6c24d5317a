"""Object-detector outputs → :class:`Detection` boxes in the original image's pixels. Pure numpy.

Two output contracts, chosen by the bundle's :class:`~iaflash.engines.bundle.DetectorSpec`:

* ``"nms"``: the graph did NMS itself. Outputs are boxes ``[1,N,4]``, scores ``[1,N]``, classes
  ``[1,N]`` and optionally num_detections ``[1]`` (named in ``spec.outputs`` in that order), or one
  packed ``[1,N,6]`` tensor of rows ``(box, score, class)``. See :func:`decode_nms`.
* ``"yolo"``: one raw ``[1,4+C,N]`` (or ``[1,N,4+C]``) tensor of cxcywh boxes and per-class
  scores, no objectness; thresholding and class-wise NMS run here. See :func:`decode_yolo`.
* ``"gfl"``: an anchor-free head with distribution-style box regression (NanoDet, GFL): per-stride
  class scores and distance bins, decoded by softmax expectation, class-wise NMS here. See
  :func:`decode_gfl`.

The seam with preprocessing: this module never resizes an image (that is ``iaflash.agent.capture.preprocess``,
OpenCV, and ``engines`` must not import the agent). It only needs the *geometry* of the resize,
which :func:`input_geometry` takes from :mod:`iaflash.engines.geometry`, the one copy of that
arithmetic, which ``iaflash.agent.capture.preprocess`` uses to resize the pixels::

    tensor = iaflash.agent.capture.preprocess.preprocess(image, bundle.manifest.preprocessing)
    geometry = input_geometry((image.shape[1], image.shape[0]), bundle.manifest.preprocessing)
    detections = run_detector(backend, bundle, tensor, geometry)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle, DetectorSpec, Preprocessing
from iaflash.engines.errors import BundleError, InferenceError
from iaflash.engines.geometry import InputGeometry, fit_geometry

__all__ = [
    "Detection",
    "InputGeometry",
    "MultiOutputInference",
    "decode",
    "decode_gfl",
    "decode_nms",
    "decode_yolo",
    "detector_spec",
    "input_geometry",
    "iou_matrix",
    "nms",
    "run_detector",
]

MAX_DETECTIONS = 300
PRE_NMS_TOP_K = 3000


@dataclass(frozen=True)
class Detection:
    """One detected object, corners in ORIGINAL image pixels (x2, y2 exclusive edges), class index."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    cls: int

    @property
    def width(self) -> float:
        return max(0.0, self.x2 - self.x1)

    @property
    def height(self) -> float:
        return max(0.0, self.y2 - self.y1)

    @property
    def area(self) -> float:
        return self.width * self.height

    def xywh(self) -> tuple[int, int, int, int]:
        """The integer ``(x, y, w, h)`` box covering this detection (edges rounded outwards)."""
        x0, y0 = int(np.floor(self.x1)), int(np.floor(self.y1))
        return x0, y0, max(1, int(np.ceil(self.x2)) - x0), max(1, int(np.ceil(self.y2)) - y0)


def input_geometry(image_size: tuple[int, int], pp: Preprocessing) -> InputGeometry:
    """The geometry of the preprocessing (iaflash.engines.geometry) for a ``(width, height)`` image."""
    return fit_geometry(image_size, (pp.width, pp.height), pp.resize)


# ---------------------------------------------------------------- NMS


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``a [N,4]`` and ``b [M,4]`` → ``[N,M]`` (0 where a union is empty)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    out: np.ndarray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS: indices of kept xyxy ``boxes``, best score first; a box overlapping a kept one by > iou goes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        if order.size == 1:
            break
        overlaps = iou_matrix(boxes[best : best + 1], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou]
    return np.asarray(keep, dtype=np.int64)


def _classwise_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """NMS within each class separately: overlapping boxes of different classes both survive."""
    members = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    kept = [idx[nms(boxes[idx], scores[idx], iou)] for idx in members]
    if not kept:
        return np.zeros(0, dtype=np.int64)
    merged = np.concatenate(kept)
    return merged[np.argsort(-scores[merged], kind="stable")][:MAX_DETECTIONS]


# ---------------------------------------------------------------- decoding


def _xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if box_format == "cxcywh":
        half = boxes[:, 2:] / 2
        boxes = np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)
    return boxes


def _to_detections(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, normalized: bool, geometry: InputGeometry
) -> list[Detection]:
    """Model-space xyxy boxes → image-pixel detections, empty ones dropped, best first."""
    if normalized:
        boxes = boxes * np.array([geometry.input_w, geometry.input_h] * 2, dtype=np.float64)
    image_boxes = geometry.to_image(boxes)
    found = [
        Detection(float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(s), int(c))
        for b, s, c in zip(image_boxes, scores, classes, strict=True)
        if b[2] > b[0] and b[3] > b[1]
    ]
    return sorted(found, key=lambda d: -d.score)


def _tensor(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in outputs:
        raise InferenceError(
            f"detector output {name!r} is missing (got {sorted(outputs)}); "
            "fix: make the manifest's detector.outputs match the model's output names"
        )
    return np.asarray(outputs[name])


def _squeeze_batch(arr: np.ndarray, name: str, tail: tuple[int, ...]) -> np.ndarray:
    """``[1, N, *tail]`` or ``[N, *tail]`` → ``[N, *tail]``; anything else is an InferenceError."""
    out = arr[0] if arr.ndim == len(tail) + 2 and arr.shape[0] == 1 else arr
    if out.ndim != len(tail) + 1 or tuple(out.shape[1:]) != tail:
        want = "[1, N" + "".join(f", {t}" for t in tail) + "]"
        raise InferenceError(f"detector output {name!r} has shape {list(arr.shape)}, expected {want}")
    return out


def _nms_arrays(outputs: Mapping[str, np.ndarray], spec: DetectorSpec) -> tuple[np.ndarray, ...]:
    if len(spec.outputs) == 1:
        packed = _tensor(outputs, spec.outputs[0])
        if packed.ndim == 2:
            packed = packed[None]
        if packed.ndim != 3 or packed.shape[0] != 1 or packed.shape[2] < 6:
            raise InferenceError(
                f"detector output {spec.outputs[0]!r} has shape {list(packed.shape)}, expected packed [1, N, 6]"
            )
        return packed[0, :, :4], packed[0, :, 4], packed[0, :, 5]
    boxes = _squeeze_batch(_tensor(outputs, spec.outputs[0]), spec.outputs[0], (4,))
    scores = _squeeze_batch(_tensor(outputs, spec.outputs[1]), spec.outputs[1], ()).reshape(-1)
    classes = _squeeze_batch(_tensor(outputs, spec.outputs[2]), spec.outputs[2], ()).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise InferenceError(
            f"detector outputs disagree on N: boxes {len(boxes)}, scores {len(scores)}, classes {len(classes)}"
        )
    if len(spec.outputs) == 4:
        count = int(np.asarray(_tensor(outputs, spec.outputs[3])).reshape(-1)[0])
        boxes, scores, classes = boxes[:count], scores[:count], classes[:count]
    return boxes, scores, classes


def decode_nms(outputs: Mapping[str, np.ndarray], spec: DetectorSpec, geometry: InputGeometry) -> list[Detection]:
    """Detections of a graph with NMS inside: keep scores >= threshold, map to image pixels, best first."""
    boxes, scores, classes = _nms_arrays(outputs, spec)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    keep = np.isfinite(scores) & (scores >= spec.score_threshold)
    classes = np.rint(np.asarray(classes, dtype=np.float64).reshape(-1)).astype(np.int64)
    boxes = _xyxy(np.asarray(boxes)[keep], spec.box_format)
    return _to_detections(boxes, scores[keep], classes[keep], spec.normalized, geometry)


def _yolo_rows(raw: np.ndarray, num_classes: int | None) -> np.ndarray:
    """``[1,4+C,N]`` or ``[1,N,4+C]`` → ``[N, 4+C]``. With no class count, the smaller axis is 4+C."""
    arr = np.asarray(raw)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or max(arr.shape) < 5:
        raise InferenceError(f"raw YOLO output has shape {list(np.shape(raw))}, expected [1, 4+C, N] or [1, N, 4+C]")
    rows, cols = arr.shape
    if num_classes is not None:
        want = 4 + num_classes
        if want not in (rows, cols):
            raise InferenceError(
                f"raw YOLO output {list(np.shape(raw))} has no axis of 4+{num_classes} = {want} "
                "(4 box values + one score per label); fix: check labels.csv"
            )
        channels_first = rows == want  # both equal: the usual [1, 4+C, N] export layout
    else:
        channels_first = rows <= cols
    return arr.T if channels_first else arr


def decode_yolo(
    raw: np.ndarray, spec: DetectorSpec, geometry: InputGeometry, *, num_classes: int | None = None
) -> list[Detection]:
    """Detections of a raw YOLO head: best class per anchor, score threshold, class-wise NMS, image pixels."""
    rows = np.asarray(_yolo_rows(raw, num_classes), dtype=np.float64)
    class_scores = rows[:, 4:]
    classes = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(rows)), classes]
    keep = np.flatnonzero(np.isfinite(scores) & (scores >= spec.score_threshold))
    keep = keep[np.argsort(-scores[keep], kind="stable")][:PRE_NMS_TOP_K]
    boxes = _xyxy(rows[keep, :4], spec.box_format)
    scores, classes = scores[keep], classes[keep]
    kept = _classwise_nms(boxes, scores, classes, spec.iou_threshold)
    return _to_detections(boxes[kept], scores[kept], classes[kept], spec.normalized, geometry)


def _gfl_points(spec: DetectorSpec, geometry: InputGeometry) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Each stride's map size ``(h, w)`` (ceil of input / stride) and every point's ``(cx, cy, stride)``."""
    sizes, points = [], []
    for stride in spec.strides:
        h, w = -(-geometry.input_h // stride), -(-geometry.input_w // stride)
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        cx, cy = (xs.reshape(-1) + spec.center_offset) * stride, (ys.reshape(-1) + spec.center_offset) * stride
        points.append(np.stack([cx, cy, np.full(h * w, float(stride))], axis=1))
        sizes.append((h, w))
    return sizes, np.concatenate(points)


def _gfl_rows(
    outputs: Mapping[str, np.ndarray], spec: DetectorSpec, sizes: list[tuple[int, int]], num_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(class scores [N, C], distance-bin logits [N, 4(R+1)])`` from the packed or per-stride outputs."""
    bins = 4 * (spec.reg_max + 1)
    n = sum(h * w for h, w in sizes)
    if len(spec.outputs) == 1:
        raw = np.asarray(_tensor(outputs, spec.outputs[0]), dtype=np.float64)
        rows = raw[0] if raw.ndim == 3 and raw.shape[0] == 1 else raw
        classes = rows.shape[-1] - bins if rows.ndim == 2 else -1
        if rows.ndim != 2 or rows.shape[0] != n or classes < 1 or num_classes not in (None, classes):
            want = f"[1, {n}, {num_classes or 'C'}+{bins}]"
            raise InferenceError(
                f"GFL output {spec.outputs[0]!r} has shape {list(raw.shape)}, expected {want} "
                f"({n} points for strides {list(spec.strides)}, 4 x {spec.reg_max + 1} distance bins); "
                "fix: check the manifest's detector.strides and reg_max against the export"
            )
        return rows[:, :classes], rows[:, classes:]
    cls_rows: list[np.ndarray] = []
    reg_rows: list[np.ndarray] = []
    for level, (h, w) in enumerate(sizes):
        for name, rows_out, depth in (
            (spec.outputs[2 * level], cls_rows, num_classes),
            (spec.outputs[2 * level + 1], reg_rows, bins),
        ):
            arr = np.asarray(_tensor(outputs, name), dtype=np.float64)
            if arr.ndim != 4 or arr.shape[0] != 1 or arr.shape[2:] != (h, w) or depth not in (None, arr.shape[1]):
                raise InferenceError(
                    f"GFL output {name!r} (stride {spec.strides[level]}) has shape {list(arr.shape)}, "
                    f"expected [1, {depth or 'C'}, {h}, {w}]; fix: check detector.strides, reg_max and outputs order"
                )
            rows_out.append(arr[0].reshape(arr.shape[1], -1).T)
    return np.concatenate(cls_rows), np.concatenate(reg_rows)


def decode_gfl(
    outputs: Mapping[str, np.ndarray], spec: DetectorSpec, geometry: InputGeometry, *, num_classes: int | None = None
) -> list[Detection]:
    """Detections of an anchor-free GFL/NanoDet head (DetectorSpec doc): softmax expectation, NMS here.

    Each side's distance is the expectation of its bins, ``sum softmax(bins)_k * k * stride``; the
    box is ``(cx - left, cy - top, cx + right, cy + bottom)`` in input pixels.
    """
    sizes, points = _gfl_points(spec, geometry)
    cls, reg = _gfl_rows(outputs, spec, sizes, num_classes)
    if spec.score_activation == "sigmoid":
        cls = 1.0 / (1.0 + np.exp(-cls))
    classes = cls.argmax(axis=1)
    scores = cls[np.arange(len(cls)), classes]
    keep = np.flatnonzero(np.isfinite(scores) & (scores >= spec.score_threshold))
    keep = keep[np.argsort(-scores[keep], kind="stable")][:PRE_NMS_TOP_K]
    logits = reg[keep].reshape(-1, 4, spec.reg_max + 1)
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    weights /= weights.sum(axis=2, keepdims=True)
    distances = (weights @ np.arange(spec.reg_max + 1, dtype=np.float64)) * points[keep, 2:3]
    cx, cy = points[keep, 0], points[keep, 1]
    boxes = np.stack([cx - distances[:, 0], cy - distances[:, 1], cx + distances[:, 2], cy + distances[:, 3]], axis=1)
    scores, classes = scores[keep], classes[keep]
    kept = _classwise_nms(boxes, scores, classes, spec.iou_threshold)
    return _to_detections(boxes[kept], scores[kept], classes[kept], spec.normalized, geometry)


def decode(
    outputs: Mapping[str, np.ndarray], spec: DetectorSpec, geometry: InputGeometry, *, num_classes: int | None = None
) -> list[Detection]:
    """:func:`decode_nms`, :func:`decode_yolo` or :func:`decode_gfl`, as ``spec.format`` says."""
    if spec.format == "gfl":
        return decode_gfl(outputs, spec, geometry, num_classes=num_classes)
    if spec.format == "yolo":
        return decode_yolo(_tensor(outputs, spec.outputs[0]), spec, geometry, num_classes=num_classes)
    return decode_nms(outputs, spec, geometry)


# ---------------------------------------------------------------- running


@runtime_checkable
class MultiOutputInference(Protocol):
    """A backend that can return every named output of the graph (needed by 3/4-output NMS graphs)."""

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def detector_spec(bundle: Bundle) -> DetectorSpec:
    """The bundle's detector description; BundleError if it is not a detector or its classes are unknown."""
    spec = bundle.manifest.detector
    if bundle.manifest.task != "detector" or spec is None:
        raise BundleError(
            f"{bundle.path}: task is {bundle.manifest.task!r}, not a detector; "
            "fix: point the detector setting at a detector bundle"
        )
    bad = [c for c in spec.vehicle_classes if c >= len(bundle.labels)]
    if bad:
        raise BundleError(
            f"{bundle.path}: detector.vehicle_classes {bad} are not rows of labels.csv "
            f"(0..{len(bundle.labels) - 1}); fix: re-pack the bundle"
        )
    return spec


def run_detector(backend: Backend, bundle: Bundle, tensor: np.ndarray, geometry: InputGeometry) -> list[Detection]:
    """Run a loaded detector on one preprocessed ``[1,3,H,W]`` tensor; detections in image pixels.

    A backend with ``infer_outputs`` (:class:`MultiOutputInference`) serves any contract; a plain
    :class:`Backend` returns only the manifest's ``output_name``, so it serves single-output
    contracts ("yolo", packed "nms") and refuses a 3/4-output NMS graph with an InferenceError.
    """
    spec = detector_spec(bundle)
    if isinstance(backend, MultiOutputInference):
        outputs = backend.infer_outputs(tensor)
    elif len(spec.outputs) == 1:
        outputs = {spec.outputs[0]: backend.infer(tensor)}
    else:
        raise InferenceError(
            f"detector {bundle.manifest.name!r} has {len(spec.outputs)} outputs {list(spec.outputs)} but the "
            f"{backend.kind} backend returns only one; fix: export the detector with one packed [1,N,6] "
            "output, or use a backend with infer_outputs"
        )
    return decode(outputs, spec, geometry, num_classes=len(bundle.labels))
