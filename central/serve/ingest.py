"""The ingester of ``iaflash-central serve``: MQTT 5 shared subscription → validated events → the store.

Several ``serve`` instances subscribe to ``$share/<group>/<filter>``; the broker hands each event to
one of them. Each instance keeps a persistent session (fixed client id, session expiry), so events
queued for an instance that is down are delivered when it comes back, and acknowledges a message
(manual PUBACK) only after the store has committed it: an instance killed mid-burst loses nothing.
paho's network thread only enqueues; one writer thread stores everything waiting in ONE transaction
(group commit, one fsync per batch) and then acknowledges each message of the batch. A store that
fails (database down) is retried with backoff, nothing acknowledged meanwhile.

Site and device are taken from the topic (``<prefix>/<site>/<device>/events/<outcome>``), which the
broker's ACL binds to the device's authenticated identity, never from the payload. A payload naming
another site or device is stored under the topic's (``identity = "topic"``, the payload's site kept
in ``payload_site``) or refused (``identity = "refuse"``); both are counted. Every refused message is
stored with its reason in the ``refused`` table, then acknowledged: nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iaflash.agent.outbox.events import validate_event
from iaflash.central.connection import BrokerOptions
from iaflash.central.serve.store import Accepted, Refused, Store

__all__ = ["DEFAULT_FILTER", "Ingester", "parse_topic"]

log = logging.getLogger(__name__)

DEFAULT_FILTER = "iaflash/v1/+/+/events/#"
SESSION_EXPIRY_S = 7 * 24 * 3600
MAX_BATCH = 500


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
        self._inbox: queue.Queue[tuple[int, int, str, bytes]] = queue.Queue()
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="serve-writer", daemon=True)
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
        self._writer.start()
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
        """Disconnect, then store what was received (its PUBACKs may not go out: the broker resends)."""
        self._client.disconnect()
        self._client.loop_stop()
        self._stopping.set()
        if self._writer.is_alive():
            self._writer.join(30)

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
        # paho's network thread only enqueues; the writer thread stores and acknowledges.
        self._inbox.put((message.mid, message.qos, message.topic, bytes(message.payload)))

    def _write_loop(self) -> None:
        """Group commit: everything waiting is stored in one transaction, then each message is acknowledged."""
        while not self._stopping.is_set() or not self._inbox.empty():
            try:
                batch = [self._inbox.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            self._store_until_done(batch)

    def _store_until_done(self, batch: list[tuple[int, int, str, bytes]]) -> None:
        delay = 0.5
        while True:
            try:
                self.handle_many([(topic, payload) for _, _, topic, payload in batch])
                break
            except Exception:
                # Not acknowledged: kept by the broker for this session; retried here until the store is back.
                log.exception(
                    "could not store %d message(s); retrying in %.1f s (nothing acknowledged)", len(batch), delay
                )
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, 30.0)
        for mid, qos, _, _ in batch:
            self._client.ack(mid, qos)

    def handle(self, topic: str, payload: bytes) -> str:
        """Validate and store one message; ``stored``, ``duplicate`` or ``refused.<reason>``."""
        return self.handle_many([(topic, payload)])[0]

    def handle_many(self, messages: list[tuple[str, bytes]]) -> list[str]:
        """Validate and store messages in one transaction; for each ``stored``, ``duplicate`` or ``refused.<r>``."""
        items: list[Accepted | Refused] = []
        for topic, payload in messages:
            item = self._check(topic, payload)
            if isinstance(item, Refused):
                log.warning("refused a message on %s: %s: %s", topic, item.reason, item.message.splitlines()[0])
            elif item.payload_site is not None:
                log.warning(
                    "event %s on %s names %s in its payload; stored under the topic's",
                    item.doc["event_id"], topic, item.payload_site,
                )  # fmt: skip
            items.append(item)
        added = self.store.write_batch(items)
        outcomes = []
        with self._lock:
            for item, new in zip(items, added, strict=True):
                if isinstance(item, Refused):
                    self.refused += 1
                    outcomes.append(f"refused.{item.reason}")
                elif new:
                    self.stored += 1
                    outcomes.append("stored")
                else:
                    self.duplicates += 1
                    outcomes.append("duplicate")
        return outcomes

    def _check(self, topic: str, payload: bytes) -> Accepted | Refused:
        parsed = parse_topic(topic, self.prefix)
        if parsed is None:
            return Refused(topic, "topic", f"{topic} is not <prefix>/<site>/<device>/events/<outcome>", payload)
        site, device, outcome = parsed
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("payload is not a JSON object")
            validate_event(doc)
        except ValueError as exc:  # JSON, UTF-8 and schema errors are ValueErrors
            return Refused(topic, "invalid", str(exc), payload)
        if doc["verdict"]["outcome"] != outcome:
            text = f"verdict.outcome {doc['verdict']['outcome']!r} does not match the topic's {outcome!r}"
            return Refused(topic, "outcome", text, payload)
        named = (doc["site_id"], doc["device_id"])
        if named == (site, device):
            return Accepted(doc, site, device, topic)
        text = f"payload names {named[0]}/{named[1]} but arrived on {site}/{device}'s topic"
        if self.identity == "refuse":
            return Refused(
                topic, "identity", text + " (fix: the box's site.site_id/device_id must match its certificate)", payload
            )
        return Accepted({**doc, "site_id": site, "device_id": device}, site, device, topic, f"{named[0]}/{named[1]}")
