"""Generated radar-like frames with faces and plates drawn at known places (tests and benchmarks/anonymise_bench.py).

A frame shows the reviewed vehicle (its box, its plate low in the box, a driver's face behind the
windscreen), a third-party vehicle with its own plate, and a pedestrian's face. Every drawn thing
is textured, so a masked region can never equal its source by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # BGR uint8
    vehicle: Box  # the reviewed vehicle (the radar's box)
    own_plate: Box  # inside the vehicle box: the evidence, kept
    occupant_face: Box  # behind the windscreen: masked
    third_plates: tuple[Box, ...]  # other vehicles' plates: masked
    bystander_faces: tuple[Box, ...]  # pedestrians: masked

    @property
    def jpeg(self) -> bytes:
        return bytes(cv2.imencode(".jpg", self.image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())


def _face(img: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    x, y, w, h = box
    skin = rng.integers(120, 200, (h, w, 3)).astype(np.uint8)
    skin[..., 2] = np.clip(skin[..., 2].astype(int) + 40, 0, 255)
    img[y : y + h, x : x + w] = skin
    cv2.circle(img, (x + w // 3, y + h // 3), max(2, w // 10), (20, 20, 20), -1)
    cv2.circle(img, (x + 2 * w // 3, y + h // 3), max(2, w // 10), (20, 20, 20), -1)
    cv2.ellipse(img, (x + w // 2, y + 3 * h // 4), (w // 4, h // 10), 0, 0, 180, (40, 40, 160), 2)


def _plate(img: np.ndarray, box: Box, text: str, rng: np.random.Generator) -> None:
    x, y, w, h = box
    img[y : y + h, x : x + w] = rng.integers(225, 256, (h, w, 3)).astype(np.uint8)
    scale = h / 40
    cv2.putText(img, text, (x + w // 12, y + int(h * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (10, 10, 10), 2)


def make_scene(width: int = 960, height: int = 800, seed: int = 3) -> Scene:
    """A frame of ``width`` x ``height``; every box scales with the frame."""
    rng = np.random.default_rng(seed)
    sx, sy = width / 960, height / 800

    def box(x: float, y: float, w: float, h: float) -> Box:
        return round(x * sx), round(y * sy), max(4, round(w * sx)), max(4, round(h * sy))

    # road and background: smooth shapes plus fine grain, compressing like a photo (about 1 MB at 5 MP)
    coarse = rng.integers(40, 200, (max(2, height // 40), max(2, width // 40), 3)).astype(np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    img = np.clip(img + rng.integers(-6, 7, img.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    vehicle = box(300, 300, 400, 380)
    vx, vy, vw, vh = vehicle
    body = np.linspace(60, 180, vw, dtype=np.float32)[None, :, None] + np.zeros((vh, 1, 3), np.float32)
    img[vy : vy + vh, vx : vx + vw] = body.astype(np.uint8)
    cv2.rectangle(img, (vx + vw // 8, vy + vh // 10), (vx + 7 * vw // 8, vy + vh // 2), (90, 70, 50), -1)
    occupant = box(380, 360, 70, 90)  # the driver, behind the windscreen (top half of the box)
    _face(img, occupant, rng)
    own = box(440, 600, 120, 30)
    _plate(img, own, "AB-123-CD", rng)
    other = box(760, 60, 170, 150)
    ox, oy, ow, oh = other
    img[oy : oy + oh, ox : ox + ow] = (40, 40, 150)
    third = (box(800, 170, 90, 24), box(40, 700, 110, 28))  # the other car's plate, a parked car's plate
    for i, plate in enumerate(third):
        _plate(img, plate, f"ZZ-{100 + i}-YY", rng)
    bystanders = (box(60, 330, 50, 64), box(860, 420, 44, 56))
    for face in bystanders:
        _face(img, face, rng)
    return Scene(img, vehicle, own, occupant, third, bystanders)
