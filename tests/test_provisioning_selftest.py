"""``iaflash-provision selftest`` on an enrolled box: a real broker (mosquitto), real bundles, real registry.

It passes on a good box without touching production state, and fails with the right fix on a
broken one (bundle missing, broker down).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from provisioning_box import CentralFiles, central_files
from waiting import wait_until

from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.provisioning.cli import cli

NO_USER = "iaflash-selftest-absent"  # run as the test's own user: never drop privileges in the test process


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> CentralFiles:
    return central_files(tmp_path_factory.mktemp("central"))


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def enrolled(files: CentralFiles, root: Path, port: int) -> Path:
    """A box enrolled from central's bundle for the broker on ``port``; returns its config file."""
    bundle = files.build(root / "bundle", f"mqtt://127.0.0.1:{port}")
    result = CliRunner().invoke(cli, ["enrol", str(bundle), "--root", str(root / "box"), "--broker-timeout", "1"])
    assert result.exit_code == 0, result.output
    return root / "box/etc/iaflash/agent.toml"


class Listener:
    """Subscribes as central does and under the selftest topics, counting what arrives on each."""

    def __init__(self, port: int) -> None:
        self.topics: dict[str, list[str]] = {"central": [], "selftest": []}
        self.payloads: list[dict[str, object]] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(
            [("iaflash/v1/+/+/events/#", 1), ("iaflash/v1/+/+/selftest/#", 1)]
        )
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        kind = "selftest" if "/selftest/" in msg.topic else "central"
        self.topics[kind].append(msg.topic)
        if "/events/" in msg.topic:
            self.payloads.append(json.loads(msg.payload))

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def listener(broker: MosquittoBroker) -> Iterator[Listener]:
    seen = Listener(broker.port)
    yield seen
    seen.stop()


