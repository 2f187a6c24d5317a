"""iaflash.agent.capture.preprocess: JPEG inspection without decoding, decode, crop and the model input tensor."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from iaflash.agent.capture.preprocess import crop, decode_jpeg, inspect_jpeg, preprocess
from iaflash.agent.errors import CaptureRejected
from iaflash.engines.bundle import Preprocessing

LIMITS = {"max_pixels": 10_000_000, "min_side": 16}


def _jpeg(width: int, height: int, *, progressive: bool = False, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), (5, 5), 0)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, buf = cv2.imencode(".jpg", image, params)
    assert ok
    return bytes(buf.tobytes())


def _normalise(rgb_or_bgr: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """Hand reference: (pixel * scale - mean) / std in float64, then HWC -> CHW with a batch axis."""
    values = (rgb_or_bgr.astype(np.float64) * pp.scale - np.array(pp.mean)) / np.array(pp.std)
    return values.transpose(2, 0, 1)[None]


def _blocks(small: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel of ``small`` becomes a factor x factor block, so INTER_AREA shrinking is exact."""
    return np.repeat(np.repeat(small, factor, axis=0), factor, axis=1)


# ---------------------------------------------------------------- inspect_jpeg


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_inspect_reads_width_and_height_from_the_frame_header(progressive: bool) -> None:
    assert inspect_jpeg(_jpeg(120, 48, progressive=progressive), **LIMITS) == (120, 48)


def test_inspect_skips_app_segments_such_as_exif_before_the_frame() -> None:
    data = _jpeg(64, 32)
    app1 = b"\xff\xe1" + (2 + 14).to_bytes(2, "big") + b"Exif\0\0" + b"\xff\xd9" + b"\0" * 6
    assert inspect_jpeg(data[:2] + app1 + data[2:], **LIMITS) == (64, 32)


def test_inspect_refuses_png_as_not_jpeg() -> None:
    ok, png = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))
    assert ok
    with pytest.raises(CaptureRejected, match="does not start with the JPEG SOI marker FFD8") as info:
        inspect_jpeg(png.tobytes(), **LIMITS)
    assert info.value.reason == "not_jpeg"


def test_inspect_refuses_empty_data_as_not_jpeg() -> None:
    with pytest.raises(CaptureRejected) as info:
        inspect_jpeg(b"", **LIMITS)
    assert info.value.reason == "not_jpeg"


@pytest.mark.parametrize("keep", [0.5, 0.99], ids=["half", "last-bytes-missing"])
def test_inspect_refuses_jpeg_cut_inside_its_image_data(keep: float) -> None:
    data = _jpeg(200, 100)
    with pytest.raises(CaptureRejected, match="no end-of-image marker FFD9") as info:
        inspect_jpeg(data[: int(len(data) * keep)], **LIMITS)
    assert info.value.reason == "truncated_jpeg"


def test_inspect_refuses_jpeg_cut_inside_its_header() -> None:
    with pytest.raises(CaptureRejected, match="inside its header") as info:
        inspect_jpeg(_jpeg(200, 100)[:30], **LIMITS)
    assert info.value.reason == "truncated_jpeg"


def test_inspect_refuses_too_many_pixels_without_decoding() -> None:
    with pytest.raises(CaptureRejected, match=r"200x100 = 20000 pixels, more than the limit of 19999") as info:
        inspect_jpeg(_jpeg(200, 100), max_pixels=19_999, min_side=16)
    assert info.value.reason == "image_too_large"


def test_inspect_accepts_exactly_max_pixels() -> None:
    assert inspect_jpeg(_jpeg(200, 100), max_pixels=20_000, min_side=100) == (200, 100)


def test_inspect_refuses_a_side_below_the_minimum() -> None:
    with pytest.raises(CaptureRejected, match=r"200x40, a side is below the minimum of 64") as info:
        inspect_jpeg(_jpeg(200, 40), max_pixels=10**7, min_side=64)
    assert info.value.reason == "image_too_small"


