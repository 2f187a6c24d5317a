"""The agent over TLS end to end: a real mosquitto run from central's shipped template, a CA made here.

The broker requires a client certificate, takes its CN as the username and the client id
(``use_identity_as_username``, ``use_username_as_clientid``) and lets each box write only under
its own topic root (``mosquitto-central.acl``). The agent's real link, publisher and outbox file
run against it: box A's events arrive; A's events under box B's topics are refused with MQTT 5
reason 135, kept in the outbox, counted and logged; A cannot take B's session over; a wrong CA,
an expired box certificate, a wrong host name, a certificate of another CA and no certificate
each give the link's (and doctor's probe's) clear error, with nothing lost.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from tls_ca import CentralBroker, Pki
from waiting import wait_until

from iaflash.agent.config import Config, parse_config
from iaflash.agent.link.mqtt import MqttLink, probe
from iaflash.agent.link.publisher import Publisher
from iaflash.agent.outbox.events import build_event, topic_for
from iaflash.agent.outbox.store import Outbox

A = ("site-1", "box-1")
B = ("site-2", "box-2")
VERDICT = {
    "outcome": "mismatch", "level": "make", "reason": "P(registered make) below threshold",
    "registry_stale": False, "p_make": 0.01, "p_model": 0.0,
    "top_k": [{"make": "VOLKSWAGEN", "model": "GOLF", "p": 0.95}],
    "registry": {"make": "RENAULT", "model": "CLIO", "genre": "VP", "body": "CI"},
    "thresholds": {"make": 0.05}, "model": {"name": "t", "version": "1", "backend": "onnxruntime", "device": "cpu"},
}  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[CentralBroker]:
    b = CentralBroker(tmp_path / "broker", pki).start()
    yield b
    b.stop()


def box_config(
    port: int, pki: Pki, cert: tuple[Path, Path] | None, ids: tuple[str, str] = A, **mqtt_keys: Any
) -> Config:
    keys: dict[str, Any] = {"port": port, "tls": True, "ca_file": str(pki.ca_file), "keepalive_s": 5}
    if cert is not None:
        keys.update(cert_file=str(cert[0]), key_file=str(cert[1]))
    keys.update(mqtt_keys)
    return parse_config({"site": {"site_id": ids[0], "device_id": ids[1]}, "mqtt": keys})


def record(outbox: Outbox, topic_root: str, site: tuple[str, str], n: int, first: int = 0) -> list[str]:
    """n mismatch events of ``site`` queued in the outbox for ``topic_root`` (as the pipeline records them)."""
    ids = []
    for i in range(first, first + n):
        doc = build_event(
            verdict=VERDICT, site_id=site[0], device_id=site[1], capture_id=f"cap-{i}",
            captured_at="2026-11-02T08:00:00+01:00", plate_key="ab" * 32, timings_ms={},
        )  # fmt: skip
        assert outbox.record(f"cap-{i}", "mismatch", doc, topic_for(topic_root, "mismatch"))
        ids.append(doc["event_id"])
    return ids


class Agent:
    """The agent's real link and publisher on an outbox file."""

    def __init__(self, cfg: Config, outbox: Path) -> None:
        self.link = MqttLink(cfg)
        self.publisher = Publisher(outbox, self.link, cfg.mqtt)

    def __enter__(self) -> Agent:
        self.link.start()
        self.publisher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.publisher.stop(5)
        self.link.stop(5)
        assert not self.publisher.is_alive() and self.publisher.error is None


class Central:
    """A subscriber with central's certificate: every event and status it is allowed to read."""

    def __init__(self, broker: CentralBroker) -> None:
        cert, key = broker.pki.issue("central", "central")
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.ready = queue.Queue[int]()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.tls_set(ca_certs=str(broker.pki.ca_file), certfile=str(cert), keyfile=str(key))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, json.loads(m.payload)))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.ready.put(max(rc.value for rc in codes))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe([("iaflash/v1/+/+/events/#", 1), ("iaflash/v1/+/+/status", 1)])
        assert self.ready.get(timeout=10) < 128, "central's subscription refused"

    def drain(self, settle_s: float = 0.5) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            try:
                out.append(self.messages.get(timeout=0.05))
            except queue.Empty:
                continue
        return out

    def events(self, n: int, timeout: float = 15) -> list[tuple[str, dict[str, Any]]]:
        got: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while sum("/events/" in t for t, _ in got) < n and time.monotonic() < deadline:
            try:
                got.append(self.messages.get(timeout=0.2))
            except queue.Empty:
                continue
        return [(t, d) for t, d in got if "/events/" in t]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def central(broker: CentralBroker) -> Iterator[Central]:
    c = Central(broker)
    yield c
    c.stop()


