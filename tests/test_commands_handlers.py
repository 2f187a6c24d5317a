"""Signed commands over MQTT: a real mosquitto, real SQLite, real Ed25519 signatures, real files.

A small real agent (MqttLink + CommandWorker over a real registry cache and spool) answers most
tests; one test runs the whole Service on the demo models. Central is the real CommandClient.
The trust store has one folder per role (docs/SIGNING.md#roles): central's key signs commands,
the registry publisher's key signs subset files, the revocation authority's key signs revocation lists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from anonymise_scenes import make_scene
from click.testing import CliRunner
from e2e_site import build_models, make_site
from waiting import wait_until

from iaflash.agent.commands.handlers import CommandWorker
from iaflash.agent.commands.protocol import canonical_bytes, validate_command, validate_response
from iaflash.agent.config import Config, parse_config
from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.evidence.anonymise import ANONYMISER_VERSION, FILL_BGR, metadata_segments
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.registry.cache import Registry, import_subset, read_state, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id, plate_key
from iaflash.agent.service import Service
from iaflash.central.cli import main as central_main
from iaflash.central.commands import CommandClient
from iaflash.engines.keys import read_public_key
from iaflash.engines.revocation import build_revocation_list
from iaflash.engines.signing import TrustState, generate_keypair, load_private_key, sign_bytes, sign_file

SITE, DEVICE = "site-1", "box-1"
PLATE = "AB-123-CD"
NEW_PLATE = "EF-456-GH"
CAPTURE = "20261102-081500-000123"


@dataclass
class Keys:
    central: Path  # trusted private key, role commands
    stranger: Path  # a valid key outside the trust store
    trust: Path
    registry: Path  # role registry: signs subset files
    models: Path  # role models: trusted, but never for a command
    revocation: Path  # role revocation: signs revocation lists
    expired: Path  # role commands, not_after an hour ago


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    trust = tmp_path / "trust"
    made = {}
    for name, role in (
        ("central", "commands"),
        ("registry", "registry"),
        ("models", "models"),
        ("revocation", "revocation"),
    ):
        made[name], pub = generate_keypair(tmp_path / name, role=role)
        (trust / role).mkdir(parents=True, exist_ok=True)
        shutil.copy(pub, trust / role / pub.name)
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    made["expired"], pub = generate_keypair(tmp_path / "expired", role="commands", not_after=past)
    shutil.copy(pub, trust / "commands" / pub.name)
    stranger, _ = generate_keypair(tmp_path / "stranger")
    return Keys(trust=trust, stranger=stranger, **made)


SCENE = make_scene(480, 400)  # the reviewed vehicle, its driver, its plate, another car's plate, a pedestrian


def write_capture(done: Path, *, vehicle_box: bool = True, jpeg: bytes | None = None) -> bytes:
    """A processed capture in done/: a real JPEG and its sidecar (with the plate in clear and the radar's box)."""
    done.mkdir(parents=True, exist_ok=True)
    jpeg = SCENE.jpeg if jpeg is None else jpeg
    (done / f"{CAPTURE}.jpg").write_bytes(jpeg)
    sidecar: dict[str, Any] = {
        "schema_version": 1,
        "capture_id": CAPTURE,
        "site_id": SITE,
        "captured_at": "2026-11-02T08:15:00+01:00",
        "plate": PLATE,
        "plate_confidence": 0.93,
        "speed_kmh": 97,
        "limit_kmh": 80,
    }
    if vehicle_box:
        sidecar["vehicle_box"] = list(SCENE.vehicle)
    (done / f"{CAPTURE}.json").write_text(json.dumps(sidecar))
    return jpeg


class Agent:
    """A real MqttLink + CommandWorker over a real registry cache and spool in ``root``."""

    def __init__(
        self,
        root: Path,
        port: int,
        keys: Keys,
        protocol: str = "5",
        allow_unsigned: bool = False,
        evidence: dict[str, Any] | None = None,
        device: str = DEVICE,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.hmac = root, secrets.token_bytes(32)
        self.cfg: Config = parse_config(
            {
                "site": {"site_id": SITE, "device_id": device},
                "spool": {"dir": str(root / "spool")},
                "registry": {"db": str(root / "registry.db")},
                "outbox": {"db": str(root / "state.db")},
                "security": {"trust_dir": str(keys.trust), "allow_unsigned": allow_unsigned},
                "mqtt": {"port": port, "protocol": protocol},
                "evidence": evidence or {},
            }
        )
        snapshot = root / "snapshot.jsonl.gz"
        write_subset(
            snapshot,
            kind="snapshot",
            dataset_id="siv",
            seq=1,
            key_id=key_id(self.hmac),
            records=records_from_plates(self.hmac, [(PLATE, "RENAULT", "CLIO", "VP", "CI")]),
        )
        import_subset(self.cfg.registry.db, snapshot, expected_key_id=key_id(self.hmac))
        self.jpeg = write_capture(root / "spool" / "done")
        self.link = MqttLink(self.cfg)
        self.beats = 0
        self.worker = self.new_worker()
        self.link.start()
        assert self.link.wait_commands_ready(10), "the agent never subscribed to its cmd topic"

    def heartbeat(self) -> dict[str, Any]:
        self.beats += 1
        return {"site_id": SITE, "beats": self.beats, "commands": self.worker.counters()}

    def new_worker(self) -> CommandWorker:
        worker = CommandWorker(
            self.cfg,
            self.link,
            heartbeat=self.heartbeat,
            hmac_key=self.hmac,
            version="9.9.9",
            done_dir=self.root / "spool" / "done",
        )
        worker.start()
        return worker

    def lookup(self, plate: str) -> str | None:
        with Registry(self.cfg.registry.db, self.hmac) as reg:
            rec = reg.lookup(plate)
        return None if rec is None else f"{rec.make} {rec.model}"

    def stop(self) -> None:
        self.worker.stop()
        self.link.stop()


@pytest.fixture
def make_agent(tmp_path: Path, broker: MosquittoBroker, keys: Keys) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(
        protocol: str = "5", allow_unsigned: bool = False, evidence: dict[str, Any] | None = None, device: str = DEVICE
    ) -> Agent:
        root = tmp_path / f"agent{len(agents)}"
        agents.append(Agent(root, broker.port, keys, protocol, allow_unsigned, evidence, device))
        return agents[-1]

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    return make_agent()


@pytest.fixture
def central(broker: MosquittoBroker, keys: Keys) -> Iterator[CommandClient]:
    with CommandClient("127.0.0.1", broker.port, private_key_path=keys.central) as client:
        yield client


def error_code(response: dict[str, Any]) -> str:
    assert response["ok"] is False, response
    return str(response["error"]["code"])


# ----- round trips ---------------------------------------------------------------------------------


def test_ping_on_mqtt5_is_answered_on_the_response_topic_with_the_correlation_data_echoed(
    agent: Agent,
    central: CommandClient,
) -> None:
    """The body has neither reply_to nor correlation_id: only the MQTT 5 properties route the answer."""
    doc = central.build(SITE, DEVICE, "ping")
    del doc["reply_to"], doc["correlation_id"]
    response = central.send_document(SITE, DEVICE, central.sign(doc), timeout=10, correlation_id="corr-5")
    validate_response(response)
    assert response["ok"] is True and response["result"]["pong"] == "9.9.9"
    assert response["correlation_id"] == "corr-5" and response["command_id"] == doc["command_id"]
    assert datetime.fromisoformat(response["result"]["time"]).tzinfo is not None
    assert agent.worker.counters()["ok"] == 1


def test_ping_on_mqtt311_uses_reply_to_and_correlation_id_from_the_signed_body(
    make_agent: Callable[..., Agent],
    broker: MosquittoBroker,
    keys: Keys,
) -> None:
    make_agent("3.1.1")
    with CommandClient("127.0.0.1", broker.port, protocol="3.1.1", private_key_path=keys.central) as client:
        doc = client.build(SITE, DEVICE, "ping")
        response = client.send_document(SITE, DEVICE, doc, timeout=10)
    assert response["ok"] is True and response["result"]["pong"] == "9.9.9"
    assert response["correlation_id"] == doc["correlation_id"]
    assert (response["site_id"], response["device_id"], response["command"]) == (SITE, DEVICE, "ping")


def test_status_answers_the_heartbeat_document_with_the_command_counters(
    agent: Agent,
    central: CommandClient,
) -> None:
    central.send(SITE, DEVICE, "ping", timeout=10)
    response = central.send(SITE, DEVICE, "status", timeout=10)
    assert response["ok"] is True
    assert response["result"]["beats"] == 1 and response["result"]["site_id"] == SITE
    assert response["result"]["commands"]["ok"] == 1 and response["result"]["commands"]["received"] == 2


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))


