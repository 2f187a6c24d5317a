"""JPEG structure read from the markers before any pixel is decoded: the decode budget and the damage checks.

libjpeg decodes whatever it is given and only *warns* about damage: OpenCV prints the warning on
stderr and returns pixels. A file cut short and closed with a fake end-of-image marker decodes to
an image whose missing part is uniform grey; a progressive file with thousands of repeated scans
takes minutes, because every scan walks every block of the image. :func:`read_structure` walks
every marker segment of the file, past each scan's entropy-coded data too (found with one regex
search, which runs in C), and refuses, with a stable ``reason``:

* more than ``max_scans`` scans (``too_many_scans``). This is the decode-time budget: with the
  pixel and byte limits of ``[spool]`` it bounds the decoder's work (docs/RELIABILITY.md);
* a scan order libjpeg would only warn about: a component or a coefficient coded twice (a
  repeated scan), AC before DC, a refinement out of order (``corrupt_image``);
* scans that stop before every component (sequential) or every coefficient bit (progressive) is
  coded: the file was cut and an end marker added (``corrupt_image``);
* restart markers missing or out of order (``corrupt_image``): exact where the file has a restart
  interval;
* no end-of-image marker after the image data (``truncated_jpeg``), and the pixel limits
  (``image_too_large``, ``image_too_small``).

:func:`grey_tail` is the one check made after decoding. In a sequential file cut inside its (last)
scan, libjpeg leaves every MCU after the cut at zero, which decodes to uniform grey 128: the
bottom-right MCU, always after the cut, is then exactly grey. What no check here sees is damage
inside the entropy-coded data that keeps the decoder in step to the end (libjpeg's "N extraneous
bytes" warning): that needs a Huffman decoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from iaflash.agent.errors import CaptureRejected

__all__ = ["DEFAULT_MAX_SCANS", "MAX_SEGMENTS", "JpegStructure", "grey_tail", "read_structure"]

DEFAULT_MAX_SCANS = 100
"""Ten times libjpeg's standard progression (10 scans for a colour image, 1 for a baseline one)."""
MAX_SEGMENTS = 1000
"""Marker segments other than scans (a real JPEG has about 15; 1,000 tiny ones are an attack on the walk)."""

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
_SOS, _DRI, _DNL, _EOI_CODE, _SOI_CODE = 0xDA, 0xDD, 0xDC, 0xD9, 0xD8
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) are not frames.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_HIERARCHICAL = frozenset({0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF})
_PROGRESSIVE = frozenset({0xC2, 0xCA})
_LOSSLESS = frozenset({0xC3, 0xCB})
# Markers with no length field: TEM, RST0..RST7, SOI and EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
# The end of entropy-coded data: the first FF not followed by a stuffed 00 or a restart marker.
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")
_RESTART_CYCLE = bytes(range(0xD0, 0xD8))
FIX_RADAR = "check the radar's image output (baseline or progressive JPEG, written completely before the sidecar)"
_FIX_CUT = "the file was cut and an end-of-image marker added, or it was damaged on the way"


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _truncated(at: int, size: int) -> CaptureRejected:
    return CaptureRejected(
        "truncated_jpeg",
        f"JPEG ends at byte {size} inside its header (segment at byte {at}): the file is incomplete; {FIX_RADAR}",
    )


def _corrupt(problem: str) -> CaptureRejected:
    return CaptureRejected("corrupt_image", f"JPEG is corrupt: {problem}; {FIX_RADAR}")


@dataclass(frozen=True)
class Component:
    ident: int
    h: int
    v: int


@dataclass(frozen=True)
class JpegStructure:
    """What the markers say: the frame, how many scans, and what the post-decode check needs."""

    width: int
    height: int
    sof: int
    components: tuple[Component, ...]
    scans: int
    last_scan_all_components: bool

    @property
    def progressive(self) -> bool:
        return self.sof in _PROGRESSIVE

    @property
    def mcu_size(self) -> tuple[int, int]:
        """(width, height) in pixels of one MCU of an interleaved scan (one 8x8 block for a grey image)."""
        if len(self.components) == 1:
            return 8, 8
        return 8 * max(c.h for c in self.components), 8 * max(c.v for c in self.components)


