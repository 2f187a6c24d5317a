"""The localiser's bundle: a ``yolo``-contract detector the daemon loads (docs/DETECTOR.md).

One class (``0,car,car,``), input ``[N, 3, S, S]`` stretched from the whole frame, RGB, ImageNet
mean/std (the same arithmetic as the training views), output ``output`` ``[N, 5, P]`` of
normalised ``xyxy`` corners and a sigmoid score; the host keeps scores at or above
``score_threshold`` and runs NMS at ``iou_threshold``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iaflash.engines.bundle import Bundle, Label, Preprocessing, write_bundle
from iaflash.engines.manifest import DetectorSpec

from .detector_cache import INPUT_NAME, OUTPUT_NAME
from .recipe import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["make_detector_bundle"]


def make_detector_bundle(out: Path, onnx_path: Path, opts: dict[str, Any], size: int) -> Bundle:
    """Write the detector bundle into ``out`` (``opts``: name, version, thresholds, what it was trained on)."""
    pp = Preprocessing(
        height=size, width=size, color_order="RGB", mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="stretch"
    )
    spec = DetectorSpec(
        format="yolo",
        box_format="xyxy",
        normalized=True,
        vehicle_classes=(0,),
        outputs=(OUTPUT_NAME,),
        score_threshold=opts["score_threshold"],
        iou_threshold=opts["iou_threshold"],
    )
    trained_on = " + ".join(
        part
        for part in (
            f"frames of {opts['labels']}" if opts.get("labels") else "",
            f"synthetic pastes of the photos of {opts['synthesise_from']}" if opts.get("synthesise_from") else "",
        )
        if part
    )
    return write_bundle(
        out,
        onnx_bytes=onnx_path.read_bytes(),
        labels=[Label(0, "car", "car")],
        name=opts["name"],
        version=opts["version"],
        task="detector",
        input_name=INPUT_NAME,
        input_shape=["N", 3, size, size],
        preprocessing=pp,
        output_name=OUTPUT_NAME,
        output_kind="probabilities",
        detector=spec,
        description=f"Vehicle localiser (EfficientNet-Lite {opts['backbone']} trunk, anchor-free head) trained by "
        f"iaflash-central train-detector on {trained_on}",
    )
