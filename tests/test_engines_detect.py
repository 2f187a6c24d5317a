"""iaflash.engines.detect: decoding real ONNX detector outputs, host NMS, input geometry, the detector manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import IR_VERSION, OPSET

from iaflash.agent.capture.preprocess import preprocess
from iaflash.engines.bundle import Bundle, DetectorSpec, Label, Manifest, Preprocessing, write_bundle
from iaflash.engines.detect import (
    Detection,
    InputGeometry,
    decode_nms,
    decode_yolo,
    detector_spec,
    input_geometry,
    iou_matrix,
    nms,
    run_detector,
)
from iaflash.engines.errors import BundleError, InferenceError
from iaflash.engines.onnxrt import OnnxRuntimeBackend

IN_H, IN_W = 32, 48
LABELS = (Label(0, "car", "car"), Label(1, "truck", "truck"), Label(2, "person", "person"))


def constant_graph(outputs: dict[str, np.ndarray]) -> bytes:
    """A real ONNX model with a [1,3,IN_H,IN_W] input whose outputs are the given constant tensors."""
    nodes = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, f"{name}_value"))
        for name, value in outputs.items()
    ]
    dtypes = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    graph = helper.make_graph(
        nodes,
        "constant_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, IN_H, IN_W])],
        [helper.make_tensor_value_info(k, dtypes[v.dtype], list(v.shape)) for k, v in outputs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def run_graph(model: bytes) -> dict[str, np.ndarray]:
    """Every output of ``model`` run by onnxruntime on a zero input."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"input": np.zeros((1, 3, IN_H, IN_W), np.float32)})
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def spec(**overrides: object) -> DetectorSpec:
    base: dict[str, object] = {
        "format": "nms",
        "box_format": "xyxy",
        "normalized": True,
        "vehicle_classes": (0, 1),
        "outputs": ("boxes", "scores", "classes"),
    }
    base.update(overrides)
    return DetectorSpec(**base)  # type: ignore[arg-type]


def detector_bundle(path: Path, model: bytes, det: DetectorSpec, pp: Preprocessing | None = None) -> Bundle:
    return write_bundle(
        path,
        onnx_bytes=model,
        labels=LABELS,
        name="tiny-detector",
        version="1.0.0",
        task="detector",
        input_name="input",
        input_shape=[1, 3, IN_H, IN_W],
        preprocessing=pp or Preprocessing(height=IN_H, width=IN_W),
        output_name=det.outputs[0],
        detector=det,
    )


def stretch(image_w: int, image_h: int) -> InputGeometry:
    return input_geometry((image_w, image_h), Preprocessing(height=IN_H, width=IN_W))


def corners(dets: list[Detection]) -> list[tuple[float, ...]]:
    return [(*(round(v, 4) for v in (d.x1, d.y1, d.x2, d.y2, d.score)), d.cls) for d in dets]


# ---------------------------------------------------------------- "nms" contract

NMS_BOXES = np.array([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]]], np.float32)
NMS_SCORES = np.array([[0.6, 0.2, 0.9]], np.float32)
NMS_CLASSES = np.array([[0, 2, 1]], np.int64)


def test_decode_nms_keeps_scores_above_threshold_best_first_in_image_pixels() -> None:
    outputs = run_graph(constant_graph({"boxes": NMS_BOXES, "scores": NMS_SCORES, "classes": NMS_CLASSES}))
    dets = decode_nms(outputs, spec(), stretch(480, 320))  # input 48x32 → scale 10 both ways
    assert corners(dets) == [(240.0, 160.0, 480.0, 320.0, 0.9, 1), (48.0, 64.0, 240.0, 192.0, 0.6, 0)]


def test_decode_nms_threshold_comes_from_the_spec() -> None:
    outputs = run_graph(constant_graph({"boxes": NMS_BOXES, "scores": NMS_SCORES, "classes": NMS_CLASSES}))
    assert [d.cls for d in decode_nms(outputs, spec(score_threshold=0.1), stretch(480, 320))] == [1, 0, 2]
    assert decode_nms(outputs, spec(score_threshold=0.95), stretch(480, 320)) == []


