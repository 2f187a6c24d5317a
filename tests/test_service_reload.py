"""The running agent reloads its models without losing a capture: SIGHUP (from `model install`) and the
signed `reload` command, with captures flowing; a bundle that fails to load keeps the old one.

A real daemon (``python -m iaflash.agent run``) as a subprocess, a real mosquitto, real signed
bundles (a tiny ONNX classifier built by the test, the demo detector), real JPEG captures, and
central's real subscriber and command client. Every published outcome is an event here, so each
capture's verdict (and the model version that judged it) is seen at central.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from e2e_site import Site, make_site
from onnx_builders import LABELS, classifier_onnx
from waiting import wait_until

from iaflash.agent.config import OUTCOMES
from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.demo.detector import build_demo_detector_bundle
from iaflash.agent.health import read_model_report
from iaflash.central.commands import CommandClient
from iaflash.central.subscriber import Subscriber
from iaflash.engines.bundle import Preprocessing, write_bundle
from iaflash.engines.signing import generate_keypair, sign_bundle
from iaflash.provisioning.cli import cli

pytestmark = pytest.mark.slow

SITE, DEVICE = "demo-site", "box-01"


def tiny_bundle(path: Path, version: str, key: Path) -> Path:
    """A signed 8x8 classifier bundle ``tiny`` at ``version`` (the same model; only the version differs)."""
    write_bundle(
        path,
        onnx_bytes=classifier_onnx(),
        labels=LABELS,
        name="tiny",
        version=version,
        input_name="input",
        input_shape=["N", 3, 8, 8],
        preprocessing=Preprocessing(height=8, width=8),
        output_name="logits",
    )
    sign_bundle(path, key, signer="test-publisher")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ (tiny 1.0.0), v2/ (tiny 1.1.0), detector/ (the demo detector), trust/, and the keys."""
    out = tmp_path_factory.mktemp("reload-models")
    (out / "trust").mkdir()
    publisher, public = generate_keypair(out / "publisher")
    _, central_pub = generate_keypair(out / "central")
    for pub in (public, central_pub):
        shutil.copy(pub, out / "trust" / pub.name)
    tiny_bundle(out / "model", "1.0.0", publisher)
    tiny_bundle(out / "v2", "1.1.0", publisher)
    build_demo_detector_bundle(out / "detector")
    sign_bundle(out / "detector", publisher, signer="test-publisher")
    return out


@dataclass
class Box:
    site: Site
    models: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def root(self) -> Path:
        return self.site.root

    @property
    def report(self) -> dict[str, Any]:
        doc = read_model_report(self.site.cfg.outbox.db.parent / "models.json")
        assert doc is not None, "the agent writes models.json once started"
        return doc

    def provision(self, *args: str) -> Any:
        return CliRunner().invoke(cli, ["model", *args, "--config", str(self.site.config_file)])

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


def start_agent(site: Site, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "iaflash.agent", "run", "--config", str(site.config_file)],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@pytest.fixture
def box(tmp_path: Path, models: Path, broker: MosquittoBroker) -> Iterator[Box]:
    """A site whose classifier slot is a `model install` link (tiny 1.0.0), with the agent running."""
    site = make_site(
        tmp_path / "site",
        models,
        broker.port,
        n=36,
        overrides={
            "model": {
                "bundle": str(tmp_path / "site" / "models" / "classifier"),
                "store_dir": str(tmp_path / "site" / "models"),
                "backend": "onnxruntime",
            },
            "mqtt": {"publish": list(OUTCOMES), "heartbeat_interval_s": 1},
            "spool": {"min_free_mb": 1},
        },
    )
    first = CliRunner().invoke(cli, ["model", "install", str(site.root / "model"), "--config", str(site.config_file)])
    assert first.exit_code == 0, first.output
    log = tmp_path / "agent.log"
    proc = start_agent(site, log)
    b = Box(site, models, log, proc)
    try:
        wait_until((site.cfg.outbox.db.parent / "models.json").exists, 60, "the agent to start")
        yield b
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


