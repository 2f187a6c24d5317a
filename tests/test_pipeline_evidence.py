"""The daemon's own pipeline (spool → intake → classify → decide → commit) on generated captures:
the crop contract, the greyscale refusal, the OOD abstention, and the published event naming the
vehicle box and the crop actually classified (valid against agent/schemas/event.v1.json).

Real parts: a spool folder, a signed-format registry subset imported into SQLite, the SQLite
outbox, a tiny real ONNX classifier run by ONNX Runtime. No broker is needed: the pipeline's
verdict callback receives the event document the publisher would send.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_capture_intake import SIDE, asymmetric_onnx
from waiting import wait_until

from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.capture.spool import Spool
from iaflash.agent.config import Config, parse_config
from iaflash.agent.decision.verdict import Verdict
from iaflash.agent.demo.fleet import CLASSES, encode_jpeg, render_scene
from iaflash.agent.outbox.events import validate_event
from iaflash.agent.pipeline.pipeline import Pipeline
from iaflash.agent.registry.cache import Registry, import_subset, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.engines.bundle import Bundle, Label, Preprocessing, write_bundle
from iaflash.engines.manifest import CropSpec, OodSpec, TtaSpec
from iaflash.engines.onnxrt import OnnxRuntimeBackend

LABELS = tuple(Label(i, c.make, c.model) for i, c in enumerate(CLASSES[:4]))
PLATE = "AB-123-CD"


def config(root: Path) -> Config:
    doc: dict[str, Any] = {
        "site": {"site_id": "s1", "device_id": "b1"},
        "spool": {"dir": str(root / "spool"), "poll_interval_s": 0.02},
        "model": {"bundle": str(root / "model")},
        "registry": {"db": str(root / "registry.db"), "hmac_key_file": str(root / "hmac.key")},
        "outbox": {"db": str(root / "state.db")},
        "security": {"trust_dir": str(root / "trust")},
        "mqtt": {"host": "127.0.0.1", "port": 1, "publish": ["match", "mismatch", "inconclusive"]},
    }
    return parse_config(doc, str(root / "agent.toml"))


def bundle(root: Path, **sections: Any) -> Bundle:
    return write_bundle(
        root / "model",
        onnx_bytes=asymmetric_onnx(),
        labels=LABELS,
        name="asym",
        version="1",
        input_name="input",
        input_shape=["N", 3, SIDE, SIDE],
        preprocessing=Preprocessing(height=SIDE, width=SIDE),
        output_name="logits",
        **sections,
    )


def run(root: Path, model: Bundle, captures: dict[str, tuple[np.ndarray, tuple[int, int, int, int]]]) -> dict[str, Any]:
    """Drop the captures, run the daemon's pipeline until each has a verdict; {id: (verdict, event)}."""
    cfg = config(root)
    key = secrets.token_bytes(32)
    subset = root / "snapshot.jsonl.gz"
    records = records_from_plates(key, [(PLATE, LABELS[0].make, LABELS[0].model, "VP", None)])
    write_subset(subset, kind="snapshot", dataset_id="t", seq=1, key_id=key_id(key), records=records)
    import_subset(cfg.registry.db, subset, expected_key_id=key_id(key))
    spool = Spool(cfg.spool.dir, cfg.spool)
    spool.ensure_layout()
    for capture_id, (image, box) in captures.items():
        incoming = cfg.spool.dir / "incoming"
        (incoming / f"{capture_id}.jpg").write_bytes(encode_jpeg(image))
        sidecar = {
            "schema_version": 1,
            "capture_id": capture_id,
            "site_id": "s1",
            "captured_at": "2026-12-01T10:00:00+01:00",
            "plate": PLATE,
            "plate_confidence": 0.99,
            "vehicle_box": list(box),
        }
        (incoming / f".{capture_id}.tmp").write_text(json.dumps(sidecar))
        os.rename(incoming / f".{capture_id}.tmp", incoming / f"{capture_id}.json")
    seen: dict[str, tuple[Verdict, dict[str, Any] | None]] = {}
    lock = threading.Lock()

    def on_verdict(capture: Capture, verdict: Verdict, event: dict[str, Any] | None) -> None:
        with lock:
            seen[capture.capture_id] = (verdict, event)

    registry = Registry(cfg.registry.db, key)
    with OnnxRuntimeBackend() as backend:
        backend.load(model)
        pipeline = Pipeline(cfg, spool, backend, model, registry, key, on_verdict=on_verdict)
        pipeline.start()
        try:
            wait_until(lambda: len(seen) == len(captures), timeout=30, what="a verdict for every capture")
        finally:
            pipeline.stop()
    registry.close()
    return {**seen, "_errors": dict(pipeline.errors)}