def test_decode_nms_honours_num_detections() -> None:
    model = constant_graph(
        {"boxes": NMS_BOXES, "scores": NMS_SCORES, "classes": NMS_CLASSES, "num": np.array([1], np.int64)}
    )
    dets = decode_nms(run_graph(model), spec(outputs=("boxes", "scores", "classes", "num")), stretch(480, 320))
    assert [d.cls for d in dets] == [0]


def test_decode_nms_pixel_cxcywh_boxes_through_letterbox() -> None:
    """cxcywh in input pixels, letterboxed 200x100 image into 48x32: scale 0.24, 8 px of padding top and bottom."""
    geometry = input_geometry((200, 100), Preprocessing(height=IN_H, width=IN_W, resize="letterbox"))
    assert (geometry.pad_x, geometry.pad_y) == (0, 4)
    boxes = np.array([[[24.0, 16.0, 24.0, 12.0]]], np.float32)  # centre of the input, 24x12 px
    outputs: dict[str, np.ndarray] = {
        "boxes": boxes,
        "scores": np.array([[0.8]], np.float32),
        "classes": np.array([[0]], np.int64),
    }
    dets = decode_nms(outputs, spec(box_format="cxcywh", normalized=False), geometry)
    assert corners(dets) == [(50.0, 25.0, 150.0, 75.0, 0.8, 0)]


def test_packed_nms_output_runs_through_the_onnxruntime_backend(tmp_path: Path) -> None:
    packed = np.array([[[0.0, 0.0, 0.5, 0.5, 0.7, 1.0], [0.5, 0.5, 1.0, 1.0, 0.1, 0.0]]], np.float32)
    det = spec(outputs=("detections",))
    bundle = detector_bundle(tmp_path / "b", constant_graph({"detections": packed}), det)
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(bundle)
    dets = run_detector(backend, bundle, np.zeros((1, 3, IN_H, IN_W), np.float32), stretch(960, 640))
    assert corners(dets) == [(0.0, 0.0, 480.0, 320.0, 0.7, 1)]


def test_onnxruntime_serves_a_three_output_nms_graph_through_infer_outputs(tmp_path: Path) -> None:
    """OnnxRuntimeBackend returns every named output, so boxes/scores/classes graphs need no packing."""
    model = constant_graph({"boxes": NMS_BOXES, "scores": NMS_SCORES, "classes": NMS_CLASSES})
    bundle = detector_bundle(tmp_path / "b", model, spec())
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(bundle)
    dets = run_detector(backend, bundle, np.zeros((1, 3, IN_H, IN_W), np.float32), stretch(96, 64))
    direct = decode_nms({"boxes": NMS_BOXES, "scores": NMS_SCORES, "classes": NMS_CLASSES}, spec(), stretch(96, 64))
    assert dets == direct and len(dets) >= 1


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"boxes": np.zeros((1, 3, 5), np.float32)}, r"'boxes' has shape \[1, 3, 5\], expected \[1, N, 4\]"),
        ({"scores": np.zeros((1, 3), np.float32)}, r"output 'boxes' is missing"),
    ],
)
def test_decode_nms_bad_outputs_raise_a_clear_error(outputs: dict[str, np.ndarray], message: str) -> None:
    full: dict[str, np.ndarray] = {"scores": NMS_SCORES, "classes": NMS_CLASSES, **outputs}
    with pytest.raises(InferenceError, match=message):
        decode_nms(full, spec(), stretch(96, 64))


# ---------------------------------------------------------------- "yolo" contract


def yolo_raw(channels_first: bool = True) -> np.ndarray:
    """Ten anchors, three classes, cxcywh input pixels: two overlapping cars, a truck on them, a weak one."""
    rows = np.array(
        [
            [20, 10, 10, 8, 0.9, 0.1, 0.0],  # car, best
            [21, 10, 10, 8, 0.8, 0.0, 0.0],  # car, overlaps the best: suppressed
            [20, 11, 10, 8, 0.0, 0.7, 0.0],  # truck on the same spot: another class, survives
            [40, 25, 6, 6, 0.1, 0.0, 0.2],  # below the threshold
            *([[0, 0, 1, 1, 0, 0, 0]] * 6),  # empty anchors: N > 4+C, as in real heads
        ],
        np.float32,
    )
    return rows.T[None] if channels_first else rows[None]


