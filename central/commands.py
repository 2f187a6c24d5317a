"""Central side of the command contract: sign a command, publish it, wait for the site's answer.

The request goes to ``<prefix>/<site>/<device>/cmd`` at QoS 1. The answer comes back on
``<prefix>/<site>/<device>/response/<client id>``: under the device's own topic root, so a broker
ACL that lets each device publish only there still lets it answer. With MQTT 5 the request carries
the response topic and correlation data as properties; with either protocol it also carries them as
``reply_to`` and ``correlation_id`` in the signed body (the MQTT 3.1.1 fallback, and a binding of
the response topic to the signature). See docs/MQTT.md#commands.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iaflash.agent.commands.protocol import SCHEMA_ID, canonical_bytes, validate_response
from iaflash.engines.signing import check_signing_role, load_private_key, sign_bytes

__all__ = ["CommandClient"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "iaflash/v1"
DEFAULT_VALIDITY_S = 300.0


class CommandClient:
    """Sends signed commands to sites and returns their responses. Use as a context manager."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        protocol: Literal["5", "3.1.1"] = "5",
        private_key_path: Path | None,
        signer: str | None = None,
        topic_prefix: str = DEFAULT_PREFIX,
        validity_s: float = DEFAULT_VALIDITY_S,
        configure: Callable[[mqtt.Client], None] | None = None,
    ) -> None:
        """``configure`` sets TLS and credentials on the paho client (``BrokerOptions.apply``)."""
        self.host, self.port, self.protocol, self.prefix = host, port, protocol, topic_prefix
        self.validity_s = validity_s
        if private_key_path is not None:  # boxes trust command keys only from trust_dir/commands/
            check_signing_role(private_key_path, "commands")
        self._key = load_private_key(private_key_path) if private_key_path is not None else None
        self.signer = signer or (Path(private_key_path).stem if private_key_path is not None else "unsigned")
        self.client_id = f"iaflash-central-cmd-{uuid.uuid4().hex[:12]}"
        self._responses: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._started = False
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311,
        )
        if configure is not None:
            configure(self._client)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # ----- connection -----------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> CommandClient:
        """Connect and subscribe to this client's response topics; TimeoutError if the broker is silent."""
        if not self._started:
            self._client.connect_async(self.host, self.port, keepalive=30)
            self._client.loop_start()
            self._started = True
        if not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(
                f"no answer from the broker {self.host}:{self.port} after {timeout:.0f} s "
                "(is it running? check --host and --port)"
            )
        return self

    def close(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False
        self._subscribed.clear()

    def __enter__(self) -> CommandClient:
        return self.connect()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("broker %s:%s refused the connection: %s", self.host, self.port, reason_code)
            return
        client.subscribe(f"{self.prefix}/+/+/response/{self.client_id}", qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if any(getattr(rc, "is_failure", False) for rc in reason_codes):
            log.error(
                "broker %s:%s refused the subscription to the response topic: %s (fix: check its ACL)",
                self.host,
                self.port,
                reason_codes,
            )
            return
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(message.payload)
        except ValueError as exc:
            log.warning("response on %s is not JSON, ignored: %s", message.topic, str(exc)[:200])
            return
        corr = getattr(getattr(message, "properties", None), "CorrelationData", None)
        key = bytes(corr).decode("utf-8", "replace") if corr else None
        key = key or (doc.get("correlation_id") if isinstance(doc, dict) else None)
        if isinstance(key, str):
            with self._cond:
                self._responses[key] = doc
                self._cond.notify_all()

    # ----- commands ---------------------------------------------------------------------------
    def response_topic(self, site: str, device: str) -> str:
        return f"{self.prefix}/{site}/{device}/response/{self.client_id}"

    def build(
        self,
        site: str,
        device: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        issued_at: datetime | None = None,
        validity_s: float | None = None,
    ) -> dict[str, Any]:
        """A signed ``iaflash.command/1`` document (unsigned when the client has no key)."""
        issued = issued_at or datetime.now(timezone.utc)
        doc: dict[str, Any] = {
            "schema": SCHEMA_ID,
            "command_id": str(uuid.uuid4()),
            "target": {"site_id": site, "device_id": device},
            "command": command,
            "args": args or {},
            "issued_at": issued.isoformat(timespec="milliseconds"),
            "expires_at": (issued + timedelta(seconds=validity_s or self.validity_s)).isoformat(
                timespec="milliseconds"
            ),
            "reply_to": self.response_topic(site, device),
            "correlation_id": str(uuid.uuid4()),
        }
        return self.sign(doc)

    def sign(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` with a fresh ``signature`` over its canonical JSON (without ``signature``)."""
        if self._key is None:
            return {k: v for k, v in doc.items() if k != "signature"}
        return {**doc, "signature": sign_bytes(canonical_bytes(doc), self._key, self.signer)}

    def send(
        self, site: str, device: str, command: str, args: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Sign and send one command; the site's response document. TimeoutError if none came."""
        return self.send_document(site, device, self.build(site, device, command, args), timeout)

    def send_document(
        self,
        site: str,
        device: str,
        doc: dict[str, Any] | bytes,
        timeout: float = 30.0,
        *,
        correlation_id: str | None = None,
    ) -> dict[str, Any]:
        """Publish a prepared request (a document, or raw bytes with ``correlation_id``) and wait."""
        if isinstance(doc, dict):
            correlation_id = correlation_id or doc.get("correlation_id")
            payload = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        else:
            payload = doc
        if not isinstance(correlation_id, str):
            raise ValueError("a correlation_id is needed to match the response")
        if not self._started:
            self.connect()
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
            props.ResponseTopic = self.response_topic(site, device)
            props.CorrelationData = correlation_id.encode("utf-8")
        with self._cond:
            self._responses.pop(correlation_id, None)
        self._client.publish(f"{self.prefix}/{site}/{device}/cmd", payload, qos=1, properties=props)
        with self._cond:
            if not self._cond.wait_for(lambda: correlation_id in self._responses, timeout):
                raise TimeoutError(
                    f"no response from {site}/{device} within {timeout:.0f} s (is the agent "
                    "online? see its retained status topic)"
                )
            response = self._responses.pop(correlation_id)
        validate_response(response)
        return response
