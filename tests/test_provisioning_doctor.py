"""``iaflash-provision doctor`` on real sites: real bundles, SQLite files, spool folders and a real Mosquitto."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from e2e_site import Site, build_models, make_site

from iaflash.agent.capture.spool import Spool
from iaflash.agent.demo.broker import MosquittoBroker, free_port
from iaflash.agent.errors import CaptureRejected
from iaflash.agent.outbox.salvage import check_and_salvage
from iaflash.agent.outbox.store import Outbox
from iaflash.engines.bundle import SIGNATURE_FILE
from iaflash.provisioning.cli import cli
from iaflash.provisioning.doctor.checks import STATUSES, Check, Report, check_systemd, run_doctor

CHECK_NAMES = [
    "config",
    "hmac key",
    "registry",
    "model",
    "detector",
    "evidence",
    "backends",
    "spool folders",
    "spool queue",
    "rejected",
    "outbox",
    "disk",
    "broker",
    "broker files",
    "systemd",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def started(site: Site) -> Site:
    """What the agent leaves behind after its first start: the spool layout and an empty outbox."""
    Spool(site.cfg.spool.dir, site.cfg.spool).ensure_layout()
    Outbox(site.cfg.outbox.db).close()
    return site


@pytest.fixture
def site(tmp_path: Path, models: Path, broker: MosquittoBroker) -> Site:
    return started(make_site(tmp_path / "site", models, broker.port, n=10))


def doctor(site: Site | Path, *args: str) -> tuple[int, dict[str, Any]]:
    """Run the CLI with --json; return its exit code and document."""
    config = site if isinstance(site, Path) else site.config_file
    result = CliRunner().invoke(cli, ["doctor", "--config", str(config), "--json", *args])
    return result.exit_code, json.loads(result.stdout)


def check(doc: dict[str, Any], name: str) -> dict[str, str]:
    return next(c for c in doc["checks"] if c["name"] == name)


def test_healthy_site_is_all_ok_and_exits_0(site: Site) -> None:
    code, doc = doctor(site)
    statuses = {c["name"]: c["status"] for c in doc["checks"]}
    assert code == 0 and doc["ok"] is True
    assert [c["name"] for c in doc["checks"]] == CHECK_NAMES
    not_applicable = {"broker files", "systemd"}  # no TLS here; systemd is not running in CI containers
    assert {n: s for n, s in statuses.items() if n not in not_applicable} == dict.fromkeys(
        set(CHECK_NAMES) - not_applicable, "ok"
    )
    assert statuses["broker files"] == "skip" and statuses["systemd"] in ("skip", "ok")
    assert all(c["fix"] == "" for c in doc["checks"] if c["status"] == "ok")
    assert "test-siv seq 1" in check(doc, "registry")["finding"]
    assert "iaflash-demo-classifier 1.0.0 (classifier" in check(doc, "model")["finding"]


def test_json_document_schema(site: Site) -> None:
    _, doc = doctor(site)
    assert set(doc) == {"ok", "config", "checks", "summary"}
    assert doc["config"] == str(site.config_file)
    assert set(doc["summary"]) == set(STATUSES) and sum(doc["summary"].values()) == len(doc["checks"])
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "finding", "fix"} and c["status"] in STATUSES
        assert all(isinstance(v, str) for v in c.values()) and c["finding"]


def test_plain_output_has_one_line_per_check_and_no_colours_off_a_terminal(site: Site) -> None:
    site.cfg.outbox.db.unlink()  # one warning, to show its fix line
    result = CliRunner().invoke(cli, ["doctor", "--config", str(site.config_file)])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and "\x1b[" not in result.stdout
    checks = [tuple(line.split()[:2]) for line in lines if not line.startswith(" ")][:-1]
    assert [status for status, _ in checks] == ["ok"] * 10 + ["warn", "ok", "ok", "skip", "skip"]
    assert [name for _, name in checks][:6] == ["config", "hmac", "registry", "model", "detector", "evidence"]
    assert checks[10] == ("warn", "outbox")
    assert lines[lines.index(next(x for x in lines if x.startswith("warn  outbox"))) + 1].strip().startswith("fix: ")
    assert lines[-1].startswith("doctor: 12 ok, 1 warn, 0 FAIL, 2 skipped: no problems")


def test_help_has_an_example_and_the_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["doctor", "-h"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout and "iaflash-provision doctor" in result.stdout
    assert "--broker-timeout" in result.stdout and "3 a check FAILed" in result.stdout


def test_unsigned_model_bundle_fails_with_a_fix(site: Site) -> None:
    (site.cfg.model.bundle / SIGNATURE_FILE).unlink()
    code, doc = doctor(site)
    model = check(doc, "model")
    assert code == 3 and doc["ok"] is False and doc["summary"]["fail"] == 1
    assert model["status"] == "fail" and "is not signed" in model["finding"]
    assert "reinstall the bundle signed by the model publisher" in model["fix"] and "trust" in model["fix"]
    assert check(doc, "detector")["status"] == "ok"


def test_a_missing_evidence_detector_bundle_fails_naming_the_key_and_the_fix(site: Site) -> None:
    """The healthy site masks evidence by geometry (ok); a configured but absent face detector fails."""
    _, doc = doctor(site)
    assert "evidence masked by geometry (fill: everything outside the vehicle box" in check(doc, "evidence")["finding"]
    missing = site.config_file.parent / "faces-bundle"
    with site.config_file.open("a", encoding="utf-8") as f:
        f.write(f'\n[evidence]\ndetector_bundle = "{missing}"\n')
    code, doc = doctor(site)
    evidence = check(doc, "evidence")
    assert code == 3 and evidence["status"] == "fail"
    assert "evidence.detector_bundle" in evidence["finding"] and "no such bundle directory" in evidence["finding"]
    assert evidence["fix"].startswith("install the bundle there or unset evidence.detector_bundle")


def test_box_key_that_is_not_the_registry_key_fails(site: Site) -> None:
    key_file = site.cfg.registry.hmac_key_file
    key_file.write_text(secrets.token_bytes(32).hex())
    code, doc = doctor(site)
    registry, key = check(doc, "registry"), check(doc, "hmac key")
    assert code == 3 and registry["status"] == "fail" and key["status"] == "ok"
    box_kid = key["finding"].split()[2]
    assert f"this box's key is {box_kid}" in registry["finding"] and "every plate looks unknown" in registry["finding"]
    assert f"key id {box_kid}" in registry["fix"] and "registry import" in registry["fix"]


def test_hmac_key_readable_by_others_fails(site: Site) -> None:
    site.cfg.registry.hmac_key_file.chmod(0o644)
    code, doc = doctor(site)
    key = check(doc, "hmac key")
    assert code == 3 and key["status"] == "fail" and "chmod 600" in key["fix"]


def test_stale_registry_is_a_warning(tmp_path: Path, models: Path, broker: MosquittoBroker) -> None:
    stale = started(
        make_site(tmp_path / "site", models, broker.port, n=10, overrides={"registry": {"max_age_hours": 1e-9}})
    )
    code, doc = doctor(stale)
    registry = check(doc, "registry")
    assert code == 0 and registry["status"] == "warn"
    assert "STALE" in registry["finding"] and "import the latest" in registry["fix"]


def test_missing_registry_cache_fails(site: Site) -> None:
    site.cfg.registry.db.unlink()
    code, doc = doctor(site)
    assert code == 3 and check(doc, "registry")["status"] == "fail"
    assert "registry import" in check(doc, "registry")["fix"]


def test_unwritable_spool_folder_fails(site: Site) -> None:
    """As root doctor judges the service account's access (here: nobody), since root may write anywhere."""
    rejected = site.cfg.spool.dir / "rejected"
    rejected.chmod(0o555)
    try:
        if os.geteuid() == 0:
            if "nobody" not in {p.pw_name for p in pwd.getpwall()}:
                pytest.skip("no 'nobody' account to judge access for")
            report = run_doctor(site.config_file, user="nobody")
        else:
            report = run_doctor(site.config_file, user=None)
    finally:
        rejected.chmod(0o750)
    spool = next(c for c in report.checks if c.name == "spool folders")
    assert report.exit_code == 3 and spool.status == "fail"
    assert "rejected/" in spool.finding and "chown" in spool.fix