def test_selftest_passes_on_a_good_box_and_leaves_production_alone(
    files: CentralFiles, tmp_path: Path, broker: MosquittoBroker, listener: Listener
) -> None:
    """The installed entry point, as a technician runs it: every check ok, 3 events acked under selftest/ only."""
    config = enrolled(files, tmp_path, broker.port)
    exe = str(Path(sys.executable).parent / "iaflash-provision")
    out = subprocess.run(
        [exe, "selftest", "--config", str(config), "--user", NO_USER],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    status = {line.split()[1]: line.split()[0] for line in lines[1:-1] if not line.startswith(" ")}
    assert status == {
        "config": "ok",
        "hmac": "ok",
        "model": "ok",
        "registry": "ok",
        "decision": "ok",
        "detector": "ok",
        "broker": "ok",
    }
    assert "the test plate was looked up: unknown_plate" in out.stdout
    assert "no plate read gave unreadable_plate" in out.stdout
    assert "3 events acknowledged by 127.0.0.1:" in out.stdout
    assert "under iaflash/v1/A13-PK42/box-01/selftest/events/" in out.stdout
    assert lines[-1] == "selftest: 7 ok, 0 warn, 0 FAIL, 0 skipped: the box works end to end"
    wait_until(lambda: len([t for t in listener.topics["selftest"] if "/events/" in t]) == 3, timeout=5)
    assert listener.topics["central"] == []  # central's subscription never sees a selftest event
    assert {json.dumps(p["radar"]) for p in listener.payloads} == {'{"equipment": "iaflash-selftest", "lane": 1}'}
    state = tmp_path / "box/var/lib/iaflash"
    assert not (state / "state.db").exists()  # the production outbox was never created
    assert [p for p in (state / "spool").rglob("*") if p.is_file()] == []


def test_selftest_json_document(files: CentralFiles, tmp_path: Path, broker: MosquittoBroker) -> None:
    config = enrolled(files, tmp_path, broker.port)
    result = CliRunner().invoke(cli, ["selftest", "--config", str(config), "--user", NO_USER, "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["ok"] is True and doc["command"] == "selftest"
    assert [c["name"] for c in doc["checks"]] == [
        "config",
        "hmac key",
        "model",
        "registry",
        "decision",
        "detector",
        "broker",
    ]


def test_broker_down_fails_the_broker_check_with_its_fix(
    files: CentralFiles, tmp_path: Path, broker: MosquittoBroker
) -> None:
    config = enrolled(files, tmp_path, broker.port)
    broker.kill()
    result = CliRunner().invoke(cli, ["selftest", "--config", str(config), "--user", NO_USER, "--broker-timeout", "2"])
    assert result.exit_code == 3, result.output
    assert f"FAIL  broker        127.0.0.1:{broker.port} refused the TCP connection" in result.output
    assert "fix: check mqtt.host and mqtt.port, and that the broker runs" in result.output
    assert "ok    model" in result.output  # the rest of the box still works
    assert result.output.splitlines()[-1].endswith("1 FAIL, 0 skipped: problems found")


def test_missing_bundle_fails_the_model_check_with_its_fix(
    files: CentralFiles, tmp_path: Path, broker: MosquittoBroker
) -> None:
    config = enrolled(files, tmp_path, broker.port)
    shutil.rmtree(tmp_path / "box/var/lib/iaflash/models/classifier")
    result = CliRunner().invoke(cli, ["selftest", "--config", str(config), "--user", NO_USER])
    assert result.exit_code == 3, result.output
    assert "FAIL  model" in result.output and "models/classifier" in result.output
    assert "fix: reinstall the signed bundle into" in result.output
    assert "skip  pipeline" in result.output


def test_invalid_config_fails_with_check_config_as_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[mqtt]\nprot = 5\n")
    result = CliRunner().invoke(cli, ["selftest", "--config", str(config), "--user", NO_USER, "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 3 and doc["checks"][0]["status"] == "fail"
    assert "mqtt.prot" in doc["checks"][0]["finding"] and "check-config" in doc["checks"][0]["fix"]


def test_demo_without_its_extra_says_what_to_install(tmp_path: Path) -> None:
    """`iaflash-agent demo` without onnx: one line naming the extra, no traceback."""
    code = (
        "import sys; sys.modules['onnx'] = None; from iaflash.agent.cli.main import main; "
        "main(['demo', '--workdir', sys.argv[1]])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "pip install 'iaflash-edge[demo]'" in out.stderr


def test_another_sites_plate_key_fails_the_hmac_check_as_the_agent_would(files: CentralFiles, tmp_path: Path) -> None:
    """[registry] hmac_key_id names this site's key: a key file with another id is refused, as the daemon does."""
    config = enrolled(files, tmp_path, 1)
    (tmp_path / "box/etc/iaflash/hmac.key").write_text("ab" * 32)  # another site's plate key
    result = CliRunner().invoke(cli, ["selftest", "--config", str(config), "--user", NO_USER, "--broker-timeout", "1"])
    assert result.exit_code == 3, result.output
    assert "FAIL  hmac key" in result.output and "hmac_key_id" in result.output


def test_a_bundle_older_than_the_box_ran_fails_the_model_check_as_the_agent_would(
    files: CentralFiles, tmp_path: Path
) -> None:
    """The trust state says this box ran a newer classifier: the agent refuses the installed one, so does selftest."""
    config = enrolled(files, tmp_path, 1)
    state = tmp_path / "box/var/lib/iaflash"
    name = json.loads((state / "models/classifier/manifest.json").read_text())["name"]
    mark = {"current": "99.0.0", "highest": "99.0.0"}
    doc = {"format": "iaflash-trust-state", "version": 1, "revocation": None, "bundles": {name: mark}}
    (state / "trust-state.json").write_text(json.dumps({**doc, "marks": {}, "refused": {}}))
    result = CliRunner().invoke(cli, ["selftest", "--config", str(config), "--user", NO_USER, "--broker-timeout", "1"])
    assert result.exit_code == 3, result.output
    assert "FAIL  model" in result.output and "99.0.0" in result.output
    assert "skip  pipeline" in result.output