def test_the_agent_publishes_over_tls_with_its_certificate_and_central_gets_each_event(
    broker: CentralBroker, pki: Pki, central: Central, tmp_path: Path
) -> None:
    cfg = box_config(broker.port, pki, pki.issue("site-1/box-1", "box-a"))
    with Outbox(tmp_path / "a.db") as ob:
        ids = record(ob, cfg.topic_root, A, 5)
        with Agent(cfg, tmp_path / "a.db") as agent:
            got = central.events(5)
            assert wait_until(lambda: ob.depth() == 0, 10, "the outbox to empty")
            assert wait_until(lambda: agent.publisher.stats()["acked"] == 5, 5, "the publisher to count the acks")
            stats = agent.publisher.stats()
            assert agent.link.health()["connect_failures"] == 0
        assert [d["event_id"] for _, d in got] == ids
        assert {t for t, _ in got} == {"iaflash/v1/site-1/box-1/events/mismatch"}
        assert (stats["acked"], stats["refused"]) == (5, 0)


def test_a_selftest_under_the_box_s_root_is_accepted_and_never_reaches_central(
    broker: CentralBroker, pki: Pki, central: Central, tmp_path: Path
) -> None:
    """``iaflash-provision selftest`` publishes under ``<root>/selftest/``: allowed, and outside central's filters."""
    cfg = box_config(broker.port, pki, pki.issue("site-1/box-1", "box-a"))
    with Outbox(tmp_path / "a.db") as ob:
        record(ob, f"{cfg.topic_root}/selftest", A, 1)
        with Agent(cfg, tmp_path / "a.db") as agent:
            assert wait_until(lambda: ob.depth() == 0, 10, "the selftest event acknowledged")
            assert wait_until(lambda: agent.publisher.stats()["acked"] == 1, 5, "the publisher to count the ack")
            stats = agent.publisher.stats()
        assert (stats["acked"], stats["refused"]) == (1, 0)
    assert [t for t, _ in central.drain() if "/events/" in t] == []