def test_spool_folders_the_agent_will_create_are_a_warning(
    tmp_path: Path, models: Path, broker: MosquittoBroker
) -> None:
    fresh = make_site(tmp_path / "site", models, broker.port, n=10)  # never started: no outbox, no layout
    code, doc = doctor(fresh)
    assert code == 0 and check(doc, "spool folders")["status"] == "warn"
    assert "processing, done, rejected missing" in check(doc, "spool folders")["finding"]
    assert check(doc, "outbox")["status"] == "warn" and "has not run" in check(doc, "outbox")["finding"]


def test_unreachable_broker_is_only_a_warning(site: Site, broker: MosquittoBroker) -> None:
    broker.kill()
    code, doc = doctor(site, "--broker-timeout", "0.5")
    found = check(doc, "broker")
    assert code == 0 and doc["ok"] is True and found["status"] == "warn"
    assert f"127.0.0.1:{broker.port} refused the TCP connection" in found["finding"]
    assert "outbox" in found["finding"] and "mqtt.host" in found["fix"]


def test_broker_check_is_a_real_mqtt_connect_that_names_refused_credentials(tmp_path: Path, models: Path) -> None:
    """TCP alone would pass here: the broker accepts the connection, then refuses who we are."""
    (tmp_path / "passwd").write_text("")  # no user at all: every CONNECT is refused
    conf = f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
    with MosquittoBroker(workdir=tmp_path / "broker", extra_conf=conf) as strict:
        site = make_site(tmp_path / "site", models, strict.port, n=10)
        code, doc = doctor(site, "--broker-timeout", "3")
    found = check(doc, "broker")
    assert code == 0 and found["status"] == "warn", found
    assert "refused" in found["finding"] and "accepted" not in found["finding"]


