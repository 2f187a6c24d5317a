"""The MQTT link: the only module that imports paho-mqtt (2.x, callback API VERSION2).

What the rest of the agent relies on:

* :meth:`MqttLink.start` never raises because the broker is down: it uses ``connect_async`` and
  paho's network thread, which retries forever (backoff 1 s doubling to 30 s).
* Last will: ``<topic_root>/status`` = ``{"state": "offline", ...}``, retained, QoS 1. On every
  connect the link publishes ``{"state": "online", ...}`` there, retained; :meth:`MqttLink.stop`
  publishes a retained ``offline`` before a clean disconnect (which suppresses the will).
* :meth:`MqttLink.publish` returns the message id (mid). When the link is NOT connected, paho
  keeps a QoS 1 message in memory and sends it on the next connect; the mid stays valid and its
  PUBACK arrives later. A QoS 0 message published while disconnected is lost (heartbeats only).
* ``acks`` receives ``(mid, success, reason)`` for every PUBACK. ``success`` is False when the
  MQTT 5 reason code is >= 128 (e.g. 135 "Not authorized"). MQTT 3.1.1 has no reason code: a
  broker that refuses a publish (ACL) acknowledges it anyway and drops it, so ``success`` is
  always True there. paho calls ``on_publish`` under its own lock, so the callback only enqueues.
* paho keeps unacknowledged QoS 1 messages in memory and resends them (same mid) after a
  reconnect; a process restart loses them, which is why the outbox exists.
* Commands (docs/MQTT.md#commands): after :meth:`MqttLink.enable_commands` the link subscribes to
  ``<topic_root>/cmd`` at QoS 1 (now if connected, and on every connect). ``on_message`` runs in
  paho's network thread, so it only copies the message (payload, MQTT 5 response topic and
  correlation data) onto a bounded queue; when that queue is full the message is dropped and
  counted in ``commands_dropped``. :meth:`MqttLink.respond` publishes an answer at QoS 1 with the
  correlation data echoed (MQTT 5).
* Silence is never an outcome (docs/RELIABILITY.md): every failed connection attempt (refused,
  unreachable, DNS, TLS: unknown CA, expired certificate, wrong host name; authentication
  refused; the client id taken over by another client; the broker closing the connection before
  its CONNACK, e.g. because it refused this box's client certificate: expired, unknown CA, none
  given) is counted in ``connect_failures`` and logged at ERROR once per distinct error, with its
  fix (:func:`explain`, :func:`closed_before_connack`); :meth:`MqttLink.health` gives it to the
  heartbeat. :func:`probe` makes one real MQTT CONNECT with the agent's TLS files and
  credentials, for ``doctor``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iaflash.agent.config import Config, read_secret
from iaflash.agent.errors import LinkError
from iaflash.agent.link.diagnosis import closed_before_connack, explain, reason_value, refusal

__all__ = ["InboundMessage", "MqttLink", "closed_before_connack", "explain", "probe"]

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
_REFUSED = 128  # MQTT 5 reason codes at or above this are failures
FLAP_WITHIN_S = 10.0  # a connection the broker closes this soon after it opened ...
FLAPS_FOR_TAKEOVER = 2  # ... this many times in a row means another client uses our client id
COMMAND_QUEUE_MAX = 100  # commands waiting for the worker; more are dropped and counted


@dataclass(frozen=True)
class InboundMessage:
    """A message received on the command topic, copied out of paho's objects."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None


@contextlib.contextmanager
def _paho_errors(action: str, where: str) -> Iterator[None]:
    """The one place where paho's (and its socket/TLS layer's) exceptions become LinkError."""
    try:
        yield
    except ssl.SSLError as exc:
        raise LinkError(
            f"MQTT {where}: cannot {action}: TLS error {exc} "
            "(fix: check mqtt.ca_file, mqtt.cert_file and mqtt.key_file)"
        ) from exc
    except OSError as exc:
        if exc.filename is None:
            raise LinkError(
                f"MQTT {where}: cannot {action}: {exc} (fix: check mqtt.host, mqtt.port and the TLS files)"
            ) from exc
        raise LinkError(
            f"MQTT {where}: cannot {action}: {exc.strerror}: {exc.filename} "
            "(fix: check that the mqtt.*_file paths exist and the service user may read them)"
        ) from exc
    except (ValueError, RuntimeError) as exc:
        raise LinkError(f"MQTT {where}: cannot {action}: {exc} (fix: check the [mqtt] section)") from exc


def _agent_version() -> str:
    try:
        return metadata.version("iaflash-edge")
    except metadata.PackageNotFoundError:
        return "unknown"


