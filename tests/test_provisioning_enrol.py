"""``iaflash-provision enrol``, as a technician runs it, from a bundle built by ``iaflash-central enrolment build``.

Every test installs into a temporary --root: real files, real registry import, real check-config
and doctor; the service user is only created for --root / (its commands are checked instead).
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from provisioning_box import CentralFiles, central_files, snapshot, tls_files

from iaflash.agent.config import load_config
from iaflash.agent.registry.cache import read_state
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.central.cli import main as central
from iaflash.provisioning.cli import cli
from iaflash.provisioning.enrol.actions import Box, ServiceUser
from iaflash.provisioning.enrol.plan import find_unit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> CentralFiles:
    return central_files(tmp_path_factory.mktemp("central"))


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def enrol(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["enrol", *args])
    return result.exit_code, result.output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enrol_installs_a_box_that_passes_check_config_and_doctor(files: CentralFiles, tmp_path: Path) -> None:
    """From the archive central made: secrets 0600, config from the template, unit, registry at seq 1, doctor ok."""
    bundle = files.build(tmp_path / "enrol-A13-box-01.tar.gz", "mqtt://127.0.0.1:1")
    box = tmp_path / "box"
    code, out = enrol(str(bundle), "--root", str(box))
    assert code == 0, out
    etc, state = box / "etc/iaflash", box / "var/lib/iaflash"
    assert (etc / "hmac.key").read_bytes() == files.plate_key.read_bytes()
    assert mode(etc / "hmac.key") == 0o600 and mode(etc / "agent.toml") == 0o640 and mode(etc) == 0o750
    assert (etc / "trust/publisher.pub").read_bytes() == files.public.read_bytes()
    assert sorted(p.name for p in (state / "models/classifier").iterdir()) == sorted(
        p.name for p in files.classifier.iterdir()
    )
    assert all(mode(p) == 0o640 for p in (state / "models/detector").iterdir())
    assert all((state / "spool" / sub).is_dir() for sub in ("incoming", "processing", "done", "rejected"))
    assert (box / "etc/systemd/system/iaflash-agent.service").read_bytes() == (
        ROOT / "systemd/iaflash-agent.service"
    ).read_bytes()
    cfg = load_config(etc / "agent.toml")
    assert (cfg.site.site_id, cfg.site.device_id, cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == (
        "A13-PK42", "box-01", "127.0.0.1", 1, False
    )  # fmt: skip
    assert cfg.model.detector_bundle == state / "models/detector" and cfg.spool.dir == state / "spool"
    # the config names the plate key it installed, so another site's key file is refused later
    assert cfg.registry.hmac_key_id == key_id(load_hmac_key((etc / "hmac.key").read_bytes().strip()))
    # the first import went through the box's trust state: its registry mark is set from the start
    assert json.loads(cfg.trust_state_file.read_text())["marks"]["registry"]["seq"] == read_state(cfg.registry.db).seq  # type: ignore[union-attr]
    registry = read_state(cfg.registry.db)
    assert registry is not None and (registry.dataset_id, registry.seq, registry.count) == ("siv-A13", 1, 2)
    assert f"check-config: {etc / 'agent.toml'}: ok" in out
    assert "doctor: " in out and " 0 FAIL" in out
    assert "enrolled: " in out and "steps changed" in out
    assert "iaflash-provision selftest --config" in out and "systemctl enable --now iaflash-agent" in out


def test_second_run_changes_nothing_and_says_so(files: CentralFiles, tmp_path: Path) -> None:
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    box = tmp_path / "box"
    assert enrol(str(folder), "--root", str(box))[0] == 0
    before = {p: p.stat().st_mtime_ns for p in box.rglob("*") if p.is_file()}  # folders: SQLite's -wal/-shm come and go
    code, out = enrol(str(folder), "--root", str(box), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["changed"] == 0 and {s["status"] for s in doc["steps"]} <= {"unchanged", "skipped"}
    assert any("already at seq 1 of siv-A13" in s["detail"] for s in doc["steps"])
    assert {p: p.stat().st_mtime_ns for p in box.rglob("*") if p.is_file()} == before
    code, text = enrol(str(folder), "--root", str(box))
    assert "nothing to do: the box already matches this bundle (0 steps changed)" in text


def test_dry_run_lists_each_step_and_touches_nothing(files: CentralFiles, tmp_path: Path) -> None:
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    box = tmp_path / "box"
    code, out = enrol(str(folder), "--root", str(box), "--dry-run", "--json")
    assert code == 0 and not box.exists()
    doc = json.loads(out)
    names = [s["name"] for s in doc["steps"]]
    assert f"HMAC key {box}/etc/iaflash/hmac.key" in names and f"registry {box}/var/lib/iaflash/registry.db" in names
    assert {s["status"] for s in doc["steps"]} == {"would change", "skipped"}
    assert doc["doctor"] is None and doc["dry_run"] is True


def test_an_edited_config_is_replaced_and_kept_as_previous(files: CentralFiles, tmp_path: Path) -> None:
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    box = tmp_path / "box"
    enrol(str(folder), "--root", str(box))
    config = box / "etc/iaflash/agent.toml"
    edited = config.read_text().replace('level = "INFO"', 'level = "DEBUG"')
    config.write_text(edited)
    _, out = enrol(str(folder), "--root", str(box), "--json")
    steps = {s["name"]: s for s in json.loads(out)["steps"]}
    assert steps[f"config {config}"]["status"] == "changed"
    assert "kept as agent.toml.previous" in steps[f"config {config}"]["detail"]
    assert (config.parent / "agent.toml.previous").read_text() == edited
    assert 'level = "INFO"' in config.read_text()


def test_a_newer_registry_on_the_box_is_kept(files: CentralFiles, tmp_path: Path) -> None:
    """Re-enrolling with the first snapshot never rolls a box's registry back."""
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    box = tmp_path / "box"
    enrol(str(folder), "--root", str(box))
    newer = snapshot(tmp_path / "siv-0002.jsonl.gz", files.key, files.publisher, seq=2, plates=[])
    result = CliRunner().invoke(
        cli, ["registry", "import", str(newer), "--config", str(box / "etc/iaflash/agent.toml")]
    )
    assert result.exit_code == 0, result.output
    _, out = enrol(str(folder), "--root", str(box))
    assert "already at seq 2 of siv-A13" in out
    state = read_state(box / "var/lib/iaflash/registry.db")
    assert state is not None and state.seq == 2


