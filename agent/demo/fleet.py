"""A small deterministic demo fleet: synthetic radar scenes of eight "vehicle" classes.

These are drawings, not photos: each class has its own body colour and silhouette,
so the demo model (``iaflash.agent.demo.model``) can genuinely learn to tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SCENE_W, SCENE_H = 1600, 1200


@dataclass(frozen=True)
class VehicleStyle:
    make: str
    model: str
    color_bgr: tuple[int, int, int]
    body_h: float  # body height as a fraction of the box height
    roof_start: float  # where the cabin starts along the body (0..1)
    roof_len: float  # cabin length as a fraction of the body


CLASSES: tuple[VehicleStyle, ...] = (
    VehicleStyle("RENAULT", "CLIO", (40, 40, 200), 0.45, 0.30, 0.45),
    VehicleStyle("RENAULT", "MEGANE", (200, 200, 40), 0.42, 0.25, 0.55),
    VehicleStyle("PEUGEOT", "208", (220, 60, 30), 0.45, 0.35, 0.40),
    VehicleStyle("PEUGEOT", "3008", (60, 60, 60), 0.60, 0.20, 0.65),
    VehicleStyle("CITROEN", "C3", (40, 200, 230), 0.50, 0.30, 0.45),
    VehicleStyle("VOLKSWAGEN", "GOLF", (230, 230, 230), 0.44, 0.28, 0.50),
    VehicleStyle("TOYOTA", "YARIS", (40, 160, 40), 0.48, 0.32, 0.40),
    VehicleStyle("DACIA", "SANDERO", (160, 40, 150), 0.50, 0.22, 0.55),
)


def _jitter_color(rng: np.random.Generator, color: tuple[int, int, int]) -> tuple[int, int, int]:
    shifted = np.clip(np.array(color, dtype=np.int32) + rng.integers(-18, 19, size=3), 0, 255)
    return int(shifted[0]), int(shifted[1]), int(shifted[2])


def draw_vehicle(
    img: np.ndarray, style: VehicleStyle, box: tuple[int, int, int, int], rng: np.random.Generator, plate_text: str = ""
) -> None:
    """Draw one vehicle of ``style`` filling ``box`` (x, y, w, h) on ``img`` in place."""
    x, y, w, h = box
    color = _jitter_color(rng, style.color_bgr)
    body_top = y + int(h * (1 - style.body_h) * 0.9)
    body_bottom = y + int(h * 0.88)
    cv2.rectangle(img, (x, body_top), (x + w, body_bottom), color, thickness=-1)
    cab_x0 = x + int(w * style.roof_start)
    cab_x1 = cab_x0 + int(w * style.roof_len)
    roof_y = y + int(h * 0.08)
    cabin = np.array(
        [[cab_x0 - w // 12, body_top], [cab_x0, roof_y], [cab_x1, roof_y], [cab_x1 + w // 12, body_top]], dtype=np.int32
    )
    cv2.fillPoly(img, [cabin], color)
    glass = (90, 70, 50)
    inset = max(3, w // 60)
    window = np.array(
        [
            [cab_x0 - w // 14 + inset, body_top - inset],
            [cab_x0 + inset, roof_y + inset],
            [cab_x1 - inset, roof_y + inset],
            [cab_x1 + w // 14 - inset, body_top - inset],
        ],
        dtype=np.int32,
    )
    cv2.fillPoly(img, [window], glass)
    wheel_r = max(4, int(h * 0.13))
    for wx in (x + int(w * 0.2), x + int(w * 0.8)):
        cv2.circle(img, (wx, body_bottom), wheel_r, (20, 20, 20), thickness=-1)
    if plate_text:
        pw, ph = int(w * 0.28), max(10, int(h * 0.09))
        px, py = x + (w - pw) // 2, body_bottom - ph - int(h * 0.05)
        cv2.rectangle(img, (px, py), (px + pw, py + ph), (245, 245, 245), thickness=-1)
        cv2.putText(
            img,
            plate_text,
            (px + 4, py + ph - 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            ph / 36,
            (10, 10, 10),
            max(1, ph // 12),
            cv2.LINE_AA,
        )


def road_background(rng: np.random.Generator, width: int = SCENE_W, height: int = SCENE_H) -> np.ndarray:
    """A grey road with lane marks and a little sensor noise."""
    base = int(rng.integers(95, 125))
    img = np.full((height, width, 3), base, dtype=np.uint8)
    sky = height // 5
    img[:sky] = (170, 150, 120)
    for lane_x in (width // 3, 2 * width // 3):
        for y0 in range(sky, height, 120):
            cv2.line(img, (lane_x, y0), (lane_x, y0 + 60), (230, 230, 230), 8)
    noise = rng.integers(-6, 7, size=img.shape, dtype=np.int16)
    out: np.ndarray = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return out


def random_box(rng: np.random.Generator, width: int = SCENE_W, height: int = SCENE_H) -> tuple[int, int, int, int]:
    w = int(rng.integers(int(width * 0.35), int(width * 0.5)))
    h = int(w * rng.uniform(0.55, 0.65))
    x = int(rng.integers(width // 10, width - w - width // 10))
    y = int(rng.integers(height // 4, height - h - height // 20))
    return x, y, w, h


def render_scene(
    style: VehicleStyle, rng: np.random.Generator, plate_text: str = "", night: bool = False
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A full radar-like frame with one vehicle; returns (BGR image, vehicle box)."""
    img = road_background(rng)
    box = random_box(rng)
    draw_vehicle(img, style, box, rng, plate_text)
    if night:
        img = (img.astype(np.float32) * 0.06).astype(np.uint8)
    return img, box


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2.imencode failed for a demo image")
    return bytes(buf.tobytes())