def test_inspect_refuses_garbage_after_soi_as_corrupt() -> None:
    with pytest.raises(CaptureRejected, match="expected a marker at byte 2") as info:
        inspect_jpeg(b"\xff\xd8" + b"\x00" * 64, **LIMITS)
    assert info.value.reason == "corrupt_image"


# ---------------------------------------------------------------- decode_jpeg


def test_decode_returns_bgr_uint8_of_the_inspected_size() -> None:
    image = decode_jpeg(_jpeg(96, 64))
    assert image.shape == (64, 96, 3)
    assert image.dtype == np.uint8


def test_decode_keeps_colour_channels_in_bgr_order() -> None:
    pure_red_bgr = np.zeros((32, 32, 3), np.uint8)
    pure_red_bgr[..., 2] = 255
    ok, buf = cv2.imencode(".jpg", pure_red_bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    b, g, r = decode_jpeg(buf.tobytes())[16, 16].tolist()
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize(("reduce", "shape"), [(2, (64, 96, 3)), (4, (32, 48, 3)), (8, (16, 24, 3))])
def test_decode_reduce_divides_both_sides(reduce: int, shape: tuple[int, int, int]) -> None:
    assert decode_jpeg(_jpeg(192, 128), reduce=reduce).shape == shape


def test_decode_refuses_truncated_jpeg_instead_of_returning_grey_pixels() -> None:
    data = _jpeg(200, 100)
    with pytest.raises(CaptureRejected) as info:
        decode_jpeg(data[: len(data) // 2])
    assert info.value.reason == "truncated_jpeg"


def test_decode_refuses_corrupt_scan_data() -> None:
    data = bytearray(_jpeg(64, 64))
    (
        _,
        _,
    ) = inspect_jpeg(bytes(data), **LIMITS)
    sof = data.find(b"\xff\xc0")
    data[sof + 9] = 9  # 9 colour components: libjpeg refuses the frame
    with pytest.raises(CaptureRejected) as info:
        decode_jpeg(bytes(data))
    assert info.value.reason == "corrupt_image"


def test_decode_refuses_non_jpeg() -> None:
    with pytest.raises(CaptureRejected) as info:
        decode_jpeg(b"GIF89a" + b"\0" * 32)
    assert info.value.reason == "not_jpeg"


def test_decode_rejects_unsupported_reduce_factor() -> None:
    with pytest.raises(ValueError, match=r"reduce must be one of \[1, 2, 4, 8\], got 3"):
        decode_jpeg(_jpeg(32, 32), reduce=3)


# ---------------------------------------------------------------- crop


def test_crop_returns_the_box_region() -> None:
    image = np.arange(10 * 20 * 3, dtype=np.uint32).reshape(10, 20, 3)
    np.testing.assert_array_equal(crop(image, (2, 3, 5, 4)), image[3:7, 2:7])


def test_crop_margin_grows_each_side_and_is_clamped_to_the_image() -> None:
    image = np.arange(10 * 20 * 3, dtype=np.uint32).reshape(10, 20, 3)
    # x: 4 - 5 -> 0 (clamped) .. 4 + 10 + 5 = 19; y: 4 - 2 = 2 .. 4 + 4 + 2 = 10 (the edge)
    np.testing.assert_array_equal(crop(image, (4, 4, 10, 4), margin=0.5), image[2:10, 0:19])
    np.testing.assert_array_equal(crop(image, (-5, -5, 8, 8)), image[0:3, 0:3])


@pytest.mark.parametrize("box", [(30, 0, 5, 5), (0, 0, 0, 5), (0, 0, 5, -1)], ids=["outside", "zero", "negative"])
def test_crop_refuses_a_box_with_no_area_in_the_image(box: tuple[int, int, int, int]) -> None:
    with pytest.raises(CaptureRejected) as info:
        crop(np.zeros((10, 20, 3), np.uint8), box)
    assert info.value.reason == "invalid_box"


# ---------------------------------------------------------------- preprocess


def _small_bgr(height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_stretch_shrink_by_two_matches_block_reference(order: str) -> None:
    pp = Preprocessing(height=4, width=6, color_order=order)  # type: ignore[arg-type]
    small = _small_bgr(4, 6)
    out = preprocess(_blocks(small, 2), pp)
    expected_pixels = small[:, :, ::-1] if order == "RGB" else small
    assert out.shape == (1, 3, 4, 6)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, _normalise(expected_pixels, pp), atol=1e-5)


def test_stretch_with_other_aspect_scales_each_axis_independently() -> None:
    pp = Preprocessing(height=4, width=4, color_order="BGR", mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
    small = _small_bgr(4, 4)
    wide = np.repeat(np.repeat(small, 2, axis=0), 4, axis=1)  # 8 x 16 -> 4 x 4: 2 rows, 4 columns a block
    np.testing.assert_allclose(preprocess(wide, pp), _normalise(small, pp), atol=1e-5)


def test_same_size_input_is_only_normalised() -> None:
    pp = Preprocessing(height=5, width=7, scale=0.5, mean=(1, 2, 3), std=(2, 4, 8))
    image = _small_bgr(5, 7)
    np.testing.assert_allclose(preprocess(image, pp), _normalise(image[:, :, ::-1], pp), atol=1e-5)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_letterbox_keeps_aspect_and_pads_with_zero_in_normalised_space(order: str) -> None:
    pp = Preprocessing(height=6, width=6, color_order=order, resize="letterbox")  # type: ignore[arg-type]
    small = _small_bgr(2, 6)
    out = preprocess(_blocks(small, 2), pp)  # 4 x 12 -> 2 x 6, centred rows 2..3 of 6
    content = small[:, :, ::-1] if order == "RGB" else small
    expected = np.zeros((1, 3, 6, 6))
    expected[:, :, 2:4, :] = _normalise(content, pp)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_letterbox_of_a_tall_image_pads_left_and_right() -> None:
    pp = Preprocessing(height=4, width=4, color_order="BGR", resize="letterbox")
    small = _small_bgr(4, 2)
    out = preprocess(_blocks(small, 3), pp)  # 12 x 6 -> 4 x 2, columns 1..2
    expected = np.zeros((1, 3, 4, 4))
    expected[:, :, :, 1:3] = _normalise(small, pp)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_center_crop_takes_the_centred_region_of_the_input_aspect(order: str) -> None:
    pp = Preprocessing(height=4, width=4, color_order=order, resize="center_crop")  # type: ignore[arg-type]
    small = _small_bgr(4, 8)
    out = preprocess(_blocks(small, 2), pp)  # 8 x 16: centred 8 x 8 is columns 4..11 -> small columns 2..5
    content = small[:, 2:6, ::-1] if order == "RGB" else small[:, 2:6]
    np.testing.assert_allclose(out, _normalise(content, pp), atol=1e-5)


def test_upscaling_a_constant_image_keeps_the_constant() -> None:
    pp = Preprocessing(height=16, width=16, color_order="BGR", mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
    image = np.full((4, 4, 3), (10, 20, 30), np.uint8)
    out = preprocess(image, pp)
    np.testing.assert_allclose(out[0, :, 5, 7], [10, 20, 30])
    assert np.ptp(out[0], axis=(1, 2)).tolist() == [0, 0, 0]


def test_preprocess_refuses_a_grey_or_float_image() -> None:
    pp = Preprocessing(height=4, width=4)
    with pytest.raises(ValueError, match=r"expects a non-empty BGR uint8 \[H, W, 3\] image, got uint8 \[4, 4\]"):
        preprocess(np.zeros((4, 4), np.uint8), pp)
    with pytest.raises(ValueError, match="got float32"):
        preprocess(np.zeros((4, 4, 3), np.float32), pp)


def test_decoded_jpeg_feeds_preprocess_end_to_end() -> None:
    pp = Preprocessing(height=8, width=8)
    image = decode_jpeg(_jpeg(64, 48), reduce=2)
    out = preprocess(crop(image, (4, 4, 16, 16), margin=0.1), pp)
    assert out.shape == (1, 3, 8, 8)
    assert np.isfinite(out).all()