@pytest.mark.parametrize("channels_first", [True, False], ids=["1x(4+C)xN", "1xNx(4+C)"])
def test_yolo_raw_output_both_axis_orders_through_the_backend(tmp_path: Path, channels_first: bool) -> None:
    raw = np.ascontiguousarray(yolo_raw(channels_first))
    det = spec(format="yolo", box_format="cxcywh", normalized=False, outputs=("raw",))
    bundle = detector_bundle(tmp_path / "b", constant_graph({"raw": raw}), det)
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(bundle)
    dets = run_detector(backend, bundle, np.zeros((1, 3, IN_H, IN_W), np.float32), stretch(IN_W, IN_H))
    assert corners(dets) == [(15.0, 6.0, 25.0, 14.0, 0.9, 0), (15.0, 7.0, 25.0, 15.0, 0.7, 1)]


def test_yolo_axis_is_found_without_a_class_count() -> None:
    det = spec(format="yolo", box_format="cxcywh", normalized=False, outputs=("raw",))
    first = decode_yolo(yolo_raw(True), det, stretch(IN_W, IN_H))
    last = decode_yolo(yolo_raw(False), det, stretch(IN_W, IN_H))
    assert corners(first) == corners(last)
    assert len(first) == 2


def test_yolo_threshold_and_iou_come_from_the_spec() -> None:
    raw = yolo_raw()
    low = spec(format="yolo", box_format="cxcywh", normalized=False, outputs=("raw",), score_threshold=0.15)
    assert sorted(d.cls for d in decode_yolo(raw, low, stretch(IN_W, IN_H))) == [0, 1, 2]
    loose = spec(format="yolo", box_format="cxcywh", normalized=False, outputs=("raw",), iou_threshold=0.95)
    assert [d.score for d in decode_yolo(raw, loose, stretch(IN_W, IN_H))] == pytest.approx([0.9, 0.8, 0.7])


def test_yolo_output_without_an_axis_of_4_plus_classes_is_refused() -> None:
    det = spec(format="yolo", box_format="cxcywh", normalized=False, outputs=("raw",))
    with pytest.raises(InferenceError, match=r"no axis of 4\+5 = 9"):
        decode_yolo(yolo_raw(), det, stretch(IN_W, IN_H), num_classes=5)


# ---------------------------------------------------------------- NMS and IoU


def test_iou_matrix_values() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float64)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], np.float64)
    assert iou_matrix(a, b) == pytest.approx(np.array([[50 / 150, 0.0], [0.0, 0.0]]))


