"""Central's flag store on real SQLite and a real PostgreSQL, and the ingester against a real mosquitto."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from central_pg import PgServer, pg_server, wait_until  # noqa: F401  # pg_server is a fixture

from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.outbox.events import build_event, topic_for
from iaflash.central.connection import BrokerOptions
from iaflash.central.serve.ingest import Ingester, parse_topic
from iaflash.central.serve.migrations import MIGRATIONS
from iaflash.central.serve.store import Store, log_lr, parse_time

VERDICT: dict[str, Any] = {
    "outcome": "mismatch",
    "level": "model",
    "reason": "P(registered model) below threshold",
    "registry_stale": False,
    "p_make": 0.9,
    "p_model": 0.01,
    "top_k": [{"make": "RENAULT", "model": "MEGANE", "p": 0.85}],
    "registry": {"make": "RENAULT", "model": "CLIO", "genre": None, "body": None},
    "thresholds": {"model": 0.05},
    "model": {"name": "t", "version": "1", "backend": "ort", "device": "cpu"},
}


def an_event(site: str = "site-7", device: str = "box-3", capture: str = "cap-1", **verdict: Any) -> dict[str, Any]:
    return build_event(
        verdict={**VERDICT, **verdict},
        site_id=site,
        device_id=device,
        capture_id=capture,
        captured_at="2026-11-02T08:00:00.5+01:00",
        plate_key="cd" * 32,
        timings_ms={"total": 40.0},
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "central.db")
    server: PgServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    s.migrate()
    yield s
    s.close()


def test_migrations_apply_once_and_record_their_version(store_url: str) -> None:
    with Store(store_url) as s:
        assert s.migrate() == [v for v, _, _ in MIGRATIONS]
    with Store(store_url) as again:
        assert again.migrate() == []
        assert again.schema_version() == MIGRATIONS[-1][0]


def test_an_event_is_stored_once_however_often_it_arrives(store: Store) -> None:
    doc = an_event()
    topic = topic_for("iaflash/v1/site-7/box-3", "mismatch")
    assert store.ingest(doc, site="site-7", device="box-3", topic=topic, payload_site=None) is True
    assert store.ingest(doc, site="site-7", device="box-3", topic=topic, payload_site=None) is False
    [row] = store.flags()
    assert row["event_id"] == doc["event_id"] and row["doc"] == doc
    assert row["p_registered"] == 0.01 and row["log_lr"] == pytest.approx(log_lr(0.01))
    assert row["captured_ts"] == parse_time("2026-11-02T07:00:00.5Z")
    assert store.counters() == {"duplicates": 1, "stored": 1}


def test_decisions_change_the_status_and_are_audited_and_retention_keeps_the_audit(store: Store) -> None:
    doc = an_event()
    store.ingest(doc, site="site-7", device="box-3", topic="t", payload_site=None)
    store.put_evidence(doc["event_id"], {"vehicle_box": [1, 2, 3, 4]}, b"\xff\xd8jpeg")
    with pytest.raises(ValueError, match="is not one of"):
        store.decide(doc["event_id"], reviewer="ann", action="maybe", note="")
    with pytest.raises(KeyError, match="no flag"):
        store.decide(str(uuid.uuid4()), reviewer="ann", action="false_flag", note="")
    assert store.decide(doc["event_id"], reviewer="ann", action="false_flag", note="same car") == "dismissed"
    [audit] = store.audit_log(doc["event_id"])
    assert (audit["reviewer"], audit["action"], audit["note"]) == ("ann", "false_flag", "same car")
    assert store.flags(status="open") == [] and len(store.flags(status="dismissed")) == 1
    assert store.purge(decided_days=30, evidence_days=30) == {"flags": 0, "evidence": 0}
    assert store.purge(decided_days=30, evidence_days=30, now=time.time() + 31 * 86400) == {"flags": 1, "evidence": 1}
    assert store.flag(doc["event_id"]) is None and store.evidence(doc["event_id"]) is None
    assert [r["action"] for r in store.audit_log()] == ["false_flag"]


def test_queue_filters_and_ranks_by_evidence(store: Store) -> None:
    weak, strong = an_event(capture="a", p_model=0.04), an_event(site="site-9", capture="b", p_model=0.0001)
    make = an_event(capture="c", level="make", p_make=0.02)
    for d in (weak, strong, make):
        store.ingest(d, site=d["site_id"], device="box-3", topic="t", payload_site=None)
    assert [f["capture_id"] for f in store.flags()] == ["b", "c", "a"]
    assert [f["capture_id"] for f in store.flags(site="site-7")] == ["c", "a"]
    assert [f["capture_id"] for f in store.flags(level="make")] == ["c"]
    day = parse_time("2026-11-02T00:00:00Z")
    assert len(store.flags(since=day, until=day + 86400)) == 3 and store.flags(since=day + 86400) == []


def test_parse_topic_takes_site_and_device_from_the_topic() -> None:
    assert parse_topic("iaflash/v1/s1/b2/events/mismatch") == ("s1", "b2", "mismatch")
    assert parse_topic("iaflash/v1/s1/b2/status") is None
    assert parse_topic("other/v1/s1/b2/events/mismatch") is None


def _publish(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=1) for t, p in messages]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.parametrize("identity", ["topic", "refuse"])
def test_ingester_binds_events_to_their_topic_and_keeps_refusals(
    broker: MosquittoBroker, store: Store, identity: str
) -> None:
    ing = Ingester(store, BrokerOptions(port=broker.port), client_id=f"t-{uuid.uuid4().hex[:6]}", identity=identity)  # type: ignore[arg-type]
    ing.start()
    try:
        good, spoofed, wrong_outcome = (
            an_event(capture="g"),
            an_event(site="site-1", capture="s"),
            an_event(capture="o"),
        )
        own = topic_for("iaflash/v1/site-7/box-3", "mismatch")
        _publish(
            broker,
            [
                (own, json.dumps(good).encode()),
                (own, json.dumps(good).encode()),  # redelivery
                (own, json.dumps(spoofed).encode()),  # names site-1 on site-7's topic
                (topic_for("iaflash/v1/site-7/box-3", "match"), json.dumps(wrong_outcome).encode()),
                (own, b"{not json"),
            ],
        )
        wait_until(lambda: sum(ing.counters().values()) == 5, 15, "every message handled")
    finally:
        ing.stop()
    counts = store.counters()
    assert counts["stored"] == (2 if identity == "topic" else 1) and counts["duplicates"] == 1
    assert counts["refused.invalid"] == 1 and counts["refused.outcome"] == 1
    reasons = sorted(r["reason"] for r in store.query("SELECT reason FROM refused"))
    if identity == "topic":
        stored = store.flag(spoofed["event_id"])
        assert stored is not None and stored["site_id"] == "site-7" and stored["payload_site"] == "site-1/box-3"
        assert stored["doc"]["site_id"] == "site-7" and counts["identity_rewritten"] == 1
        assert reasons == ["invalid", "outcome"]
    else:
        assert store.flag(spoofed["event_id"]) is None and counts["refused.identity"] == 1
        assert reasons == ["identity", "invalid", "outcome"]
        [row] = store.query("SELECT payload FROM refused WHERE reason = 'identity'")
        assert json.loads(bytes(row["payload"]))["event_id"] == spoofed["event_id"]  # kept, not lost
