"""`iaflash-provision model install | list | rollback` as a technician runs them, on a box in a temp folder.

Real signed bundles (a tiny ONNX classifier built by the test), a real trust store, real archives;
the agent's lock file for the "is it running" question. The reload with a running agent is in
tests/test_service_reload.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from onnx_builders import LABELS, classifier_onnx

from iaflash.agent.config import load_config
from iaflash.agent.health import InstanceLock, lock_holder
from iaflash.engines.bundle import Label, Preprocessing, load_bundle, write_bundle
from iaflash.engines.cli import main as engines_cli
from iaflash.engines.signing import generate_keypair, load_trusted_bundle, record_bundle, sign_bundle
from iaflash.engines.trust_state import TrustState
from iaflash.provisioning.cli import cli


@dataclass
class Box:
    """A box in ``root``: config, trust store, and a publisher key to sign bundles with."""

    root: Path
    key: Path
    stranger: Path

    @property
    def config(self) -> Path:
        return self.root / "etc" / "agent.toml"

    @property
    def trust_state(self) -> Path:
        return load_config(self.config).trust_state_file

    @property
    def link(self) -> Path:
        return self.root / "models" / "classifier"

    def bundle(
        self, version: str, *, name: str = "tiny", key: Path | None = None, sign: bool = True, **kw: Any
    ) -> Path:
        """A signed tiny classifier bundle, as central ships it."""
        path = self.root / "usb" / f"{name}-{version}"
        shutil.rmtree(path, ignore_errors=True)
        write_bundle(
            path,
            onnx_bytes=classifier_onnx(num_classes=len(kw.get("labels", LABELS))),
            labels=kw.get("labels", LABELS),
            name=name,
            version=version,
            input_name="input",
            input_shape=["N", 3, 8, 8],
            preprocessing=Preprocessing(height=8, width=8),
            output_name="logits",
        )
        if sign:
            sign_bundle(path, key or self.key, signer="publisher")
        return path

    def write_config(self, **model: Any) -> None:
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items())
        self.config.write_text(
            f'[model]\nbundle = "{self.link}"\nstore_dir = "{self.root / "models"}"\n{extra}'
            f'[security]\ntrust_dir = "{self.root / "etc" / "trust"}"\n'
            f'[outbox]\ndb = "{self.root / "state" / "state.db"}"\n'
            f'[registry]\ndb = "{self.root / "state" / "registry.db"}"\n'
            f'[spool]\ndir = "{self.root / "spool"}"\nmin_free_mb = 1\n'
        )

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(cli, ["model", *args, "--config", str(self.config)])

    def json(self, *args: str) -> dict[str, Any]:
        result = self.run(*args, "--json")
        doc: dict[str, Any] = json.loads(result.stdout)
        doc["exit_code"] = result.exit_code
        return doc

    def installed(self) -> list[str]:
        return [f"{v['name']}/{v['version']}" for v in self.json("list")["slots"]["classifier"]["installed"]]

    def current(self) -> str:
        return str(self.link.resolve().relative_to((self.root / "models").resolve()))

    def store_files(self) -> set[str]:
        return {str(p.relative_to(self.root / "models")) for p in (self.root / "models").rglob("*")}


@pytest.fixture
def box(tmp_path: Path) -> Box:
    (tmp_path / "etc" / "trust").mkdir(parents=True)
    (tmp_path / "keys").mkdir()
    key, pub = generate_keypair(tmp_path / "keys" / "publisher")
    stranger, _ = generate_keypair(tmp_path / "keys" / "stranger")
    shutil.copy(pub, tmp_path / "etc" / "trust" / pub.name)
    b = Box(tmp_path, key, stranger)
    b.write_config()
    return b


def tgz(folder: Path, out: Path, *, top: str | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=top if top is not None else folder.name)
    return out


def test_install_verifies_installs_side_by_side_and_switches_the_link_atomically(box: Box) -> None:
    doc = box.json("install", str(box.bundle("1.0.0")))
    assert doc["exit_code"] == 0 and doc["ok"] is True and doc["changed"] is True
    assert [s["step"] for s in doc["steps"]] == ["source", "room", "verify", "trial", "install", "switch", "reload"]
    verify = doc["steps"][2]["detail"]
    assert "tiny 1.0.0 (classifier), signed by publisher" in verify and "sha256" in verify
    assert box.link.is_symlink() and box.current() == "tiny/1.0.0"
    assert os.readlink(box.link) == "tiny/1.0.0", "a relative link: the store can move as a whole"
    assert doc["agent"]["state"] == "not_running"
    text = box.run("install", str(box.bundle("1.1.0")))
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].startswith("source") and "switch" in lines[5] and "(was " in lines[5]
    assert lines[-1].endswith("uses " + str(box.root / "models" / "tiny" / "1.1.0"))
    assert box.current() == "tiny/1.1.0" and box.installed() == ["tiny/1.0.0", "tiny/1.1.0"]
    assert not [p for p in box.store_files() if ".staging" in p], "no staging folder is left"


def test_install_from_an_archive_with_or_without_a_top_folder(box: Box) -> None:
    src = box.bundle("2026.11.0")
    assert box.run("install", str(tgz(src, box.root / "a.tgz"))).exit_code == 0
    flat = tgz(box.bundle("2026.12.0"), box.root / "b.tar.gz", top="")
    doc = box.json("install", str(flat))
    assert doc["exit_code"] == 0, doc
    assert doc["steps"][0]["detail"].startswith(f"archive {flat}: 4 files")
    assert box.current() == "tiny/2026.12.0"


def test_list_shows_the_slots_the_version_in_use_and_the_rollback_target(box: Box) -> None:
    box.run("install", str(box.bundle("1.0.0")))
    box.run("install", str(box.bundle("1.1.0")))
    doc = box.json("list")
    slot = doc["slots"]["classifier"]
    assert slot["link_kind"] == "link" and slot["rollback_to"] == "tiny/1.0.0"
    assert [(v["version"], v["current"], v["rollback_to"]) for v in slot["installed"]] == [
        ("1.0.0", False, True),
        ("1.1.0", True, False),
    ]
    assert slot["installed"][0]["signed_by"]["name"] == "publisher"
    assert doc["slots"]["detector"]["link"] is None and doc["agent"]["pid"] is None
    text = box.run("list").stdout
    assert "  * tiny 1.1.0" in text and "tiny 1.0.0" in text and "(rollback target)" in text
    assert "detector    (model.detector_bundle is not set)" in text and "agent       not running" in text


def test_rollback_walks_back_the_history_then_says_there_is_nothing_earlier(box: Box) -> None:
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        box.run("install", str(box.bundle(v)))
    first = box.json("rollback")
    assert first["exit_code"] == 0 and box.current() == "tiny/1.1.0"
    assert [s["step"] for s in first["steps"]] == ["verify", "switch", "reload"]
    assert box.run("rollback").exit_code == 0 and box.current() == "tiny/1.0.0"
    refused = box.run("rollback")
    assert refused.exit_code == 1 and box.current() == "tiny/1.0.0"
    assert "no earlier version to go back to" in refused.stderr and "tiny/1.2.0" in refused.stderr


def test_rollback_to_a_named_version_and_back_up(box: Box) -> None:
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        box.run("install", str(box.bundle(v)))
    assert box.run("rollback", "1.0.0").exit_code == 0 and box.current() == "tiny/1.0.0"
    assert box.run("rollback", "tiny/1.2.0").exit_code == 0 and box.current() == "tiny/1.2.0"
    same = box.json("rollback", "1.2.0")
    assert same["exit_code"] == 0 and same["changed"] is False and same["steps"][0]["step"] == "unchanged"
    missing = box.run("rollback", "0.9.0")
    assert missing.exit_code == 1 and "0.9.0 is not installed" in missing.stderr
    assert "tiny/1.0.0, tiny/1.1.0, tiny/1.2.0" in missing.stderr and box.current() == "tiny/1.2.0"


def test_rollback_verifies_again_and_refuses_a_version_whose_key_left_the_trust_store(box: Box) -> None:
    box.run("install", str(box.bundle("1.0.0")))
    box.run("install", str(box.bundle("1.1.0")))
    for pub in (box.root / "etc" / "trust").glob("*.pub"):
        pub.unlink()
    refused = box.run("rollback")
    assert refused.exit_code == 1 and "refused" in refused.stderr and "trust store" in refused.stderr
    assert box.current() == "tiny/1.1.0"


def test_only_the_keep_versions_most_recently_used_stay(box: Box) -> None:
    """1.0.0 was rolled back to, so it is the rollback target after 1.2.0: 1.1.0 goes, not 1.0.0."""
    box.write_config(keep_versions=2)
    for v in ("1.0.0", "1.1.0"):
        box.run("install", str(box.bundle(v)))
    box.run("rollback")  # 1.0.0 is in use now, and the oldest installed
    doc = box.json("install", str(box.bundle("1.2.0")))
    assert [s["detail"] for s in doc["steps"] if s["step"] == "prune"] == [
        "removed tiny 1.1.0 (model.keep_versions = 2)"
    ]
    assert doc["pruned"] == ["tiny/1.1.0"]
    assert box.installed() == ["tiny/1.0.0", "tiny/1.2.0"]
    assert not (box.root / "models" / "tiny" / "1.1.0").exists()
    assert box.json("list")["slots"]["classifier"]["rollback_to"] == "tiny/1.0.0"
    box.run("install", str(box.bundle("1.3.0")))
    assert box.installed() == ["tiny/1.2.0", "tiny/1.3.0"] and box.current() == "tiny/1.3.0"


def _tampered_model(box: Box) -> Path:
    path = box.bundle("2.0.0")
    (path / "model.onnx").write_bytes((path / "model.onnx").read_bytes() + b"\0")
    return path


def _tampered_manifest(box: Box) -> Path:
    path = box.bundle("2.0.0")
    text = (path / "manifest.json").read_text().replace('"2.0.0"', '"2.0.1"')
    (path / "manifest.json").write_text(text)
    return path


def _truncated_archive(box: Box) -> Path:
    data = tgz(box.bundle("2.0.0"), box.root / "full.tgz").read_bytes()
    out = box.root / "cut.tgz"
    out.write_bytes(data[: len(data) // 2])
    return out


def _escaping_archive(box: Box) -> Path:
    out = box.root / "evil.tar"
    with tarfile.open(out, "w") as tar:
        src = box.bundle("2.0.0")
        for f in src.iterdir():
            tar.add(f, arcname=f.name)
        info = tarfile.TarInfo("../../etc/cron.d/evil")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    return out


REFUSALS: dict[str, tuple[Callable[[Box], Path], str]] = {
    "unsigned": (lambda b: b.bundle("2.0.0", sign=False), "is not signed"),
    "wrong key": (lambda b: b.bundle("2.0.0", key=b.stranger), "not in the trust store"),
    "corrupt model": (_tampered_model, "sha256"),
    "altered manifest": (_tampered_manifest, "altered after signing"),
    "truncated archive": (_truncated_archive, "archive"),
    "archive escaping its folder": (_escaping_archive, "leaves the bundle folder"),
    "not a bundle": (lambda b: b.root / "usb", "no manifest.json in this folder"),
    "missing path": (lambda b: b.root / "nothing-here", "no such file or folder"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_exit_1_with_the_reason_and_change_nothing(box: Box, case: str) -> None:
    box.run("install", str(box.bundle("1.0.0")))
    before = box.store_files()
    make, reason = REFUSALS[case]
    source = make(box)
    result = box.run("install", str(source))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and reason in result.stderr, result.stderr
    assert "fix" in result.stderr
    assert ".staging" not in result.stderr, "errors name the technician's file, not the staging folder"
    assert box.current() == "tiny/1.0.0" and box.store_files() == before
    doc = box.json("install", str(source))
    assert sorted(doc) == ["command", "error", "exit_code", "fix", "ok"], "the provisioning CLI's error document"
    assert (doc["command"], doc["ok"], doc["exit_code"]) == ("model install", False, 1)
    assert reason in doc["error"] and doc["fix"]


def test_not_enough_room_is_refused_before_anything_is_copied(box: Box) -> None:
    box.run("install", str(box.bundle("1.0.0")))
    box.config.write_text(box.config.read_text().replace("min_free_mb = 1", "min_free_mb = 100000000"))
    before = box.store_files()
    result = box.run("install", str(box.bundle("1.1.0")))
    assert result.exit_code == 1 and "not enough room" in result.stderr and "spool.min_free_mb" in result.stderr
    assert box.store_files() == before and box.current() == "tiny/1.0.0"


def test_the_same_version_is_nothing_to_do_in_use_a_rollback_otherwise_and_refused_with_other_content(
    box: Box,
) -> None:
    box.run("install", str(box.bundle("1.0.0")))
    again = box.json("install", str(box.bundle("1.0.0")))
    assert again["exit_code"] == 0 and again["changed"] is False and again["steps"][-1]["step"] == "unchanged"
    box.run("install", str(box.bundle("1.1.0")))
    idle = box.run("install", str(box.bundle("1.0.0")))
    assert idle.exit_code == 1 and "model rollback 1.0.0" in idle.stderr
    other = box.bundle("1.1.0", labels=(*LABELS, Label(4, "DACIA", "SANDERO", ())))
    clash = box.run("install", str(other))
    assert clash.exit_code == 1 and "installed already" in clash.stderr and "new version" in clash.stderr
    assert box.current() == "tiny/1.1.0"


def ran(box: Box, version: str) -> None:
    """What the agent does once a bundle loaded and took over: record it in the box's trust state."""
    record_bundle(box.trust_state, load_bundle(box.root / "models" / "tiny" / version))