class Dropper(threading.Thread):
    """Drops captures one by one, ``every`` seconds apart, until they run out or ``stop`` is set."""

    def __init__(self, site: Site, captures: list[Any], every: float) -> None:
        super().__init__(daemon=True)
        self.site, self.captures, self.every = site, captures, every
        self.dropped: list[Any] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for c in self.captures:
            if self.stop.is_set():
                return
            self.site.drop([c])
            self.dropped.append(c)
            time.sleep(self.every)


def judged(site: Site) -> list[Any]:
    return [c for c in site.scenario if c.expect != "rejected"]


def test_model_install_reloads_the_running_agent_with_captures_flowing_and_none_lost(
    box: Box, broker: MosquittoBroker
) -> None:
    """Before the swap: 1.0.0. During it: each capture judged once, by one model. After: 1.1.0."""
    site = box.site
    central = Subscriber("127.0.0.1", broker.port).start()
    try:
        before = site.scenario[:8]
        site.drop(before)
        wait_until(lambda: site.processed_count() >= sum(c.expect != "rejected" for c in before), 60, "first batch")
        dropper = Dropper(site, site.scenario[8:30], every=0.04)
        dropper.start()  # captures keep arriving for as long as the install (and the agent's reload) runs
        result = box.provision("install", str(box.models / "v2"), "--json")
        time.sleep(0.5)  # and on for a moment after the agent reported the switch
        dropper.stop.set()
        dropper.join(10)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["agent"]["state"] == "reloaded", doc
        assert doc["agent"]["pid"] == box.proc.pid
        during = dropper.dropped
        after = [c for c in site.scenario[8:] if c not in during]
        assert len(after) >= 6, "the install outlasted the captures of this test; give it more"
        site.drop(after)
        wait_until(lambda: site.processed_count() == site.expected_verdicts(), 90, "every capture's verdict")
        assert central.wait_for(site.expected_verdicts(), timeout=30)
        time.sleep(0.5)  # a second event for one capture would arrive here
        events = central.events
    finally:
        central.stop()
    by_capture: dict[str, list[str]] = {}
    for e in events:
        by_capture.setdefault(e["capture_id"], []).append(e["verdict"]["model"]["version"])
    assert sorted(by_capture) == sorted(c.capture_id for c in judged(site)), "every judged capture, once"
    assert all(len(v) == 1 for v in by_capture.values()), "one verdict per capture"
    assert central.duplicates == 0
    assert {by_capture[c.capture_id][0] for c in before if c.expect != "rejected"} == {"1.0.0"}
    assert {by_capture[c.capture_id][0] for c in after if c.expect != "rejected"} == {"1.1.0"}
    assert {by_capture[c.capture_id][0] for c in during if c.expect != "rejected"} == {"1.0.0", "1.1.0"}
    assert site.files_in("incoming") == [] and site.files_in("processing") == []
    report = box.report
    assert report["classifier"]["version"] == "1.1.0" and report["generation"] == 2
    assert report["last_reload"]["ok"] is True and report["last_reload"]["trigger"] == "SIGHUP"
    switched = [r for r in box.log_lines() if r["msg"].startswith("model reload (SIGHUP): switched")]
    assert len(switched) == 1 and "tiny 1.0.0" in switched[0]["msg"] and "tiny 1.1.0" in switched[0]["msg"]


def test_a_bundle_that_fails_to_load_keeps_the_old_model_and_is_reported_by_log_heartbeat_and_command(
    box: Box, broker: MosquittoBroker
) -> None:
    """The detector is tampered with on disk: SIGHUP and the signed reload both fail; 1.0.0 keeps judging."""
    site = box.site
    (site.root / "detector" / "model.onnx").write_bytes(b"not the signed model")
    os.kill(box.proc.pid, signal.SIGHUP)
    wait_until(lambda: box.report["reloads"]["failed"] == 1, 30, "the failed reload to be reported")
    assert box.report["last_reload"]["ok"] is False
    assert "still running tiny 1.0.0" in box.report["last_reload"]["error"]
    errors = [r for r in box.log_lines() if r["level"] == "ERROR" and "model reload (SIGHUP) failed" in r["msg"]]
    assert len(errors) == 1 and "sha256" in errors[0]["msg"]
    with CommandClient("127.0.0.1", broker.port, private_key_path=box.models / "central.key") as central:
        answer = central.send(SITE, DEVICE, "reload", timeout=30)
        assert answer["ok"] is False and answer["error"]["code"] == "failed"
        assert "model reload failed, still running tiny 1.0.0" in answer["error"]["message"]
        status = central.send(SITE, DEVICE, "status", timeout=10)
    hb = status["result"]
    assert hb["reloads"]["failed"] == 2 and hb["reloads"]["ok"] == 0
    assert hb["model"]["version"] == "1.0.0" and hb["model"]["generation"] == 1
    assert "sha256" in hb["last_errors"]["service"]["message"]
    judged_now = judged(site)[:6]
    site.drop(judged_now)
    wait_until(lambda: site.processed_count() == len(judged_now), 60, "captures after the failed reload")
    assert box.proc.poll() is None, "the agent keeps running"