def _queue_event(db: Path, age_s: float) -> None:
    with Outbox(db) as outbox:
        outbox.record("cap-1", "mismatch", {"event_id": "e-1"}, "iaflash/v1/s/d/events/mismatch")
    with sqlite3.connect(db) as conn:  # the row was queued age_s ago
        conn.execute("UPDATE outbox SET created_at = created_at - ?", (age_s,))
    conn.close()


def test_old_unsent_events_are_a_warning(site: Site) -> None:
    _queue_event(site.cfg.outbox.db, 7200)
    code, doc = doctor(site)
    outbox = check(doc, "outbox")
    assert code == 0 and outbox["status"] == "warn"
    assert "1 unsent events, oldest 2.0 h" in outbox["finding"] and "kept" in outbox["fix"]


def test_recent_unsent_events_are_ok(site: Site) -> None:
    _queue_event(site.cfg.outbox.db, 60)
    _, doc = doctor(site)
    assert check(doc, "outbox")["status"] == "ok" and "1 unsent events" in check(doc, "outbox")["finding"]


def test_a_corrupt_state_db_is_a_failure_naming_the_outbox_fix(site: Site) -> None:
    site.cfg.outbox.db.write_bytes(b"not a database" * 500)
    code, doc = doctor(site)
    outbox = check(doc, "outbox")
    assert code == 3 and outbox["status"] == "fail" and "not a database" in outbox["finding"]
    assert "restart the agent" in outbox["fix"] and "salvages its unsent events" in outbox["fix"]


def test_a_salvaged_state_db_stays_a_finding_until_its_copy_is_deleted(site: Site) -> None:
    """A salvage that read nothing (the whole file was garbage) fails: flags may be lost that cannot be listed."""
    db = site.cfg.outbox.db
    db.write_bytes(b"not a database" * 500)
    note = check_and_salvage(db)
    assert note is not None
    code, doc = doctor(site)
    outbox = check(doc, "outbox")
    moved = Path(note["moved_to"]).name
    assert code == 3 and outbox["status"] == "fail"
    assert f"moved to {moved}" in outbox["finding"] and "flags may be lost that cannot be listed" in outbox["finding"]
    assert "now: " in outbox["finding"] and "no unsent events" in outbox["finding"]
    assert "then delete both" in outbox["fix"]
    for path in db.parent.glob(f"{moved}*"):
        path.unlink()
    assert check(doctor(site)[1], "outbox")["status"] == "ok"


def test_rejected_captures_are_summarised_by_reason(site: Site) -> None:
    spool = Spool(site.cfg.spool.dir, site.cfg.spool)
    for capture_id in ("bad-1", "bad-2"):
        (spool.incoming / f"{capture_id}.json").write_text("not json")
        with pytest.raises(CaptureRejected):
            spool.claim(capture_id)
    stray = spool.incoming / "stray.jpg"
    stray.write_bytes(b"\xff\xd8")
    os.utime(stray, (0, 0))
    assert spool.reject_orphans(older_than_s=60) == 1
    code, doc = doctor(site)
    rejected = check(doc, "rejected")
    assert code == 0 and rejected["status"] == "warn"
    assert rejected["finding"] == "3 captures rejected (2 sidecar_not_json, 1 orphan_file), 3 in the last 24 h"
    assert "capture contract" in rejected["fix"] and ".error.json" in rejected["fix"]


