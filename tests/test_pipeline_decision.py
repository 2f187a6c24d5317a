"""The daemon's pipeline deciding with the bundle's operating point, and the misread check, on generated captures.

Real parts: the demo classifier (trained and its operating point fitted at build time), a spool
folder, a registry subset imported into SQLite with HMAC'd plates, the SQLite outbox, ONNX Runtime.
The verdict callback receives the event the publisher would send (validated against the schema).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_pipeline_evidence import config
from waiting import wait_until

from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.capture.spool import Spool
from iaflash.agent.decision.verdict import Verdict
from iaflash.agent.demo.fleet import CLASSES, encode_jpeg, render_scene
from iaflash.agent.demo.model import build_demo_bundle
from iaflash.agent.outbox.events import validate_event
from iaflash.agent.pipeline.pipeline import Pipeline
from iaflash.agent.registry.cache import Registry, import_subset, records_from_plates, write_subset
from iaflash.agent.registry.plates import confusable_neighbours, key_id
from iaflash.engines.bundle import Bundle, write_bundle
from iaflash.engines.onnxrt import OnnxRuntimeBackend

GOLF = CLASSES[5]
CLIO = CLASSES[0]
# The radar reads AB-128-CD (registered to a Clio); AB-123-CD, one confusable character away (8/3), holds a Golf.
MISREAD, TRUE_PLATE, CLONED = "AB-128-CD", "AB-123-CD", "EF-456-GH"
REGISTRY = [
    (MISREAD, CLIO.make, CLIO.model, "VP", None),
    (TRUE_PLATE, GOLF.make, GOLF.model, "VP", None),
    (CLONED, CLIO.make, CLIO.model, "VP", None),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build_demo_bundle(tmp_path_factory.mktemp("demo") / "model", per_class=20, seed=3)[0]


def _without_operating_point(source: Bundle, root: Path) -> Bundle:
    m = source.manifest
    return write_bundle(
        root / "model",
        onnx_bytes=source.model_path.read_bytes(),
        labels=source.labels,
        name=m.name,
        version=m.version,
        input_name=m.input_name,
        input_shape=m.input_shape,
        preprocessing=m.preprocessing,
        output_name=m.output_name,
        temperature=m.temperature,
    )


def run(root: Path, model: Bundle, plates: dict[str, str], **decision: Any) -> dict[str, tuple[Verdict, Any]]:
    """One Golf capture per entry (id → plate read) through the daemon's pipeline; {id: (verdict, event)}."""
    cfg = config(root)
    if decision:
        cfg = cfg.model_copy(update={"decision": cfg.decision.model_copy(update=decision)})
    key = secrets.token_bytes(32)
    subset = root / "snapshot.jsonl.gz"
    write_subset(
        subset, kind="snapshot", dataset_id="t", seq=1, key_id=key_id(key), records=records_from_plates(key, REGISTRY)
    )
    import_subset(cfg.registry.db, subset, expected_key_id=key_id(key))
    spool = Spool(cfg.spool.dir, cfg.spool)
    spool.ensure_layout()
    incoming = cfg.spool.dir / "incoming"
    for n, (capture_id, plate) in enumerate(plates.items()):
        image, box = render_scene(GOLF, np.random.default_rng(100 + n))
        (incoming / f"{capture_id}.jpg").write_bytes(encode_jpeg(image))
        sidecar = {
            "schema_version": 1,
            "capture_id": capture_id,
            "site_id": "s1",
            "captured_at": "2026-12-01T10:00:00+01:00",
            "plate": plate,
            "plate_confidence": 0.99,
            "vehicle_box": list(box),
        }
        (incoming / f".{capture_id}.tmp").write_text(json.dumps(sidecar))
        os.rename(incoming / f".{capture_id}.tmp", incoming / f"{capture_id}.json")
    seen: dict[str, tuple[Verdict, Any]] = {}
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
            wait_until(lambda: len(seen) == len(plates), timeout=60, what="a verdict for every capture")
        finally:
            pipeline.stop()
    registry.close()
    return seen


def test_the_plates_are_confusable_neighbours() -> None:
    assert TRUE_PLATE in confusable_neighbours(MISREAD)
    assert not {p for p, *_ in REGISTRY} & set(confusable_neighbours(CLONED))


def test_the_daemon_flags_with_the_bundles_operating_point_and_names_it(tmp_path: Path, demo: Bundle) -> None:
    """A Golf on a plate registered to a Clio is a make-level flag; the event names the operating point."""
    op = demo.manifest.operating_point
    assert op is not None and op.met
    verdict, event = run(tmp_path, demo, {"c-clone": CLONED})["c-clone"]
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")
    assert verdict.thresholds["min_top1"] == op.thresholds["min_top1"]
    validate_event(event)
    named = event["verdict"]["evidence"]["operating_point"]
    assert named == {"id": op.id, "target": op.target, "upper_bound": op.upper_bound, "met": True, "override": False}
    assert event["verdict"]["evidence"]["misread_check"] == {"registered_neighbours": 0, "fitting": 0}


def test_a_plate_probably_misread_is_never_flagged(tmp_path: Path, demo: Bundle) -> None:
    """The read plate's record (Clio) does not fit the Golf, but its registered neighbour (Golf) does."""
    verdict, event = run(tmp_path, demo, {"c-misread": MISREAD})["c-misread"]
    assert verdict.outcome == "inconclusive"
    assert verdict.reason.startswith("plate probably misread")
    assert verdict.evidence["misread_check"] == {"registered_neighbours": 1, "fitting": 1}
    assert verdict.evidence["held_flag"]["level"] == "make"
    validate_event(event)


def test_a_bundle_without_operating_point_never_flags_in_the_daemon(tmp_path: Path, demo: Bundle) -> None:
    verdict, _ = run(tmp_path, _without_operating_point(demo, tmp_path), {"c-clone": CLONED})["c-clone"]
    assert verdict.outcome == "inconclusive"
    assert verdict.reason.startswith("no_operating_point: the model bundle has no fitted operating point")


def test_the_explicit_override_flags_without_operating_point(tmp_path: Path, demo: Bundle) -> None:
    model = _without_operating_point(demo, tmp_path)
    verdict, _ = run(tmp_path, model, {"c-clone": CLONED}, override_operating_point=True)["c-clone"]
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")
    assert verdict.evidence["operating_point"] == {"id": None, "override": True}
