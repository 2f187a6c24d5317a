"""Outbox -> MQTT -> PUBACK -> delete, against a real mosquitto: nothing recorded is ever lost."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from iaflash.agent.config import Config, parse_config
from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.link.publisher import Publisher
from iaflash.agent.outbox.events import build_event, topic_for
from iaflash.agent.outbox.store import Outbox
from iaflash.central.subscriber import Subscriber

VERDICT = {
    "outcome": "mismatch",
    "level": "make",
    "reason": "P(registered make) below threshold",
    "registry_stale": False,
    "p_make": 0.01,
    "p_model": 0.0,
    "top_k": [{"make": "VOLKSWAGEN", "model": "GOLF", "p": 0.95}],
    "registry": {"make": "RENAULT", "model": "CLIO", "genre": "VP", "body": "CI"},
    "thresholds": {"make": 0.05},
    "model": {"name": "t", "version": "1", "backend": "onnxruntime", "device": "cpu"},
}


def config(port: int, **mqtt_keys: Any) -> Config:
    return parse_config(
        {"site": {"site_id": "site-1", "device_id": "box-1"}, "mqtt": {"port": port, "keepalive_s": 5, **mqtt_keys}}
    )


def record(outbox: Outbox, cfg: Config, n: int, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        doc = build_event(
            verdict=VERDICT,
            site_id="site-1",
            device_id="box-1",
            capture_id=f"cap-{i}",
            captured_at="2026-11-02T08:00:00+01:00",
            plate_key="ab" * 32,
            timings_ms={},
        )
        assert outbox.record(f"cap-{i}", "mismatch", doc, topic_for(cfg.topic_root, "mismatch"))
        ids.append(doc["event_id"])
    return ids


class Agent:
    """A link and a publisher on one outbox file, stopped at the end of the test."""

    def __init__(self, cfg: Config, path: Path, **kw: Any) -> None:
        self.link = MqttLink(cfg)
        self.publisher = Publisher(path, self.link, cfg.mqtt, **kw)

    def start(self) -> Agent:
        self.link.start()
        self.publisher.start()
        return self

    def stop(self, link_timeout: float = 5) -> None:
        self.publisher.stop(5)
        self.link.stop(link_timeout)
        assert not self.publisher.is_alive() and self.publisher.error is None


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.stop()


def test_200_events_are_all_delivered_and_the_outbox_empties(
    broker: MosquittoBroker, tmp_path: Path, agents: list[Agent]
) -> None:
    cfg = config(broker.port)
    sub = Subscriber("127.0.0.1", broker.port).start()
    try:
        with Outbox(tmp_path / "state.db") as ob:
            ids = record(ob, cfg, 200)
            agent = Agent(cfg, tmp_path / "state.db").start()
            agents.append(agent)
            assert sub.wait_for(200, 20)
            assert wait_until(lambda: ob.depth() == 0, 10)
        assert [e["event_id"] for e in sub.events] == ids  # in order, each once
        assert sub.invalid == []
        assert wait_until(lambda: agent.publisher.stats()["acked"] == 200, 5)
        stats = agent.publisher.stats()
        assert (stats["published"], stats["refused"], stats["inflight"]) == (200, 0, 0)
        assert wait_until(lambda: agent.publisher.stats()["depth"] == 0, 5)
    finally:
        sub.stop()


def test_broker_killed_mid_stream_loses_nothing(tmp_path: Path, agents: list[Agent]) -> None:
    """SIGKILL the broker with events in flight; record more while it is down; restart on the same port.

    The broker is frozen (SIGSTOP) just before the SIGKILL so that it dies holding unacknowledged
    publishes only: an event the broker had already acknowledged is the broker's to keep, and
    mosquitto loses such events on SIGKILL (see docs/MQTT.md).
    """
    db_dir = tmp_path / "mosq"
    db_dir.mkdir()
    # Persistence keeps central's persistent session (and its subscription) across the SIGKILL.
    extra = f"persistence true\npersistence_location {db_dir}/\nautosave_interval 1\n"
    broker = MosquittoBroker(workdir=tmp_path, extra_conf=extra).start()
    sub = Subscriber("127.0.0.1", broker.port, client_id="central-test").start()
    try:
        assert wait_until((db_dir / "mosquitto.db").exists, 5)  # the subscription is saved
        cfg = config(broker.port)
        agent = Agent(cfg, tmp_path / "state.db").start()
        agents.append(agent)
        assert agent.link.wait_connected(10)
        with Outbox(tmp_path / "state.db") as radar:  # the capture side's own connection
            recorded = record(radar, cfg, 100)
            assert sub.wait_for(100, 10)
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)
            recorded += record(radar, cfg, 50, start=100)
            assert wait_until(lambda: agent.publisher.stats()["inflight"] == 50, 5)
            broker.kill()  # dies with 50 publishes in flight, none acknowledged
            assert wait_until(lambda: not agent.link.connected, 10)
            recorded += record(radar, cfg, 100, start=150)  # the radar keeps flashing
            assert radar.depth() == 150
            broker.start()
            recorded += record(radar, cfg, 50, start=250)
            assert wait_until(lambda: set(recorded) <= sub.event_ids, 20), (
                f"missing {len(set(recorded) - sub.event_ids)} event(s)"
            )
            assert wait_until(lambda: radar.depth() == 0, 10)
        assert agent.link.disconnects >= 1 and agent.link.connects >= 2
        assert len(sub.events) == 300  # duplicates are counted apart, never listed twice
    finally:
        sub.stop()
        broker.stop()


def test_a_new_publisher_republishes_rows_left_by_a_crashed_one(
    broker: MosquittoBroker, tmp_path: Path, agents: list[Agent]
) -> None:
    cfg = config(broker.port)
    path = tmp_path / "state.db"
    port = broker.port
    assert broker.proc is not None
    first = Agent(cfg, path).start()
    assert first.link.wait_connected(10)
    broker.proc.send_signal(signal.SIGSTOP)  # the broker takes the bytes but never answers
    with Outbox(path) as ob:  # recorded only now, so no PUBACK can have come before the freeze
        ids = record(ob, cfg, 20)
    assert wait_until(lambda: first.publisher.stats()["published"] == 20, 15)
    first.stop(link_timeout=0.2)  # the "process" ends: paho's in-memory queue is gone
    broker.kill()  # what reached the frozen broker is lost with it: no PUBACK ever came
    assert first.publisher.stats()["acked"] == 0
    with Outbox(path) as ob:
        assert ob.depth() == 20
    broker.start()
    assert broker.port == port
    sub = Subscriber("127.0.0.1", port).start()
    try:
        second = Agent(cfg, path).start()
        agents.append(second)
        assert sub.wait_for(20, 15)
        assert {e["event_id"] for e in sub.events} == set(ids)
        with Outbox(path) as ob:
            assert wait_until(lambda: ob.depth() == 0, 10)
    finally:
        sub.stop()


def test_unacknowledged_events_are_published_again_with_the_same_event_id(
    broker: MosquittoBroker, tmp_path: Path, agents: list[Agent]
) -> None:
    cfg = config(broker.port, republish_after_s=0.5)
    sub = Subscriber("127.0.0.1", broker.port).start()
    assert broker.proc is not None
    try:
        with Outbox(tmp_path / "state.db") as ob:
            agent = Agent(cfg, tmp_path / "state.db").start()
            agents.append(agent)
            assert agent.link.wait_connected(10)
            broker.proc.send_signal(signal.SIGSTOP)  # connected, but no PUBACK comes back
            try:
                ids = record(ob, cfg, 3)
                assert wait_until(lambda: agent.publisher.stats()["republished"] >= 3, 5)
            finally:
                broker.proc.send_signal(signal.SIGCONT)
            assert sub.wait_for(3, 10)
            assert wait_until(lambda: ob.depth() == 0, 10)
        assert [e["event_id"] for e in sub.events] == ids
        assert wait_until(lambda: sub.duplicates >= 3, 5)  # the copies carried the same event_id
    finally:
        sub.stop()


def test_an_mqtt5_refusal_keeps_the_row_counts_and_logs_the_reason(
    tmp_path: Path, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite somewhere/else/#\n")  # nothing under iaflash/ is allowed
    extra = f"per_listener_settings false\nacl_file {acl}\n"
    broker = MosquittoBroker(workdir=tmp_path, extra_conf=extra).start()
    try:
        cfg = config(broker.port)
        with Outbox(tmp_path / "state.db") as ob:
            [event_id] = record(ob, cfg, 1)
            with caplog.at_level(logging.WARNING, logger="iaflash.agent.link.publisher"):
                agent = Agent(cfg, tmp_path / "state.db").start()
                agents.append(agent)
                assert wait_until(lambda: agent.publisher.stats()["refused"] >= 1, 10)
            assert ob.depth() == 1
            [row] = ob.pending(10, now=time.time() + 3600)
            assert row.event_id == event_id and row.attempts == 1
        assert agent.publisher.stats()["acked"] == 0
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and "135" in refusals[0] and event_id in refusals[0]
    finally:
        broker.stop()


def test_heartbeat_carries_probe_fields_and_outbox_depth(
    broker: MosquittoBroker, tmp_path: Path, agents: list[Agent]
) -> None:
    cfg = config(broker.port, heartbeat_interval_s=0.3)
    got: queue.Queue[dict[str, Any]] = queue.Queue()
    tap = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    tap.on_message = lambda c, u, m: got.put(json.loads(m.payload))
    tap.connect("127.0.0.1", broker.port)
    tap.subscribe(f"{cfg.topic_root}/heartbeat", qos=0)
    tap.loop_start()
    ready = threading.Event()
    tap.on_subscribe = lambda *a: ready.set()
    try:
        with Outbox(tmp_path / "state.db") as ob:
            ob.record("cap-x", "match", None, None)
        agent = Agent(
            cfg,
            tmp_path / "state.db",
            heartbeat=lambda: {"uptime_s": 12.5},
            heartbeat_topic=f"{cfg.topic_root}/heartbeat",
        ).start()
        agents.append(agent)
        beats = [got.get(timeout=10), got.get(timeout=10)]
        for beat in beats:
            assert beat["uptime_s"] == 12.5
            assert beat["depth"] == 0 and beat["oldest_age_s"] is None
            assert {"published", "acked", "refused", "republished", "inflight"} <= beat.keys()
    finally:
        tap.disconnect()
        tap.loop_stop()


# A publisher in its own process, so that the test can SIGKILL it; it writes its stats every 20 ms.
CHILD = r"""
import json, os, sys, threading
from pathlib import Path
from iaflash.agent.config import parse_config
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.link.publisher import Publisher
port, db, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
cfg = parse_config({"site": {"site_id": "site-1", "device_id": "box-1"}, "mqtt": {"port": port, "keepalive_s": 5}})
link = MqttLink(cfg)
link.start()
pub = Publisher(db, link, cfg.mqtt)
pub.start()
tick = threading.Event()
while True:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({**pub.stats(), "connected": link.connected}))
    os.replace(tmp, out)
    tick.wait(0.02)
