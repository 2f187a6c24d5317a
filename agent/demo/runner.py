"""``iaflash-agent demo``: the whole job on one machine, with nothing configured.

Builds a demo model, a demo registry and a demo fleet; starts a local broker unless one
is given; runs the real daemon (``agent.service.Service``); subscribes as central does;
prints verdicts as they happen and a summary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import click

from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.config import parse_config
from iaflash.agent.decision.verdict import Verdict
from iaflash.agent.demo.broker import AmqttBroker, MosquittoBroker, find_mosquitto
from iaflash.agent.demo.detector import build_demo_detector_bundle
from iaflash.agent.demo.model import build_demo_bundle
from iaflash.agent.demo.scenario import DemoCapture, build_scenario, registry_rows, start_time, write_capture
from iaflash.agent.registry.cache import import_signed_subset, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.agent.service import Service
from iaflash.engines.signing import generate_keypair, sign_bundle, sign_file

log = logging.getLogger(__name__)


class _Broker(Protocol):
    port: int

    def stop(self) -> None: ...


@dataclass
class DemoResult:
    processed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    flags_received: int = 0
    duplicates: int = 0
    rejected: int = 0
    expected_flags: int = 0
    wrong: list[str] = field(default_factory=list)
    seconds: float = 0.0
    evidence_stored: int = 0  # flags whose evidence image central fetched and stored
    review: list[str] = field(default_factory=list)  # how to open the review page on the demo's store

    @property
    def ok(self) -> bool:
        return not self.wrong and self.flags_received == self.expected_flags


@contextlib.contextmanager
def local_broker(kind: str) -> Iterator[tuple[_Broker, Literal["5", "3.1.1"]]]:
    """A broker on a free 127.0.0.1 port: mosquitto when installed (MQTT 5), else amqtt (3.1.1)."""
    broker: _Broker
    protocol: Literal["5", "3.1.1"]
    if kind == "mosquitto" or (kind == "auto" and find_mosquitto()):
        broker, protocol = MosquittoBroker().start(), "5"
    else:
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # it logs every probe connection
        broker, protocol = AmqttBroker().start(), "3.1.1"
    try:
        yield broker, protocol
    finally:
        broker.stop()


def prepare_workdir(workdir: Path, scenario: list[DemoCapture], echo: Any) -> bytes:
    """Fresh directories, an HMAC key (0600), the demo bundle and an imported registry."""
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "secrets").mkdir(parents=True)
    key = secrets.token_bytes(32)
    key_file = workdir / "secrets" / "hmac.key"
    key_file.write_text(key.hex())
    os.chmod(key_file, 0o600)
    models_key = _trusted_key(workdir, "demo-models", "models")  # one key per role (docs/SIGNING.md#roles)
    registry_key = _trusted_key(workdir, "demo-registry", "registry")
    t = time.perf_counter()
    _, accuracy = build_demo_bundle(workdir / "model")
    sign_bundle(workdir / "model", models_key, signer="demo-models")
    build_demo_detector_bundle(workdir / "detector")
    sign_bundle(workdir / "detector", models_key, signer="demo-models")
    echo(
        f"  demo classifier trained in {time.perf_counter() - t:.1f}s (training accuracy {accuracy:.0%}) and "
        "demo vehicle detector built, both signed - DEMO models for the synthetic fleet only"
    )
    subset = workdir / "registry-snapshot.jsonl.gz"
    rows = registry_rows(scenario)
    write_subset(
        subset,
        kind="snapshot",
        dataset_id="demo-siv",
        seq=1,
        key_id=key_id(key),
        records=records_from_plates(key, rows),
    )
    sign_file(subset, registry_key, signer="demo-registry", role="registry")
    state, signer = import_signed_subset(
        workdir / "registry.db",
        subset,
        trust_dir=workdir / "trust",
        allow_unsigned=False,
        expected_key_id=key_id(key),
        state_file=workdir / "trust-state.json",  # where the demo agent keeps it: beside its registry
    )
    echo(f"  registry subset imported: {state.count} plates (stored as HMAC only), seq {state.seq}, signed by {signer}")
    return key


def _trusted_key(workdir: Path, name: str, role: str) -> Path:
    """A new key pair of ``role`` in secrets/, its .pub in the demo trust store's folder for that role."""
    private, public = generate_keypair(workdir / "secrets" / name, role=role)
    (workdir / "trust" / role).mkdir(parents=True, exist_ok=True)
    shutil.copy(public, workdir / "trust" / role / public.name)
    return private


