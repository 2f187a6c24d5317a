"""Synthetic training frames for the vehicle localiser: tight vehicle photos pasted into made-up scenes.

Each frame is drawn from a generator seeded by ``(seed, split, index)``, so a run is reproducible
and an interrupted synthesis resumes where it stopped. A frame is:

1. **A background of this module's own families** (deliberately *not* the decision benchmark's
   clutter, which is a vertical ramp, blocky noise and flat axis-aligned rectangles, so that the
   benchmark measures generalisation to another background family): a road scene in perspective
   (sky, horizon, asphalt with dashed lane marks, textured verges, tree and building silhouettes),
   colourised multi-scale blurred noise, or a multi-stop gradient with bands; then random shapes
   (ellipses, polygons, poles and wires, ring signs, translucent shadows).
2. **Decoys** in about a third of the frames: hard-edged panels filled with a texture, a gradient
   or the shuffled tiles of a vehicle photo, so that a sharp-edged rectangle alone is not a vehicle.
3. **Vehicles**: none in ``p_empty`` of the frames; else one photo scaled to 30-95 % of the frame
   width (height at most 95 % of the frame), at a random place, sometimes mirrored, with its own
   brightness; in ``p_second`` of them a second, smaller one (12-30 % of the width) that does not
   touch the first. The box is the pasted photo's rectangle: the photos must be tight.
4. **Conditions** on the whole frame: greyscale (an infrared night shot), low light with sensor
   noise, Gaussian or motion blur; then JPEG at quality 55-95.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .detector_data import BoxF, Frame, Photo, load_photo

__all__ = ["SynthSpec", "background", "compose", "synthesise"]

CHUNK = 50


@dataclass(frozen=True)
class SynthSpec:
    """What a synthetic frame set is made of (it keys the set on disk: change it, the set is redrawn)."""

    width: int = 1224
    height: int = 1024
    min_share: float = 0.30
    max_share: float = 0.95
    p_empty: float = 0.15
    p_second: float = 0.2
    p_decoy: float = 0.35
    p_grey: float = 0.2
    p_low_light: float = 0.2
    p_blur: float = 0.25


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    c = rng.integers(lo, hi, 3)
    return int(c[0]), int(c[1]), int(c[2])


def _between(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi), or lo when the range is empty (tiny frames)."""
    return int(rng.integers(lo, max(lo + 1, hi)))


