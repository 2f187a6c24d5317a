"""The MQTT link against a real mosquitto: background connect, retained status, last will, PUBACKs."""

from __future__ import annotations

import ipaddress
import json
import logging
import queue
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from iaflash.agent.config import Config, parse_config
from iaflash.agent.demo.broker import MosquittoBroker, free_port
from iaflash.agent.errors import LinkError
from iaflash.agent.link.mqtt import MqttLink, probe


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


# ---------------------------------------------------------------- no silence (docs/RELIABILITY.md)


def _cert(
    subject: str,
    key: Any,
    issuer: tuple[str, Any] | None,
    *,
    ca: bool,
    sans: list[str] = (),  # type: ignore[assignment]  # a tuple default for a list parameter
    days: tuple[int, int] = (-1, 30),
) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signer = (
        (name, key) if issuer is None else (x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]), issuer[1])
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days[0]))
        .not_valid_after(now + timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(s)) if s[0].isdigit() else x509.DNSName(s) for s in sans]
            ),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def _pem(path: Path, obj: Any) -> Path:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "public_bytes"):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


def tls_files(folder: Path, *, sans: list[str], days: tuple[int, int] = (-1, 30)) -> dict[str, Path]:
    """A CA, a server certificate it signed (for ``sans``, valid ``days``), and an unrelated CA."""
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, server_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test-ca", ca_key, None, ca=True, days=(-10, 3650))
    server = _cert("broker", server_key, ("test-ca", ca_key), ca=False, sans=sans, days=days)
    other = _cert("other-ca", other_key, None, ca=True, days=(-10, 3650))
    return {
        "ca": _pem(folder / "ca.pem", ca),
        "other_ca": _pem(folder / "other-ca.pem", other),
        "cert": _pem(folder / "server.pem", server),
        "key": _pem(folder / "server.key", server_key),
    }


def tls_broker(folder: Path, files: dict[str, Path]) -> MosquittoBroker:
    port = free_port()
    conf = f"listener {port} 127.0.0.1\ncafile {files['ca']}\ncertfile {files['cert']}\nkeyfile {files['key']}\n"
    return MosquittoBroker(workdir=folder, extra_conf=conf).start()


def test_probe_makes_a_real_connect_and_accepts_a_good_broker(broker: MosquittoBroker) -> None:
    ok, what, fix = probe(config(broker.port), timeout_s=5)
    assert ok and what.startswith(f"MQTT CONNECT to 127.0.0.1:{broker.port} accepted") and fix == ""


def test_probe_names_a_closed_port(tmp_path: Any) -> None:
    port = free_port()
    ok, what, fix = probe(config(port), timeout_s=2)
    assert not ok and what == f"127.0.0.1:{port} refused the TCP connection" and "mqtt.port" in fix


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong CA", "self-signed certificate in certificate chain"),
        ("wrong host name", "mismatch"),
        ("expired", "expired"),
    ],
)
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # paho 2.2 leaves a failed TLS handshake's socket to the GC
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the same socket, at GC time
def test_probe_and_the_link_name_each_tls_failure_with_its_fix(
    tmp_path: Path, case: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    """TCP passes in all three cases: only a real TLS handshake tells them apart."""
    sans = ["otherhost.example"] if case == "wrong host name" else ["127.0.0.1", "localhost"]
    days = (-30, -1) if case == "expired" else (-1, 30)
    files = tls_files(tmp_path / "pki", sans=sans, days=days)
    tls = tls_broker(tmp_path / "broker", files)
    port = int(tls.extra_conf.split()[1])
    ca = files["other_ca"] if case == "wrong CA" else files["ca"]
    cfg = config(port, tls=True, ca_file=str(ca))
    try:
        ok, what, fix = probe(cfg, timeout_s=5)
        assert not ok and what.startswith(f"TLS: the certificate of 127.0.0.1:{port} was refused")
        assert expected.lower() in what.lower() and "mqtt.ca_file" in fix
        link = MqttLink(cfg)
        with caplog.at_level(logging.ERROR, logger="iaflash.agent.link.mqtt"):
            link.start()
            try:
                assert wait_until(lambda: link.connect_failures >= 2, 15, "two failed TLS connects")
            finally:
                link.stop()
        health = link.health()
        assert health["connected"] is False and health["last_error"] == what and health["fix"] == fix
        logged = [r.getMessage() for r in caplog.records if "was refused" in r.getMessage()]
        assert len(logged) == 1 and "fix: check that mqtt.ca_file" in logged[0]  # once, not once per retry
    finally:
        tls.stop()


def test_probe_and_tls_succeed_with_the_right_ca(tmp_path: Path) -> None:
    files = tls_files(tmp_path / "pki", sans=["127.0.0.1"])
    tls = tls_broker(tmp_path / "broker", files)
    port = int(tls.extra_conf.split()[1])
    try:
        ok, what, _ = probe(config(port, tls=True, ca_file=str(files["ca"])), timeout_s=5)
    finally:
        tls.stop()
    assert ok and "TLS" in what


def test_a_second_client_with_the_same_id_is_named_as_a_takeover(broker: MosquittoBroker) -> None:
    """Two agents on one config used to swap the session every 2 s with "Unspecified error"."""
    cfg = config(broker.port)
    first, second = MqttLink(cfg), MqttLink(cfg)
    first.start()
    try:
        assert first.wait_connected(10)
        second.start()
        assert wait_until(lambda: first.takeovers + second.takeovers >= 1, 20, "the takeover to be named")
        second.stop()
        named = first if first.takeovers else second
        health = named.health()
        assert "took the session over" in health["last_error"] and "device_id" in health["fix"]
    finally:
        first.stop()
