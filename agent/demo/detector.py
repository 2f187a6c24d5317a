"""The DEMO vehicle detector: a hand-built ONNX graph that finds the demo fleet's drawing in a scene.

It is NOT a learned detector and finds nothing in real photos. It knows the synthetic scenes of
``iaflash.agent.demo.fleet``: grey road, a sky band over the top fifth, thin white dashed lane marks, and
one vehicle that is strongly coloured, dark (wheels, windows, the dark-grey class) or bright white.

The graph, on a ``[1, 3, 120, 160]`` RGB input in 0..1 (stretch resize):

1. mask = saturation ``|R-G| + |G-B| > 0.1`` (bodies, blue-tinted windows) OR darkness
   ``max(R,G,B) < 0.34`` OR whiteness ``min(R,G,B) > 0.75``, times a constant row mask that
   blanks the sky band;
2. an opening (3×3 erosion = MaxPool of the negated mask, then 3×3 dilation) removes the lane
   marks, which are at most two input pixels wide;
3. box = min/max of the pixel-edge coordinate grids over the mask (``coord*mask + 2*(1-mask)``
   for the minimum), normalised xyxy;
4. score = 0.9 when the mask holds at least ``MIN_PIXELS`` pixels and at most ``MAX_FRACTION`` of
   the road area (a night scene darkens everything: "everything is a vehicle" means none), else 0;
   class 0 = "car".

Outputs follow the "nms" contract: ``boxes [1,1,4]``, ``scores [1,1]``, ``classes [1,1]`` and the
same row packed as ``detections [1,1,6]``, which is the one the manifest names so that a
single-output backend can run it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from iaflash.agent.demo.fleet import SCENE_H
from iaflash.engines.bundle import Bundle, DetectorSpec, Label, Preprocessing, write_bundle

__all__ = ["INPUT_H", "INPUT_W", "PREPROCESSING", "SPEC", "build_demo_detector_bundle", "detector_onnx"]

INPUT_H, INPUT_W = 120, 160
SKY_ROWS = math.ceil(INPUT_H * (SCENE_H // 5) / SCENE_H) + 1  # the sky band, plus one blended row
SATURATION = 0.1
DARK = 0.34
WHITE = 0.75
MIN_PIXELS = 30
MAX_FRACTION = 0.6
PREPROCESSING = Preprocessing(
    height=INPUT_H,
    width=INPUT_W,
    color_order="RGB",
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    scale=1 / 255,
    resize="stretch",
)
SPEC = DetectorSpec(
    format="nms",
    box_format="xyxy",
    normalized=True,
    vehicle_classes=(0,),
    outputs=("detections",),
    score_threshold=0.35,
    iou_threshold=0.5,
)


def _constants() -> dict[str, np.ndarray]:
    rows = np.zeros((1, 1, INPUT_H, INPUT_W), np.float32)
    rows[:, :, SKY_ROWS:, :] = 1.0
    grid_y, grid_x = np.mgrid[0:INPUT_H, 0:INPUT_W].astype(np.float32)
    shape = (1, 1, INPUT_H, INPUT_W)
    road = float(rows.sum())
    return {
        "row_mask": rows,
        "x_lo": (grid_x / INPUT_W).reshape(shape),
        "x_hi": ((grid_x + 1) / INPUT_W).reshape(shape),
        "y_lo": (grid_y / INPUT_H).reshape(shape),
        "y_hi": ((grid_y + 1) / INPUT_H).reshape(shape),
        "one": np.array(1.0, np.float32),
        "far": np.array(2.0, np.float32),
        "zero": np.array(0.0, np.float32),
        "sat_t": np.array(SATURATION, np.float32),
        "dark_t": np.array(DARK, np.float32),
        "white_t": np.array(WHITE, np.float32),
        "min_px": np.array(MIN_PIXELS - 0.5, np.float32),
        "max_px": np.array(MAX_FRACTION * road, np.float32),
        "conf": np.array(0.9, np.float32),
        "all_axes": np.array([1, 2, 3], np.int64),
        "shape_11": np.array([1, 1], np.int64),
        "shape_114": np.array([1, 1, 4], np.int64),
        "cls": np.zeros((1, 1), np.float32),
    }


def _mask_nodes(h: Any) -> list[Any]:
    """input → ``mask`` [1,1,H,W] float 0/1: coloured, dark or white pixels below the sky, opened."""
    n = h.make_node
    return [
        n("Split", ["input"], ["r", "g", "b"], axis=1),
        n("Sub", ["r", "g"], ["rg"]),
        n("Abs", ["rg"], ["rg_abs"]),
        n("Sub", ["g", "b"], ["gb"]),
        n("Abs", ["gb"], ["gb_abs"]),
        n("Add", ["rg_abs", "gb_abs"], ["sat"]),
        n("Greater", ["sat", "sat_t"], ["is_sat"]),
        n("Max", ["r", "g", "b"], ["hi"]),
        n("Less", ["hi", "dark_t"], ["is_dark"]),
        n("Min", ["r", "g", "b"], ["lo"]),
        n("Greater", ["lo", "white_t"], ["is_white"]),
        n("Or", ["is_sat", "is_dark"], ["sat_or_dark"]),
        n("Or", ["sat_or_dark", "is_white"], ["any"]),
        n("Cast", ["any"], ["any_f"], to=1),
        n("Mul", ["any_f", "row_mask"], ["raw_mask"]),
        n("Sub", ["one", "raw_mask"], ["background"]),
        n("MaxPool", ["background"], ["grown_bg"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("Sub", ["one", "grown_bg"], ["eroded"]),
        n("MaxPool", ["eroded"], ["mask"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]


def _box_nodes(h: Any) -> list[Any]:
    """mask → ``boxes`` [1,1,4] normalised xyxy (empty mask: x1=2 > x2=0, clipped to 0..1)."""
    n = h.make_node
    nodes = [n("Sub", ["one", "mask"], ["outside"]), n("Mul", ["outside", "far"], ["outside_far"])]
    for axis in ("x", "y"):
        nodes += [
            n("Mul", [f"{axis}_lo", "mask"], [f"{axis}_lo_m"]),
            n("Add", [f"{axis}_lo_m", "outside_far"], [f"{axis}_lo_far"]),
            n("ReduceMin", [f"{axis}_lo_far"], [f"{axis}1_4d"], axes=[1, 2, 3], keepdims=1),
            n("Reshape", [f"{axis}1_4d", "shape_11"], [f"{axis}1"]),
            n("Mul", [f"{axis}_hi", "mask"], [f"{axis}_hi_m"]),
            n("ReduceMax", [f"{axis}_hi_m"], [f"{axis}2_4d"], axes=[1, 2, 3], keepdims=1),
            n("Reshape", [f"{axis}2_4d", "shape_11"], [f"{axis}2"]),
        ]
    return [
        *nodes,
        n("Concat", ["x1", "y1", "x2", "y2"], ["box_raw"], axis=1),
        n("Clip", ["box_raw", "zero", "one"], ["box_flat"]),
        n("Reshape", ["box_flat", "shape_114"], ["boxes"]),
    ]


def _score_nodes(h: Any) -> list[Any]:
    """mask → ``scores`` [1,1], ``classes`` [1,1] int64 and the packed ``detections`` [1,1,6]."""
    n = h.make_node
    return [
        n("ReduceSum", ["mask", "all_axes"], ["count_4d"], keepdims=1),
        n("Reshape", ["count_4d", "shape_11"], ["count"]),
        n("Greater", ["count", "min_px"], ["enough"]),
        n("Less", ["count", "max_px"], ["not_all"]),
        n("And", ["enough", "not_all"], ["found"]),
        n("Cast", ["found"], ["found_f"], to=1),
        n("Mul", ["found_f", "conf"], ["scores"]),
        n("Cast", ["cls"], ["classes"], to=7),
        n("Unsqueeze", ["scores", "two_axis"], ["score_col"]),
        n("Unsqueeze", ["cls", "two_axis"], ["cls_col"]),
        n("Concat", ["boxes", "score_col", "cls_col"], ["detections"], axis=2),
    ]


def detector_onnx() -> bytes:
    """The serialised demo detector graph (opset 17, fixed batch of one)."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415  # demo-only dependency

    consts = {**_constants(), "two_axis": np.array([2], np.int64)}
    outputs = [
        helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 1, 6]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 1, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1]),
        helper.make_tensor_value_info("classes", TensorProto.INT64, [1, 1]),
    ]
    graph = helper.make_graph(
        [*_mask_nodes(helper), *_box_nodes(helper), *_score_nodes(helper)],
        "iaflash_demo_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, INPUT_H, INPUT_W])],
        outputs,
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="iaflash-demo")
    model.ir_version = 8
    return bytes(model.SerializeToString())


def build_demo_detector_bundle(path: Path) -> Bundle:
    """Write the DEMO detector as a bundle (task "detector", demo=True) in ``path`` and return it."""
    return write_bundle(
        path,
        onnx_bytes=detector_onnx(),
        labels=[Label(0, "car", "car")],
        name="iaflash-demo-detector",
        version="1.0.0",
        task="detector",
        input_name="input",
        input_shape=(1, 3, INPUT_H, INPUT_W),
        preprocessing=PREPROCESSING,
        output_name="detections",
        output_kind="probabilities",
        demo=True,
        detector=SPEC,
        description="DEMO DETECTOR: a hand-built colour/darkness mask that finds the synthetic demo fleet's "
        "drawing in synthetic demo scenes only; it detects nothing in real radar photos.",
    )