def _noise(rng: np.random.Generator, w: int, h: int, octaves: int = 4) -> np.ndarray:
    """Multi-scale value noise in 0..1, ``[h, w]`` float32 (small random grids, smoothly enlarged)."""
    out = np.zeros((h, w), np.float32)
    weight, total = 1.0, 0.0
    cells = int(rng.integers(2, 6))
    for _ in range(octaves):
        grid = rng.random((cells + 1, max(2, round(cells * w / h)) + 1)).astype(np.float32)
        out += weight * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += weight
        weight *= float(rng.uniform(0.4, 0.65))
        cells *= 2
    out /= total
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _palette(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 0..1 map coloured between two or three random colours, BGR float32 (through a 256-entry table)."""
    stops = np.asarray([_colour(rng) for _ in range(int(rng.integers(2, 4)))], np.float32)
    table = np.stack(
        [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(stops)), stops[:, c]) for c in range(3)], 1
    )
    index = np.clip(t * 255, 0, 255).astype(np.uint8)
    lut = table.astype(np.uint8).reshape(1, 256, 3)
    return cv2.LUT(cv2.merge([index, index, index]), lut).astype(np.float32)


def _randn(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise, float32, drawn by OpenCV (an order faster than numpy) from a seed of ``rng``."""
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    out = np.empty(shape, np.float32)
    cv2.randn(out, 0.0, sigma)
    return out


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = _palette(_noise(rng, w, h), rng)
    return base + _randn((h, w, 1), float(rng.uniform(2, 12)), rng)


def _gradient(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * np.cos(angle) / w + ys * np.sin(angle) / h
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    if rng.random() < 0.6:  # bands: facades, fences, hedges
        freq = rng.uniform(4, 40)
        t = np.clip(t + 0.15 * np.sin(2 * np.pi * freq * (xs if rng.random() < 0.5 else ys) / w), 0, 1)
    img = _palette(t, rng)
    blurred = cv2.GaussianBlur(_randn((h // 4, w // 4), 1.0, rng), (0, 0), 2)
    return img + cv2.resize(blurred, (w, h))[..., None] * float(rng.uniform(3, 15))


def _road(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Sky, horizon, asphalt in perspective with dashed lane marks, verges, silhouettes on the horizon."""
    horizon = int(h * rng.uniform(0.12, 0.5))
    vx = w * rng.uniform(0.25, 0.75)
    sky_top, sky_low = np.asarray(_colour(rng, 90, 256), np.float32), np.asarray(_colour(rng, 120, 256), np.float32)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = sky_top * (1 - ramp) + sky_low * ramp
    img = np.repeat(img, w, axis=1)
    verge = _texture(rng, w, h)
    img[horizon:] = verge[horizon:]
    left, right = w * rng.uniform(-0.6, 0.25), w * rng.uniform(0.75, 1.6)
    road = np.array([[vx - 2, horizon], [vx + 2, horizon], [right, h], [left, h]], np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [road], 1)
    grey = float(rng.uniform(45, 130))
    asphalt = grey + 18 * (_noise(rng, w, h, 3) - 0.5)[..., None] + _randn((h, w, 1), 5.0, rng)
    img = np.where(mask[..., None] > 0, asphalt * np.asarray([1.0, 1.0, rng.uniform(0.95, 1.08)], np.float32), img)
    mark = _colour(rng, 170, 256) if rng.random() < 0.8 else (40, 200, 230)
    for frac in rng.uniform(0.2, 0.8, int(rng.integers(1, 4))):
        bottom = left + (right - left) * frac
        steps = np.linspace(0, 1, 24) ** 2
        for a, b in zip(steps[0::2], steps[1::2], strict=False):
            p0 = (int(vx + (bottom - vx) * a), int(horizon + (h - horizon) * a))
            p1 = (int(vx + (bottom - vx) * b), int(horizon + (h - horizon) * b))
            cv2.line(img, p0, p1, mark, max(1, int(2 + 12 * b)))
    for _ in range(int(rng.integers(2, 9))):  # trees and buildings standing on the horizon
        cx, size = int(rng.integers(0, w)), int(h * rng.uniform(0.03, 0.2))
        colour = _colour(rng, 10, 120)
        if rng.random() < 0.5:
            cv2.ellipse(img, (cx, horizon - size // 2), (size // 2, size), 0, 0, 360, colour, -1)
        else:
            pts = np.array([[cx, horizon], [cx + size, horizon], [cx + size, horizon - size], [cx, horizon - 2 * size]])
            cv2.fillPoly(img, [pts.astype(np.int32)], colour)
    return img


def _shapes(img: np.ndarray, rng: np.random.Generator) -> None:
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(3, 13))):
        kind = rng.integers(0, 5)
        colour = _colour(rng)
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if kind == 0:
            axes = (_between(rng, 2, w // 6), _between(rng, 2, h // 6))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        elif kind == 1:
            pts = np.asarray(c) + rng.normal(0, w * rng.uniform(0.02, 0.12), (int(rng.integers(3, 8)), 2))
            cv2.fillPoly(img, [pts.astype(np.int32)], colour)
        elif kind == 2:  # a pole or a wire
            end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, c, end, colour, _between(rng, 1, max(2, w // 40)))
        elif kind == 3:  # a round sign
            r = _between(rng, 3, h // 10)
            cv2.circle(img, c, r, colour, -1)
            cv2.circle(img, c, r, _colour(rng), max(2, r // 5))
        else:  # a translucent shadow
            pts = np.asarray(c) + rng.normal(0, w * 0.1, (int(rng.integers(3, 7)), 2))
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
            img[mask > 0] *= float(rng.uniform(0.4, 0.8))


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """One made-up scene (module doc, step 1), BGR float32 ``[h, w, 3]``, drawn at half size and enlarged."""
    sw, sh = max(8, w // 2), max(8, h // 2)
    family = rng.choice(3, p=[0.5, 0.25, 0.25])
    img = _road(rng, sw, sh) if family == 0 else _texture(rng, sw, sh) if family == 1 else _gradient(rng, sw, sh)
    img = np.ascontiguousarray(img, dtype=np.float32)
    _shapes(img, rng)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def _shuffled_tiles(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = photo.shape[:2]
    n = int(rng.integers(3, 6))
    th, tw = max(1, h // n), max(1, w // n)
    tiles = [photo[i * th : (i + 1) * th, j * tw : (j + 1) * tw] for i in range(n) for j in range(n)]
    order = rng.permutation(len(tiles))
    rows = [np.concatenate([tiles[k] for k in order[r * n : (r + 1) * n]], axis=1) for r in range(n)]
    return np.concatenate(rows, axis=0)


def _decoy(img: np.ndarray, rng: np.random.Generator, photo: np.ndarray | None) -> None:
    h, w = img.shape[:2]
    dw = max(2, int(w * rng.uniform(0.1, 0.6)))
    dh = max(2, int(min(h * 0.9, dw / rng.uniform(0.7, 3.0))))
    kind = rng.integers(0, 3) if photo is not None else rng.integers(0, 2)
    if kind == 0:
        fill = _texture(rng, dw, dh)
    elif kind == 1:
        fill = _gradient(rng, dw, dh)
    else:
        assert photo is not None
        fill = cv2.resize(_shuffled_tiles(photo, rng), (dw, dh)).astype(np.float32)
    x, y = int(rng.integers(0, w - dw + 1)), int(rng.integers(0, h - dh + 1))
    img[y : y + dh, x : x + dw] = fill


def _place(rng: np.random.Generator, size: tuple[int, int], frame: tuple[int, int], avoid: BoxF | None) -> BoxF | None:
    cw, ch = size
    for _ in range(12):
        x, y = int(rng.integers(0, frame[0] - cw + 1)), int(rng.integers(0, frame[1] - ch + 1))
        box = (float(x), float(y), float(x + cw), float(y + ch))
        if avoid is None or box[2] <= avoid[0] or box[0] >= avoid[2] or box[3] <= avoid[1] or box[1] >= avoid[3]:
            return box
    return None


def _paste(
    img: np.ndarray, photo: np.ndarray, share: float, rng: np.random.Generator, avoid: BoxF | None
) -> BoxF | None:
    h, w = img.shape[:2]
    ph, pw = photo.shape[:2]
    scale = min(share * w / pw, 0.95 * h / ph)
    cw, ch = max(2, round(pw * scale)), max(2, round(ph * scale))
    box = _place(rng, (cw, ch), (w, h), avoid)
    if box is None:
        return None
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    car = cv2.resize(photo, (cw, ch), interpolation=interp).astype(np.float32)
    if rng.random() < 0.5:
        car = car[:, ::-1]
    car = car * float(rng.uniform(0.8, 1.15)) + float(rng.uniform(-15, 15))
    x, y = int(box[0]), int(box[1])
    img[y : y + ch, x : x + cw] = car
    return box


def _conditions(img: np.ndarray, rng: np.random.Generator, spec: SynthSpec) -> np.ndarray:
    if rng.random() < spec.p_blur:
        if rng.random() < 0.5:
            img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.8, 2.5)))
        else:  # motion along the road
            k = int(rng.integers(5, 17))
            kernel = np.zeros((k, k), np.float32)
            kernel[k // 2, :] = 1.0 / k
            img = cv2.filter2D(img, -1, kernel)
    if rng.random() < spec.p_low_light:
        img = img * float(rng.uniform(0.15, 0.6)) + _randn(img.shape, float(rng.uniform(2, 9)), rng)
    out = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < spec.p_grey:
        grey = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
        grey = cv2.convertScaleAbs(grey, alpha=float(rng.uniform(0.6, 1.0)), beta=float(rng.uniform(0, 40)))
        out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    return out


def compose(rng: np.random.Generator, spec: SynthSpec, pick: Callable[[], np.ndarray]) -> tuple[np.ndarray, list[BoxF]]:
    """One frame (module doc) and its vehicle boxes; ``pick()`` returns a random tight photo (BGR)."""
    img = background(rng, spec.width, spec.height)
    if rng.random() < spec.p_decoy:
        for _ in range(int(rng.integers(1, 3))):
            _decoy(img, rng, pick() if rng.random() < 0.4 else None)
    boxes: list[BoxF] = []
    if rng.random() >= spec.p_empty:
        main = _paste(img, pick(), float(rng.uniform(spec.min_share, spec.max_share)), rng, None)
        assert main is not None  # a single photo always fits
        boxes.append(main)
        if rng.random() < spec.p_second:
            second = _paste(img, pick(), float(rng.uniform(0.12, 0.3)), rng, main)
            if second is not None:
                boxes.append(second)
    return _conditions(img, rng, spec), boxes


def synthesise(
    photos: Sequence[Photo],
    count: int,
    folder: Path,
    *,
    split: str,
    seed: int,
    spec: SynthSpec,
    report: Callable[[str], None] = lambda _: None,
) -> list[Frame]:
    """``count`` frames from ``photos`` as JPEGs in ``folder`` (plus ``labels.csv``); resumes a set of the same key."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"spec": asdict(spec), "seed": seed, "split": split, "photos": [str(p.path) for p in photos]}
    key = json.dumps(meta, sort_keys=True)
    meta_path, rows_path = folder / "meta.json", folder / "rows.jsonl"
    rows: list[_Row] = []
    if meta_path.is_file() and meta_path.read_text() == key and rows_path.is_file():
        rows = [_Row.parse(line) for line in rows_path.read_text().splitlines() if line.strip()]
        rows = rows[: len(rows) - len(rows) % CHUNK] if len(rows) < count else rows[:count]
    else:
        meta_path.write_text(key)
    rows_path.write_text("".join(r.dump() for r in rows))
    if len(rows) < count:
        report(f"synthesising {count - len(rows)} {split} frame(s) in {folder}")
    photo_cache: dict[int, np.ndarray] = {}
    for start in range(len(rows), count, CHUNK):
        done = [
            _draw(i, photos, folder, split, seed, spec, photo_cache) for i in range(start, min(count, start + CHUNK))
        ]
        with rows_path.open("a") as fh:  # one chunk at a time: a resumed run redraws at most one chunk
            fh.write("".join(r.dump() for r in done))
        rows.extend(done)
        if (start // CHUNK) % 10 == 9 or start + CHUNK >= count:
            report(f"synthesised {min(count, start + CHUNK)}/{count} {split} frame(s)")
    _write_labels(folder / "labels.csv", rows, split)
    return [Frame(folder / r.image, r.boxes, split, 0, "synthetic") for r in rows]


@dataclass(frozen=True)
class _Row:
    image: str
    boxes: tuple[BoxF, ...]

    def dump(self) -> str:
        return json.dumps({"image": self.image, "boxes": [list(b) for b in self.boxes]}) + "\n"

    @classmethod
    def parse(cls, line: str) -> _Row:
        doc = json.loads(line)
        return cls(str(doc["image"]), tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in doc["boxes"]))


def _draw(
    i: int, photos: Sequence[Photo], folder: Path, split: str, seed: int, spec: SynthSpec, cache: dict[int, np.ndarray]
) -> _Row:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])

    def pick() -> np.ndarray:
        k = int(rng.integers(0, len(photos)))
        if k not in cache:
            if len(cache) > 512:
                cache.clear()
            cache[k] = load_photo(photos[k])
        return cache[k]

    img, boxes = compose(rng, spec, pick)
    name = f"{split}-{i:06d}.jpg"
    cv2.imwrite(str(folder / name), img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(55, 96))])
    return _Row(name, tuple(boxes))


def _write_labels(path: Path, rows: Sequence[_Row], split: str) -> None:
    """The set as a LABELS CSV (``image,x1,y1,x2,y2,split``), the format the command reads back."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "x1", "y1", "x2", "y2", "split"])
        for r in rows:
            if not r.boxes:
                w.writerow([r.image, "", "", "", "", split])
            for b in r.boxes:
                w.writerow([r.image, *(f"{v:g}" for v in b), split])