def test_an_older_version_than_the_box_ran_is_refused_unless_the_publisher_signed_a_rollback(box: Box) -> None:
    """The engines' rule (docs/SIGNING.md#rollback), checked by install before anything changes."""
    box.run("install", str(box.bundle("1.2.0")))
    ran(box, "1.2.0")
    refused = box.run("install", str(box.bundle("1.1.0")))
    assert refused.exit_code == 1 and "older than or equal to 1.2.0" in refused.stderr
    assert "allow-rollback" in refused.stderr and box.current() == "tiny/1.2.0"
    assert box.installed() == ["tiny/1.2.0"]
    signed = box.bundle("1.1.0")
    allowed = CliRunner().invoke(engines_cli, ["allow-rollback", str(signed), "--from", "1.2.0", "--key", str(box.key)])
    assert allowed.exit_code == 0, allowed.output
    doc = box.json("install", str(signed))
    assert doc["exit_code"] == 0 and box.current() == "tiny/1.1.0"


def test_rollback_by_the_technician_is_recorded_in_the_trust_state_so_the_agent_accepts_it(box: Box) -> None:
    for v in ("1.0.0", "1.1.0"):
        box.run("install", str(box.bundle(v)))
        ran(box, v)
    again = box.run("install", str(box.bundle("1.0.0")))
    assert again.exit_code == 1 and "model rollback 1.0.0" in again.stderr, "the refusal names the way back"
    doc = box.json("rollback")
    assert doc["exit_code"] == 0 and box.current() == "tiny/1.0.0"
    trust = next(s["detail"] for s in doc["steps"] if s["step"] == "trust")
    assert "tiny may run 1.0.0 (a rollback by the technician, from 1.1.0)" in trust
    assert box.trust_state.is_relative_to(box.root), "the test box's trust state, never the machine's"
    mark = TrustState(box.trust_state).bundle_mark("tiny")
    assert mark is not None and (mark.current, mark.highest) == ("1.0.0", "1.1.0")
    sec = f"{box.root}/etc/trust"
    assert (
        load_trusted_bundle(box.link.resolve(), Path(sec), False, state_file=box.trust_state).manifest.version
        == "1.0.0"
    )
    assert box.run("rollback", "1.1.0").exit_code == 0 and box.current() == "tiny/1.1.0"
    mark = TrustState(box.trust_state).bundle_mark("tiny")
    assert mark is not None and (mark.current, mark.highest) == ("1.1.0", "1.1.0")