def test_tls_bundle_installs_the_certificates_and_a_private_key(files: CentralFiles, tmp_path: Path) -> None:
    ca, cert, key = tls_files(tmp_path / "pki")
    tls = ("--ca", str(ca), "--cert", str(cert), "--key", str(key))
    folder = files.build(tmp_path / "bundle", "mqtts://mqtt.example.invalid", *tls)
    assert mode(folder / "client.key") == 0o600
    box = tmp_path / "box"
    code, out = enrol(str(folder), "--root", str(box), "--broker-timeout", "0.5")
    etc = box / "etc/iaflash"
    assert mode(etc / "client.key") == 0o600 and mode(etc / "ca.pem") == 0o644
    cfg = load_config(etc / "agent.toml")
    assert (cfg.mqtt.tls, cfg.mqtt.port, cfg.mqtt.ca_file, cfg.mqtt.key_file) == (
        True, 8883, etc / "ca.pem", etc / "client.key"
    )  # fmt: skip
    assert "check-config: " in out and ": ok" in out
    assert code in (0, 3)  # the broker does not exist: doctor warns (or fails the TLS files check on another box)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners can only be set as root")
def test_as_root_the_service_user_owns_the_secrets_and_the_state(files: CentralFiles, tmp_path: Path) -> None:
    """With an existing account (nobody here), secrets and state belong to it, the config to root:its group."""
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    box = tmp_path / "box"
    code, out = enrol(str(folder), "--root", str(box), "--user", "nobody")
    assert code in (0, 3), out  # doctor runs as root here: the spool check judges user nobody
    nobody = pwd.getpwnam("nobody")
    key = (box / "etc/iaflash/hmac.key").stat()
    assert (key.st_uid, key.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    config = (box / "etc/iaflash/agent.toml").stat()
    assert (config.st_uid, config.st_gid) == (0, nobody.pw_gid)
    db = (box / "var/lib/iaflash/registry.db").stat()
    assert db.st_uid == nobody.pw_uid and "owners:" not in out


def test_service_user_step_creates_the_account_in_the_ingress_and_gpu_groups() -> None:
    """What the step runs on a box (--root /), as systemd/iaflash.sysusers declares; only GPU groups present."""
    import grp

    step = ServiceUser(Box(Path("/"), "iaflash-enrol-test-user"), "/var/lib/iaflash")
    commands = step.commands()
    assert commands[0][:2] == ["useradd", "--system"] and commands[0][-1] == "iaflash-enrol-test-user"
    assert "--home-dir" in commands[0] and "/var/lib/iaflash" in commands[0]
    groups = {e.gr_name for e in grp.getgrall()}
    expected = [] if "iaflash-ingress" in groups else [["groupadd", "--system", "iaflash-ingress"]]
    wanted = ",".join(["iaflash-ingress", *(g for g in ("video", "render") if g in groups)])
    expected.append(["usermod", "--append", "--groups", wanted, "iaflash-enrol-test-user"])
    assert commands[1:] == expected
    assert ServiceUser(Box(Path("/tmp/x"), "iaflash"), "/var/lib/iaflash").skipped  # not the system: never run


def test_the_spool_gets_the_modes_of_systemd_tmpfiles(files: CentralFiles, tmp_path: Path) -> None:
    """spool/ 0710 and incoming/ 2770 (setgid) for the radar feed's group; the sysusers/tmpfiles files installed."""
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    box = tmp_path / "box"
    enrol(str(folder), "--root", str(box))
    spool = box / "var/lib/iaflash/spool"
    assert (mode(box / "var/lib/iaflash"), mode(spool), mode(spool / "incoming"), mode(spool / "done")) == (
        0o751, 0o710, 0o2770, 0o750
    )  # fmt: skip
    assert (box / "usr/lib/tmpfiles.d/iaflash.conf").read_bytes() == (ROOT / "systemd/iaflash.tmpfiles").read_bytes()
    assert (box / "usr/lib/sysusers.d/iaflash.conf").read_bytes() == (ROOT / "systemd/iaflash.sysusers").read_bytes()


def test_a_damaged_bundle_is_refused_naming_the_file_and_nothing_is_installed(
    files: CentralFiles, tmp_path: Path
) -> None:
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    (folder / "models/classifier/labels.csv").write_text("make,model\nX,Y\n")
    box = tmp_path / "box"
    result = CliRunner().invoke(cli, ["enrol", str(folder), "--root", str(box), "--json"])
    assert result.exit_code == 1 and not box.exists()
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["command"] == "enrol" and doc["exit_code"] == 1
    assert "models/classifier/labels.csv does not match its sha256" in doc["error"] and "copy it again" in doc["fix"]
    assert "error: " in result.stderr


def test_an_archive_with_a_link_is_refused(files: CentralFiles, tmp_path: Path) -> None:
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    (tmp_path / "evil").symlink_to("/etc/shadow")
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="bundle")
        tar.add(tmp_path / "evil", arcname="bundle/trust/evil.pub")
    code, out = enrol(str(archive), "--root", str(tmp_path / "box"))
    assert code == 1 and "is a link, a device or leaves the archive" in out


