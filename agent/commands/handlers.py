"""Signed commands from central: verify, execute, answer (contract: docs/MQTT.md#commands).

paho hands each message on ``<topic_root>/cmd`` to :meth:`iaflash.agent.link.mqtt.MqttLink.enable_commands`'s
queue and returns at once. :class:`CommandWorker`'s thread takes it from there and checks, in order:
size and JSON (``invalid``), the schema ``command.v1.json`` (``invalid``), the Ed25519 signature over
the canonical body by a key of role ``commands`` of ``security.trust_dir``, with the box's applied
revocation list (``bad_signature``/``untrusted_key``/``wrong_role``/``expired_key``/``revoked_key``),
the signed target (``wrong_target``), the validity window (``expired``/``invalid``), the command id
against the replay store (``replayed``), and the name (``unknown_command``). The target check
makes the per-box replay store enough fleet-wide: a command runs on the one box it names, once.
``revoke_keys`` applies a revocation list (signed by a ``revocation`` key) to the box's trust
state; an older list is refused (``rollback``), as is an older registry file (``registry_sync``).
Fast commands (ping, status) run on that thread; slow ones (send_evidence,
registry_sync) on one more thread, so a registry import never delays a ping. Every answer follows
``response.v1.json`` and never carries a plate in clear; every refusal is counted and logged once.
send_evidence sends only anonymised images (:mod:`iaflash.agent.evidence.anonymise`, docs/EVIDENCE.md):
when anonymising fails the command answers an error and the stored image never leaves the box.
``reload`` is registered by the service (:meth:`iaflash.agent.service.Service.reload`), which owns the
models; a worker without a service answers it ``unknown_command``. After a reload,
:meth:`CommandWorker.models_reloaded` has the evidence detectors loaded again from their paths.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from iaflash.agent.capture.sidecar import CAPTURE_ID_RE, IMAGE_NAME_RE, parse_timestamp
from iaflash.agent.commands.protocol import (
    CLOCK_SKEW_S,
    COMMAND_ROLE,
    FIX_SIGN,
    MAX_FILE_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_VALIDITY_S,
    RESPONSE_SCHEMA_ID,
    SLOW,
    Handler,
    ReplayStore,
    canonical_bytes,
    parse_command,
    validate_command,
    validate_response,
)
from iaflash.agent.config import Config
from iaflash.agent.errors import (
    AnonymiseError,
    CommandError,
    IaflashError,
    KeyExpired,
    KeyRevoked,
    LinkError,
    PlateError,
    RollbackRefused,
    SignatureError,
    UntrustedKey,
    WrongRole,
)
from iaflash.agent.evidence.anonymise import anonymise_jpeg
from iaflash.agent.evidence.detector import BundleFinder, load_finder
from iaflash.agent.evidence.vehicle_box import VehicleLocator, load_locator
from iaflash.agent.link.mqtt import InboundMessage, MqttLink
from iaflash.agent.registry.cache import import_signed_subset
from iaflash.agent.registry.plates import key_id, plate_key
from iaflash.engines.signing import TrustState, TrustStore, Verified, install_revocations

__all__ = ["CommandWorker"]

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """Where and how to answer one request."""

    topic: str | None
    correlation_data: bytes | None
    correlation_id: str | None = None
    command_id: str | None = None
    command: str | None = None

    @classmethod
    def of(cls, msg: InboundMessage, doc: dict[str, Any] | None) -> Reply:
        text: dict[str, str] = {k: v for k, v in (doc or {}).items() if isinstance(v, str) and v}
        cid = text.get("correlation_id")
        if cid is None and msg.correlation_data is not None:
            with contextlib.suppress(UnicodeDecodeError):
                cid = msg.correlation_data.decode("utf-8")
        topic = msg.response_topic or text.get("reply_to")
        if topic is not None and ("#" in topic or "+" in topic or "\0" in topic):
            topic = None
        return cls(topic, msg.correlation_data, cid, text.get("command_id"), text.get("command"))


class CommandWorker:
    """Verifies and executes the commands the link receives; answers each one on its response topic."""

    def __init__(
        self,
        cfg: Config,
        link: MqttLink,
        *,
        heartbeat: Callable[[], dict[str, Any]],
        hmac_key: bytes,
        version: str,
        done_dir: Path,
        replay_db: Path | None = None,
    ) -> None:
        self.cfg, self.link, self.heartbeat = cfg, link, heartbeat
        self.version, self.done_dir, self._hmac_key = version, Path(done_dir), hmac_key
        self.replay = ReplayStore(replay_db or cfg.outbox.db.with_name("commands.db"))
        self._inbox = link.enable_commands()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iaflash-cmd-slow")
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(("received", "ok", "refused", "no_reply_to", "response_errors"), 0)
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        self._finder: BundleFinder | None = None  # evidence.detector_bundle, loaded on first use
        self._locator: VehicleLocator | None = None  # model.detector_bundle on a CPU session, on first use
        for name, handler in (
            ("ping", self._ping),
            ("status", self._status),
            ("send_evidence", self._send_evidence),
            ("registry_sync", self._registry_sync),
            ("revoke_keys", self._revoke_keys),
        ):
            self.register(name, handler, slow=name in SLOW)

    def register(self, command: str, handler: Handler, *, slow: bool) -> None:
        """Add or replace a command; ``slow`` ones run on the second thread. ``handler(args) -> result``."""
        self._handlers[command] = (handler, slow)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="iaflash-commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking commands; wait for the one running (queued slow ones are cancelled, unanswered)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._slow.shutdown(wait=True, cancel_futures=True)
        self.replay.close()
        for loaded in (self._finder, self._locator):
            if loaded is not None:
                loaded.close()

    def models_reloaded(self) -> None:
        """The bundles may have moved (a reload): the evidence detectors are loaded again on their next use.

        Queued on the slow thread, so a send_evidence using them now finishes first.
        """
        with contextlib.suppress(RuntimeError):  # the worker is stopping: nothing left to reload
            self._slow.submit(self._forget_detectors)

    def _forget_detectors(self) -> None:
        finder, locator, self._finder, self._locator = self._finder, self._locator, None, None
        for loaded in (finder, locator):
            if loaded is not None:
                loaded.close()

    def counters(self) -> dict[str, int]:
        """received, ok, refused, ``refused.<code>``, no_reply_to, response_errors and dropped (queue full)."""
        with self._lock:
            return {**self._counts, "dropped": self.link.commands_dropped}

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    # ----- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._handle(msg)
            except Exception:  # the worker must outlive any bug in one command
                log.exception("command worker: unexpected error; the command was dropped")

    def _handle(self, msg: InboundMessage) -> None:
        self._count("received")
        reply = Reply.of(msg, None)
        try:
            doc = parse_command(msg.payload)
            reply = Reply.of(msg, doc)
            handler, slow = self._accept(doc, msg)
        except CommandError as exc:
            self._refuse(reply, exc)
            return
        if slow:
            self._slow.submit(self._execute, handler, doc["args"], reply)
        else:
            self._execute(handler, doc["args"], reply)

    def _accept(self, doc: dict[str, Any], msg: InboundMessage) -> tuple[Handler, bool]:
        """Every check before execution, in the documented order; raises CommandError."""
        validate_command(doc)
        if msg.response_topic and doc.get("reply_to") not in (None, msg.response_topic):
            raise CommandError(
                "invalid",
                "the MQTT 5 response topic differs from the signed reply_to; fix: send both with the same topic",
            )
        verified = self._check_signature(doc)
        self._check_target(doc)
        expires = self._check_window(doc)
        if not self.replay.first_time(doc["command_id"], expires):
            raise CommandError(
                "replayed",
                f"command {doc['command_id']} was already received; fix: send a new command (new command_id)",
            )
        found = self._handlers.get(doc["command"])
        if found is None:
            raise CommandError(
                "unknown_command",
                f"this agent ({self.version}) has no command "
                f"{doc['command']!r}; it knows {', '.join(sorted(self._handlers))}",
            )
        log.info(
            "command %s %s accepted (signed by %s)",
            doc["command_id"],
            doc["command"],
            verified.name if verified else "nobody: security.allow_unsigned",
        )
        return found

    def _check_signature(self, doc: dict[str, Any]) -> Verified | None:
        sec, what = self.cfg.security, f"command {doc['command_id']}"
        if "signature" not in doc or (sec.allow_unsigned and not Path(sec.trust_dir).is_dir()):
            if sec.allow_unsigned:
                log.warning("%s is NOT signed or not checked; accepted because security.allow_unsigned = true", what)
                return None
            raise CommandError("bad_signature", f"{what} is not signed; fix: {FIX_SIGN}")
        try:
            trust = TrustStore.from_dir(sec.trust_dir, state=TrustState(self.cfg.trust_state_file))
            return trust.check(canonical_bytes(doc), doc["signature"], role=COMMAND_ROLE, what=what)
        except SignatureError as exc:
            raise trust_refusal(exc, " (security.trust_dir)") from exc

    def _check_target(self, doc: dict[str, Any]) -> None:
        """The signed target must be this box: a command signed for another box never runs here."""
        target, site = doc["target"], self.cfg.site
        if (target["site_id"], target["device_id"]) != (site.site_id, site.device_id):
            raise CommandError(
                "wrong_target",
                f"command {doc['command_id']} is signed for {target['site_id']}/{target['device_id']}, "
                f"this box is {site.site_id}/{site.device_id}; fix: sign a command for this box "
                f"(iaflash-central cmd {site.site_id} {site.device_id} ...)",
            )

    def _check_window(self, doc: dict[str, Any]) -> float:
        """The expiry as a POSIX time, after checking issued_at <= now (+skew) < expires_at."""
        try:
            issued, expires = parse_timestamp(doc["issued_at"]), parse_timestamp(doc["expires_at"])
        except ValueError as exc:
            raise CommandError("invalid", f"issued_at/expires_at: {exc}") from exc
        now = datetime.now(timezone.utc)
        if expires <= now:
            raise CommandError(
                "expired",
                f"command {doc['command_id']} expired at {doc['expires_at']} "
                f"(agent time {now.isoformat(timespec='seconds')}); fix: send a new command, "
                "and check both clocks (NTP)",
            )
        if (issued - now).total_seconds() > CLOCK_SKEW_S:
            raise CommandError(
                "invalid",
                f"issued_at {doc['issued_at']} is in the future (agent time "
                f"{now.isoformat(timespec='seconds')}); fix: check both clocks (NTP)",
            )
        if not 0 < (expires - issued).total_seconds() <= MAX_VALIDITY_S:
            raise CommandError(
                "invalid",
                f"expires_at must follow issued_at by at most {MAX_VALIDITY_S} s; fix: send a shorter-lived command",
            )
        return expires.timestamp()

    def _execute(self, handler: Handler, args: dict[str, Any], reply: Reply) -> None:
        try:
            result = handler(args)
        except CommandError as exc:
            self._refuse(reply, exc)
            return
        except (IaflashError, OSError) as exc:
            self._refuse(reply, CommandError("failed", str(exc)))
            return
        except Exception as exc:  # a bug in one command must not kill the worker; it is answered and logged
            log.exception("command %s %s crashed", reply.command_id, reply.command)
            self._refuse(reply, CommandError("failed", f"internal error {type(exc).__name__}; see the agent's log"))
            return
        self._count("ok")
        self._send(reply, {"ok": True, "result": result})

    def _refuse(self, reply: Reply, exc: CommandError) -> None:
        self._count("refused")
        self._count(f"refused.{exc.code}")
        log.warning("command %s %s refused: %s: %s", reply.command_id, reply.command, exc.code, exc)
        self._send(reply, {"ok": False, "error": {"code": exc.code, "message": str(exc)}})

    def _send(self, reply: Reply, outcome: dict[str, Any]) -> None:
        if reply.topic is None:
            self._count("no_reply_to")
            log.warning(
                "command %s: no usable response topic (MQTT 5 property or reply_to); not answered", reply.command_id
            )
            return
        doc = {
            "schema": RESPONSE_SCHEMA_ID,
            "command_id": reply.command_id,
            "correlation_id": reply.correlation_id,
            "command": reply.command,
            "site_id": self.cfg.site.site_id,
            "device_id": self.cfg.site.device_id,
            "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            **outcome,
        }
        try:
            validate_response(doc)
            self.link.respond(
                reply.topic, json.dumps(doc, separators=(",", ":")).encode("utf-8"), reply.correlation_data
            )
        except (CommandError, LinkError) as exc:
            self._count("response_errors")
            log.error("command %s: cannot publish the response: %s", reply.command_id, exc)

    # ----- the commands ---------------------------------------------------------------------
    def _ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": self.version, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}

    def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.heartbeat()

    def _send_evidence(self, args: dict[str, Any]) -> dict[str, Any]:
        capture_id = args.get("capture_id")
        if not isinstance(capture_id, str) or not CAPTURE_ID_RE.fullmatch(capture_id):
            raise CommandError(
                "invalid",
                f"args.capture_id {str(capture_id)[:80]!r} is not a capture id "
                f"(pattern {CAPTURE_ID_RE.pattern}); fix: copy it from the event",
            )
        sidecar_path = self.done_dir / f"{capture_id}.json"
        if sidecar_path.resolve().parent != self.done_dir.resolve() or not sidecar_path.is_file():
            raise CommandError(
                "not_found",
                f"capture {capture_id} is not in done/ (never processed, or "
                f"purged after spool.retention_days = {self.cfg.spool.retention_days})",
            )
        sidecar = _parse_sidecar(sidecar_path)
        listed = sidecar.get("images")
        names = [
            n
            for n in (listed if isinstance(listed, list) else [f"{capture_id}.jpg"])
            if isinstance(n, str) and IMAGE_NAME_RE.fullmatch(n) and (self.done_dir / n).is_file()
        ]
        if not names:
            raise CommandError("not_found", f"capture {capture_id}: its image is no longer in done/")
        images, anonymisation = self._anonymised(capture_id, names, sidecar)
        plate, sidecar["plate_key"] = sidecar.pop("plate", None), None  # never in clear: its HMAC, as in events
        with contextlib.suppress(PlateError):
            sidecar["plate_key"] = plate_key(self._hmac_key, plate).hex() if isinstance(plate, str) else None
        return {"capture_id": capture_id, "sidecar": sidecar, "images": images, "anonymisation": anonymisation}

    def _anonymised(
        self, capture_id: str, names: list[str], sidecar: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Each image masked and re-encoded as ``evidence.*`` says; any failure sends nothing (docs/EVIDENCE.md)."""
        policy = self.cfg.evidence
        images, records, withheld = [], [], []
        try:
            if self._finder is None and policy.detector_bundle is not None:
                self._finder = load_finder(self.cfg)  # refused clearly; retried by the next command
            for i, name in enumerate(names):
                data = (self.done_dir / name).read_bytes()
                vehicle_box, source = self._vehicle_box(data, sidecar, name, first=i == 0)
                if vehicle_box is None:
                    if policy.no_vehicle_box == "refuse":
                        raise CommandError("failed", _no_box(capture_id, name, source))
                    withheld.append({"name": name, "reason": f"no vehicle box ({source})"})
                    continue
                done = anonymise_jpeg(data, vehicle_box=vehicle_box, policy=policy, finder=self._finder, name=name)
                images.append(_image(name, done.jpeg))
                records.append({**done.record, "vehicle_box_source": source})
        except AnonymiseError as exc:
            self._count("evidence.anonymise_failed")
            raise CommandError("failed", f"capture {capture_id}: not sent, anonymisation failed: {exc}") from exc
        if not images:
            raise CommandError("failed", _no_box(capture_id, ", ".join(names), "every image withheld"))
        return images, {"images": records, "withheld": withheld}

    def _vehicle_box(
        self, data: bytes, sidecar: dict[str, Any], name: str, *, first: bool
    ) -> tuple[Sequence[float] | None, str]:
        """The reviewed vehicle's box in this image and where it came from (the radar's, else the detector's)."""
        box = sidecar.get("vehicle_box")
        if first and _is_box(box):
            return box, "sidecar"  # the radar's box is in the first image's pixels
        if self.cfg.model.detector_bundle is None:
            return None, "the sidecar has none for this image and no vehicle detector is configured"
        if self._locator is None:
            self._locator = load_locator(self.cfg)  # refused clearly; retried by the next command
        assert self._locator is not None  # model.detector_bundle is set
        found, reason = self._locator.locate(data, sidecar, name)
        return found, f"detector: {reason}"

    def _registry_sync(self, args: dict[str, Any]) -> dict[str, Any]:
        data, signature = _b64(args.get("file_b64")), args.get("signature")
        if signature is not None and not isinstance(signature, dict):
            raise CommandError("invalid", "args.signature must be the .sig JSON document of the file")
        db = self.cfg.registry.db
        tmp = Path(tempfile.mkdtemp(prefix=".cmd-sync-", dir=db.parent))  # 0700, beside the cache
        try:
            file = tmp / "subset.jsonl.gz"
            file.write_bytes(data)
            if signature is not None:
                file.with_name(file.name + ".sig").write_text(json.dumps(signature), encoding="utf-8")
            sec = self.cfg.security
            state, signer = import_signed_subset(
                db,
                file,
                trust_dir=sec.trust_dir,
                allow_unsigned=sec.allow_unsigned,
                expected_key_id=key_id(self._hmac_key),
                state_file=self.cfg.trust_state_file,
            )
        except SignatureError as exc:
            raise trust_refusal(exc) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"state": state.to_dict(), "signer": signer}

    def _revoke_keys(self, args: dict[str, Any]) -> dict[str, Any]:
        """Apply the signed revocation list in ``args.list`` (role revocation; never an older one)."""
        doc = args.get("list")
        if not isinstance(doc, dict):
            raise CommandError(
                "invalid",
                "args.list must be the revocation list document; fix: "
                "`iaflash-central cmd SITE DEVICE revoke_keys --revocations LIST.json --key COMMANDS.key`",
            )
        try:
            parsed, changed = install_revocations(
                doc, self.cfg.security.trust_dir, TrustState(self.cfg.trust_state_file), where="args.list"
            )
        except SignatureError as exc:
            raise trust_refusal(exc) from exc
        return {**parsed.summary(), "changed": changed}