def demo_config(workdir: Path, port: int, protocol: str, host: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "site": {"site_id": "demo-site", "device_id": "box-01"},
        "spool": {"dir": str(workdir / "spool"), "poll_interval_s": 0.05},
        "model": {"bundle": str(workdir / "model"), "detector_bundle": str(workdir / "detector"), "backend": "auto"},
        "registry": {"db": str(workdir / "registry.db"), "hmac_key_file": str(workdir / "secrets" / "hmac.key")},
        "outbox": {"db": str(workdir / "state.db")},
        "security": {"trust_dir": str(workdir / "trust")},
        "mqtt": {"host": host, "port": port, "protocol": protocol, "heartbeat_interval_s": 5},
        "log": {"level": "WARNING", "format": "text"},
    }


def _verdict_line(capture: Capture, verdict: Verdict, expect: str) -> str:
    label = verdict.outcome + (f"/{verdict.level}" if verdict.level else "")
    top = verdict.top_k[0] if verdict.top_k else None
    seen = f"{top.make} {top.model} p={top.p:.2f}" if top else "-"
    reg = f"{verdict.registry.make} {verdict.registry.model}" if verdict.registry else "-"
    mark = "" if label == expect else f"  (expected {expect})"
    why = "" if verdict.outcome in ("match", "mismatch") else f"  [{verdict.reason}]"
    return f"  {capture.capture_id}  {label:<17} seen: {seen:<26} registered: {reg}{why}{mark}"


def _review_store(workdir: Path, port: int, protocol: str, echo: Any) -> Any:
    """Central's store and ingester (iaflash-central serve's own code) when MQTT 5 and the [central] extra allow."""
    if protocol != "5":
        echo("  central's review store skipped: it needs MQTT 5 (mosquitto), the demo runs amqtt (3.1.1)")
        return None
    try:
        from iaflash.central.serve.embedded import EmbeddedCentral  # noqa: PLC0415  # the demo plays central
    except ImportError as exc:
        echo(f"  central's review store skipped ({exc}): pip install 'iaflash-edge[central]'")
        return None
    key = _trusted_key(workdir, "demo-central", "commands")  # the box trusts central's signed commands
    return EmbeddedCentral(workdir, port, key).start()


def run_demo(
    workdir: Path, *, broker_kind: str = "auto", count: int = 40, echo: Any = click.echo, timeout_s: float = 90.0
) -> DemoResult:
    """Run the demo end to end and return what happened."""
    from iaflash.central.subscriber import Subscriber  # noqa: PLC0415  # central is a sibling package, demo only

    started = time.perf_counter()
    scenario = build_scenario(count)
    by_id = {c.capture_id: c for c in scenario}
    result = DemoResult(expected_flags=sum(c.expect.startswith("mismatch") for c in scenario))
    echo(f"iaflash-edge demo - working in {workdir}")
    prepare_workdir(workdir, scenario, echo)
    lock, done = threading.Lock(), threading.Event()
    expected_verdicts = sum(c.expect != "rejected" for c in scenario)

    def on_verdict(capture: Capture, verdict: Verdict, event: dict[str, Any] | None) -> None:
        label = verdict.outcome + (f"/{verdict.level}" if verdict.level else "")
        expect = by_id[capture.capture_id].expect
        with lock:
            result.processed += 1
            result.outcomes[label] += 1
            if label != expect:
                result.wrong.append(capture.capture_id)
            echo(_verdict_line(capture, verdict, expect))
            if result.processed >= expected_verdicts:
                done.set()

    with local_broker(broker_kind) as (broker, protocol):
        echo(f"  broker: {type(broker).__name__} on 127.0.0.1:{broker.port} (MQTT {protocol})")
        cfg = parse_config(demo_config(workdir, broker.port, protocol), "<demo config>")
        central = Subscriber(
            "127.0.0.1",
            broker.port,
            protocol=protocol,
            on_event=lambda ev: echo(
                f"  >> central received FLAG {ev['event_id'][:8]} for {ev['capture_id']}: {ev['verdict']['reason']}"
            ),
        )
        central.start()
        review = _review_store(workdir, broker.port, protocol, echo)
        service = Service(cfg, on_verdict=on_verdict)
        service.start()
        try:
            incoming = cfg.spool.dir / "incoming"
            t0 = start_time()
            for i, c in enumerate(scenario):
                write_capture(c, incoming, t0 + timedelta(seconds=7 * i), seed=1000 + i)
            done.wait(timeout_s)
            central.wait_for(result.expected_flags, timeout=15)
            if review is not None and review.wait_stored(result.expected_flags, timeout=15):
                result.evidence_stored = review.fetch_evidence()
                for failure in review.evidence_failed:
                    echo(f"  central: no evidence for {failure}")
                result.review = review.review_hint()
        finally:
            service.stop()
            central.stop()
            if review is not None:
                review.stop()
        result.flags_received = len(central.events)
        result.duplicates = central.duplicates
        result.rejected = len(list((cfg.spool.dir / "rejected").glob("*.error.json")))
    result.seconds = time.perf_counter() - started
    return result
