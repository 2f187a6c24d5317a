"""The demo's deterministic scenario: which vehicle, which plate, what the registry says.

Every capture is drawn from the demo fleet. Most plates are registered to the vehicle
shown (match). Some are deliberately registered to another make (make-level clone) or
another model of the same make (model-level clone). A few exercise every other outcome:
unknown plate, unreadable plate, a registered model outside the taxonomy (never flagged),
a night shot too dark to judge, and two bad inputs that must end in rejected/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from iaflash.agent.demo.fleet import CLASSES, encode_jpeg, render_scene

LETTERS = "ABCDEFGHJKLMNPQRSTVWXYZ"  # SIV letters: no I, O, U


@dataclass(frozen=True)
class DemoCapture:
    capture_id: str
    shown: int  # index into CLASSES
    plate: str | None
    registered: tuple[str, str] | None  # (make, model) in the registry, None = not registered
    expect: str  # expected outcome, e.g. "match", "mismatch/make"
    night: bool = False
    bad: str | None = None  # "corrupt_jpeg" | "unknown_field"
    radar_box: bool = False  # the radar gives the vehicle box in the sidecar (else the detector finds it)


def siv_plate(rng: np.random.Generator) -> str:
    a = "".join(rng.choice(list(LETTERS), 2))
    b = "".join(rng.choice(list(LETTERS), 2))
    return f"{a}-{int(rng.integers(1, 1000)):03d}-{b}"


def _other_make(shown: int, rng: np.random.Generator) -> tuple[str, str]:
    choices = [c for c in CLASSES if c.make != CLASSES[shown].make]
    c = choices[int(rng.integers(len(choices)))]
    return c.make, c.model


def _same_make_other_model(shown: int) -> tuple[str, str]:
    c = next(c for c in CLASSES if c.make == CLASSES[shown].make and c.model != CLASSES[shown].model)
    return c.make, c.model


def build_scenario(n: int = 40, seed: int = 7) -> list[DemoCapture]:
    """n captures (n ≥ 16) with a fixed mix of outcomes."""
    rng = np.random.default_rng(seed)
    out: list[DemoCapture] = []
    special = {
        3: "mismatch/make",
        9: "mismatch/model",
        14: "mismatch/make",
        18: "unknown_plate",
        21: "mismatch/model",
        24: "unreadable_plate",
        27: "unsupported",
        30: "inconclusive",
        33: "mismatch/make",
        12: "corrupt_jpeg",
        36: "unknown_field",
        38: "unknown_plate",
    }
    for i in range(n):
        shown = i % len(CLASSES)
        style = CLASSES[shown]
        kind = special.get(i, "match")
        plate: str | None = siv_plate(rng)
        registered: tuple[str, str] | None = (style.make, style.model)
        if kind == "mismatch/make":
            registered = _other_make(shown, rng)
        elif kind == "mismatch/model":
            shown = next(j for j, c in enumerate(CLASSES) if c.make in ("RENAULT", "PEUGEOT") and j % 2 == i % 2)
            registered = _same_make_other_model(shown)
        elif kind == "unknown_plate":
            registered = None
        elif kind == "unreadable_plate":
            plate = None
        elif kind == "unsupported":
            registered = ("MERCEDES-BENZ", "CLASSE G")
        bad = kind if kind in ("corrupt_jpeg", "unknown_field") else None
        expect = "rejected" if bad else kind
        out.append(
            DemoCapture(
                f"demo-{i:04d}",
                shown,
                plate,
                registered,
                expect,
                night=kind == "inconclusive",
                bad=bad,
                radar_box=i % 4 == 1,
            )
        )
    return out


def registry_rows(scenario: list[DemoCapture]) -> list[tuple[str, str, str, str | None, str | None]]:
    """(plate, make, model, genre, body) for every registered demo plate."""
    return [
        (c.plate, c.registered[0], c.registered[1], "VP", "CI")
        for c in scenario
        if c.plate is not None and c.registered is not None
    ]


def write_capture(c: DemoCapture, incoming: Path, captured_at: datetime, seed: int) -> None:
    """Write image(s) first, then the sidecar through a rename: the radar's contract."""
    rng = np.random.default_rng(seed)
    img, box = render_scene(CLASSES[c.shown], rng, plate_text=c.plate or "", night=c.night)
    jpeg = encode_jpeg(img)
    if c.bad == "corrupt_jpeg":
        jpeg = jpeg[:200] + bytes(len(jpeg) - 200)  # header kept, entropy data destroyed
    (incoming / f"{c.capture_id}.jpg").write_bytes(jpeg)
    sidecar = {
        "schema_version": 1,
        "capture_id": c.capture_id,
        "site_id": "demo-site",
        "captured_at": captured_at.isoformat(),
        "plate": c.plate,
        "plate_confidence": 0.97 if c.plate else 0.0,
        "direction": "approaching",
        "lane": 1 + seed % 2,
        "speed_kmh": 90 + seed % 40,
        "limit_kmh": 80,
        "equipment": "MESTA-FUSION",
    }
    if c.radar_box:
        sidecar["vehicle_box"] = list(box)
    if c.bad == "unknown_field":
        sidecar["colour_guess"] = "red"
    tmp = incoming / f".{c.capture_id}.json.tmp"
    tmp.write_text(json.dumps(sidecar))
    tmp.rename(incoming / f"{c.capture_id}.json")


def start_time() -> datetime:
    return datetime(2026, 11, 25, 8, 0, tzinfo=timezone(timedelta(hours=1)))