def _apply_auth(client: mqtt.Client, cfg: Config, where: str) -> None:
    """TLS files and username/password from the config onto a paho client (LinkError when unreadable)."""
    m = cfg.mqtt
    if m.tls:
        for key, path in (("ca_file", m.ca_file), ("cert_file", m.cert_file), ("key_file", m.key_file)):
            if path is not None and not os.access(path, os.R_OK):
                raise LinkError(
                    f"MQTT {where}: mqtt.{key} {path} is missing or unreadable "
                    "(fix: correct the path or let the service user read it)"
                )
        client.tls_set(
            ca_certs=str(m.ca_file) if m.ca_file else None,
            certfile=str(m.cert_file) if m.cert_file else None,
            keyfile=str(m.key_file) if m.key_file else None,
        )
    if m.username:
        client.username_pw_set(m.username, _password(cfg))


def _password(cfg: Config) -> str | None:
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    has_credential = bool(creds) and (Path(str(creds)) / "mqtt-password").is_file()
    if cfg.mqtt.password_file is None and not has_credential:
        return None
    secret = read_secret("mqtt-password", cfg.mqtt.password_file, what="MQTT password", config_key="mqtt.password_file")
    return secret.decode("utf-8")


class MqttLink:
    """One paho client with a retained online/offline status and a queue of PUBACKs."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.status_topic = f"{cfg.topic_root}/status"
        self.command_topic = f"{cfg.topic_root}/cmd"  # subscribed once enable_commands() was called
        self.commands_dropped = 0
        self._commands: queue.Queue[InboundMessage] | None = None
        self._commands_ready = threading.Event()
        self._command_sub_mid: int | None = None
        self._sub_lock = threading.Lock()
        self.acks: queue.Queue[tuple[int, bool, str]] = queue.Queue()
        self.connects = 0
        self.disconnects = 0
        self.last_error: str | None = None
        self.last_fix: str | None = None
        self.last_error_at: float | None = None
        self.connect_failures = 0
        self.takeovers = 0
        self._connected_at = 0.0
        self._flaps = 0  # disconnects in a row, each within FLAP_WITHIN_S of its connect
        self._attempt_failed = False  # this connection attempt was already counted as a failure
        self._socket_error: str | None = None  # paho's last socket error (its log), for closed_before_connack
        self._logged: str | None = None  # the last error logged: the same one is not logged again
        self._connected = threading.Event()
        self._where = f"{cfg.mqtt.host}:{cfg.mqtt.port}"
        self._version = _agent_version()
        self._started = False
        self._stopping = False
        self._client = self._make_client()

    # ----- construction -------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        v5 = m.protocol == "5"
        with _paho_errors("configure the client", self._where):
            client = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=self.cfg.client_id,
                protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                reconnect_on_failure=True,
            )
            client.max_inflight_messages_set(m.max_inflight)
            client.max_queued_messages_set(0)  # unlimited: the publisher bounds what it hands over
            client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
            client.will_set(self.status_topic, self._status("offline", "connection lost"), qos=1, retain=True)
            self._auth(client)
        client.on_pre_connect = self._on_pre_connect
        client.on_log = self._on_log
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _auth(self, client: mqtt.Client) -> None:
        _apply_auth(client, self.cfg, self._where)

    def _status(self, state: str, reason: str) -> bytes:
        doc = {
            "state": state,
            "reason": reason,
            "client_id": self.cfg.client_id,
            "site_id": self.cfg.site.site_id,
            "device_id": self.cfg.site.device_id,
            "agent_version": self._version,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    # ----- paho callbacks (paho's network thread) -----------------------------------------
    def _failed(self, what: str, fix: str) -> None:
        """Count a failed connection; log it at ERROR when it differs from the last one logged."""
        self.connect_failures += 1
        self._attempt_failed = True
        self.last_error, self.last_fix, self.last_error_at = what, fix, time.time()
        if what != self._logged:
            self._logged = what
            log.error(
                "MQTT: %s (fix: %s); events wait in the outbox and paho retries every %d-%d s",
                what,
                fix,
                RECONNECT_MIN_S,
                RECONNECT_MAX_S,
                extra={"mqtt_error": what, "connect_failures": self.connect_failures},
            )

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._attempt_failed, self._socket_error = False, None

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        # paho reports a TLS alert received after the handshake only here (then "Unspecified error").
        if level == mqtt.MQTT_LOG_ERR and "socket" in text:
            self._socket_error = text

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the error is the one being handled.
        self._failed(*explain(sys.exc_info()[1], self._where))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_value(reason_code) >= _REFUSED or (self.cfg.mqtt.protocol != "5" and reason_value(reason_code)):
            self._failed(*refusal(reason_code, self._where))
            return
        self.connects += 1
        self._connected_at = time.monotonic()
        if self._flaps == 0:  # while sessions keep being taken over, the error stays shown (and logged once)
            if self._logged is not None:
                log.warning("MQTT: connected again to %s after %d failed attempts", self._where, self.connect_failures)
            self.last_error = self._logged = None
        client.publish(self.status_topic, self._status("online", "connected"), qos=1, retain=True)
        with self._sub_lock:  # enable_commands() may run now in another thread
            if self._commands is not None:
                self._subscribe_commands(client)
            self._connected.set()
        log.info("MQTT connected to %s as %s", self._where, self.cfg.client_id)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._commands_ready.clear()
        if not was_connected and not self._stopping and not self._attempt_failed:
            # closed after TCP (and TLS) but before a CONNACK: never silent (an expired client certificate)
            m = self.cfg.mqtt
            self._failed(*closed_before_connack(self._socket_error, self._where, m.cert_file, m.ca_file))
        elif was_connected and self._stopping:
            log.info("MQTT disconnected from %s (stopped)", self._where)
        elif was_connected:
            self.disconnects += 1
            quick = time.monotonic() - self._connected_at < FLAP_WITHIN_S
            self._flaps = self._flaps + 1 if quick else 0
            if reason_value(reason_code) == 142 or self._flaps >= FLAPS_FOR_TAKEOVER:
                self._taken_over(reason_code)
            elif self._logged is None:  # a plain outage: one warning; a repeated one is counted, not re-logged
                log.warning("MQTT disconnected from %s: %s; paho reconnects with backoff", self._where, reason_code)

    def _taken_over(self, reason_code: Any) -> None:
        """The broker keeps dropping us right after connecting: another client uses our client id.

        Mosquitto just closes the socket of the older session (paho says "Unspecified error"), so
        this is recognised by the pattern (or MQTT 5's reason 142, Session taken over).
        """
        self.takeovers += 1
        self._failed(
            f"the broker {self._where} keeps closing this connection right after it opens ({reason_code}): "
            f"another client took the session over with the same client id {self.cfg.client_id!r}",
            "two agents run with one config: stop the other one, or give each box its own [site] device_id "
            "(or mqtt.client_id); if only one runs, check the broker's ACL and log",
        )

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        # Called under paho's lock: enqueue only, never touch SQLite or log heavily here.
        code = reason_value(reason_code)
        self.acks.put((mid, code < _REFUSED, f"{code} {reason_code}"))

    def _subscribe_commands(self, client: mqtt.Client) -> None:
        rc, mid = client.subscribe(self.command_topic, qos=1)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:  # retried on the next connect
            log.warning("MQTT %s: cannot subscribe to %s: %s", self._where, self.command_topic, mqtt.error_string(rc))
        self._command_sub_mid = mid

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._command_sub_mid:
            return
        if any(reason_value(rc) >= _REFUSED for rc in reason_codes):
            log.error(
                "broker %s refused the subscription to %s: %s (fix: allow this device to subscribe "
                "to its cmd topic in the broker ACL)",
                self._where,
                self.command_topic,
                reason_codes,
            )
            return
        self._commands_ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # paho's network thread: copy and enqueue only; the command worker does the rest.
        if self._commands is None or message.topic != self.command_topic:
            return
        props = getattr(message, "properties", None)
        topic = getattr(props, "ResponseTopic", None)
        corr = getattr(props, "CorrelationData", None)
        item = InboundMessage(
            message.topic,
            bytes(message.payload),
            topic if isinstance(topic, str) else None,
            bytes(corr) if isinstance(corr, (bytes, bytearray)) else None,
        )
        try:
            self._commands.put_nowait(item)
        except queue.Full:
            self.commands_dropped += 1
            log.warning(
                "command dropped: %d commands already wait for the worker (dropped so far: %d)",
                self._commands.maxsize,
                self.commands_dropped,
            )

    # ----- public API ---------------------------------------------------------------------
    def enable_commands(self, maxsize: int = COMMAND_QUEUE_MAX) -> queue.Queue[InboundMessage]:
        """Subscribe to ``command_topic`` (QoS 1) and return the queue its messages land on."""
        with self._sub_lock:
            if self._commands is None:
                self._commands = queue.Queue(maxsize)
                if self.connected:
                    self._subscribe_commands(self._client)
            return self._commands

    def wait_commands_ready(self, timeout: float) -> bool:
        """True once the broker granted the command subscription; False after ``timeout`` seconds."""
        return self._commands_ready.wait(timeout)

    def respond(self, topic: str, payload: bytes, correlation_data: bytes | None) -> int:
        """Publish a command response at QoS 1, echoing ``correlation_data`` (an MQTT 5 property)."""
        props = None
        if self.cfg.mqtt.protocol == "5" and correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
            props.CorrelationData = correlation_data
        with _paho_errors(f"publish to {topic}", self._where):
            info = self._client.publish(topic, payload, qos=1, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            self._check(info.rc, f"publish to {topic}")
        return int(info.mid)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def health(self) -> dict[str, Any]:
        """For the heartbeat: connected or not, the last connection error with its fix, the counts."""
        return {
            "connected": self.connected,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "connect_failures": self.connect_failures,
            "takeovers": self.takeovers,
            "last_error": self.last_error,
            "fix": self.last_fix if self.last_error else None,
            "last_error_at": self.last_error_at if self.last_error else None,
        }

    def wait_connected(self, timeout: float) -> bool:
        """True once connected; False when ``timeout`` seconds pass first."""
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Connect in the background; never raises because the broker is unreachable."""
        if self._started:
            return
        m = self.cfg.mqtt
        with _paho_errors("start", self._where):
            self._client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
            rc = self._client.loop_start()
        self._check(rc, "start the network thread")
        self._started = True

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Hand a message to paho and return its mid.

        Not connected is not an error: a QoS 1 message waits in paho's memory for the next
        connect (see the module docstring). Any other paho failure raises LinkError.
        """
        with _paho_errors(f"publish to {topic}", self._where):
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            self._check(info.rc, f"publish to {topic}")
        return int(info.mid)

    def stop(self, timeout: float = 5) -> None:
        """Publish a retained ``offline`` status, disconnect cleanly, stop the network thread."""
        if not self._started:
            return
        self._stopping = True
        if self.connected:
            with _paho_errors("publish the offline status", self._where):
                info = self._client.publish(self.status_topic, self._status("offline", "stopped"), qos=1, retain=True)
                with contextlib.suppress(RuntimeError, ValueError):  # not sent: the will covers it
                    info.wait_for_publish(timeout)
        with _paho_errors("disconnect", self._where):
            self._client.disconnect()
            self._client.loop_stop()
        self._connected.clear()
        self._started = False
        self._stopping = False

    def _check(self, rc: MQTTErrorCode | int, action: str) -> None:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkError(
                f"MQTT {self._where}: cannot {action}: {mqtt.error_string(rc)} "
                "(fix: check the [mqtt] section and the broker)"
            )


def probe(cfg: Config, timeout_s: float) -> tuple[bool, str, str]:
    """One real MQTT CONNECT with the agent's TLS files and credentials: (ok, what happened, fix).

    It connects as ``<client_id>-doctor`` so that it never takes the running agent's session over,
    and disconnects at once. (A broker with ``use_username_as_clientid``, as central's template,
    replaces that id with the certificate's CN: the probe then bumps the running agent's
    connection once, and the agent reconnects within a second; docs/MQTT.md.) Used by
    ``iaflash-provision doctor``.
    """
    m = cfg.mqtt
    where = f"{m.host}:{m.port}"
    answer: list[Any] = []
    socket_error: list[str] = []
    done = threading.Event()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        answer.append(reason_code)
        done.set()

    def on_log(client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and "socket" in text:
            socket_error.append(text)

    def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        done.set()  # closed before (or after) the CONNACK

    try:
        with _paho_errors("configure the client", where):
            client = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=f"{cfg.client_id}-doctor"[:64],
                protocol=MQTTProtocolVersion.MQTTv5 if m.protocol == "5" else MQTTProtocolVersion.MQTTv311,
            )
            _apply_auth(client, cfg, where)
    except LinkError as exc:
        return False, str(exc), "fix the [mqtt] section"
    client.on_connect, client.on_log, client.on_disconnect = on_connect, on_log, on_disconnect
    try:
        client.connect(m.host, m.port, keepalive=max(5, int(timeout_s) + 5))
    except (OSError, ValueError) as exc:
        what, fix = explain(exc, where)
        return False, what, fix
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            return (
                False,
                f"{where} accepted TCP but gave no CONNACK in {timeout_s:.0f} s",
                "check mqtt.port and mqtt.tls",
            )
        if not answer:
            what, fix = closed_before_connack(socket_error[-1] if socket_error else None, where, m.cert_file, m.ca_file)
            return False, what, fix
        code = answer[0]
        if reason_value(code) >= _REFUSED or (m.protocol != "5" and reason_value(code)):
            what, fix = refusal(code, where)
            return False, what, fix
        return True, f"MQTT CONNECT to {where} accepted ({'TLS, ' if m.tls else ''}MQTT {m.protocol})", ""
    finally:
        client.disconnect()
        client.loop_stop()