def kept_pixels(a: np.ndarray, b: np.ndarray, box: tuple[int, int, int, int]) -> int:
    x, y, w, h = box
    return int(np.all(a[y : y + h, x : x + w] == b[y : y + h, x : x + w], axis=2).sum())


def test_send_evidence_returns_an_anonymised_jpeg_its_record_and_the_sidecar_with_the_plate_only_hashed(
    agent: Agent,
    central: CommandClient,
) -> None:
    response = central.send(SITE, DEVICE, "send_evidence", {"capture_id": CAPTURE}, timeout=10)
    assert response["ok"] is True
    result = response["result"]
    [image] = result["images"]
    sent = base64.b64decode(image["jpeg_b64"])
    assert sent != agent.jpeg and metadata_segments(sent) == []
    assert image["sha256"] == hashlib.sha256(sent).hexdigest() and image["name"] == f"{CAPTURE}.jpg"
    source, shown = decoded(agent.jpeg), decoded(sent)
    for box in (*SCENE.third_plates, *SCENE.bystander_faces, SCENE.occupant_face):
        assert kept_pixels(source, shown, box) == 0, box  # no pixel of a bystander or an occupant left
    x, y, w, h = SCENE.own_plate
    assert np.abs(source[y : y + h, x : x + w].astype(int) - shown[y : y + h, x : x + w].astype(int)).mean() < 6
    assert np.abs(shown[:8, :8].astype(int) - np.array(FILL_BGR)).max() <= 3  # outside the vehicle: filled
    [record] = result["anonymisation"]["images"]
    assert record["version"] == ANONYMISER_VERSION and record["vehicle_box"] == list(SCENE.vehicle)
    assert [m["kind"] for m in record["masked"]] == ["outside_vehicle", "occupants"]
    assert record["source_sha256"] == hashlib.sha256(agent.jpeg).hexdigest()
    assert result["anonymisation"]["withheld"] == []
    assert "plate" not in result["sidecar"]
    assert result["sidecar"]["plate_key"] == plate_key(agent.hmac, PLATE).hex()
    assert result["sidecar"]["speed_kmh"] == 97
    assert PLATE not in json.dumps(response) and "AB123CD" not in json.dumps(response)