def test_the_signed_reload_command_switches_to_what_the_link_names_and_answers_the_new_version(
    box: Box, broker: MosquittoBroker
) -> None:
    site = box.site
    staged = box.provision("install", str(box.models / "v2"), "--no-reload", "--json")
    assert staged.exit_code == 0, staged.output
    assert json.loads(staged.stdout)["agent"]["state"] == "skipped"
    assert box.report["classifier"]["version"] == "1.0.0", "--no-reload leaves the agent on the old version"
    with CommandClient("127.0.0.1", broker.port, private_key_path=box.models / "central.key") as central:
        answer = central.send(SITE, DEVICE, "reload", timeout=30)
        assert answer["ok"] is True, answer
        assert answer["result"]["previous"]["version"] == "1.0.0"
        assert answer["result"]["running"]["version"] == "1.1.0"
        status = central.send(SITE, DEVICE, "status", timeout=10)["result"]
    assert status["model"]["version"] == "1.1.0" and status["model"]["generation"] == 2
    assert status["model"]["detector"]["name"] == "iaflash-demo-detector"
    assert status["reloads"]["ok"] == 1 and status["reloads"]["last"]["trigger"] == "command"
    listed = json.loads(box.provision("list", "--json").stdout)
    running = [v for v in listed["slots"]["classifier"]["installed"] if v["running"]]
    assert [v["version"] for v in running] == ["1.1.0"] and running[0]["current"] is True
    captures = judged(site)[:4]
    site.drop(captures)
    wait_until(lambda: site.processed_count() == len(captures), 60, "verdicts after the command")


def test_install_switches_back_when_the_agent_refuses_the_new_bundle(box: Box) -> None:
    """The agent cannot load the new set (its detector was damaged): the link goes back to what it runs."""
    site = box.site
    (site.root / "detector" / "manifest.sig").write_text("{}")
    result = box.provision("install", str(box.models / "v2"), "--json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["agent"]["state"] == "failed"
    assert [s["step"] for s in doc["steps"]][-2:] == ["reload", "switch back"]
    link = site.root / "models" / "classifier"
    assert link.resolve() == (site.root / "models" / "tiny" / "1.0.0").resolve()
    assert box.report["classifier"]["version"] == "1.0.0" and box.proc.poll() is None
    listed = json.loads(box.provision("list", "--json").stdout)
    assert {v["version"] for v in listed["slots"]["classifier"]["installed"]} == {"1.0.0", "1.1.0"}


def test_model_rollback_reloads_the_running_agent_back_to_the_previous_version(box: Box) -> None:
    """After 1.1.0 ran, going back is the technician's explicit rollback: the agent accepts it and judges with it."""
    site = box.site
    assert box.provision("install", str(box.models / "v2")).exit_code == 0
    assert box.report["classifier"]["version"] == "1.1.0"
    result = box.provision("rollback", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["agent"]["state"] == "reloaded" and box.report["classifier"]["version"] == "1.0.0"
    assert box.report["generation"] == 3 and box.report["reloads"] == {"ok": 2, "failed": 0}
    captures = judged(site)[:4]
    site.drop(captures)
    wait_until(lambda: site.processed_count() == len(captures), 60, "verdicts after the rollback")
