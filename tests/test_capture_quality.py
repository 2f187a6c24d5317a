"""iaflash.agent.capture.quality: the dark / flat / empty crop gates that make a verdict inconclusive."""

from __future__ import annotations

import numpy as np
import pytest

from iaflash.agent.capture.quality import MIN_LUMA_STD, MIN_MEAN_LUMA, quality_problem


def _textured(height: int = 120, width: int = 200, seed: int = 3) -> np.ndarray:
    """A mid-grey BGR image with strong random texture and edges, like a car body in daylight."""
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 220, size=(height, width, 3), dtype=np.uint8)
    img[:, : width // 2] //= 2  # a hard edge
    return img


def test_a_normal_textured_image_passes() -> None:
    """A bright enough image with contrast has no quality problem."""
    assert quality_problem(_textured()) is None


def test_a_dark_image_is_too_dark() -> None:
    """A night shot below the minimum mean luminance is refused with its measured mean."""
    dark = (_textured() // 10).astype(np.uint8)
    reason = quality_problem(dark)
    assert reason is not None
    assert reason.startswith("poor image: too dark (mean luminance ")
    assert f"< {MIN_MEAN_LUMA:.0f})" in reason


def test_a_black_image_is_too_dark() -> None:
    """All black is the extreme dark case: mean luminance 0."""
    assert quality_problem(np.zeros((80, 80, 3), np.uint8)) == "poor image: too dark (mean luminance 0 < 30)"


@pytest.mark.parametrize("level", [60, 128, 255])
def test_a_flat_image_has_no_contrast(level: int) -> None:
    """A uniform bright image (fog, overexposure, lens cap off a grey wall) is refused for no contrast."""
    flat = np.full((90, 160, 3), level, np.uint8)
    assert quality_problem(flat) == f"poor image: no contrast (luminance std 0.0 < {MIN_LUMA_STD})"


def test_dark_is_checked_before_flat() -> None:
    """An image both dark and flat is reported as too dark."""
    reason = quality_problem(np.full((64, 64, 3), 10, np.uint8))
    assert reason is not None
    assert "too dark" in reason


def test_low_noise_on_a_flat_image_is_still_flat() -> None:
    """Sensor noise of a couple of grey levels does not count as contrast."""
    rng = np.random.default_rng(0)
    img = np.clip(128 + rng.normal(0, 2, size=(100, 100, 3)), 0, 255).astype(np.uint8)
    reason = quality_problem(img)
    assert reason is not None
    assert "no contrast" in reason


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 50, 3), (50, 0, 3)])
def test_an_empty_crop_is_reported(shape: tuple[int, int, int]) -> None:
    """A box that crops to nothing gives 'empty vehicle crop' instead of an OpenCV error."""
    assert quality_problem(np.zeros(shape, np.uint8)) == "empty vehicle crop"


def test_a_crop_of_a_larger_frame_is_judged_on_its_own() -> None:
    """A dark crop taken from a bright frame (a view, not a copy) is judged on the crop's pixels."""
    frame = _textured(200, 300)
    frame[50:150, 100:200] = 5
    assert quality_problem(frame[50:150, 100:200]) is not None
    assert quality_problem(frame[0:50, 0:300]) is None


def test_tiny_crops_are_resized_not_refused() -> None:
    """A crop smaller than 64x64 is upscaled for the measurement; a checkerboard has plenty of contrast."""
    board = np.indices((8, 8)).sum(axis=0) % 2
    img = np.repeat((board * 200 + 30).astype(np.uint8)[:, :, None], 3, axis=2)
    assert quality_problem(img) is None
