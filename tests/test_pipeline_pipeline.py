"""iaflash.agent.pipeline.pipeline helpers: the JPEG decode reduction and the box scaling that follows it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iaflash.agent.capture.intake import choose_reduction, scale_box


@pytest.mark.parametrize(
    ("width", "height", "box", "side", "factor"),
    [
        # Whole image (no box): the smaller side decides. 2448x2048 radar frame, 224 model input.
        (2448, 2048, None, 224, 4),  # 2048/4 = 512 >= 448, 2048/8 = 256 < 448
        (4000, 3584, None, 224, 8),  # 3584/8 = 448: exactly 2x the input is enough
        (4000, 3583, None, 224, 4),  # one pixel less and 8 is too much
        (4000, 1792, None, 224, 4),  # 1792/4 = 448 exactly
        (4000, 1791, None, 224, 2),
        (4000, 896, None, 224, 2),  # 896/2 = 448 exactly
        (4000, 895, None, 224, 1),
        (640, 480, None, 224, 1),  # already small: full size
        (100, 100, None, 224, 1),  # smaller than the input: never reduce
        (2448, 2048, None, 64, 8),  # a tiny model input allows the largest reduction
        # With a box, the box's smaller side decides, not the frame's.
        (2448, 2048, (100, 200, 1800, 1000), 224, 2),  # 1000/2 = 500 >= 448, 1000/4 = 250
        (2448, 2048, (0, 0, 2448, 2048), 224, 4),
        (2448, 2048, (10, 10, 3584, 3584), 224, 4),  # overhanging box: only the visible 2038 px count
        (2448, 2048, (10, 10, 896, 1800), 224, 2),
        (2448, 2048, (10, 10, 895, 1800), 224, 1),
        (2448, 2048, (500, 500, 300, 200), 224, 1),
        (2448, 2048, (0, 0, 1, 1), 224, 1),
    ],
)
def test_choose_reduction_picks_the_largest_factor_keeping_2x_the_input(
    width: int, height: int, box: tuple[int, int, int, int] | None, side: int, factor: int
) -> None:
    """The largest of 8/4/2 whose reduced region side is >= 2x the model input, else 1 (boundaries included)."""
    assert choose_reduction(width, height, box, side) == factor


@given(width=st.integers(1, 10_000), height=st.integers(1, 10_000), side=st.integers(1, 1024))
@settings(max_examples=200, deadline=None)
def test_choose_reduction_keeps_the_region_large_enough_and_is_maximal(width: int, height: int, side: int) -> None:
    """Any result other than 1 keeps >= 2x the input; the next larger factor would not."""
    factor = choose_reduction(width, height, None, side)
    assert factor in (1, 2, 4, 8)
    region = min(width, height)
    if factor > 1:
        assert region / factor >= 2 * side
    if factor < 8:
        assert region / (factor * 2) < 2 * side


def test_choose_reduction_judges_only_the_part_of_the_box_inside_the_image() -> None:
    """A box that overhangs the frame must be judged by its visible part (the part that is decoded and cropped).

    Box x=2000, w=2000 on a 2448-wide frame: only 448 px are inside; at 1/4 the crop would be 112 px wide,
    a quarter of the 448 px the docstring promises for a 224 px model input.
    """
    assert choose_reduction(2448, 2048, (2000, 0, 2000, 2048), 224) == 1


@pytest.mark.parametrize(
    ("box", "sx", "sy", "expected"),
    [
        ((100, 200, 300, 400), 1.0, 1.0, (100, 200, 300, 400)),
        ((100, 200, 300, 400), 0.5, 0.5, (50, 100, 150, 200)),
        ((800, 800, 1600, 808), 0.125, 0.125, (100, 100, 200, 101)),
        ((100, 200, 300, 400), 0.25, 0.5, (25, 100, 75, 200)),  # x and y scale independently
        ((3, 5, 7, 9), 0.5, 0.5, (2, 2, 4, 4)),  # round half to even: 1.5->2, 2.5->2, 3.5->4, 4.5->4
        ((10, 10, 3, 3), 0.125, 0.125, (1, 1, 1, 1)),  # a tiny box keeps at least one pixel
        ((0, 0, 1, 1), 0.125, 0.125, (0, 0, 1, 1)),
    ],
)
def test_scale_box(box: tuple[int, int, int, int], sx: float, sy: float, expected: tuple[int, int, int, int]) -> None:
    """scale_box maps an (x, y, w, h) box to the reduced image, rounding and keeping w, h >= 1."""
    assert scale_box(box, sx, sy) == expected


def test_scale_box_follows_a_real_reduced_decode_size() -> None:
    """With the ratio of a real 1/8 decode (ceil(2448/8) = 306, ceil(2047/8) = 256), the full box maps to it."""
    x, y, w, h = scale_box((0, 0, 2448, 2047), 306 / 2448, 256 / 2047)
    assert (x, y, w, h) == (0, 0, 306, 256)


@given(
    x=st.integers(0, 5000),
    y=st.integers(0, 5000),
    w=st.integers(1, 5000),
    h=st.integers(1, 5000),
    factor=st.sampled_from([1, 2, 4, 8]),
)
@settings(max_examples=200, deadline=None)
def test_scale_box_always_has_area_and_is_within_half_a_pixel(x: int, y: int, w: int, h: int, factor: int) -> None:
    """Every scaled box has w, h >= 1 and each value is within half a pixel of the exact one."""
    s = 1 / factor
    sx_, sy_, sw, sh = scale_box((x, y, w, h), s, s)
    assert sw >= 1
    assert sh >= 1
    assert abs(sx_ - x * s) <= 0.5
    assert abs(sy_ - y * s) <= 0.5
    assert sw == 1 if w * s < 0.5 else abs(sw - w * s) <= 0.5
    assert sh == 1 if h * s < 0.5 else abs(sh - h * s) <= 0.5