@pytest.mark.parametrize(
    ("capture_id", "code"),
    [
        ("20261102-000000-999999", "not_found"),
        ("../registry.db", "invalid"),
        ("../../etc/passwd", "invalid"),
        ("/etc/passwd", "invalid"),
        (".hidden", "invalid"),
        ("a/b", "invalid"),
        ("", "invalid"),
        (12, "invalid"),
    ],
)
def test_send_evidence_refuses_unknown_ids_and_anything_that_is_not_a_capture_id(
    agent: Agent,
    central: CommandClient,
    capture_id: Any,
    code: str,
) -> None:
    response = central.send(SITE, DEVICE, "send_evidence", {"capture_id": capture_id}, timeout=10)
    assert error_code(response) == code
    assert agent.worker.counters()[f"refused.{code}"] == 1


def assert_nothing_sent(response: dict[str, Any], agent: Agent, *fragments: str) -> None:
    """Refused as failed, with the reason; no image (and no byte of the stored one) in the answer."""
    assert error_code(response) == "failed" and "result" not in response
    for fragment in fragments:
        assert fragment in response["error"]["message"], response["error"]["message"]
    text = json.dumps(response)
    assert "jpeg_b64" not in text and base64.b64encode(agent.jpeg[:999]).decode() not in text  # no byte of it
    assert agent.worker.counters()["refused.failed"] == 1


def test_send_evidence_of_an_image_with_no_vehicle_box_answers_an_error_and_sends_no_image(
    agent: Agent,
    central: CommandClient,
) -> None:
    write_capture(agent.root / "spool" / "done", vehicle_box=False)
    response = central.send(SITE, DEVICE, "send_evidence", {"capture_id": CAPTURE}, timeout=10)
    assert_nothing_sent(response, agent, "has no vehicle box", "is not sent", "evidence.no_vehicle_box")


def test_send_evidence_of_an_unreadable_image_answers_an_error_and_never_the_raw_bytes(
    agent: Agent,
    central: CommandClient,
) -> None:
    broken = agent.jpeg[:600] + bytes(len(agent.jpeg) - 600)  # header kept, image data destroyed
    agent.jpeg = write_capture(agent.root / "spool" / "done", jpeg=broken)
    response = central.send(SITE, DEVICE, "send_evidence", {"capture_id": CAPTURE}, timeout=10)
    assert_nothing_sent(response, agent, f"capture {CAPTURE}: not sent, anonymisation failed")
    assert agent.worker.counters()["evidence.anonymise_failed"] == 1


def test_send_evidence_with_a_missing_detector_bundle_answers_an_error_naming_the_key(
    make_agent: Callable[..., Agent],
    central: CommandClient,
    tmp_path: Path,
) -> None:
    agent = make_agent(evidence={"detector_bundle": str(tmp_path / "faces-bundle")})
    response = central.send(SITE, DEVICE, "send_evidence", {"capture_id": CAPTURE}, timeout=10)
    assert_nothing_sent(response, agent, "evidence.detector_bundle", "no such bundle directory", "fix:")


def test_send_evidence_withholds_an_image_with_no_box_when_the_policy_says_so(
    make_agent: Callable[..., Agent],
    central: CommandClient,
) -> None:
    agent = make_agent(evidence={"no_vehicle_box": "withhold"})
    done = agent.root / "spool" / "done"
    (done / "second.jpg").write_bytes(agent.jpeg)
    sidecar = json.loads((done / f"{CAPTURE}.json").read_text())
    (done / f"{CAPTURE}.json").write_text(json.dumps({**sidecar, "images": [f"{CAPTURE}.jpg", "second.jpg"]}))
    response = central.send(SITE, DEVICE, "send_evidence", {"capture_id": CAPTURE}, timeout=10)
    assert response["ok"] is True, response
    assert [i["name"] for i in response["result"]["images"]] == [f"{CAPTURE}.jpg"]
    [withheld] = response["result"]["anonymisation"]["withheld"]
    assert withheld["name"] == "second.jpg" and withheld["reason"].startswith("no vehicle box (the sidecar has none")


