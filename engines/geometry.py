"""The one image↔tensor geometry: how an image region becomes the model's ``H x W`` input.

A leaf (numpy only). The classifier's preprocessing (``iaflash.agent.capture.preprocess``) and the
detector's box decoding (:mod:`iaflash.engines.detect`) both read it, so the pixels that are resized
into the tensor and the boxes mapped back out of it can never disagree.

``input = (image - crop) * scale + pad``, per axis:

* ``stretch``: the whole image, resized to ``H x W`` (aspect ratio not kept);
* ``letterbox``: the whole image, scaled by one factor to fit, centred, the rest padded;
* ``center_crop``: the largest centred region with the input's aspect ratio, resized to ``H x W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["RESIZE_MODES", "InputGeometry", "ResizeMode", "fit_geometry"]

ResizeMode = Literal["stretch", "letterbox", "center_crop"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("stretch", "letterbox", "center_crop")


@dataclass(frozen=True)
class InputGeometry:
    """How image pixels map to model-input pixels: ``input = (image - crop) * scale + pad``.

    ``crop_x/crop_y`` is the corner of the image region that is resized (center_crop only),
    ``crop_w/crop_h`` its size (the whole image otherwise), ``new_w/new_h`` the size it is resized
    to, ``scale_x/scale_y`` input pixels per image pixel, ``pad_x/pad_y`` the letterbox offset.
    """

    image_w: int
    image_h: int
    input_w: int
    input_h: int
    scale_x: float
    scale_y: float
    crop_x: int = 0
    crop_y: int = 0
    pad_x: int = 0
    pad_y: int = 0
    crop_w: int = 0  # 0: the whole image width (kept for callers that build one by hand)
    crop_h: int = 0
    new_w: int = 0  # 0: the whole input width
    new_h: int = 0

    @property
    def region(self) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` of the image region that is resized into the input."""
        return self.crop_x, self.crop_y, self.crop_w or self.image_w, self.crop_h or self.image_h

    @property
    def resized(self) -> tuple[int, int]:
        """``(width, height)`` the region is resized to, before padding."""
        return self.new_w or self.input_w, self.new_h or self.input_h

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """``[..., 4]`` xyxy image-pixel boxes (or ``[..., 2]`` points) → model-input pixels."""
        return self._affine(boxes, forward=True)

    def to_image(self, boxes: np.ndarray, *, clip: bool = True) -> np.ndarray:
        """``[..., 4]`` xyxy model-input-pixel boxes (or points) → image pixels, clipped to the image."""
        out = self._affine(boxes, forward=False)
        if clip:
            limits = np.tile([self.image_w, self.image_h], out.shape[-1] // 2)
            out = np.clip(out, 0.0, limits)
        return out

    def _affine(self, boxes: np.ndarray, *, forward: bool) -> np.ndarray:
        arr = np.asarray(boxes, dtype=np.float64)
        if arr.shape[-1] not in (2, 4):
            raise ValueError(f"expected [..., 4] boxes or [..., 2] points, got shape {list(arr.shape)}")
        reps = arr.shape[-1] // 2
        scale = np.tile([self.scale_x, self.scale_y], reps)
        crop = np.tile([self.crop_x, self.crop_y], reps)
        pad = np.tile([self.pad_x, self.pad_y], reps)
        if forward:
            result: np.ndarray = (arr - crop) * scale + pad
        else:
            result = (arr - pad) / scale + crop
        return result


def fit_geometry(image_size: tuple[int, int], input_size: tuple[int, int], resize: str) -> InputGeometry:
    """The geometry of a ``(width, height)`` image fitted into a ``(width, height)`` input by ``resize``."""
    src_w, src_h = image_size
    in_w, in_h = input_size
    if src_w <= 0 or src_h <= 0 or in_w <= 0 or in_h <= 0:
        raise ValueError(f"image and input sizes must be positive, got {image_size} and {input_size}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    base = {"image_w": src_w, "image_h": src_h, "input_w": in_w, "input_h": in_h}
    if resize == "letterbox":
        scale = min(in_w / src_w, in_h / src_h)
        new_w = min(in_w, max(1, round(src_w * scale)))
        new_h = min(in_h, max(1, round(src_h * scale)))
        return InputGeometry(
            **base,
            scale_x=new_w / src_w,
            scale_y=new_h / src_h,
            pad_x=(in_w - new_w) // 2,
            pad_y=(in_h - new_h) // 2,
            crop_w=src_w,
            crop_h=src_h,
            new_w=new_w,
            new_h=new_h,
        )
    if resize == "center_crop":
        crop_w = min(src_w, max(1, round(src_h * in_w / in_h)))
        crop_h = min(src_h, max(1, round(src_w * in_h / in_w)))
        return InputGeometry(
            **base,
            scale_x=in_w / crop_w,
            scale_y=in_h / crop_h,
            crop_x=(src_w - crop_w) // 2,
            crop_y=(src_h - crop_h) // 2,
            crop_w=crop_w,
            crop_h=crop_h,
            new_w=in_w,
            new_h=in_h,
        )
    return InputGeometry(
        **base, scale_x=in_w / src_w, scale_y=in_h / src_h, crop_w=src_w, crop_h=src_h, new_w=in_w, new_h=in_h
    )