def test_a_bundle_folder_copied_by_hand_is_adopted_into_the_store(box: Box) -> None:
    shutil.copytree(box.bundle("0.9.0"), box.link)  # the old way: cp -r bundle /var/lib/iaflash/models/classifier
    doc = box.json("install", str(box.bundle("1.0.0")))
    assert doc["exit_code"] == 0, doc
    adopt = next(s["detail"] for s in doc["steps"] if s["step"] == "adopt")
    assert "was a folder (tiny 0.9.0)" in adopt
    assert box.installed() == ["tiny/0.9.0", "tiny/1.0.0"] and box.current() == "tiny/1.0.0"
    assert box.run("rollback").exit_code == 0 and box.current() == "tiny/0.9.0"


def test_a_classifier_is_refused_in_the_detector_slot_and_an_unset_slot_says_which_key_to_set(box: Box) -> None:
    wrong = box.run("install", str(box.bundle("1.0.0")), "--slot", "detector")
    assert wrong.exit_code == 1 and "is a classifier bundle, the detector slot" in wrong.stderr
    box.write_config(detector_bundle=str(box.root / "models" / "detector"))
    still = box.run("install", str(box.bundle("1.0.0")), "--slot", "detector")
    assert still.exit_code == 1 and "takes a detector" in still.stderr
    unset = box.run("rollback", "--slot", "evidence")
    assert unset.exit_code == 1 and "evidence.detector_bundle is not set" in unset.stderr


def test_a_running_agent_named_by_its_lock_is_told_or_left_alone_with_no_reload(box: Box) -> None:
    """--no-reload names the running agent's pid and the command to reload it (no signal is sent)."""
    state = box.root / "state"
    assert lock_holder(state) is None
    lock = InstanceLock(state)
    lock.acquire()
    try:
        assert lock_holder(state) == os.getpid()
        doc = box.json("install", str(box.bundle("1.0.0")), "--no-reload")
        assert doc["agent"]["state"] == "skipped" and doc["agent"]["pid"] == os.getpid()
        assert f"sudo kill -HUP {os.getpid()}" in doc["agent"]["detail"]
        assert box.json("list")["agent"]["pid"] == os.getpid()
    finally:
        lock.release()
    assert lock_holder(state) is None, "a lock file left behind names nobody"


def test_usage_errors_exit_2_and_every_model_command_has_help_with_an_example() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["model", "install"]).exit_code == 2
    assert runner.invoke(cli, ["model", "rollback", "--slot", "nope"]).exit_code == 2
    for command in ("install", "list", "rollback"):
        result = runner.invoke(cli, ["model", command, "-h"])
        assert result.exit_code == 0 and "Example:" in result.output
