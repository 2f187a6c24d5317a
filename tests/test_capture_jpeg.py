"""iaflash.agent.capture.jpeg: the decode budget and the damage checks, on real JPEGs made by OpenCV.

libjpeg only warns about a cut or repeated-scan file and returns pixels: each test builds such a
file from a real encoder's output, shows what the bare decoder does with it where that matters,
and checks that the agent refuses it with its reason (or, for the documented limits, how little
of the image a cut it cannot see costs).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from jpeg_builders import EOI, encode, photo, raw_decode, repeated_scans

from iaflash.agent.capture.jpeg import DEFAULT_MAX_SCANS, MAX_SEGMENTS, read_structure
from iaflash.agent.capture.preprocess import check_jpeg, decode_jpeg
from iaflash.agent.errors import CaptureRejected

LIMITS = {"max_pixels": 10_000_000, "min_side": 16}


def rejected(data: bytes, reduce: int = 1, **limits: int) -> CaptureRejected:
    """The rejection of the daemon's intake path (markers walked, then decoded)."""
    with pytest.raises(CaptureRejected) as info:
        structure = check_jpeg(data, **{**LIMITS, **limits})
        decode_jpeg(data, reduce=reduce, structure=structure)
    return info.value


# ---------------------------------------------------------------- good files


@pytest.mark.parametrize(
    ("params", "scans"),
    [
        ({}, 1),
        ({"progressive": 1}, 10),
        ({"rst_interval": 4}, 1),
        ({"sampling_factor": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}, 1),
        ({"sampling_factor": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422}, 1),
    ],
    ids=["baseline", "progressive", "restart-markers", "444", "422"],
)
@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_a_complete_jpeg_is_accepted_at_every_decode_reduction(params: dict[str, int], scans: int, reduce: int) -> None:
    data = encode(photo(637, 479), **params)
    structure = check_jpeg(data, **LIMITS)
    assert (structure.width, structure.height, structure.scans) == (637, 479, scans)
    image = decode_jpeg(data, reduce=reduce, structure=structure)
    assert image.shape == (-(-479 // reduce), -(-637 // reduce), 3)


def test_a_grey_jpeg_is_accepted() -> None:
    data = encode(cv2.cvtColor(photo(), cv2.COLOR_BGR2GRAY))
    assert len(read_structure(data).components) == 1
    assert decode_jpeg(data).shape == (480, 640, 3)


def test_a_flat_mid_grey_corner_of_a_real_frame_is_not_mistaken_for_the_decoder_fill() -> None:
    """A studio photo's flat 128 grey floor ends at the subject's outline, not across the last row of blocks."""
    image = photo()
    image[240:, 200:] = 128
    assert (decode_jpeg(encode(image))[-16:, -100:] == 128).all()  # decoded exactly grey, and accepted


# ---------------------------------------------------------------- the decode budget


def test_repeated_scans_that_libjpeg_decodes_silently_are_refused_before_decoding() -> None:
    base = encode(photo(), progressive=1)
    attack = repeated_scans(base, 2000, 640, 480)
    bare = raw_decode(attack)
    assert bare is not None and np.array_equal(bare, raw_decode(base))  # no error, no change: only time lost
    error = rejected(attack)
    assert error.reason == "corrupt_image"
    assert "progressive scan 11 codes coefficient 1 of component 1 again" in str(error)
    assert "repeated scan" in str(error)


def test_more_scans_than_spool_max_jpeg_scans_is_too_many_scans_whatever_they_hold() -> None:
    base = encode(photo(), progressive=1)
    error = rejected(base, max_scans=9)
    assert error.reason == "too_many_scans"
    assert "more than 9 scans (spool.max_jpeg_scans" in str(error) and "raise spool.max_jpeg_scans" in str(error)
    assert check_jpeg(base, **LIMITS, max_scans=10).scans == 10
    assert rejected(repeated_scans(base, 50_000, 640, 480), max_scans=10).reason == "too_many_scans"
    assert DEFAULT_MAX_SCANS == 100


def test_thousands_of_tiny_marker_segments_are_refused_without_walking_them_all() -> None:
    data = encode(photo())
    comments = (b"\xff\xfe\x00\x03x") * (MAX_SEGMENTS + 5)
    error = rejected(data[:2] + comments + data[2:])
    assert error.reason == "corrupt_image" and f"more than {MAX_SEGMENTS} marker segments" in str(error)


def test_the_pixel_limits_are_checked_at_the_frame_header_before_any_scan_is_read() -> None:
    data = encode(photo(200, 100))
    cut = data[: len(data) // 2]  # no end marker: the size is still refused first
    assert rejected(cut, max_pixels=19_999).reason == "image_too_large"
    assert rejected(cut, min_side=101).reason == "image_too_small"


# ---------------------------------------------------------------- cut files


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])
def test_a_cut_jpeg_without_an_end_marker_is_truncated(keep: float) -> None:
    for params in ({}, {"progressive": 1}):
        data = encode(photo(), **params)
        error = rejected(data[: int(len(data) * keep)])
        assert error.reason == "truncated_jpeg" and "no end-of-image marker FFD9" in str(error)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.96])