def signed_delta(agent: Agent, tmp_path: Path, key: Path | None) -> dict[str, Any]:
    """registry_sync args: a delta seq 2 that adds NEW_PLATE and deletes PLATE, signed by ``key``."""
    delta = tmp_path / "delta.jsonl.gz"
    records = [
        *records_from_plates(agent.hmac, [(NEW_PLATE, "PEUGEOT", "208", "VP", "CI")]),
        {"op": "delete", "plate_key": plate_key(agent.hmac, PLATE).hex()},
    ]
    write_subset(delta, kind="delta", dataset_id="siv", seq=2, base_seq=1, key_id=key_id(agent.hmac), records=records)
    args: dict[str, Any] = {"file_b64": base64.b64encode(delta.read_bytes()).decode("ascii")}
    if key is not None:
        args["signature"] = json.loads(sign_file(delta, key).read_text())
    return args


def test_registry_sync_imports_a_signed_delta_and_lookups_change(
    agent: Agent,
    central: CommandClient,
    keys: Keys,
    tmp_path: Path,
) -> None:
    assert agent.lookup(PLATE) == "RENAULT CLIO" and agent.lookup(NEW_PLATE) is None
    response = central.send(SITE, DEVICE, "registry_sync", signed_delta(agent, tmp_path, keys.registry), timeout=20)
    assert response["ok"] is True, response
    assert response["result"]["state"]["seq"] == 2 and response["result"]["state"]["count"] == 1
    assert response["result"]["signer"] == "registry"
    assert agent.lookup(PLATE) is None and agent.lookup(NEW_PLATE) == "PEUGEOT 208"
    leftovers = [p.name for p in agent.cfg.registry.db.parent.iterdir() if p.name.startswith(".cmd-sync-")]
    assert leftovers == []


@pytest.mark.parametrize(("signer", "code"), [("none", "bad_signature"), ("stranger", "untrusted_key")])
def test_registry_sync_refuses_an_unsigned_or_untrusted_file_and_keeps_the_cache(
    agent: Agent,
    central: CommandClient,
    keys: Keys,
    tmp_path: Path,
    signer: str,
    code: str,
) -> None:
    args = signed_delta(agent, tmp_path, None if signer == "none" else keys.stranger)
    response = central.send(SITE, DEVICE, "registry_sync", args, timeout=20)
    assert error_code(response) == code
    state = read_state(agent.cfg.registry.db)
    assert state is not None and state.seq == 1
    assert agent.lookup(PLATE) == "RENAULT CLIO"


def test_registry_sync_of_a_delta_with_a_gap_fails_with_the_fix(
    agent: Agent,
    central: CommandClient,
    keys: Keys,
    tmp_path: Path,
) -> None:
    delta = tmp_path / "gap.jsonl.gz"
    write_subset(
        delta,
        kind="delta",
        dataset_id="siv",
        seq=5,
        base_seq=4,
        key_id=key_id(agent.hmac),
        records=records_from_plates(agent.hmac, [(NEW_PLATE, "PEUGEOT", "208", "VP", "CI")]),
    )
    args = {
        "file_b64": base64.b64encode(delta.read_bytes()).decode("ascii"),
        "signature": json.loads(sign_file(delta, keys.registry).read_text()),
    }
    response = central.send(SITE, DEVICE, "registry_sync", args, timeout=20)
    assert error_code(response) == "failed" and "request a snapshot" in response["error"]["message"]
    assert agent.lookup(NEW_PLATE) is None


# ----- refusals --------------------------------------------------------------------------------------


def tampered(client: CommandClient) -> dict[str, Any]:
    doc = client.build(SITE, DEVICE, "send_evidence", {"capture_id": CAPTURE})
    doc["args"]["capture_id"] = "20261102-000000-000001"  # after signing
    return doc


def expired(client: CommandClient) -> dict[str, Any]:
    return client.build(SITE, DEVICE, "ping", issued_at=datetime.now(timezone.utc) - timedelta(hours=1), validity_s=60)


def invalid(client: CommandClient) -> dict[str, Any]:
    doc = client.build(SITE, DEVICE, "ping")
    del doc["command_id"]
    return client.sign(doc)


def for_another_box(client: CommandClient) -> dict[str, Any]:
    """Validly signed for box-2 of the same site, then published on this box's topic."""
    doc = client.build(SITE, "box-2", "ping")
    doc["reply_to"] = client.response_topic(SITE, DEVICE)  # so the answer comes back to the test
    return client.sign(doc)