def test_nms_is_greedy_by_score() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [2, 0, 12, 10]], np.float64)
    scores = np.array([0.5, 0.9, 0.3, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 3, 0, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


# ---------------------------------------------------------------- geometry

MODES = ("stretch", "letterbox", "center_crop")


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    image=st.tuples(st.integers(16, 5000), st.integers(16, 5000)),
    size=st.tuples(st.integers(8, 1024), st.integers(8, 1024)),
    point=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_geometry_round_trips_image_to_input_to_image(
    mode: str, image: tuple[int, int], size: tuple[int, int], point: tuple[float, float]
) -> None:
    pp = Preprocessing(height=size[1], width=size[0], resize=mode)  # type: ignore[arg-type]
    geo = input_geometry(image, pp)
    # a point of the part of the image the model sees (all of it, except outside a center crop)
    seen_w, seen_h = geo.input_w / geo.scale_x, geo.input_h / geo.scale_y
    if mode == "letterbox":
        seen_w, seen_h = image
    x = geo.crop_x + point[0] * min(seen_w, image[0])
    y = geo.crop_y + point[1] * min(seen_h, image[1])
    inside = geo.to_input(np.array([x, y]))
    assert -1e-6 <= inside[0] <= geo.input_w + 1e-6
    assert -1e-6 <= inside[1] <= geo.input_h + 1e-6
    back = geo.to_image(inside)
    assert abs(back[0] - x) < 1.0
    assert abs(back[1] - y) < 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image_size", [(640, 480), (300, 700), (1600, 1200)])
def test_geometry_matches_agent_preprocess(mode: str, image_size: tuple[int, int]) -> None:
    """A white square drawn in the image lands where the geometry says, in iaflash.agent.capture.preprocess's tensor."""
    w, h = image_size
    image = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = w // 3, h // 3, w // 3 + w // 5, h // 3 + h // 5
    image[y0:y1, x0:x1] = 255
    pp = Preprocessing(height=64, width=96, mean=(0, 0, 0), std=(1, 1, 1), resize=mode)  # type: ignore[arg-type]
    tensor = preprocess(image, pp)[0, 0]
    ys, xs = np.nonzero(tensor > 0.5)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    expected = input_geometry((w, h), pp).to_input(np.array([x0, y0, x1, y1], np.float64))
    expected = np.clip(expected, 0, [96, 64, 96, 64])  # a center crop may cut the square
    assert np.abs(found - expected).max() <= 1.0


def test_to_image_clips_to_the_image() -> None:
    geo = stretch(480, 320)
    assert geo.to_image(np.array([-5.0, -5.0, 60.0, 40.0])).tolist() == [0.0, 0.0, 480.0, 320.0]


# ---------------------------------------------------------------- the detector manifest


def test_detector_spec_round_trips_through_the_manifest(tmp_path: Path) -> None:
    det = spec(outputs=("detections",), score_threshold=0.4, iou_threshold=0.6)
    bundle = detector_bundle(tmp_path / "b", constant_graph({"detections": np.zeros((1, 1, 6), np.float32)}), det)
    assert bundle.manifest.detector == det
    document = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert document["detector"]["vehicle_classes"] == [0, 1]
    assert Manifest.from_dict(bundle.manifest.to_dict()) == bundle.manifest


def manifest_doc(task: str, detector: dict[str, object] | None, output_name: str = "boxes") -> dict[str, object]:
    doc: dict[str, object] = {
        "schema_version": 1,
        "name": "d",
        "version": "1",
        "task": task,
        "input_name": "input",
        "input_shape": [1, 3, IN_H, IN_W],
        "preprocessing": Preprocessing(height=IN_H, width=IN_W).to_dict(),
        "output_name": output_name,
        "files": {"model.onnx": "0" * 64, "labels.csv": "1" * 64},
    }
    if detector is not None:
        doc["detector"] = detector
    return doc


@pytest.mark.parametrize(
    ("task", "detector", "message"),
    [
        ("detector", None, r"'detector' is missing for task detector"),
        ("classifier", spec().to_dict(), r"'detector' is only allowed for task detector"),
        ("detector", {**spec().to_dict(), "format": "ssd"}, r"'format' is 'ssd', not a known value"),
        ("detector", {**spec().to_dict(), "format": "yolo"}, r"'detector.outputs' must be 1 distinct names"),
        ("detector", {**spec().to_dict(), "vehicle_classes": []}, r"'detector.vehicle_classes' must be a non-empty"),
        ("detector", {**spec().to_dict(), "score_threshold": 2}, r"'detector.score_threshold' must be between 0"),
        ("detector", {**spec().to_dict(), "anchors": 3}, r"'detector.anchors' is not a known key"),
        ("detector", {**spec().to_dict(), "outputs": ["a", "b", "c"]}, r"'output_name' is 'boxes', not one of"),
    ],
)
def test_bad_detector_manifests_are_refused(task: str, detector: dict[str, object] | None, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(manifest_doc(task, detector))


def test_classifier_manifest_has_no_detector_key() -> None:
    manifest = Manifest.from_dict(manifest_doc("classifier", None, "logits"))
    assert manifest.detector is None
    assert "detector" not in manifest.to_dict()


def test_vehicle_classes_must_be_rows_of_labels(tmp_path: Path) -> None:
    det = spec(outputs=("detections",), vehicle_classes=(0, 7))
    bundle = detector_bundle(tmp_path / "b", constant_graph({"detections": np.zeros((1, 1, 6), np.float32)}), det)
    with pytest.raises(BundleError, match=r"vehicle_classes \[7\] are not rows of labels.csv"):
        detector_spec(bundle)