@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_a_cut_baseline_jpeg_closed_by_a_fake_end_marker_is_corrupt_not_half_an_image(keep: float, reduce: int) -> None:
    """libjpeg warns "premature end of data segment" on stderr and fills the rest with grey 128."""
    data = encode(photo())
    fake = data[: int(len(data) * keep)] + EOI
    bare = raw_decode(fake)
    assert bare is not None and (bare[-15:] == 128).all()  # what used to be judged
    error = rejected(fake, reduce=reduce)
    assert error.reason == "corrupt_image"
    assert "stops early" in str(error) and "decoder's uniform grey fill" in str(error)


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.4])
def test_a_progressive_jpeg_cut_before_its_last_scan_is_corrupt(keep: float) -> None:
    data = encode(photo(), progressive=1)
    error = rejected(data[: int(len(data) * keep)] + EOI)
    assert error.reason == "corrupt_image" and "progressive scans end before coefficient" in str(error)


def test_a_jpeg_with_restart_markers_cut_anywhere_is_corrupt_from_its_markers_alone() -> None:
    data = encode(photo(), rst_interval=2)
    for keep in (0.3, 0.7, 0.99):
        with pytest.raises(CaptureRejected, match=r"restart markers where its 1200 MCUs need 599") as info:
            read_structure(data[: int(len(data) * keep)] + EOI)
        assert info.value.reason == "corrupt_image"


def test_a_cut_inside_the_last_row_of_blocks_is_not_seen_and_costs_at_most_that_row() -> None:
    """The documented limit of the grey check: it sees cuts made before the last MCU row."""
    image = photo()
    data = encode(image)
    whole = decode_jpeg(data)
    cut = decode_jpeg(data[: int(len(data) * 0.995)] + EOI)  # accepted
    changed = np.flatnonzero((cut != whole).any(axis=(1, 2)))
    assert changed.size and changed.min() >= 480 - 16 - 1  # the row above only through chroma upsampling


def test_a_progressive_jpeg_cut_inside_its_last_scan_is_whole_one_bit_coarser() -> None:
    """The other documented limit: the last scan refines the luma's last bit; the picture is all there."""
    data = encode(photo(), progressive=1)
    whole = decode_jpeg(data)
    cut = decode_jpeg(data[: int(len(data) * 0.8)] + EOI)  # accepted
    assert float(np.abs(cut.astype(int) - whole.astype(int)).mean()) < 3.0


def test_the_one_false_positive_is_a_frame_whose_whole_last_row_of_blocks_is_flat_mid_grey() -> None:
    image = photo()
    image[-16:] = 128
    assert rejected(encode(image)).reason == "corrupt_image"


# ---------------------------------------------------------------- broken marker sequences


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan: its SOS segment and entropy-coded data, up to the next marker."""
    out, pos = [], data.find(b"\xff\xda")
    while pos != -1:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
            end += 1
        out.append((pos, end))
        pos = data.find(b"\xff\xda", end)
    return out


def test_a_baseline_scan_repeated_is_a_component_coded_twice() -> None:
    data = encode(photo())
    ((start, end),) = _scans(data)
    with pytest.raises(CaptureRejected, match="scan 2 codes component 1 a second time") as info:
        read_structure(data[:end] + data[start:end] + data[end:])
    assert info.value.reason == "corrupt_image"


def test_progressive_ac_before_dc_is_corrupt() -> None:
    data = encode(photo(), progressive=1)
    spans = _scans(data)
    (dc_start, dc_end), (ac_start, ac_end) = spans[0], spans[1]
    swapped = data[:dc_start] + data[ac_start:ac_end] + data[dc_end:ac_start] + data[dc_start:dc_end] + data[ac_end:]
    with pytest.raises(CaptureRejected, match="codes AC coefficients of component 1 before its DC"):
        read_structure(swapped)


def test_restart_markers_out_of_order_are_corrupt() -> None:
    data = bytearray(encode(photo(), rst_interval=2))
    first = data.find(b"\xff\xd0")
    data[first + 1] = 0xD3
    with pytest.raises(CaptureRejected, match="restart markers out of order"):
        read_structure(bytes(data))


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:2] + d, "a second start-of-image marker"),
        (lambda d: d[:2] + b"\xff\xd9" + d[2:], "marker FFD9 at byte 2 before any image data"),
        (lambda d: d.replace(b"\xff\xda\x00\x0c\x03\x01", b"\xff\xda\x00\x0c\x03\x07", 1), "names components"),
    ],
    ids=["two-soi", "eoi-first", "unknown-component"],
)
def test_broken_marker_sequences_are_corrupt(mangle: object, message: str) -> None:
    data = encode(photo())
    assert callable(mangle)
    with pytest.raises(CaptureRejected, match=message) as info:
        read_structure(mangle(data))
    assert info.value.reason == "corrupt_image"
