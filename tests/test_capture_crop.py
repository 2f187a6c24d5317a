"""iaflash.agent.capture.crop: the bundle's crop contract applied (margin, aspect, interpolation, colour, flip)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from iaflash.agent.capture.crop import color_mode, prepare_crop
from iaflash.agent.capture.preprocess import preprocess
from iaflash.agent.errors import CaptureRejected
from iaflash.engines.errors import BundleError
from iaflash.engines.manifest import CropSpec, Manifest

DIGEST = "0" * 64


def manifest(*, task: str = "classifier", size: int = 32, **sections: Any) -> Manifest:
    """A parsed manifest (from its JSON document, as a bundle's would be) with the given sections."""
    pp = sections.pop("preprocessing", {"height": size, "width": size})
    doc: dict[str, Any] = {
        "schema_version": 1,
        "name": "m",
        "version": "1",
        "task": task,
        "input_name": "input",
        "input_shape": ["N", 3, pp["height"], pp["width"]],
        "preprocessing": pp,
        "output_name": "logits",
        "files": {"model.onnx": DIGEST, "labels.csv": DIGEST},
        **sections,
    }
    return Manifest.from_dict(doc)


def frame(width: int = 400, height: int = 300, seed: int = 1) -> np.ndarray:
    """A colourful noisy BGR frame (smoothed so that JPEG-like statistics hold)."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), (5, 5), 0)


BOX = (100, 80, 160, 80)  # x, y, w, h: a 2:1 "vehicle"


# ---------------------------------------------------------------- margin


def test_a_manifest_without_a_crop_section_keeps_the_old_ten_percent_margin() -> None:
    m = manifest()
    assert m.crop is None and m.crop_spec == CropSpec(margin=0.1, aspect="stretch")
    tensor, info = prepare_crop(frame(), BOX, m)
    assert info.margin == 0.1
    assert info.region == (84, 72, 192, 96)  # 16 px (10 % of 160) and 8 px (10 % of 80) on each side
    assert info.box == BOX
    assert tensor is not None and tensor.shape == (1, 3, 32, 32)


def test_margin_zero_classifies_exactly_the_box_and_differs_from_ten_percent() -> None:
    image = frame()
    tight, tight_info = prepare_crop(image, BOX, manifest(crop={"margin": 0}))
    loose, loose_info = prepare_crop(image, BOX, manifest(crop={"margin": 0.1}))
    assert tight_info.region == BOX and tight_info.margin == 0.0
    assert loose_info.region == (84, 72, 192, 96)
    x, y, w, h = BOX
    expected = preprocess(image[y : y + h, x : x + w], manifest().preprocessing)
    assert tight is not None and loose is not None
    np.testing.assert_array_equal(tight, expected)
    assert float(np.abs(tight - loose).max()) > 0.1


def test_crop_info_speaks_frame_pixels_when_the_image_was_decoded_reduced() -> None:
    _, info = prepare_crop(frame(), (25, 20, 40, 20), manifest(crop={"margin": 0}), reduction=4)
    assert info.box == (100, 80, 160, 80)
    assert info.region == (100, 80, 160, 80)
    assert info.reduction == 4
    doc = info.to_dict()
    assert doc["box"] == [100, 80, 160, 80] and doc["input_size"] == [32, 32] and doc["color_mode"] == "color"


def test_a_box_outside_the_image_is_refused_as_invalid_box() -> None:
    with pytest.raises(CaptureRejected) as err:
        prepare_crop(frame(), (500, 500, 10, 10), manifest())
    assert err.value.reason == "invalid_box"


# ---------------------------------------------------------------- aspect and interpolation


def test_letterbox_pads_a_wide_crop_where_stretch_fills_the_input() -> None:
    image = frame()
    boxed, info = prepare_crop(image, BOX, manifest(crop={"margin": 0, "aspect": "letterbox"}))
    stretched, _ = prepare_crop(image, BOX, manifest(crop={"margin": 0, "aspect": "stretch"}))
    assert info.aspect == "letterbox"
    assert boxed is not None and stretched is not None
    # 160x80 into 32x32: letterboxed to 32x16, 8 rows of padding (0 = the mean colour) above and below.
    assert np.all(boxed[0, :, :8, :] == 0) and np.all(boxed[0, :, 24:, :] == 0)
    assert np.abs(boxed[0, :, 8:24, :]).min(initial=1.0) >= 0  # the picture itself
    assert np.count_nonzero(stretched[0, :, :8, :]) > 0


def test_crop_aspect_is_the_preprocessings_resize_and_may_not_contradict_it() -> None:
    assert manifest(crop={"aspect": "center_crop"}).preprocessing.resize == "center_crop"
    pp = {"height": 32, "width": 32, "resize": "letterbox"}
    assert manifest(preprocessing=pp, crop={"margin": 0}).crop_spec.aspect == "letterbox"
    with pytest.raises(BundleError, match=r"crop\.aspect' is 'stretch' but preprocessing\.resize is 'letterbox'"):
        manifest(preprocessing=pp, crop={"aspect": "stretch"})


def test_interpolation_is_applied_nearest_differs_from_area() -> None:
    image = frame()
    near, info = prepare_crop(image, BOX, manifest(crop={"margin": 0, "interpolation": "nearest"}))
    area, _ = prepare_crop(image, BOX, manifest(crop={"margin": 0, "interpolation": "area"}))
    assert info.interpolation == "nearest"
    assert near is not None and area is not None and float(np.abs(near - area).max()) > 0.05


@pytest.mark.parametrize(
    ("crop", "message"),
    [
        ({"margin": -0.1}, r"crop\.margin' must be between 0 and 1"),
        ({"margin": True}, r"crop\.margin"),
        ({"aspect": "squash"}, r"crop\.aspect' is 'squash', not a known value"),
        ({"interpolation": "lanczos"}, r"crop\.interpolation' is 'lanczos'"),
        ({"color_modes": ["infrared"]}, r"crop\.color_modes' must list distinct"),
        ({"color_modes": []}, r"crop\.color_modes' must list distinct"),
        ({"padding": 3}, r"crop\.padding' is not a known key"),
    ],
)
def test_bad_crop_sections_are_refused_with_the_field_and_fix(crop: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleError, match=message) as err:
        manifest(crop=crop)
    assert "fix:" in str(err.value)


def test_crop_tta_and_ood_are_refused_on_a_detector() -> None:
    det = {
        "format": "nms",
        "box_format": "xyxy",
        "normalized": True,
        "vehicle_classes": [0],
        "outputs": ["logits"],
    }
    for key, value in (("crop", {"margin": 0}), ("tta", {"hflip": True}), ("ood", {"threshold": -1})):
        with pytest.raises(BundleError, match=f"'{key}' is only allowed for task classifier"):
            manifest(task="detector", detector=det, **{key: value})


def test_the_sections_round_trip_and_are_omitted_when_absent() -> None:
    m = manifest(
        crop={"margin": 0, "color_modes": ["color", "grey"]},
        tta={"hflip": True},
        ood={"threshold": -4.5},
    )
    doc = m.to_dict()
    assert doc["crop"] == {
        "margin": 0.0,
        "aspect": "stretch",
        "interpolation": "auto",
        "color_modes": ["color", "grey"],
    }
    assert doc["tta"] == {"hflip": True}
    assert doc["ood"] == {"threshold": -4.5, "method": "energy", "temperature": 1.0}
    assert Manifest.from_dict(doc) == m
    assert not {"crop", "tta", "ood"} & set(manifest().to_dict())


def test_ood_needs_logits() -> None:
    with pytest.raises(BundleError, match="ood' needs output_kind logits"):
        manifest(output_kind="probabilities", ood={"threshold": -1})


# ---------------------------------------------------------------- colour modes


def grey_frame() -> np.ndarray:
    """An infrared-looking night shot: all three channels equal, stored through JPEG in colour."""
    luma = cv2.cvtColor(frame(), cv2.COLOR_BGR2GRAY)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(luma, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def test_a_greyscale_frame_is_refused_by_a_colour_only_model_with_a_reason() -> None:
    tensor, info = prepare_crop(grey_frame(), BOX, manifest())
    assert tensor is None
    assert info.color_mode == "grey"
    assert info.problem is not None
    assert info.problem.startswith("grey frame (infrared or monochrome) and the model accepts only color")


def test_a_greyscale_frame_is_classified_when_the_bundle_accepts_grey() -> None:
    tensor, info = prepare_crop(grey_frame(), BOX, manifest(crop={"color_modes": ["color", "grey"]}))
    assert info.problem is None and info.color_mode == "grey"
    assert tensor is not None and tensor.shape == (1, 3, 32, 32)


def test_colour_photos_of_grey_things_still_count_as_colour() -> None:
    """A grey car on a grey road with one coloured detail (lights, plate, window tint) is colour."""
    image = np.full((100, 200, 3), 110, np.uint8)
    image += np.random.default_rng(3).integers(0, 3, size=image.shape, dtype=np.uint8)
    assert color_mode(image) == "grey"
    cv2.rectangle(image, (20, 20), (60, 40), (40, 40, 200), -1)  # a red light
    assert color_mode(image) == "color"


# ---------------------------------------------------------------- flip view


def test_hflip_adds_the_mirrored_input_as_a_second_view() -> None:
    tensor, info = prepare_crop(frame(), BOX, manifest(crop={"margin": 0}, tta={"hflip": True}))
    assert info.views == ("original", "hflip")
    assert tensor is not None and tensor.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(tensor[1], tensor[0][:, :, ::-1])
    plain, plain_info = prepare_crop(frame(), BOX, manifest(crop={"margin": 0}, tta={"hflip": False}))
    assert plain_info.views == ("original",) and plain is not None and plain.shape[0] == 1


def test_an_infrared_frame_with_a_uniform_colour_cast_is_still_grey() -> None:
    """Some IR cameras store a tinted image: a constant cast carries no colour information."""
    tinted = np.clip(grey_frame().astype(np.int16) + np.array([-4, 0, 9], np.int16), 0, 255).astype(np.uint8)
    tinted[:, :, :] = np.maximum(tinted, 20)  # keep clear of 0/255 clipping, where a cast is not uniform
    assert color_mode(tinted) == "grey"
    assert color_mode(frame()) == "color"
