"""The ingester of ``iaflash-central serve``: MQTT 5 shared subscription → validated events → the store.

Several ``serve`` instances subscribe to ``$share/<group>/<filter>``; the broker hands each event to
one of them. Each instance keeps a persistent session (fixed client id, session expiry), so events
queued for an instance that is down are delivered when it comes back, and acknowledges a message
(manual PUBACK) only after the store has committed it: an instance killed mid-burst loses nothing.

Site and device are taken from the topic (``<prefix>/<site>/<device>/events/<outcome>``), which the
broker's ACL binds to the device's authenticated identity, never from the payload. A payload naming
another site or device is stored under the topic's (``identity = "topic"``, the payload's site kept
in ``payload_site``) or refused (``identity = "refuse"``); both are counted. Every refused message is
stored with its reason in the ``refused`` table, then acknowledged: nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iaflash.agent.outbox.events import validate_event
from iaflash.central.connection import BrokerOptions
from iaflash.central.serve.store import Store

__all__ = ["DEFAULT_FILTER", "Ingester", "parse_topic"]

log = logging.getLogger(__name__)

DEFAULT_FILTER = "iaflash/v1/+/+/events/#"
SESSION_EXPIRY_S = 7 * 24 * 3600


def parse_topic(topic: str, prefix: str = "iaflash/v1") -> tuple[str, str, str] | None:
    """(site, device, outcome) of an event topic, or None when it is not one."""
    head = prefix.strip("/") + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 4 or parts[2] != "events" or not all(parts):
        return None
    return parts[0], parts[1], parts[3]


class Ingester:
    """One ``serve`` instance's subscriber; ``start()`` blocks until the subscription is granted."""

    def __init__(
        self,
        store: Store,
        broker: BrokerOptions,
        *,
        group: str = "central",
        topic: str = DEFAULT_FILTER,
        client_id: str = "iaflash-central-serve-1",
        identity: Literal["topic", "refuse"] = "topic",
    ) -> None:
        if broker.protocol != "5":
            raise ValueError("serve needs MQTT 5 (shared subscriptions): use --protocol 5")
        self.store, self.broker, self.identity = store, broker, identity
        self.subscription = f"$share/{group}/{topic}"
        self.prefix = topic.split("/+/", maxsplit=1)[0]
        self.client_id = client_id
        self.stored = self.duplicates = self.refused = 0
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        broker.apply(self._client)
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(1, 10)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> Ingester:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            self.broker.host, self.broker.port, keepalive=30, clean_start=False, properties=props
        )
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise TimeoutError(
                f"no subscription to {self.subscription} on {self.broker.host}:{self.broker.port} after "
                f"{timeout:.0f} s (is the broker running? do --host/--port/--tls-* match it? its ACL must "
                "allow this client to read the event topics)"
            )
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"stored": self.stored, "duplicates": self.duplicates, "refused": self.refused}

    # ----- paho callbacks -----------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.error("broker %s:%s refused the connection: %s", self.broker.host, self.broker.port, reason_code)
            return
        client.subscribe(self.subscription, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if any(getattr(rc, "is_failure", False) for rc in reason_codes):
            log.error(
                "subscription to %s refused: %s (fix: the broker's ACL for this user)", self.subscription, reason_codes
            )
            return
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self.handle(message.topic, bytes(message.payload))
        except Exception:
            # Not acknowledged: the broker redelivers it (to this session) after a reconnect.
            log.exception("could not store the message on %s; left unacknowledged for redelivery", message.topic)
            return
        client.ack(message.mid, message.qos)

    def handle(self, topic: str, payload: bytes) -> str:
        """Validate and store one message; ``stored``, ``duplicate`` or ``refused.<reason>``."""
        outcome = self._check(topic, payload)
        if len(outcome) == 2:  # (reason, message): refused
            reason, text = outcome
            log.warning("refused a message on %s: %s: %s", topic, reason, text.splitlines()[0])
            self.store.refuse(topic=topic, reason=reason, message=text, payload=payload)
            with self._lock:
                self.refused += 1
            return f"refused.{reason}"
        doc, site, device, payload_site = outcome  # type: ignore[misc]  # the accepted 4-tuple
        if payload_site is not None:
            log.warning(
                "event %s on %s names site %s in its payload; stored under the topic's",
                doc["event_id"],
                topic,
                payload_site,
            )
            self.store.count("identity_rewritten")
        stored = self.store.ingest(doc, site=site, device=device, topic=topic, payload_site=payload_site)
        with self._lock:
            if stored:
                self.stored += 1
            else:
                self.duplicates += 1
        return "stored" if stored else "duplicate"

    def _check(self, topic: str, payload: bytes) -> tuple[str, str] | tuple[dict[str, Any], str, str, str | None]:
        parsed = parse_topic(topic, self.prefix)
        if parsed is None:
            return "topic", f"{topic} is not <prefix>/<site>/<device>/events/<outcome>"
        site, device, outcome = parsed
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("payload is not a JSON object")
            validate_event(doc)
        except ValueError as exc:  # JSON, UTF-8 and schema errors are ValueErrors
            return "invalid", str(exc)
        if doc["verdict"]["outcome"] != outcome:
            return "outcome", f"verdict.outcome {doc['verdict']['outcome']!r} does not match the topic's {outcome!r}"
        named = (doc["site_id"], doc["device_id"])
        if named == (site, device):
            return doc, site, device, None
        text = f"payload names {named[0]}/{named[1]} but arrived on {site}/{device}'s topic"
        if self.identity == "refuse":
            return "identity", text + " (fix: the box's site.site_id/device_id must match its certificate)"
        payload_site = f"{named[0]}/{named[1]}"
        return {**doc, "site_id": site, "device_id": device}, site, device, payload_site