@pytest.mark.parametrize("how", ["an outbox row for B's topic", "A's certificate in B's config"])
def test_box_a_cannot_publish_under_box_b_s_topics_the_event_is_refused_135_kept_and_counted(
    broker: CentralBroker, pki: Pki, central: Central, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """With MQTT 5 the broker answers 135 (not authorised): the row stays, ``refused`` counts it, one warning."""
    a_cert = pki.issue("site-1/box-1", "box-a")
    b_root = "iaflash/v1/site-2/box-2"
    cfg = box_config(broker.port, pki, a_cert, ids=A if how.startswith("an outbox") else B)
    with Outbox(tmp_path / "a.db") as ob:
        forged = record(ob, b_root, B, 1)
        own = record(ob, cfg.topic_root, A, 1, first=1) if cfg.topic_root != b_root else []
        with (
            caplog.at_level(logging.WARNING, logger="iaflash.agent.link.publisher"),
            Agent(cfg, tmp_path / "a.db") as agent,
        ):
            assert wait_until(lambda: agent.publisher.stats()["refused"] >= 1, 15, "the broker's refusal")
            got = central.events(len(own), timeout=5) + [m for m in central.drain() if "/events/" in m[0]]
            pending = ob.pending(10, now=time.time() + 3600)  # due or not
        assert [d["event_id"] for _, d in got] == own  # the forged one never reached central
        assert [r.event_id for r in pending] == forged and pending[0].topic == f"{b_root}/events/mismatch"
        assert pending[0].attempts >= 1  # deferred with a growing delay, not deleted
        with sqlite3.connect(tmp_path / "a.db") as db:
            (last_error,) = db.execute("SELECT last_error FROM outbox").fetchone()
        assert last_error == "broker refused: 135 Not authorized"
        assert ob.depth() == 1
    warned = [r.getMessage() for r in caplog.records if "broker refused event" in r.getMessage()]
    assert len(warned) == 1 and forged[0] in warned[0] and "135" in warned[0]
    assert "kept in the outbox" in warned[0] and "fix: allow this device to publish under its topic prefix" in warned[0]


def test_a_box_cannot_publish_on_any_cmd_topic_not_even_its_own(broker: CentralBroker, pki: Pki) -> None:
    """Only central writes commands: the ACL gives a box no write on ``cmd`` (commands are signed as well)."""
    cert, key = pki.issue("site-1/box-1", "box-a")
    codes: queue.Queue[int] = queue.Queue()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    c.tls_set(ca_certs=str(pki.ca_file), certfile=str(cert), keyfile=str(key))
    c.on_publish = lambda client, userdata, mid, rc, props: codes.put(rc.value)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        for topic in (
            "iaflash/v1/site-1/box-1/cmd",
            "iaflash/v1/site-2/box-2/cmd",
            "iaflash/v1/site-1/box-1/heartbeat",
        ):
            c.publish(topic, b"{}", qos=1)
        got = [codes.get(timeout=10) for _ in range(3)]
    finally:
        c.disconnect()
        c.loop_stop()
    assert got[:2] == [135, 135] and got[2] < 128  # both cmd topics refused; its heartbeat accepted (16: no subscriber)


def test_box_a_cannot_take_box_b_s_session_over_by_using_its_client_id(
    broker: CentralBroker, pki: Pki, tmp_path: Path
) -> None:
    """The broker forces the client id to the certificate's CN; B's own certificate twice does collide."""
    b_cert = pki.issue("site-2/box-2", "box-b")
    b_link = MqttLink(box_config(broker.port, pki, b_cert, ids=B))
    b_link.start()
    try:
        assert b_link.wait_connected(10)
        thief = MqttLink(
            box_config(broker.port, pki, pki.issue("site-1/box-1", "box-a"), client_id=b_link.cfg.client_id)
        )
        thief.start()
        try:
            assert thief.wait_connected(10)
            time.sleep(0.5)  # mosquitto drops a taken-over session at once, when the new CONNECT lands
            assert b_link.connected and b_link.health()["disconnects"] == 0
        finally:
            thief.stop()
        assert "as site-1/box-1" in broker.log()  # the thief got its own CN as client id, not B's
        clone = MqttLink(box_config(broker.port, pki, b_cert, ids=B))  # control: B's certificate again
        clone.start()
        try:
            assert wait_until(lambda: b_link.health()["disconnects"] + clone.health()["disconnects"] >= 1, 10)
        finally:
            clone.stop()
    finally:
        b_link.stop()


CASES = {
    "wrong CA": ("TLS: the certificate of 127.0.0.1:{port} was refused", "mqtt.ca_file is the CA"),
    "expired box certificate": (
        "TLS: 127.0.0.1:{port} refused this box's client certificate: mqtt.cert_file {cert} expired on",
        "valid now",
    ),
    "wrong host name": (
        "TLS: the certificate of 127.0.0.1:{port} was refused: IP address mismatch",
        "mqtt.host is a name",
    ),
    "certificate of another CA": (
        "TLS: 127.0.0.1:{port} refused this box's client certificate: mqtt.cert_file {cert} was issued by "
        "CN=iaflash other CA, not by the fleet CA of mqtt.ca_file (CN=iaflash fleet CA)",
        "issued by the fleet CA",
    ),
    "no client certificate": (
        "TLS: 127.0.0.1:{port} closed the connection: this box gave no client certificate",
        "cert_file",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # paho 2.2 leaves a failed TLS handshake's socket to the GC
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the same socket, at GC time
def test_each_tls_failure_is_named_with_its_fix_by_the_link_and_doctor_and_nothing_is_lost(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    names = ("broker.example",) if case == "wrong host name" else ("127.0.0.1", "localhost")
    broker = CentralBroker(tmp_path / "broker", pki, server_names=names).start()
    try:
        cert: tuple[Path, Path] | None = pki.issue("site-1/box-1", "box-a")
        keys: dict[str, Any] = {}
        if case == "wrong CA":
            keys["ca_file"] = str(Pki(tmp_path / "other", "other").ca_file)
        elif case == "expired box certificate":
            cert = pki.issue("site-1/box-1", "box-a-expired", valid_days=(-30, -1))
        elif case == "certificate of another CA":
            cert = Pki(tmp_path / "other", "other").issue("site-1/box-1", "box-a-other")
        elif case == "no client certificate":
            cert = None
        cfg = box_config(broker.port, pki, cert, **keys)
        what_prefix, fix_part = CASES[case]
        expected = what_prefix.format(port=broker.port, cert=cert[0] if cert else "")

        ok, what, fix = probe(cfg, timeout_s=5)
        assert not ok and what.startswith(expected) and fix_part in fix

        with Outbox(tmp_path / "a.db") as ob:
            ids = record(ob, cfg.topic_root, A, 1)
            with (
                caplog.at_level(logging.ERROR, logger="iaflash.agent.link.mqtt"),
                Agent(cfg, tmp_path / "a.db") as agent,
            ):
                assert wait_until(lambda: agent.link.connect_failures >= 2, 15, "two failed connects")
                health = agent.link.health()
            assert [
                r.event_id for r in ob.pending(10, now=time.time() + 3600)
            ] == ids  # waits in the outbox: nothing lost
        assert health["connected"] is False and health["last_error"].startswith(expected)
        assert fix_part in health["fix"]
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MQTT: TLS")]
        assert len(logged) == 1 and logged[0].startswith(f"MQTT: {expected}")  # once, not once per retry
    finally:
        broker.stop()
