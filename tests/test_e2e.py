"""End to end: captures in the spool → real model → real registry → outbox → real Mosquitto → central.

The agent runs its real code path (``Service``), in process or as a subprocess that is
SIGKILLed. The broker is a real mosquitto that is SIGKILLed and restarted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from e2e_site import Site, build_models, make_site
from waiting import wait_until

from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.decision.verdict import Verdict
from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.outbox.events import validate_event
from iaflash.agent.outbox.store import Outbox
from iaflash.agent.service import Service
from iaflash.central.subscriber import Subscriber

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Signed demo classifier and detector bundles plus their trust store (built once)."""
    return build_models(tmp_path_factory.mktemp("models"))


class Recorder:
    """Collects verdicts from the service's callback (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.verdicts: dict[str, str] = {}

    def __call__(self, capture: Capture, verdict: Verdict, event: dict[str, Any] | None) -> None:
        with self.lock:
            self.verdicts[capture.capture_id] = verdict.outcome + (f"/{verdict.level}" if verdict.level else "")

    def count(self) -> int:
        with self.lock:
            return len(self.verdicts)


@pytest.fixture
def running(tmp_path: Path, demo_bundle: Path, broker: MosquittoBroker) -> Iterator[tuple[Site, Service, Recorder]]:
    site = make_site(tmp_path / "site", demo_bundle, broker.port)
    recorder = Recorder()
    service = Service(site.cfg, on_verdict=recorder)
    service.start()
    yield site, service, recorder
    service.stop()


def write_bad_inputs(incoming: Path) -> dict[str, str]:
    """Bad captures beside the good ones; returns capture_id -> expected rejection reason."""
    tiny = cv2.imencode(".jpg", np.full((10, 64, 3), 128, np.uint8))[1].tobytes()
    base = {
        "schema_version": 1,
        "site_id": "demo-site",
        "captured_at": "2026-11-25T08:00:00+01:00",
        "plate": "AB-123-CD",
        "plate_confidence": 0.9,
    }
    (incoming / "bad-noimage.json").write_text(json.dumps({**base, "capture_id": "bad-noimage"}))
    (incoming / "bad-tiny.jpg").write_bytes(tiny)
    (incoming / "bad-tiny.json").write_text(json.dumps({**base, "capture_id": "bad-tiny"}))
    (incoming / "bad-json.jpg").write_bytes(tiny)
    (incoming / "bad-json.json").write_text("{not json")
    (incoming / "bad-speed.jpg").write_bytes(tiny)
    (incoming / "bad-speed.json").write_text(json.dumps({**base, "capture_id": "bad-speed", "speed_kmh": 9000}))
    return {
        "bad-noimage": "missing_image",
        "bad-tiny": "image_too_small",
        "bad-json": "sidecar_not_json",
        "bad-speed": "sidecar_invalid",
    }


def test_fifty_captures_give_exactly_the_expected_flags_and_bad_input_is_rejected_with_reasons(
    running: tuple[Site, Service, Recorder],
    broker: MosquittoBroker,
) -> None:
    site, service, recorder = running
    central = Subscriber("127.0.0.1", broker.port).start()
    try:
        bad = write_bad_inputs(site.incoming)
        site.drop(site.scenario)
        wait_until(lambda: recorder.count() == site.expected_verdicts(), 90, "every good capture's verdict")
        expected = site.expected_flags()
        assert central.wait_for(len(expected), timeout=30)
        time.sleep(0.5)  # a stray extra event would show up here
        events = central.events
    finally:
        central.stop()
    assert sorted(e["capture_id"] for e in events) == sorted(expected)
    for event in events:
        validate_event(event)
        level = event["verdict"]["level"]
        assert f"mismatch/{level}" == expected[event["capture_id"]]
        assert event["plate_key"] and len(event["plate_key"]) == 64
    assert central.duplicates == 0 and central.invalid == []
    wrong = {
        c.capture_id: (c.expect, recorder.verdicts.get(c.capture_id))
        for c in site.scenario
        if c.expect != "rejected" and recorder.verdicts.get(c.capture_id) != c.expect
    }
    assert wrong == {}
    reasons = {
        p.name.removesuffix(".error.json"): json.loads(p.read_text())["reason"]
        for p in site.files_in("rejected", "*.error.json")
    }
    demo_rejects = {c.capture_id for c in site.scenario if c.expect == "rejected"}
    assert {k: v for k, v in reasons.items() if k.startswith("bad-")} == bad
    assert set(reasons) == set(bad) | demo_rejects
    counters = service.spool.counters()
    assert counters["rejected_total"] == len(bad) + len(demo_rejects)
    assert len(site.files_in("done", "*.json")) == site.expected_verdicts()
    assert site.files_in("incoming") == [] and site.files_in("processing") == []
    with Outbox(site.cfg.outbox.db) as ob:
        wait_until(lambda: ob.depth() == 0, 10, "the outbox to empty after PUBACKs")


def test_broker_killed_mid_run_loses_no_event(tmp_path: Path, demo_bundle: Path) -> None:
    with MosquittoBroker(workdir=tmp_path / "broker", persistence=True) as broker:
        site = make_site(tmp_path / "site", demo_bundle, broker.port)
        central = Subscriber("127.0.0.1", broker.port, client_id="central-review").start()
        recorder = Recorder()
        service = Service(site.cfg, on_verdict=recorder)
        service.start()
        try:
            first, second = site.scenario[:20], site.scenario[20:]
            site.drop(first)
            wait_until(lambda: recorder.count() >= 10, 60, "10 verdicts before the outage")
            time.sleep(3.0)  # the broker autosaves the subscriber's session every second; 3 s of margin under load
            # Freeze first: what the broker already acknowledged has been delivered; what it has not
            # acknowledged stays in the agent's outbox. (A broker that dies between its PUBACK and its
            # disk write loses that message itself: see docs/MQTT.md.)
            broker.freeze()
            time.sleep(0.3)
            broker.kill()
            site.drop(second)
            wait_until(lambda: recorder.count() == site.expected_verdicts(), 90, "all verdicts during the outage")
            with Outbox(site.cfg.outbox.db) as ob:
                assert ob.depth() > 0, "flags made during the outage must wait in the outbox"
            time.sleep(1.0)
            broker.start()
            expected = site.expected_flags()
            assert central.wait_for(len(expected), timeout=60)
            assert {e["capture_id"] for e in central.events} == set(expected)
            with Outbox(site.cfg.outbox.db) as ob:
                wait_until(lambda: ob.depth() == 0, 30, "the outbox to empty after the outage")
        finally:
            service.stop()
            central.stop()


def agent_proc(site: Site, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "iaflash.agent", "run", "--config", str(site.config_file)],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def test_agent_sigkilled_mid_run_loses_nothing_and_never_sends_two_events_for_one_capture(
    tmp_path: Path,
    demo_bundle: Path,
    broker: MosquittoBroker,
) -> None:
    site = make_site(tmp_path / "site", demo_bundle, broker.port)
    central = Subscriber("127.0.0.1", broker.port, client_id="central-crash").start()
    logs = tmp_path / "iaflash.agent.log"
    proc = agent_proc(site, logs)
    try:
        site.drop(site.scenario)
        wait_until(lambda: site.processed_count() >= 8, 60, "the agent to process some captures")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        at_kill = site.processed_count()
        assert at_kill < site.expected_verdicts(), "the kill must land mid-run for this test to mean anything"
        proc = agent_proc(site, logs)
        wait_until(lambda: site.processed_count() == site.expected_verdicts(), 90, "the restarted agent")
        expected = site.expected_flags()
        assert central.wait_for(len(expected), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, logs.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        central.stop()
    events = central.events
    assert sorted(e["capture_id"] for e in events) == sorted(expected)  # one event_id per capture
    assert len(site.files_in("done", "*.json")) == site.expected_verdicts()
    assert site.files_in("incoming") == [] and site.files_in("processing") == []
    lines = [json.loads(line) for line in logs.read_text().splitlines() if line.startswith("{")]
    per_capture = [r for r in lines if r.get("capture_id")]
    assert per_capture, "one JSON log line per capture"
    plates = {c.plate for c in site.scenario if c.plate}
    text = logs.read_text()
    assert not any(p in text or p.replace("-", "") in text for p in plates), "a plate leaked into the logs"
