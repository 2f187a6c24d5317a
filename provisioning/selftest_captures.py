"""The known captures of ``iaflash-provision selftest``: drawn at run time, written as a radar does.

Each is a real JPEG (a drawn car on a road, 1024×768) and its sidecar (contract v1), written
image first, sidecar last through a rename. Their plates can never match a real registration:
``ZZ-999-ZZ`` is a valid SIV plate that will not be issued for decades, and one capture has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

__all__ = ["KNOWN", "Known", "write_known"]

TEST_PLATE = "ZZ-999-ZZ"
EQUIPMENT = "iaflash-selftest"
_BOX = (250, 300, 520, 330)  # x, y, w, h of the drawn car


@dataclass(frozen=True)
class Known:
    """One known capture: what it tests, and whether its sidecar gives the vehicle box."""

    capture_id: str
    plate: str | None
    sidecar_box: bool
    tests: str


KNOWN = (
    Known("selftest-model", TEST_PLATE, True, "model and registry: the car is classified, the plate looked up"),
    Known("selftest-noplate", None, True, "decision: no plate read gives unreadable_plate"),
    Known("selftest-detector", TEST_PLATE, False, "detector: no box in the sidecar, the detector looks"),
)


def draw_car(seed: int) -> np.ndarray:
    """A 1024×768 road scene with one car: enough for the detector and the classifier to run on."""
    rng = np.random.default_rng(seed)
    img = np.zeros((768, 1024, 3), np.uint8)
    img[:] = (170, 160, 150)
    img[420:] = (70, 70, 75)  # road
    x, y, w, h = _BOX
    colour = tuple(int(c) for c in rng.integers(40, 220, 3))
    cv2.rectangle(img, (x, y + h // 3), (x + w, y + h - 40), colour, -1)  # body
    cv2.rectangle(img, (x + w // 5, y), (x + 4 * w // 5, y + h // 3), colour, -1)  # cabin
    cv2.rectangle(img, (x + w // 5 + 15, y + 15), (x + 4 * w // 5 - 15, y + h // 3), (60, 50, 40), -1)  # windscreen
    for cx in (x + w // 5, x + 4 * w // 5):
        cv2.circle(img, (cx, y + h - 40), 40, (20, 20, 20), -1)  # wheels
    px, py = x + w // 2 - 70, y + h - 95
    cv2.rectangle(img, (px, py), (px + 140, py + 32), (245, 245, 245), -1)
    cv2.putText(img, TEST_PLATE, (px + 6, py + 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (10, 10, 10), 2)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def write_known(incoming: Path, site_id: str, known: tuple[Known, ...] = KNOWN) -> list[str]:
    """Write each known capture into ``incoming`` (image, then the sidecar by rename); returns their ids."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for n, k in enumerate(known):
        ok, jpeg = cv2.imencode(".jpg", draw_car(n), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        (incoming / f"{k.capture_id}.jpg").write_bytes(jpeg.tobytes())
        sidecar: dict[str, object] = {
            "schema_version": 1,
            "capture_id": k.capture_id,
            "site_id": site_id,
            "captured_at": now,
            "plate": k.plate,
            "plate_confidence": 0.99 if k.plate else None,
            "direction": "approaching",
            "lane": 1,
            "speed_kmh": 92.0,
            "limit_kmh": 80.0,
            "equipment": EQUIPMENT,
        }
        if k.sidecar_box:
            sidecar["vehicle_box"] = list(_BOX)
        tmp = incoming / f".{k.capture_id}.json.tmp"
        tmp.write_text(json.dumps(sidecar), encoding="utf-8")
        tmp.rename(incoming / f"{k.capture_id}.json")
    return [k.capture_id for k in known]