def test_central_refuses_a_snapshot_hashed_with_another_plate_key(files: CentralFiles, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex())
    os.chmod(other, 0o600)
    args = ["enrolment", "build", str(tmp_path / "out"), "--site", "A13", "--device", "box-01",
            "--broker", "mqtt://127.0.0.1", "--plate-key", str(other), "--trust", str(files.public),
            "--classifier", str(files.classifier), "--registry", str(files.snapshot)]  # fmt: skip
    result = CliRunner().invoke(central, args)
    assert result.exit_code == 1
    assert (
        "but --plate-key is" in result.output
        and "fix: give the plate key this snapshot was built with" in result.output
    )


def test_the_installed_unit_is_the_shipped_one() -> None:
    assert find_unit().read_bytes() == (ROOT / "systemd/iaflash-agent.service").read_bytes()


def test_a_model_slot_managed_by_the_model_store_is_kept(files: CentralFiles, tmp_path: Path) -> None:
    """After `model install` the slot is a link to the version in use: a new enrol leaves it alone and says how."""
    folder = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    box = tmp_path / "box"
    enrol(str(folder), "--root", str(box))
    slot = box / "var/lib/iaflash/models/classifier"
    version = slot.with_name("tiny-classifier-1.0.0")
    slot.rename(version)
    slot.symlink_to(version.name)
    code, out = enrol(str(folder), "--root", str(box), "--json")
    steps = {s["name"]: s for s in json.loads(out)["steps"]}
    assert steps[f"classifier {slot}"]["status"] == "skipped"
    assert "managed by the model store: kept" in steps[f"classifier {slot}"]["detail"]
    assert slot.is_symlink() and code == 0
