"""iaflash.engines.detect "gfl": anchor-free heads with distribution-style box regression (NanoDet / GFL).

A tiny real ONNX graph (onnx.helper Constant outputs) plays the head; the expected boxes are
worked out by hand from the bins: distance = sum(softmax(bins)_k * k) * stride.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_engines_detect import IN_H, IN_W, LABELS, constant_graph, detector_bundle, run_graph

from iaflash.engines.bundle import DetectorSpec, Manifest
from iaflash.engines.detect import decode_gfl, input_geometry, run_detector
from iaflash.engines.errors import BundleError, InferenceError
from iaflash.engines.manifest import Preprocessing
from iaflash.engines.onnxrt import OnnxRuntimeBackend

STRIDES = (8, 16)  # on a 48x32 input: 6x4 = 24 points at stride 8, 3x2 = 6 at stride 16
REG_MAX = 3  # 4 bins per side
BINS = 4 * (REG_MAX + 1)
C = len(LABELS)
N = 24 + 6
HOT = 30.0  # a bin logit this far above the others carries all the mass


def onehot_bins(*sides: int) -> np.ndarray:
    """Distance-bin logits that put (almost) all the mass on bin ``k`` for each of left, top, right, bottom."""
    out = np.zeros((4, REG_MAX + 1), np.float32)
    for side, k in enumerate(sides):
        out[side, k] = HOT
    return out.reshape(-1)


def head_rows() -> np.ndarray:
    """[N, C + BINS] rows: two overlapping cars at stride 8, one truck at stride 16, the rest background."""
    rows = np.zeros((N, C + BINS), np.float32)
    rows[:, :C] = 0.01
    # stride 8, point (x=2, y=1) at (16, 8): car 0.9; bins l=1 t=1 r=2 b=3 -> 8, 8, 16, 24 px
    p = 1 * 6 + 2
    rows[p, 0] = 0.9
    rows[p, C:] = onehot_bins(1, 1, 2, 3)
    # its neighbour (x=3, y=1) at (24, 8): car 0.6, box l=2 t=1 r=1 b=3 -> (8, 0, 32, 32): IoU 1 with the first
    q = 1 * 6 + 3
    rows[q, 0] = 0.6
    rows[q, C:] = onehot_bins(2, 1, 1, 3)
    # stride 16, point (x=1, y=1) at (16, 16): truck 0.8; left bins uniform -> 1.5 * 16 = 24 px, t=0 r=1 b=1
    t = 24 + 1 * 3 + 1
    rows[t, 1] = 0.8
    bins = onehot_bins(0, 0, 1, 1).reshape(4, REG_MAX + 1)
    bins[0] = 0.0  # uniform: the expectation is the middle, 1.5 bins
    rows[t, C:] = bins.reshape(-1)
    return rows


def gfl_spec(outputs: tuple[str, ...] = ("head",), **extra: object) -> DetectorSpec:
    fields: dict[str, object] = {
        "format": "gfl",
        "box_format": "xyxy",
        "normalized": False,
        "vehicle_classes": (0, 1),
        "outputs": outputs,
        "strides": STRIDES,
        "reg_max": REG_MAX,
        **extra,
    }
    return DetectorSpec(**fields)  # type: ignore[arg-type]


def per_stride(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The same head as class maps [1,C,H,W] and bin maps [1,BINS,H,W], one pair per stride."""
    out, start = {}, 0
    for stride in STRIDES:
        h, w = -(-IN_H // stride), -(-IN_W // stride)
        level = rows[start : start + h * w]
        start += h * w
        out[f"cls_{stride}"] = np.ascontiguousarray(level[:, :C].T.reshape(1, C, h, w))
        out[f"reg_{stride}"] = np.ascontiguousarray(level[:, C:].T.reshape(1, BINS, h, w))
    return out


def as_tuples(dets: list) -> list[tuple[tuple[float, ...], float, int]]:
    return [(tuple(round(v, 3) for v in (d.x1, d.y1, d.x2, d.y2)), round(d.score, 3), d.cls) for d in dets]


def test_gfl_decode_takes_the_softmax_expectation_of_the_bins_and_suppresses_overlaps() -> None:
    geometry = input_geometry((IN_W, IN_H), Preprocessing(height=IN_H, width=IN_W))
    dets = decode_gfl({"head": head_rows()[None]}, gfl_spec(), geometry, num_classes=C)
    assert as_tuples(dets) == [
        ((8.0, 0.0, 32.0, 32.0), 0.9, 0),
        ((0.0, 16.0, 32.0, 32.0), 0.8, 1),  # x1 = 16 - 24 clipped to 0
    ]


def test_gfl_boxes_map_back_to_the_original_image_pixels() -> None:
    """A 96x64 frame is stretched 2x into the 48x32 input: every coordinate doubles."""
    geometry = input_geometry((2 * IN_W, 2 * IN_H), Preprocessing(height=IN_H, width=IN_W))
    dets = decode_gfl({"head": head_rows()[None]}, gfl_spec(), geometry, num_classes=C)
    assert as_tuples(dets)[0] == ((16.0, 0.0, 64.0, 64.0), 0.9, 0)


def test_gfl_center_offset_and_sigmoid_scores() -> None:
    rows = head_rows()
    rows[:, :C] = np.log(rows[:, :C] / (1 - rows[:, :C]))  # logits: the sigmoid gives back the scores
    geometry = input_geometry((IN_W, IN_H), Preprocessing(height=IN_H, width=IN_W))
    dets = decode_gfl(
        {"head": rows[None]}, gfl_spec(score_activation="sigmoid", center_offset=0.5), geometry, num_classes=C
    )
    assert as_tuples(dets)[0] == ((12.0, 4.0, 36.0, 32.0), 0.9, 0)  # half a stride (4 px) further, clipped below


def test_a_packed_gfl_head_runs_through_the_onnxruntime_backend(tmp_path: Path) -> None:
    model = constant_graph({"head": head_rows()[None]})
    bundle = detector_bundle(tmp_path / "det", model, gfl_spec())
    with OnnxRuntimeBackend() as backend:
        backend.load(bundle)
        geometry = input_geometry((IN_W, IN_H), bundle.manifest.preprocessing)
        dets = run_detector(backend, bundle, np.zeros((1, 3, IN_H, IN_W), np.float32), geometry)
    assert as_tuples(dets) == [((8.0, 0.0, 32.0, 32.0), 0.9, 0), ((0.0, 16.0, 32.0, 32.0), 0.8, 1)]


def test_per_stride_class_and_bin_maps_decode_like_the_packed_head(tmp_path: Path) -> None:
    maps = per_stride(head_rows())
    outputs = ("cls_8", "reg_8", "cls_16", "reg_16")
    model = constant_graph({name: maps[name] for name in outputs})
    bundle = detector_bundle(tmp_path / "det", model, gfl_spec(outputs))
    geometry = input_geometry((IN_W, IN_H), bundle.manifest.preprocessing)
    direct = decode_gfl(run_graph(model), bundle.manifest.detector, geometry, num_classes=C)  # type: ignore[arg-type]
    with OnnxRuntimeBackend() as backend:
        backend.load(bundle)
        served = run_detector(backend, bundle, np.zeros((1, 3, IN_H, IN_W), np.float32), geometry)
    assert (
        as_tuples(direct) == as_tuples(served) == [((8.0, 0.0, 32.0, 32.0), 0.9, 0), ((0.0, 16.0, 32.0, 32.0), 0.8, 1)]
    )


def test_gfl_output_of_the_wrong_size_says_what_the_strides_need() -> None:
    geometry = input_geometry((IN_W, IN_H), Preprocessing(height=IN_H, width=IN_W))
    with pytest.raises(InferenceError, match=r"expected \[1, 30, 3\+16\] \(30 points for strides \[8, 16\]"):
        decode_gfl({"head": head_rows()[None, :-1]}, gfl_spec(), geometry, num_classes=C)
    maps = per_stride(head_rows())
    maps["reg_16"] = maps["reg_16"][:, :8]
    with pytest.raises(
        InferenceError, match=r"'reg_16' \(stride 16\) has shape \[1, 8, 2, 3\], expected \[1, 16, 2, 3\]"
    ):
        decode_gfl(maps, gfl_spec(("cls_8", "reg_8", "cls_16", "reg_16")), geometry, num_classes=C)


def _doc(detector: dict[str, object]) -> dict[str, object]:
    return {
        "schema_version": 1,
        "name": "d",
        "version": "1",
        "task": "detector",
        "input_name": "input",
        "input_shape": [1, 3, IN_H, IN_W],
        "preprocessing": {"height": IN_H, "width": IN_W},
        "output_name": "head",
        "files": {"model.onnx": "0" * 64, "labels.csv": "0" * 64},
        "detector": detector,
    }


def test_gfl_manifest_fields_round_trip_and_older_formats_keep_their_keys() -> None:
    doc = _doc({"format": "gfl", "vehicle_classes": [0], "outputs": ["head"], "strides": [8, 16, 32, 64]})
    manifest = Manifest.from_dict(doc)
    det = manifest.detector
    assert det is not None and det.strides == (8, 16, 32, 64) and det.reg_max == 7
    assert det.box_format == "xyxy" and det.normalized is False and det.score_activation == "none"
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    yolo = DetectorSpec("yolo", "cxcywh", False, (0,), ("raw",)).to_dict()
    assert "strides" not in yolo and "reg_max" not in yolo
    # and so is the whole manifest of a yolo detector: what older agents wrote and can read
    older = Manifest.from_dict(
        _doc(
            {"format": "yolo", "box_format": "cxcywh", "normalized": False, "vehicle_classes": [0], "outputs": ["head"]}
        )
    )
    written = older.to_dict()["detector"]
    assert not set(written) & {"strides", "reg_max", "center_offset", "score_activation"}, written
    assert Manifest.from_dict(json.loads(json.dumps(older.to_dict()))) == older


@pytest.mark.parametrize(
    ("detector", "message"),
    [
        ({"format": "gfl", "vehicle_classes": [0], "outputs": ["head"]}, r"'strides' is missing"),
        ({"format": "gfl", "vehicle_classes": [0], "outputs": ["head"], "strides": [0]}, r"detector\.strides' must be"),
        (
            {"format": "gfl", "vehicle_classes": [0], "outputs": ["head"], "strides": [8], "reg_max": 0},
            r"detector\.reg_max' must be >= 1",
        ),
        (
            {"format": "gfl", "vehicle_classes": [0], "outputs": ["head", "x", "y"], "strides": [8]},
            r"must be 1 or 2 distinct names",
        ),
        (
            {"format": "gfl", "vehicle_classes": [0], "outputs": ["head"], "strides": [8], "score_activation": "relu"},
            r"'score_activation' is 'relu'",
        ),
    ],
)
def test_bad_gfl_manifests_are_refused(detector: dict[str, object], message: str) -> None:
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(_doc(detector))