def signed_by(key: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` signed with ``key`` whatever its role (central's client refuses a key of another role)."""
    return {**doc, "signature": sign_bytes(canonical_bytes(doc), load_private_key(key), key.stem)}


REFUSALS: dict[str, Callable[[CommandClient, Keys, int], dict[str, Any]]] = {
    "bad_signature": lambda c, k, p: tampered(c),
    "untrusted_key": lambda c, k, p: CommandClient(port=p, private_key_path=k.stranger).sign(
        c.build(SITE, DEVICE, "ping")
    ),
    "wrong_role": lambda c, k, p: signed_by(k.models, c.build(SITE, DEVICE, "ping")),
    "expired_key": lambda c, k, p: signed_by(k.expired, c.build(SITE, DEVICE, "ping")),
    "expired": lambda c, k, p: expired(c),
    "invalid": lambda c, k, p: invalid(c),
    "unknown_command": lambda c, k, p: c.build(SITE, DEVICE, "self_destruct"),
    "wrong_target": lambda c, k, p: for_another_box(c),
}


def test_a_command_without_a_target_is_refused_as_invalid(agent: Agent, central: CommandClient) -> None:
    """An older central that names no target gets a clear refusal, never a run on every box."""
    doc = central.build(SITE, DEVICE, "ping")
    del doc["target"]
    response = central.send_document(SITE, DEVICE, central.sign(doc), timeout=10)
    assert error_code(response) == "invalid" and "target" in response["error"]["message"]
    assert agent.worker.counters()["ok"] == 0


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_each_refusal_is_answered_with_its_code_and_counted(
    agent: Agent,
    central: CommandClient,
    keys: Keys,
    broker: MosquittoBroker,
    code: str,
) -> None:
    doc = REFUSALS[code](central, keys, broker.port)
    response = central.send_document(SITE, DEVICE, doc, timeout=10)
    validate_response(response)
    assert error_code(response) == code and response["error"]["message"]
    counters = agent.worker.counters()
    assert counters[f"refused.{code}"] == 1 and counters["refused"] == 1 and counters["ok"] == 0


def test_a_replayed_command_is_refused_even_by_a_restarted_worker(agent: Agent, central: CommandClient) -> None:
    doc = central.build(SITE, DEVICE, "ping")
    assert central.send_document(SITE, DEVICE, doc, timeout=10)["ok"] is True
    assert error_code(central.send_document(SITE, DEVICE, doc, timeout=10)) == "replayed"
    agent.worker.stop()
    agent.worker = agent.new_worker()  # ids are kept in SQLite beside the outbox
    assert error_code(central.send_document(SITE, DEVICE, doc, timeout=10)) == "replayed"
    assert agent.worker.counters()["refused.replayed"] == 1


def test_replay_on_a_second_box_is_refused(
    make_agent: Callable[..., Agent], broker: MosquittoBroker, keys: Keys
) -> None:
    """A registry_sync signed for box-1, captured and published to box-2, is refused there (wrong_target):
    box-2's replay store never saw it, the signed target is what stops it; box-2's cache is untouched."""
    box1, box2 = make_agent(device="box-1"), make_agent(device="box-2")
    snapshot = box1.root / "other.jsonl.gz"
    write_subset(
        snapshot,
        dataset_id="siv",
        seq=7,
        key_id=key_id(box1.hmac),
        records=records_from_plates(box1.hmac, [(NEW_PLATE, "PEUGEOT", "208", "VP", "CI")]),
    )
    args = {
        "file_b64": base64.b64encode(snapshot.read_bytes()).decode("ascii"),
        "signature": json.loads(sign_file(snapshot, keys.registry).read_text()),
    }
    # MQTT 3.1.1 from central: the answer goes to the signed reply_to, whichever box publishes it
    with CommandClient("127.0.0.1", broker.port, protocol="3.1.1", private_key_path=keys.central) as client:
        doc = client.build(SITE, "box-1", "registry_sync", args)
        assert client.send_document(SITE, "box-1", doc, timeout=20)["ok"] is True
        replayed = client.send_document(SITE, "box-2", doc, timeout=20)
    assert error_code(replayed) == "wrong_target" and replayed["device_id"] == "box-2"
    assert f"is signed for {SITE}/box-1, this box is {SITE}/box-2" in replayed["error"]["message"]
    assert box2.worker.counters()["refused.wrong_target"] == 1 and box2.worker.counters()["ok"] == 0
    assert box2.lookup(PLATE) == "RENAULT CLIO" and read_state(box2.cfg.registry.db).seq == 1  # type: ignore[union-attr]
    assert box1.lookup(NEW_PLATE) == "PEUGEOT 208"


def revocations(keys: Keys, seq: int, *revoked: Path, signer: Path | None = None) -> dict[str, Any]:
    """A revocation list of ``seq`` revoking the keys of ``revoked``, signed by the revocation key (or ``signer``)."""
    pairs = [(read_public_key(k.with_suffix(".pub")).key_id, f"test: {k.stem} compromised") for k in revoked]
    key = signer or keys.revocation
    return build_revocation_list(seq, pairs, load_private_key(key), key.stem)


def test_revoke_keys_applies_a_signed_list_and_the_revoked_keys_are_refused_everywhere(
    agent: Agent, central: CommandClient, keys: Keys, tmp_path: Path
) -> None:
    """Seq 1 revokes the registry key: its file is refused (revoked_key), the cache kept. Seq 2 also
    revokes central's own key: the next command it signs is refused. Both are counted."""
    first = central.send(SITE, DEVICE, "revoke_keys", {"list": revocations(keys, 1, keys.registry)}, timeout=10)
    assert first["ok"] is True and first["result"]["seq"] == 1 and first["result"]["changed"] is True
    sync = central.send(SITE, DEVICE, "registry_sync", signed_delta(agent, tmp_path, keys.registry), timeout=20)
    assert error_code(sync) == "revoked_key"
    assert "which is revoked by the revocation list seq 1 this box applied" in sync["error"]["message"]
    assert agent.lookup(PLATE) == "RENAULT CLIO" and agent.lookup(NEW_PLATE) is None
    both = revocations(keys, 2, keys.registry, keys.central)
    assert central.send(SITE, DEVICE, "revoke_keys", {"list": both}, timeout=10)["ok"] is True
    ping = central.send(SITE, DEVICE, "ping", timeout=10)
    assert error_code(ping) == "revoked_key" and "signed by key central" in ping["error"]["message"]
    counters = agent.worker.counters()
    assert counters["refused.revoked_key"] == 2 and counters["ok"] == 2
    assert TrustState(agent.cfg.trust_state_file).summary()["refused"]["revoked_key"] == 2


def test_revoke_keys_never_replaces_a_newer_list_with_an_older_one(
    agent: Agent, central: CommandClient, keys: Keys
) -> None:
    newer, older = revocations(keys, 5, keys.models), revocations(keys, 4, keys.stranger)
    assert central.send(SITE, DEVICE, "revoke_keys", {"list": newer}, timeout=10)["ok"] is True
    refused = central.send(SITE, DEVICE, "revoke_keys", {"list": older}, timeout=10)
    assert error_code(refused) == "rollback"
    assert "revocation list seq 4 is older than the applied seq 5" in refused["error"]["message"]
    again = central.send(SITE, DEVICE, "revoke_keys", {"list": newer}, timeout=10)  # the same list: a no-op
    assert again["ok"] is True and again["result"]["changed"] is False
    state = TrustState(agent.cfg.trust_state_file)
    applied = state.revocation()
    assert (
        applied is not None
        and applied.seq == 5
        and applied.key_ids == (read_public_key(keys.models.with_suffix(".pub")).key_id,)
    )
    assert state.summary()["refused"]["rollback_revocation"] == 1


def test_a_revocation_list_signed_by_the_command_key_is_refused_as_wrong_role(
    agent: Agent, central: CommandClient, keys: Keys
) -> None:
    """Only a revocation key signs a list: a stolen command key alone cannot revoke the others."""
    forged = revocations(keys, 1, keys.registry, signer=keys.central)
    response = central.send(SITE, DEVICE, "revoke_keys", {"list": forged}, timeout=10)
    assert error_code(response) == "wrong_role"
    assert "revocation lists need a key of role revocation" in response["error"]["message"]
    assert TrustState(agent.cfg.trust_state_file).revocation() is None


def test_registry_sync_of_an_older_snapshot_is_refused_and_counted(
    agent: Agent, central: CommandClient, keys: Keys, tmp_path: Path
) -> None:
    assert central.send(SITE, DEVICE, "registry_sync", signed_delta(agent, tmp_path, keys.registry), 20)["ok"]
    old = tmp_path / "old-snapshot.jsonl.gz"
    write_subset(
        old,
        dataset_id="siv",
        seq=1,
        key_id=key_id(agent.hmac),
        records=records_from_plates(agent.hmac, [(PLATE, "RENAULT", "CLIO", "VP", "CI")]),
    )
    args = {
        "file_b64": base64.b64encode(old.read_bytes()).decode("ascii"),
        "signature": json.loads(sign_file(old, keys.registry).read_text()),
    }
    response = central.send(SITE, DEVICE, "registry_sync", args, timeout=20)
    assert error_code(response) == "rollback"
    assert "snapshot seq 1 (dataset siv) is older than the applied seq 2" in response["error"]["message"]
    assert "fix: import the newest file from central" in response["error"]["message"]
    assert read_state(agent.cfg.registry.db).seq == 2  # type: ignore[union-attr]
    assert agent.lookup(PLATE) is None and agent.lookup(NEW_PLATE) == "PEUGEOT 208"
    assert agent.worker.counters()["refused.rollback"] == 1
    assert TrustState(agent.cfg.trust_state_file).summary()["refused"]["rollback_registry"] == 1


def test_a_response_topic_that_differs_from_the_signed_reply_to_is_refused(
    agent: Agent,
    central: CommandClient,
) -> None:
    """The signed reply_to binds the answer's destination: a relay cannot divert it with the property."""
    doc = central.sign(
        {
            **central.build(SITE, DEVICE, "send_evidence", {"capture_id": CAPTURE}),
            "reply_to": "iaflash/v1/elsewhere/box/response/x",
        }
    )
    response = central.send_document(SITE, DEVICE, doc, timeout=10)
    assert error_code(response) == "invalid" and "reply_to" in response["error"]["message"]
    assert agent.worker.counters()["ok"] == 0


def test_unsigned_or_non_json_requests_are_refused(agent: Agent, broker: MosquittoBroker) -> None:
    with CommandClient("127.0.0.1", broker.port, private_key_path=None) as unsigned:
        assert error_code(unsigned.send(SITE, DEVICE, "ping", timeout=10)) == "bad_signature"
        raw = unsigned.send_document(SITE, DEVICE, b"\xff not json", timeout=10, correlation_id="c-raw")
    assert error_code(raw) == "invalid" and raw["command_id"] is None and raw["correlation_id"] == "c-raw"


def test_allow_unsigned_accepts_an_unsigned_command_with_a_warning_but_never_a_bad_signature(
    make_agent: Callable[..., Agent],
    broker: MosquittoBroker,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_agent(allow_unsigned=True)
    with CommandClient("127.0.0.1", broker.port, private_key_path=None) as unsigned:
        assert unsigned.send(SITE, DEVICE, "ping", timeout=10)["ok"] is True
    assert "NOT signed" in caplog.text
    with CommandClient("127.0.0.1", broker.port, private_key_path=keys.central) as client:
        assert error_code(client.send_document(SITE, DEVICE, tampered(client), timeout=10)) == "bad_signature"


def test_a_request_without_a_response_topic_is_counted_not_answered(
    make_agent: Callable[..., Agent],
    broker: MosquittoBroker,
    keys: Keys,
) -> None:
    agent = make_agent("3.1.1")
    with CommandClient("127.0.0.1", broker.port, protocol="3.1.1", private_key_path=keys.central) as client:
        doc = client.build(SITE, DEVICE, "ping")
        del doc["reply_to"]
        with pytest.raises(TimeoutError):
            client.send_document(SITE, DEVICE, client.sign(doc), timeout=2)
    assert agent.worker.counters()["no_reply_to"] == 1 and agent.worker.counters()["ok"] == 1


def test_the_canonical_form_is_what_is_signed_and_the_schema_holds(central: CommandClient) -> None:
    doc = central.build(SITE, DEVICE, "ping", {"b": 1, "a": "é"})
    validate_command(doc)
    body = canonical_bytes(doc)
    assert b"signature" not in body and b" " not in body and body.index(b'"args"') < body.index(b'"command"')
    assert '"a":"é","b":1'.encode() in body


# ----- threads -----------------------------------------------------------------------------------------


def test_a_slow_command_does_not_delay_a_ping(agent: Agent, central: CommandClient) -> None:
    release, started = threading.Event(), threading.Event()

    def slow(args: dict[str, Any]) -> dict[str, Any]:
        started.set()
        release.wait(30)
        return {"slept": True}

    agent.worker.register("slow_test", slow, slow=True)
    answers: list[dict[str, Any]] = []
    sender = threading.Thread(target=lambda: answers.append(central.send(SITE, DEVICE, "slow_test", timeout=40)))
    sender.start()
    try:
        assert started.wait(10)
        ping = central.send(SITE, DEVICE, "ping", timeout=10)  # answered while slow_test still runs
        assert ping["ok"] is True and not release.is_set() and answers == []
    finally:
        release.set()
        sender.join(40)
    assert answers[0]["result"] == {"slept": True}


def test_commands_beyond_the_queue_are_dropped_and_counted(agent: Agent, central: CommandClient) -> None:
    release = threading.Event()
    agent.worker.register("block", lambda args: {"released": release.wait(30)}, slow=False)
    blocker = threading.Thread(target=lambda: central.send(SITE, DEVICE, "block", timeout=40))
    blocker.start()
    try:
        wait_until(lambda: agent.worker.counters()["received"] > 0, 10, "the blocking command")
        for _ in range(130):
            doc = central.build(SITE, DEVICE, "ping")
            central._client.publish(f"iaflash/v1/{SITE}/{DEVICE}/cmd", json.dumps(doc), qos=1)
        wait_until(lambda: agent.worker.counters()["dropped"] >= 30, 10, "30 dropped commands")
    finally:
        release.set()
        blocker.join(40)
    assert agent.worker.counters()["dropped"] == 30


# ----- the CLI -------------------------------------------------------------------------------------------


def test_cli_cmd_has_help_with_an_example() -> None:
    result = CliRunner().invoke(central_main, ["cmd", "-h"])
    assert result.exit_code == 0 and "Example:" in result.output and "iaflash-central cmd" in result.output


def test_cli_cmd_ping_and_registry_sync_print_the_response(
    agent: Agent,
    broker: MosquittoBroker,
    keys: Keys,
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    base = ["cmd", SITE, DEVICE, "--key", str(keys.central), "--port", str(broker.port), "--timeout", "10"]
    ping = runner.invoke(central_main, [*base[:3], "ping", *base[3:], "--json"])
    assert ping.exit_code == 0, ping.output
    assert json.loads(ping.stdout)["result"]["pong"] == "9.9.9"
    delta = tmp_path / "delta.jsonl.gz"
    delta.write_bytes(base64.b64decode(signed_delta(agent, tmp_path, keys.registry)["file_b64"]))
    sync = runner.invoke(central_main, [*base[:3], "registry_sync", *base[3:], "--file", str(delta)])
    assert sync.exit_code == 0, sync.output
    assert '"seq": 2' in sync.stdout and agent.lookup(NEW_PLATE) == "PEUGEOT 208"
    out = tmp_path / "evidence"
    evidence = runner.invoke(
        central_main, [*base[:3], "send_evidence", *base[3:], "--arg", f"capture_id={CAPTURE}", "--out", str(out)]
    )
    assert evidence.exit_code == 0, evidence.output
    saved = (out / f"{CAPTURE}.jpg").read_bytes()
    assert saved != agent.jpeg and metadata_segments(saved) == []  # the anonymised image, never the stored one


def test_cli_cmd_exits_1_on_a_refusal_and_2_on_a_bad_arg(agent: Agent, broker: MosquittoBroker, keys: Keys) -> None:
    base = ["cmd", SITE, DEVICE, "send_evidence", "--key", str(keys.central), "--port", str(broker.port)]
    refused = CliRunner().invoke(central_main, [*base, "--arg", "capture_id=nope-0001", "--timeout", "10"])
    assert refused.exit_code == 1 and "not_found" in refused.output
    assert CliRunner().invoke(central_main, [*base, "--arg", "capture_id"]).exit_code == 2


# ----- the whole service ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_running_service_answers_status_and_sends_the_evidence_of_a_processed_capture(
    tmp_path: Path,
    broker: MosquittoBroker,
) -> None:
    models = build_models(tmp_path / "models")
    central_key, central_pub = generate_keypair(tmp_path / "central")
    site = make_site(tmp_path / "site", models, broker.port, n=4)
    (site.cfg.security.trust_dir / "commands").mkdir(exist_ok=True)
    shutil.copy(central_pub, site.cfg.security.trust_dir / "commands" / central_pub.name)
    service = Service(site.cfg)
    service.start()
    try:
        site.drop(site.scenario)
        wait_until(lambda: site.processed_count() >= site.expected_verdicts(), 60, "every verdict")
        assert service.link is not None and service.link.wait_commands_ready(10)
        sidecars = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in site.files_in("done", "*.json")}
        processed = [cid for cid, doc in sidecars.items() if "vehicle_box" in doc]
        boxless = [cid for cid, doc in sidecars.items() if "vehicle_box" not in doc]
        assert processed and boxless
        with CommandClient("127.0.0.1", broker.port, private_key_path=central_key) as client:
            status = client.send(site.cfg.site.site_id, site.cfg.site.device_id, "status", timeout=20)
            evidence = client.send(
                site.cfg.site.site_id,
                site.cfg.site.device_id,
                "send_evidence",
                {"capture_id": processed[0]},
                timeout=20,
            )
            located = [
                client.send(site.cfg.site.site_id, site.cfg.site.device_id, "send_evidence", {"capture_id": c}, 30)
                for c in boxless
            ]
    finally:
        service.stop()
    assert status["ok"] is True and status["result"]["versions"]["agent"] == "0.1.0"
    assert status["result"]["commands"]["received"] == 1
    trust = status["result"]["trust"]  # the versions it runs are recorded: a lower one is refused later
    assert trust["bundles"]["iaflash-demo-classifier"] == {"current": "1.0.0", "highest": "1.0.0"}
    assert trust["refused"] == {} and trust["revocation_seq"] is None
    # no radar box: the site's vehicle detector finds the vehicle again, or nothing is sent
    sources = [r["result"]["anonymisation"]["images"][0]["vehicle_box_source"] for r in located if r["ok"]]
    assert sources and all(src.startswith("detector: ") for src in sources), located
    for refused in (r for r in located if not r["ok"]):
        assert refused["error"]["code"] == "failed" and "has no vehicle box (detector: " in refused["error"]["message"]
    assert evidence["ok"] is True, evidence
    image = evidence["result"]["images"][0]
    sent = base64.b64decode(image["jpeg_b64"])
    assert sent != (site.cfg.spool.dir / "done" / image["name"]).read_bytes() and metadata_segments(sent) == []
    assert evidence["result"]["anonymisation"]["images"][0]["masked"][0]["kind"] == "outside_vehicle"
    assert "plate" not in evidence["result"]["sidecar"]
