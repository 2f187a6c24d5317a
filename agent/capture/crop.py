"""The crop contract applied: a vehicle box in a decoded frame → the classifier's input views.

:func:`prepare_crop` is the ONE function that cuts the classifier's input from a frame, used by the
daemon's intake (:mod:`iaflash.agent.capture.intake`) and by ``evaluate`` / ``calibrate``, so an
offline figure is a figure of the daemon. It applies the bundle's ``crop`` section
(:class:`~iaflash.engines.manifest.CropSpec`: margin, aspect, interpolation, accepted colour modes;
a manifest without one gets the legacy 10 % margin), the quality gates, the preprocessing, and
horizontal-flip test-time augmentation when the bundle's ``tta.hflip`` allows it.

Colour mode: a frame whose crop has (almost) no chroma is ``grey`` (an infrared night shot, or a
monochrome camera); it is classified only if the bundle lists ``grey`` in ``crop.color_modes``,
else the capture is ``inconclusive`` with a reason, never a flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from iaflash.agent.capture.preprocess import crop_region, preprocess
from iaflash.agent.capture.quality import quality_problem
from iaflash.engines.manifest import Manifest

__all__ = ["GREY_CHROMA", "CropInfo", "color_mode", "frame_box", "prepare_crop"]

Box = tuple[int, int, int, int]

GREY_CHROMA = 8.0
"""A crop is grey when the 99th percentile of its chroma deviation is at most this many levels: on a
64 x 64 area-downsampled copy, ``|(B-G) - median(B-G)| + |(G-R) - median(G-R)|`` per pixel, so a
uniform colour cast (an infrared camera storing a tinted image) counts as no colour. A greyscale
JPEG decoded in colour has 0. On the 1,221 cars-dev val photos (benchmarks/crop_bench.py), 10
studio shots of black, white or silver cars on white (0.8 %) fall under it; every greyscale
version of the photos does, and 77 % of versions with a warm cast of 12 levels."""

VIEW_ORIGINAL = "original"
VIEW_HFLIP = "hflip"


def color_mode(region_bgr: np.ndarray) -> Literal["color", "grey"]:
    """``grey`` when the BGR crop carries no colour (:data:`GREY_CHROMA`), else ``color``."""
    small = cv2.resize(region_bgr, (64, 64), interpolation=cv2.INTER_AREA).astype(np.int16)
    blue_green, green_red = small[:, :, 0] - small[:, :, 1], small[:, :, 1] - small[:, :, 2]
    deviation = np.abs(blue_green - np.median(blue_green)) + np.abs(green_red - np.median(green_red))
    return "grey" if float(np.percentile(deviation, 99)) <= GREY_CHROMA else "color"


def frame_box(box: Box, reduction: int) -> Box:
    """A box in a 1/``reduction`` decoded image → the frame's full-resolution pixels."""
    return box[0] * reduction, box[1] * reduction, box[2] * reduction, box[3] * reduction


@dataclass(frozen=True)
class CropInfo:
    """What was classified: the vehicle box and the crop, in FRAME pixels (full resolution).

    ``box`` is the vehicle box (None: the whole frame), ``region`` the crop actually cut (box
    grown by ``margin``, clamped to the frame), ``input_size`` the model input ``(w, h)``,
    ``views`` the tensor's rows (``original``, ``hflip``), ``problem`` why it is not classified.
    """

    box: Box | None
    region: Box
    margin: float
    aspect: str
    interpolation: str
    input_size: tuple[int, int]
    color_mode: Literal["color", "grey"]
    views: tuple[str, ...]
    problem: str | None = None
    reduction: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": None if self.box is None else list(self.box),
            "region": list(self.region),
            "margin": self.margin,
            "aspect": self.aspect,
            "interpolation": self.interpolation,
            "input_size": list(self.input_size),
            "color_mode": self.color_mode,
            "views": list(self.views),
            "decode_reduction": self.reduction,
            "problem": self.problem,
        }


def _refused_mode(mode: str, accepted: tuple[str, ...]) -> str:
    return (
        f"{mode} frame (infrared or monochrome) and the model accepts only {', '.join(accepted)} "
        f"(crop.color_modes {list(accepted)}); not judged"
    )


def prepare_crop(
    image: np.ndarray, box: Box | None, manifest: Manifest, *, reduction: int = 1
) -> tuple[np.ndarray | None, CropInfo]:
    """The classifier input ``[V, 3, H, W]`` for the vehicle ``box`` of a BGR ``image``, and its :class:`CropInfo`.

    ``box`` is ``(x, y, w, h)`` in ``image``'s pixels (None: the whole image); ``reduction`` is the
    JPEG decode reduction of ``image`` (1, 2, 4, 8), so that :class:`CropInfo` speaks frame pixels.
    The tensor is None exactly when ``CropInfo.problem`` says why (colour mode refused, too dark,
    no contrast). Raises CaptureRejected ``invalid_box`` for a box with no area inside the image.
    """
    spec, pp = manifest.crop_spec, manifest.preprocessing
    size = (image.shape[1], image.shape[0])
    whole = (0, 0, *size)
    region = whole if box is None else crop_region(box, spec.margin, size)
    x, y, w, h = region
    pixels = image[y : y + h, x : x + w]
    mode = color_mode(pixels)
    views = (VIEW_ORIGINAL, VIEW_HFLIP) if manifest.tta is not None and manifest.tta.hflip else (VIEW_ORIGINAL,)
    problem = _refused_mode(mode, spec.color_modes) if mode not in spec.color_modes else quality_problem(pixels)
    info = CropInfo(
        box=None if box is None else frame_box(box, reduction),
        region=frame_box(region, reduction),
        margin=spec.margin,
        aspect=pp.resize,
        interpolation=spec.interpolation,
        input_size=(pp.width, pp.height),
        color_mode=mode,
        views=views,
        problem=problem,
        reduction=reduction,
    )
    if problem is not None:
        return None, info
    tensor = preprocess(pixels, pp, interpolation=spec.interpolation)
    if VIEW_HFLIP in views:  # the mirrored input: flip the tensor's width axis
        tensor = np.concatenate([tensor, np.ascontiguousarray(tensor[:, :, :, ::-1])])
    return tensor, info
