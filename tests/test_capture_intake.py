"""The intake's evidence under shift: crop contract, flip TTA, two-image fusion and the OOD gate, on generated data.

Real parts only: rendered radar-like scenes (the demo fleet), real JPEGs, the demo detector and a
tiny asymmetric classifier as real ONNX models run by ONNX Runtime; fusion is checked against the
hand formula (mean of the views' log-probabilities, renormalised).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import IR_VERSION, LABELS, OPSET

from iaflash.agent.capture.crop import prepare_crop
from iaflash.agent.capture.intake import Preparer
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.config import SpoolConfig
from iaflash.agent.demo.detector import build_demo_detector_bundle
from iaflash.agent.demo.fleet import CLASSES, encode_jpeg, render_scene
from iaflash.engines.bundle import Bundle, Preprocessing, write_bundle
from iaflash.engines.manifest import CropSpec, OodSpec, TtaSpec
from iaflash.engines.onnxrt import OnnxRuntimeBackend
from iaflash.engines.scores import OOD_REASON, energy, fuse, log_softmax, score_views

SIDE = 16


def asymmetric_onnx(seed: int = 5) -> bytes:
    """Flatten -> Gemm over every input pixel: the mirrored crop gives other logits (unlike a global pool)."""
    rng = np.random.default_rng(seed)
    weights = (rng.normal(size=(3 * SIDE * SIDE, len(LABELS))) * 0.05).astype(np.float32)
    bias = np.zeros(len(LABELS), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "asymmetric",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return write_bundle(
        tmp_path_factory.mktemp("cls") / "b",
        onnx_bytes=asymmetric_onnx(),
        labels=LABELS,
        name="asym",
        version="1",
        input_name="input",
        input_shape=["N", 3, SIDE, SIDE],
        preprocessing=Preprocessing(height=SIDE, width=SIDE),
        output_name="logits",
        temperature=1.3,
        crop=CropSpec(margin=0.0),
        tta=TtaSpec(hflip=True),
    )


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build_demo_detector_bundle(tmp_path_factory.mktemp("det") / "d")


def capture(box: tuple[int, int, int, int] | None, images: int = 1) -> Capture:
    return Capture(
        capture_id="c1",
        site_id="s1",
        captured_at=datetime(2026, 12, 1, tzinfo=timezone.utc),
        plate="AB123CD",
        plate_confidence=0.99,
        direction="approaching",
        lane=1,
        speed_kmh=90.0,
        limit_kmh=80.0,
        equipment=None,
        vehicle_box=box,
        images=tuple(f"c1_{i}.jpg" for i in range(images)),
    )


def scene(seed: int, style: int = 0, night: bool = False) -> tuple[bytes, tuple[int, int, int, int]]:
    image, box = render_scene(CLASSES[style], np.random.default_rng(seed), night=night)
    return encode_jpeg(image), box


def infer(bundle: Bundle, tensor: np.ndarray) -> np.ndarray:
    with OnnxRuntimeBackend() as backend:
        backend.load(bundle)
        return np.asarray(backend.infer(tensor), dtype=np.float64)


# ---------------------------------------------------------------- fusion, by the formula


def test_fuse_averages_the_views_calibrated_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5)) * 3
    fused = fuse(logits, ("original", "hflip", "image2"), temperature=2.0)
    expected = np.exp(log_softmax(logits, 2.0)).mean(axis=0)
    np.testing.assert_allclose(fused.probs, expected, rtol=1e-12)
    assert fused.probs.sum() == pytest.approx(1.0)
    assert fused.view_top1 == tuple(int(i) for i in logits.argmax(axis=1))
    one = fuse(logits[:1], ("original",), temperature=2.0)
    np.testing.assert_allclose(one.probs, np.exp(log_softmax(logits[0], 2.0)), rtol=1e-12)
    assert one.evidence()["fusion"] == "none" and fused.evidence()["fusion"] == "mean_probability"


def test_one_view_that_sees_the_vehicle_keeps_it_likely() -> None:
    """A flag needs every view to find the registered class unlikely: one view ruling it out is not enough."""
    probs = np.array([[0.98, 0.01, 0.01], [0.02, 0.96, 0.02]])
    fused = fuse(probs, ("original", "image2"), output_kind="probabilities")
    np.testing.assert_allclose(fused.probs, [0.5, 0.485, 0.015], rtol=1e-9)
    assert fused.evidence()["views_agree"] is False


def test_probability_outputs_are_read_as_log_p() -> None:
    p = np.array([[0.7, 0.2, 0.1]])
    np.testing.assert_allclose(fuse(p, ("original",), output_kind="probabilities").probs, p[0], rtol=1e-9)


def test_energy_is_minus_t_logsumexp() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.1, 0.1, 0.1]])
    np.testing.assert_allclose(energy(logits), -np.log(np.exp(logits).sum(axis=1)), rtol=1e-12)
    np.testing.assert_allclose(energy(logits, 2.0), -2.0 * np.log(np.exp(logits / 2).sum(axis=1)), rtol=1e-12)


# ---------------------------------------------------------------- flip TTA through a real model


def test_hflip_tta_fuses_the_crop_and_its_mirror_through_the_model(classifier: Bundle) -> None:
    data, box = scene(1)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    tensor, info = prepare_crop(image, box, classifier.manifest)
    assert tensor is not None and info.views == ("original", "hflip")
    outputs = infer(classifier, tensor)
    assert not np.allclose(outputs[0], outputs[1])  # the mirror is a genuinely different view
    fused, problem = score_views(outputs, info.views, classifier.manifest)
    assert problem is None
    x, y, w, h = box
    mirrored = np.ascontiguousarray(image[y : y + h, x : x + w][:, ::-1])
    plain, _ = prepare_crop(mirrored, None, replace(classifier.manifest, tta=None))
    assert plain is not None
    by_hand = np.stack([outputs[0], infer(classifier, plain)[0]])
    np.testing.assert_allclose(fused.probs, np.exp(log_softmax(by_hand, 1.3)).mean(axis=0), atol=1e-4)


# ---------------------------------------------------------------- intake: the daemon's path


def test_intake_applies_the_bundles_margin_and_records_the_box_in_frame_pixels(classifier: Bundle) -> None:
    data, box = scene(2)
    for margin in (0.0, 0.1):
        manifest = replace(classifier.manifest, crop=CropSpec(margin=margin), tta=None)
        done = Preparer(SpoolConfig(), manifest).prepare_capture(capture(box), [data])
        crop = done.evidence["crop"]
        assert isinstance(crop, dict) and crop["box"] == list(box) and crop["margin"] == margin
        x, y, w, h = box
        if margin == 0.0:  # cut at the decode reduction: within one reduced pixel of the box
            factor = crop["decode_reduction"]
            assert factor > 1 and all(abs(r - b) <= factor for r, b in zip(crop["region"], box, strict=True))
        else:  # at the decode reduction the margin is rounded in reduced pixels, then scaled back
            rx, ry, rw, rh = crop["region"]
            assert rx < x and ry < y and rx + rw > x + w and ry + rh > y + h
        assert done.tensor is not None and done.tensor.shape == (1, 3, SIDE, SIDE) and done.views == ("original",)


def test_intake_refuses_an_infrared_frame_for_a_colour_only_model(classifier: Bundle) -> None:
    data, box = scene(3)
    grey = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR)
    done = Preparer(SpoolConfig(), classifier.manifest).prepare_capture(capture(box), [encode_jpeg(grey)])
    assert done.tensor is None
    assert done.problem is not None and "grey frame (infrared or monochrome)" in done.problem
    assert done.evidence["crop"]["color_mode"] == "grey"  # type: ignore[index]
    accepting = replace(classifier.manifest, crop=CropSpec(margin=0.0, color_modes=("color", "grey")))
    assert Preparer(SpoolConfig(), accepting).prepare_capture(capture(box), [encode_jpeg(grey)]).problem is None


def test_a_second_image_is_found_by_the_detector_and_fused(classifier: Bundle, detector: Bundle) -> None:
    first, box = scene(4, style=2)
    second, box2 = scene(5, style=2)
    with OnnxRuntimeBackend() as backend:
        backend.load(detector)
        preparer = Preparer(SpoolConfig(), classifier.manifest, (backend, detector))
        done = preparer.prepare_capture(capture(box, images=2), [first, second])
    assert done.problem is None
    assert done.views == ("original", "hflip", "image2", "image2/hflip")
    assert done.tensor is not None and done.tensor.shape == (4, 3, SIDE, SIDE)
    assert done.evidence["second_image"] == "fused"
    found = done.evidence["crop_image2"]["box"]  # type: ignore[index]
    iou_x = max(0, min(found[0] + found[2], box2[0] + box2[2]) - max(found[0], box2[0]))
    iou_y = max(0, min(found[1] + found[3], box2[1] + box2[3]) - max(found[1], box2[1]))
    assert iou_x * iou_y > 0.7 * box2[2] * box2[3]  # the detector found the drawn vehicle
    fused, problem = score_views(infer(classifier, done.tensor), done.views, classifier.manifest)
    assert problem is None and len(fused.view_top1) == 4


def test_a_second_image_without_a_detector_is_not_used_and_says_why(classifier: Bundle) -> None:
    first, box = scene(6)
    second, _ = scene(7)
    done = Preparer(SpoolConfig(), classifier.manifest).prepare_capture(capture(box, images=2), [first, second])
    assert done.views == ("original", "hflip")
    assert "no detector to find the vehicle in it" in str(done.evidence["second_image"])


def test_a_broken_second_image_never_blocks_the_first(classifier: Bundle, detector: Bundle) -> None:
    first, box = scene(8)
    with OnnxRuntimeBackend() as backend:
        backend.load(detector)
        preparer = Preparer(SpoolConfig(), classifier.manifest, (backend, detector))
        done = preparer.prepare_capture(capture(box, images=2), [first, b"not a jpeg"])
    assert done.problem is None and done.views == ("original", "hflip")
    assert str(done.evidence["second_image"]).startswith("not used: not_jpeg")


# ---------------------------------------------------------------- out of distribution


def test_energy_above_the_bundles_threshold_abstains_as_out_of_distribution(classifier: Bundle) -> None:
    data, box = scene(9)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    tensor, info = prepare_crop(image, box, classifier.manifest)
    assert tensor is not None
    outputs = infer(classifier, tensor)
    e = float(energy(outputs).mean())
    strict = replace(classifier.manifest, ood=OodSpec(threshold=e - 0.01))
    lenient = replace(classifier.manifest, ood=OodSpec(threshold=e + 0.01))
    fused, problem = score_views(outputs, info.views, strict)
    assert problem is not None and problem.startswith(f"{OOD_REASON}: energy {e:.3f} > ood.threshold")
    assert fused.energy == pytest.approx(e)
    assert score_views(outputs, info.views, lenient)[1] is None
    assert score_views(outputs, info.views, classifier.manifest)[0].energy is None  # no ood section: no score
