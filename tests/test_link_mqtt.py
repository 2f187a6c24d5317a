"""The MQTT link against a real mosquitto: background connect, retained status, last will, PUBACKs."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iaflash.agent.config import Config, parse_config
from iaflash.agent.demo.broker import MosquittoBroker, free_port
from iaflash.agent.errors import LinkError
from iaflash.agent.link.mqtt import MqttLink


def config(port: int, protocol: str = "5", **mqtt_keys: Any) -> Config:
    return parse_config(
        {"site": {"site_id": "site-1", "device_id": "box-1"}, "mqtt": {"port": port, "protocol": protocol, **mqtt_keys}}
    )


class Tap:
    """A plain paho subscriber that records (topic, payload, retain) for any filter."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def next(self, timeout: float = 10) -> tuple[str, dict[str, Any], bool]:
        topic, payload, retain = self.messages.get(timeout=timeout)
        return topic, json.loads(payload), retain

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publish_returns_a_mid_and_the_puback_lands_on_acks(broker: MosquittoBroker, protocol: str) -> None:
    link = MqttLink(config(broker.port, protocol))
    link.start()
    try:
        assert link.wait_connected(10)
        mid = link.publish("iaflash/v1/site-1/box-1/events/mismatch", b"{}", qos=1)
        deadline = time.monotonic() + 10
        acks = []
        while time.monotonic() < deadline and mid not in [a[0] for a in acks]:
            acks.append(link.acks.get(timeout=10))
        assert (mid, True) in [(a[0], a[1]) for a in acks]
        assert link.connects == 1
    finally:
        link.stop()
    assert not link.connected


def test_start_does_not_raise_when_the_broker_is_down_and_connects_later(tmp_path: Any) -> None:
    port = free_port()
    link = MqttLink(config(port))
    link.start()  # nothing listens: paho keeps retrying in the background
    try:
        assert not link.wait_connected(0.5)
        mid = link.publish("iaflash/v1/site-1/box-1/events/mismatch", b"{}")  # kept in paho's memory
        with MosquittoBroker(port=port, workdir=tmp_path):
            assert link.wait_connected(15)
            acked = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and mid not in acked:
                acked.append(link.acks.get(timeout=10)[0])
            assert mid in acked
            link.stop()
    finally:
        link.stop()


def test_online_status_is_retained_and_stop_leaves_offline(broker: MosquittoBroker) -> None:
    cfg = config(broker.port)
    link = MqttLink(cfg)
    link.start()
    assert link.wait_connected(10)
    time.sleep(0.2)  # the online status is published right after CONNACK
    late = Tap(broker.port, f"{cfg.topic_root}/status")  # subscribes after the fact
    try:
        topic, status, retained = late.next()
        assert (topic, status["state"], retained) == ("iaflash/v1/site-1/box-1/status", "online", True)
        assert status["client_id"] == "iaflash-site-1-box-1"
        link.stop()
        _, status, _ = late.next()
        assert (status["state"], status["reason"]) == ("offline", "stopped")
    finally:
        late.stop()
        link.stop()


LINK_SCRIPT = textwrap.dedent("""
    import sys, time
    from iaflash.agent.config import parse_config
    from iaflash.agent.link.mqtt import MqttLink
    cfg = parse_config({"site": {"site_id": "site-1", "device_id": "box-9"},
                        "mqtt": {"port": int(sys.argv[1]), "keepalive_s": 5}})
    link = MqttLink(cfg)
    link.start()
    print("connected" if link.wait_connected(10) else "timeout", flush=True)
    time.sleep(60)
""")


def test_last_will_says_offline_when_the_process_is_killed(broker: MosquittoBroker) -> None:
    proc = subprocess.Popen([sys.executable, "-c", LINK_SCRIPT, str(broker.port)], stdout=subprocess.PIPE, text=True)
    tap = None
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        tap = Tap(broker.port, "iaflash/v1/site-1/box-9/status")
        assert tap.next()[1]["state"] == "online"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _, status, _ = tap.next(15)
        assert (status["state"], status["reason"]) == ("offline", "connection lost")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        if tap is not None:
            tap.stop()


def test_a_bad_topic_is_a_link_error(broker: MosquittoBroker) -> None:
    link = MqttLink(config(broker.port))
    link.start()
    try:
        with pytest.raises(LinkError, match=r"MQTT 127\.0\.0\.1:\d+: cannot publish to a/#"):
            link.publish("a/#", b"{}")
    finally:
        link.stop()


def test_an_unreadable_tls_ca_file_is_a_link_error(tmp_path: Any) -> None:
    cfg = config(free_port(), tls=True, ca_file=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(LinkError, match=r"mqtt\.ca_file .*missing-ca\.pem is missing or unreadable \(fix: "):
        MqttLink(cfg)
