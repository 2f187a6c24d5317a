"""Reference subscriber for central: receives events, validates them, dedupes on ``event_id``.

Delivery from the sites is at least once, so the same event may arrive twice (after a broker
outage or an agent restart); :class:`Subscriber` keeps the first copy and counts the others.
A message that is not a valid ``iaflash.event/1`` document is kept aside in ``invalid`` with the
reason; it never stops the subscriber.

With ``client_id`` set, the subscriber uses a persistent session (MQTT 5 ``clean_start=False``
with a session expiry; MQTT 3.1.1 ``clean_session=False``): QoS 1 events published while it is
disconnected are queued by the broker and delivered when it comes back.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iaflash.agent.outbox.events import validate_event

__all__ = ["DEFAULT_FILTER", "InvalidMessage", "Subscriber"]

log = logging.getLogger(__name__)

DEFAULT_FILTER = "iaflash/v1/+/+/events/#"
SESSION_EXPIRY_S = 7 * 24 * 3600


@dataclass(frozen=True)
class InvalidMessage:
    """A message that is not a valid event, kept for inspection."""

    topic: str
    payload: bytes
    error: str


class Subscriber:
    """Subscribe to event topics with QoS 1; ``events`` holds each distinct event once, in order."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        protocol: Literal["5", "3.1.1"] = "5",
        topic: str = DEFAULT_FILTER,
        client_id: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        configure: Callable[[mqtt.Client], None] | None = None,
    ) -> None:
        """``configure`` sets TLS and credentials on the paho client (``BrokerOptions.apply``)."""
        self.host, self.port, self.protocol, self.topic = host, port, protocol, topic
        self.persistent = client_id is not None
        self.client_id = client_id or f"iaflash-central-{uuid.uuid4().hex[:12]}"
        self.on_event = on_event
        self.duplicates = 0
        self._events: list[dict[str, Any]] = []
        self._invalid: list[InvalidMessage] = []
        self._seen: set[str] = set()
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        v5 = protocol == "5"
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else not self.persistent,
        )
        if configure is not None:
            configure(self._client)
        self._client.reconnect_delay_set(1, 10)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    @property
    def events(self) -> list[dict[str, Any]]:
        """Distinct valid events in arrival order (a copy)."""
        with self._cond:
            return list(self._events)

    @property
    def invalid(self) -> list[InvalidMessage]:
        with self._cond:
            return list(self._invalid)

    @property
    def event_ids(self) -> set[str]:
        with self._cond:
            return set(self._seen)

    def start(self, timeout: float = 10.0) -> Subscriber:
        """Connect and wait until the subscription is granted; raises TimeoutError otherwise."""
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
            props.SessionExpiryInterval = SESSION_EXPIRY_S if self.persistent else 0
        clean_start: mqtt.CleanStartOption = mqtt.MQTT_CLEAN_START_FIRST_ONLY  # 3.1.1: clean_session
        if self.protocol == "5":
            clean_start = not self.persistent
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=clean_start, properties=props)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise TimeoutError(
                f"no subscription to {self.topic} on {self.host}:{self.port} "
                f"after {timeout:.0f} s (is the broker running?)"
            )
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait_for(self, n: int, timeout: float) -> bool:
        """True once ``n`` distinct events were received; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._events) >= n, timeout)

    # ----- paho callbacks -----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("broker %s:%s refused the connection: %s", self.host, self.port, reason_code)
            return
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if all(not getattr(rc, "is_failure", False) for rc in reason_codes):
            self._subscribed.set()
        else:
            log.error("subscription to %s refused: %s", self.topic, reason_codes)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("payload is not a JSON object")
            validate_event(doc)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("invalid event on %s: %s", message.topic, str(exc).splitlines()[0])
            with self._cond:
                self._invalid.append(InvalidMessage(message.topic, payload, str(exc)))
            return
        self._accept(doc)

    def _accept(self, doc: dict[str, Any]) -> None:
        with self._cond:
            if doc["event_id"] in self._seen:
                self.duplicates += 1
                return
            self._seen.add(doc["event_id"])
            self._events.append(doc)
            self._cond.notify_all()
        if self.on_event is not None:
            try:
                self.on_event(doc)
            except Exception:
                log.exception("on_event callback failed for event %s", doc["event_id"])