"""


def child_stats(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.exists() else {}


def test_a_sigkill_between_puback_and_delete_yields_duplicates_never_a_loss(
    broker: MosquittoBroker, tmp_path: Path, agents: list[Agent]
) -> None:
    """The publisher process dies holding 50 PUBACKs whose batch was not committed: all 50 rows stay,
    the next publisher sends them again (50 duplicates, same event_id), none is lost."""
    cfg = config(broker.port)
    path = tmp_path / "state.db"
    Outbox(path).close()
    sub = Subscriber("127.0.0.1", broker.port).start()
    out = tmp_path / "stats.json"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(broker.port), str(path), str(out)])
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        assert wait_until(lambda: child_stats(out).get("connected") is True, 20)
        assert broker.proc is not None
        broker.freeze()
        try:
            with Outbox(path) as ob:
                ids = record(ob, cfg, 50)
            assert wait_until(lambda: child_stats(out).get("published") == 50, 15)
            locker.execute("BEGIN IMMEDIATE")  # the disk is busy: the batch's commit must wait
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        assert sub.wait_for(50, 15)
        # every PUBACK is in the process (the inflight gauge refreshes every 0.25 s)
        assert wait_until(lambda: child_stats(out)["unsettled"] >= 50 and child_stats(out)["inflight"] == 0, 15)
        stats = child_stats(out)
        assert (stats["acked"], stats["settles"], stats["inflight"]) == (0, 0, 0)
        os.kill(child.pid, signal.SIGKILL)  # between the PUBACKs and the delete
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
    try:
        with Outbox(path) as ob:
            assert ob.depth() == 50  # acknowledged by the broker, never settled: every row is still there
            second = Agent(cfg, path).start()
            agents.append(second)
            assert wait_until(lambda: ob.depth() == 0, 20)
        assert wait_until(lambda: sub.duplicates == 50, 10)  # each one came twice, with the same event_id
        assert [e["event_id"] for e in sub.events] == ids  # and is listed once, in order
        assert wait_until(lambda: second.publisher.stats()["acked"] == 50, 5)
    finally:
        sub.stop()


def test_pubacks_that_arrive_while_the_disk_is_busy_are_settled_in_one_transaction(
    broker: MosquittoBroker, tmp_path: Path, agents: list[Agent]
) -> None:
    cfg = config(broker.port)
    path = tmp_path / "state.db"
    agent = Agent(cfg, path).start()
    agents.append(agent)
    assert agent.link.wait_connected(10)
    assert broker.proc is not None
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        broker.freeze()
        try:
            with Outbox(path) as ob:
                record(ob, cfg, 60)
            assert wait_until(lambda: agent.publisher.stats()["published"] == 60, 15)
            locker.execute("BEGIN IMMEDIATE")
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        assert wait_until(lambda: agent.publisher.stats()["unsettled"] >= 60, 15)
        assert locker.execute("SELECT COUNT(*) FROM outbox").fetchone() == (60,)  # nothing settled yet
        assert agent.publisher.stats()["acked"] == 0
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
    assert wait_until(lambda: agent.publisher.stats()["acked"] == 60, 15)
    stats = agent.publisher.stats()
    # the batch that was waiting for the lock, then everything that arrived meanwhile: at most two
    assert 1 <= stats["settles"] <= 2 and stats["unsettled"] == 0 and stats["inflight"] == 0
    with Outbox(path) as ob:
        assert ob.depth() == 0


def test_refused_and_acknowledged_pubacks_of_one_batch_are_settled_each_their_way(
    tmp_path: Path, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    """Interleaved allowed and denied topics: the allowed rows are deleted, the denied ones kept,
    counted, deferred once each; one warning per refused event."""
    cfg = config(1883)  # for its topic names only
    allowed = topic_for(cfg.topic_root, "mismatch")
    denied = f"{cfg.topic_root}/events/denied"
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {allowed}\n")
    broker = MosquittoBroker(workdir=tmp_path, extra_conf=f"per_listener_settings false\nacl_file {acl}\n").start()
    try:
        cfg = config(broker.port)
        path = tmp_path / "state.db"
        with Outbox(path) as ob:
            for i in range(40):
                doc = build_event(
                    verdict=VERDICT,
                    site_id="site-1",
                    device_id="box-1",
                    capture_id=f"cap-{i}",
                    captured_at="2026-11-02T08:00:00+01:00",
                    plate_key="ab" * 32,
                    timings_ms={},
                )
                assert ob.record(f"cap-{i}", "mismatch", doc, allowed if i % 2 else denied)
            with caplog.at_level(logging.WARNING, logger="iaflash.agent.link.publisher"):
                agent = Agent(cfg, path).start()
                agents.append(agent)
                assert wait_until(
                    lambda: agent.publisher.stats()["acked"] + agent.publisher.stats()["refused"] == 40, 15
                )
            stats = agent.publisher.stats()
            assert (stats["acked"], stats["refused"], stats["inflight"]) == (20, 20, 0)
            assert stats["settles"] < 40  # grouped
            later = ob.pending(100, now=time.time() + 3600)
            assert [r.topic for r in later] == [denied] * 20 and {r.attempts for r in later} == {1}
            assert ob.pending(100) == []  # all held back
        refusals = [r.getMessage() for r in caplog.records if "refused event" in r.getMessage()]
        assert len(refusals) == 20 and all("135" in m for m in refusals)
    finally:
        broker.stop()


def test_a_corrupt_outbox_stops_the_publisher_and_marks_the_file_for_the_salvage(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Retrying a damaged state.db for ever would hold its flags until some commit failed (at night,
    none): the publisher marks the file, stops, and the service exits so that the next start salvages."""
    cfg = config(broker.port)
    db = tmp_path / "state.db"
    with Outbox(db) as ob:
        record(ob, cfg, 300)
    size = db.stat().st_size
    with db.open("r+b") as f:  # every page but the schema's: the first read of the rows meets garbage
        f.seek(2 * 4096)
        f.write(bytes(range(256)) * ((size - 2 * 4096) // 256))
    agent = Agent(cfg, db).start()
    try:
        assert wait_until(lambda: not agent.publisher.is_alive(), 20)
        assert agent.publisher.error is not None and "malformed" in str(agent.publisher.error)
        assert Path(f"{db}.suspect").is_file()
    finally:
        agent.publisher.stop(5)
        agent.link.stop(5)