_TRUST_CODES: tuple[tuple[type[SignatureError], str], ...] = (
    (RollbackRefused, "rollback"),
    (KeyRevoked, "revoked_key"),
    (KeyExpired, "expired_key"),
    (WrongRole, "wrong_role"),
    (UntrustedKey, "untrusted_key"),
)


def trust_refusal(exc: SignatureError, suffix: str = "") -> CommandError:
    """The command error of a trust refusal: its code says which (``bad_signature`` for the rest)."""
    code = next((c for cls, c in _TRUST_CODES if isinstance(exc, cls)), "bad_signature")
    return CommandError(code, f"{exc}{suffix}")


def _b64(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_PAYLOAD_BYTES:
        raise CommandError(
            "invalid", f"args.file_b64 must be the base64 of the gzip subset file (at most {MAX_FILE_BYTES} bytes)"
        )
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CommandError("invalid", f"args.file_b64 is not base64: {exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise CommandError(
            "invalid",
            f"the subset file is {len(data)} bytes, over {MAX_FILE_BYTES}; "
            "fix: copy it on site with `iaflash-provision registry import`",
        )
    return data


def _parse_sidecar(path: Path) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        doc = json.loads(path.read_bytes())
        if isinstance(doc, dict):
            return doc
    raise CommandError("failed", f"{path.name}: the sidecar in done/ is not a JSON object; fix: inspect it")


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _no_box(capture_id: str, names: str, why: str) -> str:
    return (
        f"capture {capture_id}: image {names} has no vehicle box ({why}; the sidecar's vehicle_box covers "
        "the first image only), so it cannot be anonymised and is not sent; fix: have the radar write "
        'vehicle_box, configure model.detector_bundle, or set evidence.no_vehicle_box = "withhold" to send '
        "the other images"
    )


def _image(name: str, data: bytes) -> dict[str, Any]:
    return {
        "name": name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "jpeg_b64": base64.b64encode(data).decode("ascii"),
    }