def _segment(data: bytes, pos: int) -> tuple[int, int, int]:
    """``(position, marker, length)`` of the segment at ``pos``, after fill bytes; 0 length if standalone."""
    while pos + 1 < len(data) and data[pos] == 0xFF and data[pos + 1] == 0xFF:
        pos += 1  # fill bytes before a marker
    if pos + 2 > len(data):
        raise _truncated(pos, len(data))
    if data[pos] != 0xFF:
        raise _corrupt(f"expected a marker at byte {pos}, found {data[pos]:#04x}")
    marker = data[pos + 1]
    if marker in _STANDALONE:
        return pos, marker, 0
    if pos + 4 > len(data):
        raise _truncated(pos, len(data))
    length = int.from_bytes(data[pos + 2 : pos + 4], "big")
    if length < 2:
        raise _corrupt(f"segment FF{marker:02X} at byte {pos} has length {length}")
    if pos + 2 + length > len(data):
        raise _truncated(pos, len(data))
    return pos, marker, length


@dataclass
class _Coverage:
    """What the scans coded so far: each component once (sequential), every coefficient bit (progressive)."""

    progressive: bool
    lossless: bool
    components: tuple[Component, ...]
    seen: set[int] = field(default_factory=set)
    bits: dict[int, list[int]] = field(default_factory=dict)  # progressive: the last bit coded, -1 = never

    def add(self, scan: int, comps: list[Component], ss: int, se: int, ah: int, al: int) -> None:
        if self.progressive:
            self._add_progressive(scan, comps, ss, se, ah, al)
            return
        if not self.lossless and (ss, se, ah, al) != (0, 63, 0, 0):
            raise _corrupt(f"sequential scan {scan} has spectral/approximation parameters {ss}-{se}, {ah}/{al}")
        for c in comps:
            if c.ident in self.seen:
                raise _corrupt(f"scan {scan} codes component {c.ident} a second time (a repeated scan)")
            self.seen.add(c.ident)

    def _add_progressive(self, scan: int, comps: list[Component], ss: int, se: int, ah: int, al: int) -> None:
        if (ss == 0 and se != 0) or (ss > 0 and (len(comps) != 1 or se < ss or se > 63)) or al > 13:
            raise _corrupt(f"progressive scan {scan} has invalid parameters Ss={ss} Se={se} Al={al}")
        if ah and al != ah - 1:
            raise _corrupt(f"progressive scan {scan} refines from bit {ah} to bit {al}, not one bit")
        for c in comps:
            bits = self.bits.setdefault(c.ident, [-1] * 64)
            if ss > 0 and bits[0] == -1:
                raise _corrupt(f"progressive scan {scan} codes AC coefficients of component {c.ident} before its DC")
            for k in range(ss, se + 1):
                if bits[k] != (ah if ah else -1):
                    raise _corrupt(
                        f"progressive scan {scan} codes coefficient {k} of component {c.ident} again or out of "
                        "order (a repeated scan)"
                    )
                bits[k] = al

    def check_complete(self) -> None:
        """Every component (and, progressive, every coefficient down to bit 0) was coded."""
        for c in self.components:
            if self.progressive:
                bits = self.bits.get(c.ident, [-1] * 64)
                missing = next((k for k, b in enumerate(bits) if b != 0), None)
                if missing is not None:
                    raise _corrupt(
                        f"its progressive scans end before coefficient {missing} of component {c.ident} is "
                        f"complete: the image data stops early ({_FIX_CUT})"
                    )
            elif c.ident not in self.seen:
                raise _corrupt(
                    f"its scans end before component {c.ident} is coded: the image data stops early ({_FIX_CUT})"
                )


