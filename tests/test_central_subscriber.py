"""Central's reference subscriber and the ``iaflash-central`` CLI against a real mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from iaflash.agent.config import parse_config
from iaflash.agent.demo.broker import MosquittoBroker, free_port
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.outbox.events import build_event, topic_for
from iaflash.central.cli import main
from iaflash.central.subscriber import Subscriber

VERDICT = {
    "outcome": "mismatch",
    "level": "model",
    "reason": "P(registered model) below threshold",
    "registry_stale": True,
    "p_make": 0.9,
    "p_model": 0.01,
    "top_k": [{"make": "RENAULT", "model": "MEGANE", "p": 0.85}],
    "registry": {"make": "RENAULT", "model": "CLIO", "genre": None, "body": None},
    "thresholds": {"model": 0.05},
    "model": {"name": "t", "version": "1", "backend": "ort", "device": "cpu"},
}
ROOT = "iaflash/v1/site-7/box-3"
TOPIC = topic_for(ROOT, "mismatch")


def an_event(capture_id: str = "cap-1") -> dict[str, Any]:
    return build_event(
        verdict=VERDICT,
        site_id="site-7",
        device_id="box-3",
        capture_id=capture_id,
        captured_at="2026-11-02T08:00:00+01:00",
        plate_key="cd" * 32,
        timings_ms={"total": 40.0},
    )


@pytest.fixture
def link(broker: MosquittoBroker) -> Iterator[MqttLink]:
    lk = MqttLink(parse_config({"site": {"site_id": "site-7", "device_id": "box-3"}, "mqtt": {"port": broker.port}}))
    lk.start()
    assert lk.wait_connected(10)
    yield lk
    lk.stop()


def send(link: MqttLink, payload: bytes, topic: str = TOPIC) -> None:
    mid = link.publish(topic, payload)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if link.acks.get(timeout=10)[0] == mid:
            return
    raise AssertionError("no PUBACK")


def test_subscriber_dedupes_on_event_id_and_keeps_invalid_messages_aside(
    broker: MosquittoBroker, link: MqttLink
) -> None:
    seen: list[str] = []
    sub = Subscriber("127.0.0.1", broker.port, on_event=lambda e: seen.append(e["event_id"])).start()
    try:
        first, second = an_event("a"), an_event("b")
        send(link, json.dumps(first).encode())
        send(link, json.dumps(first).encode())  # an at-least-once redelivery
        send(link, b"not json")
        send(link, json.dumps({**second, "extra": 1}).encode())
        send(link, json.dumps(second).encode())
        assert sub.wait_for(2, 10)
        time.sleep(0.2)
        assert [e["event_id"] for e in sub.events] == [first["event_id"], second["event_id"]] == seen
        assert sub.duplicates == 1
        assert (sub.invalid[0].topic, sub.invalid[0].payload) == (TOPIC, b"not json")
        assert "'extra' was unexpected" in sub.invalid[1].error
    finally:
        sub.stop()


def test_a_persistent_subscriber_gets_what_was_sent_while_it_was_away(broker: MosquittoBroker, link: MqttLink) -> None:
    first = Subscriber("127.0.0.1", broker.port, client_id="central-1").start()
    first.stop()
    away = an_event()
    send(link, json.dumps(away).encode())
    again = Subscriber("127.0.0.1", broker.port, client_id="central-1").start()
    try:
        assert again.wait_for(1, 10)
        assert again.events[0]["event_id"] == away["event_id"]
    finally:
        again.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_listen_prints_one_line_per_event(broker: MosquittoBroker, link: MqttLink, protocol: str) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from iaflash.central.cli import main; main()",
            "listen",
            "--port",
            str(broker.port),
            "--protocol",
            protocol,
            "--count",
            "1",
            "--timeout",
            "15",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith(f"listening on 127.0.0.1:{broker.port}")
        event = an_event()
        send(link, json.dumps(event).encode())
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    [line] = out.splitlines()
    assert "site-7/box-3 mismatch/model capture=cap-1" in line
    assert f"event={event['event_id']}" in line and "registry_stale" in line
    assert "1 event(s), 0 duplicate(s), 0 invalid" in err


def test_listen_json_prints_the_event_document(broker: MosquittoBroker, link: MqttLink) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from iaflash.central.cli import main; main()",
            "listen",
            "--port",
            str(broker.port),
            "--json",
            "--count",
            "1",
            "--timeout",
            "15",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stderr.readline().startswith("listening on")
        event = an_event()
        send(link, json.dumps(event).encode())
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert json.loads(out) == event


def test_listen_exits_1_when_count_is_not_reached(broker: MosquittoBroker) -> None:
    result = CliRunner().invoke(main, ["listen", "--port", str(broker.port), "--count", "1", "--timeout", "0.3"])
    assert result.exit_code == 1
    assert "only 0 of 1 event(s) before the 0.3 s timeout" in result.output


def test_listen_exits_1_when_no_broker_answers() -> None:
    result = CliRunner().invoke(main, ["listen", "--port", str(free_port()), "--timeout", "0.5"])
    assert result.exit_code == 1
    assert "is the broker running?" in result.output


@pytest.mark.parametrize("args", [[], ["listen"], ["registry"], ["registry", "build"], ["cmd"]])
def test_every_command_has_short_help_with_an_example(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "-h"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "iaflash-central " in result.output


def test_a_bad_option_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["listen", "--protocol", "4"])
    assert result.exit_code == 2