def test_old_file_waiting_in_incoming_is_a_warning(site: Site) -> None:
    waiting = site.incoming / "cap-9.jpg"
    waiting.write_bytes(b"\xff\xd8")
    old = waiting.stat().st_mtime - 600
    os.utime(waiting, (old, old))
    _, doc = doctor(site)
    queue = check(doc, "spool queue")
    assert queue["status"] == "warn" and "oldest waiting 10 min" in queue["finding"]
    assert "agent may be down" in queue["finding"] and "systemctl status" in queue["fix"]


def corrupt_registry(db: Path) -> None:
    """Overwrite the pages after the header with garbage: what a failing SD card does."""
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(4096)
        f.write(bytes(range(256)) * ((size - 4096) // 256 + 1))


def test_a_corrupt_registry_fails_with_the_fix_re_import_a_snapshot(site: Site) -> None:
    corrupt_registry(site.cfg.registry.db)
    code, doc = doctor(site, "--broker-timeout", "0.5")
    found = check(doc, "registry")
    assert code == 3 and found["status"] == "fail", found
    assert "corrupt" in found["finding"] and "re-import a snapshot" in found["fix"]


def test_low_disk_fails(tmp_path: Path, models: Path, broker: MosquittoBroker) -> None:
    full = started(make_site(tmp_path / "site", models, broker.port, n=10, overrides={"spool": {"min_free_mb": 10**9}}))
    code, doc = doctor(full)
    assert code == 3 and check(doc, "disk")["status"] == "fail" and "intake is paused" in check(doc, "disk")["finding"]


def test_missing_tls_files_fail(tmp_path: Path, models: Path, broker: MosquittoBroker) -> None:
    ca = tmp_path / "absent-ca.pem"
    tls = started(
        make_site(tmp_path / "site", models, broker.port, n=10, overrides={"mqtt": {"tls": True, "ca_file": str(ca)}})
    )
    code, doc = doctor(tls)
    files = check(doc, "broker files")
    assert code == 3 and files["status"] == "fail" and f"mqtt.ca_file: {ca} is missing" in files["finding"]


def test_unreadable_config_is_a_fail_finding_not_a_crash(tmp_path: Path) -> None:
    code, doc = doctor(tmp_path / "absent.toml")
    assert code == 3 and [c["name"] for c in doc["checks"]] == ["config", "site", "systemd"]
    assert check(doc, "config")["status"] == "fail" and "cannot read" in check(doc, "config")["finding"]
    assert check(doc, "site")["status"] == "skip"


def test_invalid_config_names_the_key_and_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[mqtt]\nprot = 1883\n")
    code, doc = doctor(config)
    found = check(doc, "config")
    assert code == 3 and "mqtt.prot" in found["finding"] and "allowed keys here" in found["fix"]


def test_systemd_is_skipped_where_it_does_not_run(tmp_path: Path) -> None:
    found = check_systemd(booted_marker=tmp_path / "not-booted")
    assert found.status == "skip" and "not running" in found.finding


def test_inactive_unit_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemctl is an external program: a stand-in script answers like it does for a stopped unit."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "systemctl"
    fake.write_text("#!/bin/sh\nprintf 'LoadState=loaded\\nActiveState=failed\\nSubState=failed\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    found = check_systemd(booted_marker=tmp_path)
    assert found == Check("systemd", "warn", "iaflash-agent.service is failed (failed)", found.fix)
    assert "systemctl start iaflash-agent.service" in found.fix and "journalctl" in found.fix


def test_a_doctor_crash_is_an_error_and_exit_1() -> None:
    report = Report("x.toml", [Check("config", "ok", "valid"), Check("disk", "error", "doctor could not run")])
    assert report.exit_code == 1 and report.ok is False
    assert Report("x.toml", [Check("a", "fail", "x"), Check("b", "warn", "y")]).exit_code == 3
    assert Report("x.toml", [Check("a", "warn", "x"), Check("b", "skip", "y")]).exit_code == 0


def test_doctor_creates_nothing(tmp_path: Path, models: Path) -> None:
    fresh = make_site(tmp_path / "site", models, free_port(), n=10)
    before = sorted(p.relative_to(fresh.root) for p in fresh.root.rglob("*"))
    run_doctor(fresh.config_file, broker_timeout_s=0.2)
    assert sorted(p.relative_to(fresh.root) for p in fresh.root.rglob("*")) == before