class _Walk:
    """One pass over every marker segment; raises CaptureRejected on the first problem."""

    def __init__(self, data: bytes, max_scans: int, max_pixels: int | None, min_side: int | None) -> None:
        self.data, self.max_scans = data, max_scans
        self.max_pixels, self.min_side = max_pixels, min_side
        self.frame: tuple[int, int, int, tuple[Component, ...]] | None = None  # width, height, sof, components
        self.coverage: _Coverage | None = None
        self.restart = 0
        self.scans = 0
        self.last_all = False

    def run(self) -> JpegStructure:
        pos, segments = 2, 0
        while True:
            pos, marker, length = _segment(self.data, pos)
            segments += 1
            if segments > MAX_SEGMENTS:
                raise _corrupt(f"more than {MAX_SEGMENTS} marker segments (at byte {pos})")
            if marker == _EOI_CODE:
                return self._end(pos)
            if marker == _SOS:
                pos = self._scan(pos, length)
                continue
            if marker == _SOI_CODE:
                raise _corrupt(f"a second start-of-image marker at byte {pos}")
            if marker in _SOF:
                self._frame(pos, length, marker)
            elif marker == _DRI:
                self.restart = int.from_bytes(self.data[pos + 4 : pos + 6], "big") if length >= 4 else 0
            elif marker == _DNL:
                raise _corrupt(f"a DNL marker at byte {pos} (the height defined after the scan is unsupported)")
            pos += 2 + length

    def _end(self, pos: int) -> JpegStructure:
        if self.frame is None or self.coverage is None or self.scans == 0:
            raise _corrupt(f"marker FFD9 at byte {pos} before any image data")
        self.coverage.check_complete()
        width, height, sof, components = self.frame
        return JpegStructure(width, height, sof, components, self.scans, self.last_all)

    def _frame(self, pos: int, length: int, marker: int) -> None:
        data = self.data
        if self.frame is not None:
            raise _corrupt(f"a second frame header at byte {pos} (hierarchical JPEG is unsupported)")
        if marker in _HIERARCHICAL:
            raise _corrupt(f"frame type FF{marker:02X} at byte {pos} (hierarchical JPEG) is unsupported")
        if length < 8:
            raise _corrupt(f"frame header at byte {pos} is {length} bytes, needs at least 8")
        height = int.from_bytes(data[pos + 5 : pos + 7], "big")
        width = int.from_bytes(data[pos + 7 : pos + 9], "big")
        if height == 0 or width == 0:
            raise _corrupt(f"frame header at byte {pos} gives {width}x{height} (DNL-defined height is unsupported)")
        count = data[pos + 9]
        if count not in (1, 3, 4) or length != 8 + 3 * count:
            raise _corrupt(f"frame header at byte {pos} has {count} colour components in {length} bytes")
        comps = tuple(
            Component(data[at], data[at + 1] >> 4, data[at + 1] & 15) for at in range(pos + 10, pos + 10 + 3 * count, 3)
        )
        if len({c.ident for c in comps}) != count or not all(1 <= c.h <= 4 and 1 <= c.v <= 4 for c in comps):
            raise _corrupt(f"frame header at byte {pos} has duplicate components or sampling factors outside 1-4")
        self._check_size(width, height)
        self.frame = (width, height, marker, comps)
        self.coverage = _Coverage(marker in _PROGRESSIVE, marker in _LOSSLESS, comps)

    def _check_size(self, width: int, height: int) -> None:
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise CaptureRejected(
                "image_too_large",
                f"JPEG is {width}x{height} = {width * height} pixels, more than the limit of {self.max_pixels}; "
                "lower the radar's resolution or raise spool.max_image_pixels",
            )
        if self.min_side is not None and min(width, height) < self.min_side:
            raise CaptureRejected(
                "image_too_small",
                f"JPEG is {width}x{height}, a side is below the minimum of {self.min_side} pixels; "
                "check the radar's output or lower spool.min_image_side",
            )

    def _scan(self, pos: int, length: int) -> int:
        """Check one scan header, skip its entropy-coded data; the position of the marker after it."""
        data = self.data
        if self.frame is None or self.coverage is None:
            raise _corrupt("image data (SOS) before any frame header (SOF)")
        self.scans += 1
        if self.scans > self.max_scans:
            raise CaptureRejected(
                "too_many_scans",
                f"JPEG has more than {self.max_scans} scans (spool.max_jpeg_scans; a progressive image needs about "
                "10): each scan walks the whole image, so thousands of them stall the decoder for minutes. Fix: "
                "check the radar's JPEG encoder, or raise spool.max_jpeg_scans",
            )
        count = data[pos + 4] if length >= 3 else 0
        if not 1 <= count <= 4 or length != 6 + 2 * count:
            raise _corrupt(f"scan header at byte {pos} lists {count} components in {length} bytes")
        by_id = {c.ident: c for c in self.frame[3]}
        ids = [data[at] for at in range(pos + 5, pos + 5 + 2 * count, 2)]
        if len(set(ids)) != count or not all(i in by_id for i in ids):
            raise _corrupt(f"scan header at byte {pos} names components {ids}, the frame has {sorted(by_id)}")
        comps = [by_id[i] for i in ids]
        end = pos + 2 + length
        ss, se, approx = data[end - 3], data[end - 2], data[end - 1]
        self.coverage.add(self.scans, comps, ss, se, approx >> 4, approx & 15)
        self.last_all = count == len(by_id)
        found = _ENTROPY_END.search(data, end)
        if found is None:
            raise CaptureRejected(
                "truncated_jpeg",
                f"JPEG has no end-of-image marker FFD9 after its image data ({len(data)} bytes): "
                f"the file is incomplete; {FIX_RADAR}",
            )
        if self.restart and self.frame[2] not in _LOSSLESS:
            self._check_restarts(end, found.start(), comps)
        return found.start()

    def _check_restarts(self, start: int, end: int, comps: list[Component]) -> None:
        """The scan holds one restart marker per interval, RST0..RST7 in turn (a trailing one is tolerated)."""
        assert self.frame is not None
        width, height, _, all_comps = self.frame
        if len(comps) == 1:  # a non-interleaved scan: one MCU per 8x8 block of that component
            c = comps[0]
            hmax, vmax = max(x.h for x in all_comps), max(x.v for x in all_comps)
            units = _ceil(_ceil(width * c.h, hmax), 8) * _ceil(_ceil(height * c.v, vmax), 8)
        else:
            mcu_w, mcu_h = JpegStructure(width, height, 0, all_comps, 0, True).mcu_size
            units = _ceil(width, mcu_w) * _ceil(height, mcu_h)
        expected = _ceil(units, self.restart) - 1
        markers = b"".join(_RESTART.findall(self.data, start, end))[1::2]
        if len(markers) < expected:
            raise _corrupt(
                f"scan {self.scans} has {len(markers)} restart markers where its {units} MCUs need {expected}: "
                f"the image data stops early ({_FIX_CUT})"
            )
        due = (_RESTART_CYCLE * (len(markers) // 8 + 1))[: len(markers)]
        if len(markers) > expected + 1 or markers != due:
            raise _corrupt(f"scan {self.scans} has restart markers out of order or in excess ({len(markers)} found)")


def read_structure(
    data: bytes, *, max_scans: int = DEFAULT_MAX_SCANS, max_pixels: int | None = None, min_side: int | None = None
) -> JpegStructure:
    """Walk every marker segment of a JPEG without decoding it; raise CaptureRejected on the first problem.

    Reasons: ``not_jpeg``, ``truncated_jpeg``, ``corrupt_image``, ``too_many_scans`` and, when the
    limits are given, ``image_too_large`` and ``image_too_small`` (checked at the frame header,
    before any scan is read).
    """
    if len(data) < 4 or data[:2] != SOI:
        raise CaptureRejected(
            "not_jpeg",
            f"image does not start with the JPEG SOI marker FFD8 (first bytes "
            f"{data[:4].hex() or 'none'}, {len(data)} bytes); {FIX_RADAR}",
        )
    return _Walk(data, max_scans, max_pixels, min_side).run()


def grey_tail(image: np.ndarray, structure: JpegStructure, reduce: int) -> bool:
    """True when the last MCU row of a sequential JPEG decoded as libjpeg's uniform grey fill (data ended early).

    ``image`` is the decoded BGR (or grey) image at 1/``reduce`` size. libjpeg fills every MCU after
    the point where the data ran out with zeros (grey 128), in raster order, so a file cut before its
    last MCU row ends in a whole row of exact grey. A real photo does not: a flat 128 grey corner
    (a studio floor) ends at the subject's outline, not across the full width. A cut inside the last
    MCU row is not seen (it costs at most that strip). The row's first pixel row is left out when it
    is taller than a pixel: chroma upsampling blends it with the row above.
    """
    if structure.progressive or structure.sof in _LOSSLESS or not structure.last_scan_all_components:
        return False
    if len(structure.components) not in (1, 3):
        return False
    mcu_h = structure.mcu_size[1]
    y0 = (structure.height - 1) // mcu_h * mcu_h // reduce
    region = image[y0 + (image.shape[0] - y0 > 1) :]
    return region.size > 0 and bool((region == 128).all())