def scene(seed: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    return render_scene(CLASSES[0], np.random.default_rng(seed))


def test_the_published_event_names_the_box_and_the_crop_classified(tmp_path: Path) -> None:
    image, box = scene(1)
    model = bundle(tmp_path, crop=CropSpec(margin=0.0, aspect="stretch"), tta=TtaSpec(hflip=True))
    out = run(tmp_path, model, {"c-colour": (image, box)})
    verdict, event = out["c-colour"]
    assert verdict.outcome in ("match", "mismatch", "inconclusive")
    assert event is not None
    validate_event(event)
    evidence = event["verdict"]["evidence"]["image"]
    assert evidence["crop"]["box"] == list(box)  # frame pixels, the radar's own box
    assert evidence["crop"]["margin"] == 0.0 and evidence["crop"]["color_mode"] == "color"
    assert evidence["crop"]["input_size"] == [SIDE, SIDE]
    assert evidence["views"]["views"] == ["original", "hflip"] and evidence["views"]["fusion"] == "mean_probability"


def test_an_infrared_frame_is_inconclusive_never_a_flag_for_a_colour_model(tmp_path: Path) -> None:
    image, box = scene(2)
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    out = run(tmp_path, bundle(tmp_path), {"c-ir": (grey, box)})
    verdict, event = out["c-ir"]
    assert verdict.outcome == "inconclusive" and not verdict.is_flag
    assert "grey frame (infrared or monochrome) and the model accepts only color" in verdict.reason
    assert event is not None
    validate_event(event)
    assert event["verdict"]["evidence"]["image"]["crop"]["color_mode"] == "grey"


def test_energy_above_the_bundles_threshold_makes_the_verdict_abstain(tmp_path: Path) -> None:
    image, box = scene(3)
    model = bundle(tmp_path, ood=OodSpec(threshold=-1e6))  # every input is 'unlike the training data'
    out = run(tmp_path, model, {"c-ood": (image, box)})
    verdict, event = out["c-ood"]
    assert verdict.outcome == "inconclusive" and verdict.reason.startswith("out_of_distribution: energy")
    assert event is not None
    validate_event(event)
    views = event["verdict"]["evidence"]["image"]["views"]
    assert views["energy"] is not None and views["energy"] > -1e6 and views["ood_threshold"] == -1e6
    assert out["_errors"]["out_of_distribution"] == 1


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_the_daemon_cuts_the_margin_the_bundle_says(tmp_path: Path, margin: float) -> None:
    image, box = scene(4)
    model = bundle(tmp_path, crop=CropSpec(margin=margin))
    _, event = run(tmp_path, model, {"c-m": (image, box)})["c-m"]
    assert event is not None
    crop = event["verdict"]["evidence"]["image"]["crop"]
    assert crop["margin"] == margin and crop["box"] == list(box)
    grown = (crop["region"][2] - box[2]) / box[2]
    assert grown == pytest.approx(2 * margin, abs=0.03)  # margin on each side (to a reduced pixel)
    assert model.manifest.crop_spec.margin == margin
