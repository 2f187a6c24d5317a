"""iaflash.agent.capture.vehicle: which box is the vehicle the radar measured (truth table), and crop margins."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iaflash.agent.capture.vehicle import Selection, crop_box_with_margin, select_vehicle
from iaflash.engines.detect import Detection

SIZE = (1600, 1200)
CAR, TRUCK, PERSON = 0, 1, 2
VEHICLES = (CAR, TRUCK)
LANES = {1: (0.0, 0.5), 2: (0.5, 1.0)}


def det(x: float, y: float, w: float, h: float, score: float = 0.9, cls: int = CAR) -> Detection:
    return Detection(x, y, x + w, y + h, score, cls)


def select(detections: list[Detection], **kw: object) -> Selection:
    args: dict[str, object] = {
        "image_size": SIZE,
        "sidecar_box": None,
        "lane": None,
        "direction": None,
        "vehicle_classes": VEHICLES,
    }
    args.update(kw)
    return select_vehicle(detections, **args)  # type: ignore[arg-type]


LEFT = det(100, 500, 500, 300)  # lane 1, bottom at 800
RIGHT = det(900, 520, 480, 290)  # lane 2, same size and depth
FAR_RIGHT = det(1000, 300, 460, 280)  # lane 2, same size but higher in frame (bottom at 580)
BIG = det(850, 450, 700, 500)  # more than 1.5x LEFT's area


def test_sidecar_box_wins_over_detections() -> None:
    sel = select([LEFT, RIGHT], sidecar_box=(10, 20, 300, 200))
    assert sel == Selection((10, 20, 300, 200), "radar sidecar box", "sidecar", 2)


def test_sidecar_box_partly_outside_is_clamped_and_said() -> None:
    sel = select([], sidecar_box=(1500, 1100, 300, 200))
    assert sel.box == (1500, 1100, 100, 100)
    assert sel.source == "sidecar"
    assert "clamped to the image from (1500, 1100, 300, 200)" in sel.reason


def test_sidecar_box_entirely_outside_is_ignored_and_the_detector_decides() -> None:
    sel = select([LEFT], sidecar_box=(2000, 10, 100, 100))
    assert sel.box == (100, 500, 500, 300)
    assert sel.source == "detector"
    assert (
        sel.reason == "one vehicle detected; sidecar box (2000, 10, 100, 100) lies outside the 1600x1200 image, ignored"
    )


def test_sidecar_box_outside_and_no_detection_is_no_vehicle() -> None:
    sel = select([], sidecar_box=(-500, -500, 100, 100))
    assert sel.box is None
    assert sel.source == "none"
    assert sel.reason.startswith("no vehicle detected; sidecar box (-500, -500, 100, 100) lies outside")


def test_no_detection_is_no_vehicle() -> None:
    assert select([]) == Selection(None, "no vehicle detected", "none", 0)


def test_non_vehicle_classes_are_not_vehicles() -> None:
    assert select([det(100, 100, 400, 400, cls=PERSON)]) == Selection(None, "no vehicle detected", "none", 0)


def test_one_vehicle_is_chosen() -> None:
    assert select([RIGHT, det(0, 0, 50, 50, cls=PERSON)]) == Selection(
        (900, 520, 480, 290), "one vehicle detected", "detector", 1
    )


def test_detection_box_is_rounded_outwards() -> None:
    assert select([Detection(10.4, 20.6, 110.2, 220.01, 0.9, CAR)]).box == (10, 20, 101, 201)


@pytest.mark.parametrize(("lane", "expected"), [(1, LEFT), (2, RIGHT)])
def test_lane_region_chooses_between_similar_vehicles(lane: int, expected: Detection) -> None:
    sel = select([LEFT, RIGHT], lane=lane, lane_regions=LANES)
    assert sel.box == expected.xywh()
    assert sel.reason == f"the only vehicle in lane {lane}"
    assert (sel.source, sel.candidates) == ("detector", 2)


@pytest.mark.parametrize("direction", ["approaching", "receding"])
def test_direction_chooses_the_nearest_vehicle(direction: str) -> None:
    sel = select([FAR_RIGHT, LEFT], direction=direction)
    assert sel.box == LEFT.xywh()
    assert sel.reason == f"the nearest vehicle (lowest in frame, {direction})"


def test_lane_then_direction_within_the_lane() -> None:
    near_right = det(950, 700, 480, 300)
    sel = select([LEFT, FAR_RIGHT, near_right], lane=2, lane_regions=LANES, direction="approaching")
    assert sel.box == near_right.xywh()
    assert sel.reason == "the nearest vehicle (lowest in frame, approaching); in lane 2"
    assert sel.candidates == 3


def test_largest_vehicle_is_the_fallback_when_it_dominates() -> None:
    sel = select([LEFT, BIG])
    assert sel.box == BIG.xywh()
    assert sel.reason == "the largest vehicle"


def test_similar_vehicles_with_nothing_to_choose_are_inconclusive() -> None:
    sel = select([LEFT, RIGHT])
    assert sel == Selection(None, "several vehicles (2) and nothing to tell which one the radar measured", "none", 2)


def test_similar_depth_with_a_direction_is_still_inconclusive() -> None:
    sel = select([LEFT, RIGHT], direction="approaching")
    assert sel.box is None
    assert sel.reason.startswith("several vehicles (2)")


def test_lane_with_no_vehicle_in_it_falls_back_to_all_and_says_so() -> None:
    sel = select([LEFT, det(200, 480, 480, 300)], lane=2, lane_regions=LANES)
    assert sel.box is None
    assert sel.reason == (
        "several vehicles (2) and nothing to tell which one the radar measured; "
        "no vehicle inside lane 2's region, all 2 considered"
    )


def test_unmapped_lane_does_not_decide() -> None:
    assert select([LEFT, RIGHT], lane=3, lane_regions=LANES).box is None


def test_weak_detection_does_not_make_the_choice_ambiguous() -> None:
    weak = det(900, 520, 480, 290, score=0.3)
    sel = select([LEFT, weak])
    assert sel.box == LEFT.xywh()
    assert sel.reason == "the only confident vehicle"


def test_trucks_are_vehicles_too() -> None:
    assert select([det(0, 400, 800, 600, cls=TRUCK)]).box == (0, 400, 800, 600)


# ---------------------------------------------------------------- crop margin


def test_crop_box_with_margin_grows_and_clamps() -> None:
    assert crop_box_with_margin((100, 100, 200, 100), 0.1, SIZE) == (80, 90, 240, 120)
    assert crop_box_with_margin((0, 0, 200, 100), 0.5, SIZE) == (0, 0, 300, 150)
    assert crop_box_with_margin((1500, 1100, 100, 100), 0.0, SIZE) == (1500, 1100, 100, 100)


@pytest.mark.parametrize(("box", "margin"), [((1700, 0, 50, 50), 0.1), ((0, 0, 0, 10), 0.1), ((0, 0, 10, 10), -1)])
def test_crop_box_with_margin_refuses_empty_boxes(box: tuple[int, int, int, int], margin: float) -> None:
    with pytest.raises(ValueError, match=r"no area inside|margin must be >= 0"):
        crop_box_with_margin(box, margin, SIZE)


@given(
    x=st.integers(0, 1599),
    y=st.integers(0, 1199),
    w=st.integers(1, 2000),
    h=st.integers(1, 2000),
    margin=st.floats(0, 1),
)
def test_crop_box_with_margin_contains_the_visible_box(x: int, y: int, w: int, h: int, margin: float) -> None:
    cx, cy, cw, ch = crop_box_with_margin((x, y, w, h), margin, SIZE)
    assert 0 <= cx <= x and 0 <= cy <= y
    assert cx + cw >= min(x + w, SIZE[0]) and cy + ch >= min(y + h, SIZE[1])
    assert cx + cw <= SIZE[0] and cy + ch <= SIZE[1]
