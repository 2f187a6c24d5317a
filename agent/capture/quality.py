"""Image quality gates applied to the vehicle crop before any flag can be raised."""

from __future__ import annotations

import cv2
import numpy as np

MIN_MEAN_LUMA = 30.0
MIN_LUMA_STD = 6.0


def quality_problem(region_bgr: np.ndarray) -> str | None:
    """A reason string when the crop is too dark or too flat to judge, else None."""
    if region_bgr.size == 0:
        return "empty vehicle crop"
    small = cv2.resize(region_bgr, (64, 64), interpolation=cv2.INTER_AREA)
    luma = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    mean, std = float(luma.mean()), float(luma.std())
    if mean < MIN_MEAN_LUMA:
        return f"poor image: too dark (mean luminance {mean:.0f} < {MIN_MEAN_LUMA:.0f})"
    if std < MIN_LUMA_STD:
        return f"poor image: no contrast (luminance std {std:.1f} < {MIN_LUMA_STD})"
    return None
