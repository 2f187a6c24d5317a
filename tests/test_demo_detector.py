"""iaflash.agent.demo.detector: the hand-built DEMO detector finds the demo fleet's vehicle in rendered scenes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from iaflash.agent.capture.preprocess import decode_jpeg
from iaflash.agent.capture.vehicle import detect_vehicles, select_vehicle
from iaflash.agent.demo.detector import SPEC, build_demo_detector_bundle
from iaflash.agent.demo.fleet import CLASSES, VehicleStyle, encode_jpeg, render_scene, road_background
from iaflash.engines.bundle import Bundle
from iaflash.engines.detect import Detection, iou_matrix
from iaflash.engines.onnxrt import OnnxRuntimeBackend

SCENES_PER_CLASS = 5


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OnnxRuntimeBackend, Bundle]]:
    bundle = build_demo_detector_bundle(tmp_path_factory.mktemp("demo") / "detector")
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(bundle)
    yield backend, bundle
    backend.close()


def iou(d: Detection, box: tuple[int, int, int, int]) -> float:
    x, y, w, h = box
    return float(iou_matrix(np.array([[d.x1, d.y1, d.x2, d.y2]]), np.array([[x, y, x + w, y + h]]))[0, 0])


def test_bundle_is_a_labelled_demo_detector(detector: tuple[OnnxRuntimeBackend, Bundle]) -> None:
    _, bundle = detector
    manifest = bundle.manifest
    assert (manifest.task, manifest.demo, manifest.detector) == ("detector", True, SPEC)
    assert manifest.description.startswith("DEMO DETECTOR")
    assert [(lb.make, lb.model) for lb in bundle.labels] == [("car", "car")]


@pytest.mark.parametrize("style", CLASSES, ids=lambda s: f"{s.make}-{s.model}")
def test_finds_the_vehicle_of_every_class(detector: tuple[OnnxRuntimeBackend, Bundle], style: VehicleStyle) -> None:
    backend, bundle = detector
    rng = np.random.default_rng(CLASSES.index(style))
    for _ in range(SCENES_PER_CLASS):
        image, box = render_scene(style, rng, plate_text="AB-123-CD")
        found = detect_vehicles(image, backend, bundle)
        assert len(found) == 1
        assert found[0].cls == 0
        assert found[0].score >= SPEC.score_threshold
        assert iou(found[0], box) >= 0.7


def test_finds_the_vehicle_in_a_reduced_jpeg_decode(detector: tuple[OnnxRuntimeBackend, Bundle]) -> None:
    """As the pipeline sees it: JPEG q90, decoded at 1/4 size; the box scales back to full size."""
    backend, bundle = detector
    image, box = render_scene(CLASSES[5], np.random.default_rng(99))  # the white one
    small = decode_jpeg(encode_jpeg(image), reduce=4)
    found = detect_vehicles(small, backend, bundle)
    full = Detection(found[0].x1 * 4, found[0].y1 * 4, found[0].x2 * 4, found[0].y2 * 4, found[0].score, 0)
    assert iou(full, box) >= 0.7


def test_empty_road_has_no_vehicle(detector: tuple[OnnxRuntimeBackend, Bundle]) -> None:
    backend, bundle = detector
    image = road_background(np.random.default_rng(5))
    found = detect_vehicles(image, backend, bundle)
    assert found == []
    sel = select_vehicle(
        found,
        image_size=(image.shape[1], image.shape[0]),
        sidecar_box=None,
        lane=None,
        direction=None,
        vehicle_classes=SPEC.vehicle_classes,
    )
    assert (sel.box, sel.reason) == (None, "no vehicle detected")


def test_night_scene_is_no_vehicle_rather_than_a_wrong_box(detector: tuple[OnnxRuntimeBackend, Bundle]) -> None:
    """At night everything is dark: the mask covers the road, which the graph scores 0 (documented limit)."""
    backend, bundle = detector
    image, _ = render_scene(CLASSES[0], np.random.default_rng(3), night=True)
    assert detect_vehicles(image, backend, bundle) == []
