"""No single file, fault or mishap stops a site (docs/RELIABILITY.md), with the real daemon.

Each test runs the real ``Service`` (real model, real SQLite, real mosquitto, real files) and
checks both halves: the bad thing is rejected or paused with its reason and message, and its
neighbours go through, nothing is lost, the daemon stays up (or comes back by itself).
File-system faults use tmpfs mounts, which need root: those tests are skipped cleanly otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from e2e_site import Site, build_models, make_site
from jpeg_builders import EOI, progressive_of, repeated_scans
from tmpfs_mounts import needs_root, remount
from waiting import wait_until

from iaflash.agent.capture.jpeg import read_structure
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.decision.verdict import Verdict
from iaflash.agent.demo.broker import MosquittoBroker, free_port
from iaflash.agent.demo.scenario import DemoCapture, registry_rows, start_time, write_capture
from iaflash.agent.errors import InstanceLocked, RegistryUnavailable
from iaflash.agent.outbox.salvage import salvage_notes
from iaflash.agent.outbox.store import Outbox
from iaflash.agent.registry.cache import import_subset, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.agent.service import Service
from iaflash.central.subscriber import Subscriber
from iaflash.provisioning.doctor.host import check_outbox

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("models"))


class Recorder:
    """Verdicts from the service's callback, by capture id (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.verdicts: dict[str, Verdict] = {}

    def __call__(self, capture: Capture, verdict: Verdict, event: dict[str, Any] | None) -> None:
        with self.lock:
            self.verdicts[capture.capture_id] = verdict

    def count(self) -> int:
        with self.lock:
            return len(self.verdicts)


def run_service(site: Site, recorder: Recorder | None = None) -> Service:
    service = Service(site.cfg, on_verdict=recorder)
    service.start()
    return service


def reasons(site: Site) -> dict[str, dict[str, Any]]:
    """capture id → its error JSON, for everything in rejected/."""
    return {
        p.name.removesuffix(".error.json"): json.loads(p.read_text()) for p in site.files_in("rejected", "*.error.json")
    }


def good(site: Site) -> list[str]:
    return [c.capture_id for c in site.scenario if c.expect != "rejected"]


def all_verdicts_in(site: Site, recorder: Recorder, extra: int = 0, timeout: float = 90) -> None:
    wait_until(lambda: recorder.count() >= site.expected_verdicts() + extra, timeout, "every good capture's verdict")


def deep_sidecar(folder: Path, capture_id: str, depth: int = 30_000) -> None:
    """The 60 KB sidecar nested 30,000 deep that used to kill intake and then recovery, at every start."""
    (folder / f"{capture_id}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(2000))
    (folder / f"{capture_id}.json").write_bytes(b"[" * depth + b"]" * depth)


def assert_alive(service: Service) -> None:
    assert service.pipeline is not None
    assert service.pipeline.fatal is None and service.pipeline.alive()


# ---------------------------------------------------------------- 1. poison captures


def test_a_30000_deep_sidecar_is_rejected_with_its_reason_and_its_neighbours_go_through(
    tmp_path: Path, models: Path, broker: MosquittoBroker
) -> None:
    site = make_site(tmp_path / "site", models, broker.port, n=16)
    recorder = Recorder()
    service = run_service(site, recorder)
    try:
        deep_sidecar(site.incoming, "poison-deep")
        site.drop(site.scenario)
        all_verdicts_in(site, recorder)
        wait_until(lambda: "poison-deep" in reasons(site), 10, "the poison capture's rejection")
        assert_alive(service)
    finally:
        service.stop()
    doc = reasons(site)["poison-deep"]
    assert doc["reason"] == "sidecar_too_deep" and "nested more than 16 deep" in doc["message"]
    assert sorted(doc["files"]) == ["poison-deep.jpg", "poison-deep.json"]
    assert set(recorder.verdicts) == set(good(site))
    assert site.files_in("incoming") == [] and site.files_in("processing") == []


def test_recovery_survives_a_poison_capture_left_in_processing_and_quarantines_a_crasher(
    tmp_path: Path, models: Path, broker: MosquittoBroker
) -> None:
    """At start the same file used to crash the agent again: now recovery rejects it and goes on.

    A capture whose handling killed the agent max_attempts times (its count survives restarts in
    spool/.attempts/) is quarantined at its next claim, while the other captures left behind go through.
    """
    site = make_site(tmp_path / "site", models, broker.port, n=16)
    processing = site.cfg.spool.dir / "processing"
    processing.mkdir(parents=True)
    deep_sidecar(processing, "poison-deep")
    site.drop(site.scenario)
    crasher, survivor = good(site)[0], good(site)[1]
    for cid in (crasher, survivor):  # as the agent leaves them when it is killed mid-capture
        for f in site.incoming.glob(f"{cid}.*"):
            shutil.move(f, processing / f.name)
    attempts = site.cfg.spool.dir / ".attempts"
    attempts.mkdir()
    (attempts / crasher).write_text(f"{site.cfg.spool.max_attempts}\n")  # killed that many times already
    (attempts / survivor).write_text("1\n")  # killed once: tried again
    recorder = Recorder()
    service = run_service(site, recorder)  # used to raise RecursionError here, at every start
    try:
        wait_until(lambda: recorder.count() >= site.expected_verdicts() - 1, 90, "the other captures' verdicts")
        wait_until(lambda: {"poison-deep", crasher} <= set(reasons(site)), 10, "both rejections")
        assert_alive(service)
    finally:
        service.stop()
    rejected = reasons(site)
    assert rejected["poison-deep"]["reason"] == "sidecar_too_deep"
    assert rejected[crasher]["reason"] == "quarantined"
    assert "stopped the agent 3 times" in rejected[crasher]["message"]
    assert set(recorder.verdicts) == set(good(site)) - {crasher}
    assert survivor in recorder.verdicts
    assert list(attempts.iterdir()) == []  # every capture ended: no count is left behind


def test_a_failing_verdict_callback_is_counted_and_never_stops_the_commit_thread(
    tmp_path: Path, models: Path, broker: MosquittoBroker
) -> None:
    site = make_site(tmp_path / "site", models, broker.port, n=16)
    recorder = Recorder()
    victim = good(site)[2]

    def callback(capture: Capture, verdict: Verdict, event: dict[str, Any] | None) -> None:
        if capture.capture_id == victim:
            raise RuntimeError("a consumer bug")
        recorder(capture, verdict, event)

    service = Service(site.cfg, on_verdict=callback)
    service.start()
    try:
        site.drop(site.scenario)
        wait_until(lambda: site.processed_count() == site.expected_verdicts(), 90, "every verdict to be durable")
        assert_alive(service)
        assert service.heartbeat()["errors"]["on_verdict"] == 1
    finally:
        service.stop()
    assert set(recorder.verdicts) == set(good(site)) - {victim}
    assert len(site.files_in("done", "*.json")) == site.expected_verdicts()


# ---------------------------------------------------------------- 2. registry


def corrupt(db: Path) -> None:
    """Garbage over every page after the first: what a failing SD card leaves."""
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(4096)
        f.write(bytes(range(256)) * ((size - 4096) // 256 + 1))


def _lookup_works(service: Service, plate: str) -> bool:
    assert service.registry is not None
    try:
        return service.registry.lookup(plate) is not None
    except RegistryUnavailable:
        return False


def test_a_corrupt_registry_gives_inconclusive_registry_unavailable_then_heals_after_a_re_import(
    tmp_path: Path, models: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    site = make_site(tmp_path / "site", models, broker.port, n=16)
    db = site.cfg.registry.db
    corrupt(db)
    recorder = Recorder()
    with caplog.at_level(logging.ERROR):
        service = run_service(site, recorder)  # used to crash-loop at the first lookup
    try:
        assert service.registry is not None
        service.registry.reopen_every_s = 0.2
        first = [c for c in site.scenario if c.expect != "rejected"][:4]
        site.drop(first)
        wait_until(lambda: recorder.count() == 4, 60, "verdicts with the registry down")
        beat = service.heartbeat()
        assert beat["registry"]["state"] == "unavailable" and "corrupt" in beat["registry"]["problem"]
        assert "re-import a snapshot" in beat["registry"]["fix"]
        outcomes = {cid: (v.outcome, v.reason.split(":")[0]) for cid, v in recorder.verdicts.items()}
        unavailable = [cid for cid, o in outcomes.items() if o == ("inconclusive", "registry_unavailable")]
        assert unavailable and beat["errors"]["registry_unavailable"] == len(unavailable)
        assert all(
            o == ("inconclusive", "registry_unavailable") or o[0] == "unreadable_plate" for o in outcomes.values()
        )
        # the operator's fix: move the file aside and re-import a snapshot; the agent picks it up itself
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{db}{suffix}").exists():
                Path(f"{db}{suffix}").rename(f"{db}{suffix}.corrupt")
        snapshot = tmp_path / "snap.jsonl.gz"
        write_subset(
            snapshot,
            kind="snapshot",
            dataset_id="test-siv",
            seq=2,
            key_id=key_id(site.key),
            records=records_from_plates(site.key, registry_rows(site.scenario)),
        )
        import_subset(db, snapshot, expected_key_id=key_id(site.key))
        # The cache re-checks the file at its next lookup (every reopen_every_s): wait until a
        # lookup goes through, so the next captures are judged on the healed file (under heavy
        # load the first of them could otherwise still meet the old state).
        plate = next(c.plate for c in site.scenario if c.plate and c.expect == "match")
        wait_until(lambda: _lookup_works(service, plate), 30, "the registry to heal by itself")
        site.drop([c for c in site.scenario if c not in first])
        all_verdicts_in(site, recorder)
        assert service.heartbeat()["registry"]["state"] == "ok"
        assert_alive(service)
    finally:
        service.stop()
    later = {c.capture_id: c.expect for c in site.scenario if c not in first and c.expect != "rejected"}
    got = {cid: v.outcome + (f"/{v.level}" if v.level else "") for cid, v in recorder.verdicts.items() if cid in later}
    assert got == later
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("registry unavailable")]
    assert errors and "re-import a snapshot" in errors[0]
    assert len(errors) == len(set(errors))  # each distinct problem once, not once per capture


# ---------------------------------------------------------------- 3. file systems


@needs_root
def test_a_read_only_spool_pauses_intake_with_one_error_and_resumes_by_itself(
    tmp_path: Path, models: Path, broker: MosquittoBroker, tmpfs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmpfs(tmp_path / "spool")
    site = make_site(
        tmp_path / "site", models, broker.port, n=16, overrides={"spool": {"dir": str(spool), "min_free_mb": 1}}
    )
    (spool / "incoming").mkdir(exist_ok=True)
    site.drop(site.scenario)
    Service(site.cfg).spool.ensure_layout()
    remount(spool, "ro")  # ext4 does this after an I/O error
    recorder = Recorder()
    with caplog.at_level(logging.WARNING):
        service = run_service(site, recorder)
        try:
            wait_until(lambda: service.heartbeat()["disk_paused"], 10, "intake to pause")
            beat = service.heartbeat()
            assert "read-only file system" in beat["disk_problem"] and recorder.count() == 0
            assert_alive(service)
            remount(spool, "rw")
            all_verdicts_in(site, recorder)
            assert service.heartbeat()["disk_paused"] is False
        finally:
            service.stop()
    paused = [r for r in caplog.records if r.getMessage().startswith("intake paused")]
    assert len(paused) == 1 and paused[0].levelno == logging.ERROR and "remount it read-write" in paused[0].getMessage()
    assert any(r.getMessage().startswith("intake resumed") for r in caplog.records)
    assert set(recorder.verdicts) == set(good(site))


@needs_root
def test_state_db_on_another_full_file_system_pauses_intake_and_commits_then_resumes(
    tmp_path: Path, models: Path, broker: MosquittoBroker, tmpfs: Any
) -> None:
    """The guard used to watch the spool only: state.db's own full disk crash-looped the agent."""
    state = tmpfs(tmp_path / "state", size="8m")
    site = make_site(
        tmp_path / "site",
        models,
        broker.port,
        n=16,
        overrides={"outbox": {"db": str(state / "state.db")}, "spool": {"min_free_mb": 2}},
    )
    recorder = Recorder()
    service = run_service(site, recorder)
    try:
        filler = state / "filler"
        with filler.open("wb") as f:  # leave about 1 MiB: below the guard's 2 MiB
            f.write(bytes(7 * 1024 * 1024 - 512 * 1024))
        site.drop(site.scenario)
        wait_until(lambda: service.heartbeat()["disk_paused"], 10, "intake to pause")
        assert str(state) in service.heartbeat()["disk_problem"]
        assert_alive(service)
        filler.unlink()
        all_verdicts_in(site, recorder)
        assert_alive(service)
    finally:
        service.stop()
    assert set(recorder.verdicts) == set(good(site))
    assert site.processed_count() == site.expected_verdicts()


@needs_root
def test_a_commit_that_fails_on_a_full_disk_is_retried_until_it_goes_through(
    tmp_path: Path, models: Path, broker: MosquittoBroker, tmpfs: Any
) -> None:
    """With no guard margin the commit itself hits ENOSPC: commits pause, nothing is lost, they resume."""
    state = tmpfs(tmp_path / "state", size="4m")
    site = make_site(
        tmp_path / "site",
        models,
        broker.port,
        n=16,
        overrides={"outbox": {"db": str(state / "state.db")}, "spool": {"min_free_mb": 0}},
    )
    recorder = Recorder()
    service = run_service(site, recorder)
    try:
        filler = state / "filler"
        with filler.open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(64 * 1024))
            except OSError:  # ENOSPC: the file system is full
                pass
        site.drop(site.scenario)
        wait_until(lambda: service.heartbeat()["commits_paused"] is not None, 30, "commits to pause")
        assert "full" in service.heartbeat()["commits_paused"]
        assert_alive(service)
        filler.unlink()
        all_verdicts_in(site, recorder)
        assert service.heartbeat()["commits_paused"] is None
        assert service.heartbeat()["errors"]["commit_failures"] >= 1
    finally:
        service.stop()
    assert set(recorder.verdicts) == set(good(site))
    assert site.processed_count() == site.expected_verdicts()
    assert site.files_in("processing") == []


# ---------------------------------------------------------------- 4. reused capture ids


def test_a_reused_capture_id_with_other_content_gets_its_own_verdict_under_a_derived_id(
    tmp_path: Path, models: Path, broker: MosquittoBroker
) -> None:
    site = make_site(tmp_path / "site", models, broker.port, n=16)
    recorder = Recorder()
    service = run_service(site, recorder)
    flags = {c.capture_id: c for c in site.scenario if c.expect.startswith("mismatch")}
    reused = next(iter(flags.values()))
    try:
        site.drop(site.scenario)
        all_verdicts_in(site, recorder)
        # the radar's counter resets: the same id comes again with another photo (seed) and time
        other = site.scenario[0] if site.scenario[0] is not reused else site.scenario[1]
        write_capture(reused, site.incoming, start_time() + timedelta(days=1), seed=4242)
        all_verdicts_in(site, recorder, extra=1)
        # and the exact same capture again (a re-sent file): recorded once, not sent twice
        write_capture(reused, site.incoming, start_time() + timedelta(days=1), seed=4242)
        wait_until(lambda: site.files_in("incoming") == [] and site.files_in("processing") == [], 30, "the re-send")
        assert_alive(service)
        dup_ids = [cid for cid in recorder.verdicts if cid.startswith(f"{reused.capture_id}-dup-")]
        assert len(dup_ids) == 1, sorted(recorder.verdicts)
        assert recorder.verdicts[dup_ids[0]].outcome == "mismatch"
        assert service.heartbeat()["errors"]["duplicate_ids"] == 1
        assert other.capture_id in recorder.verdicts
    finally:
        service.stop()
    assert site.processed_count() == site.expected_verdicts() + 1
    with Outbox(site.cfg.outbox.db) as ob:
        assert ob.is_processed(dup_ids[0]) and ob.is_processed(reused.capture_id)
    assert len(site.files_in("done", f"{reused.capture_id}*.json")) == 3  # nothing deleted


# ---------------------------------------------------------------- 5. silence and the lock


def test_an_unreachable_broker_is_logged_once_with_the_fix_and_counted_in_the_heartbeat(
    tmp_path: Path, models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = make_site(tmp_path / "site", models, free_port(), n=16)
    with caplog.at_level(logging.ERROR, logger="iaflash.agent.link.mqtt"):
        service = run_service(site)
        try:
            wait_until(lambda: service.heartbeat()["mqtt"]["connect_failures"] >= 2, 20, "two failed connects")
            beat = service.heartbeat()["mqtt"]
        finally:
            service.stop()
    assert beat["connected"] is False and "refused the TCP connection" in beat["last_error"]
    assert "mqtt.host" in beat["fix"]
    logged = [r for r in caplog.records if "refused the TCP connection" in r.getMessage()]
    assert len(logged) == 1 and "fix: check mqtt.host" in logged[0].getMessage()


def test_a_second_agent_on_the_same_state_directory_is_refused_naming_the_first(
    tmp_path: Path, models: Path, broker: MosquittoBroker
) -> None:
    site = make_site(tmp_path / "site", models, broker.port, n=16)
    first = run_service(site)
    try:
        with pytest.raises(InstanceLocked, match=rf"another agent \(pid {os.getpid()}\)"):
            Service(site.cfg).start()
        assert_alive(first)
    finally:
        first.stop()
    second = run_service(site)  # the lock is released with the first agent
    second.stop()


# ---------------------------------------------------------------- 6. safe decoding


def test_linked_and_fifo_files_are_rejected_without_blocking_and_the_rest_goes_through(
    tmp_path: Path, models: Path, broker: MosquittoBroker
) -> None:
    site = make_site(tmp_path / "site", models, broker.port, n=16)
    recorder = Recorder()
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    os.symlink(target, site.incoming / "linked-sidecar.json")
    os.symlink("/dev/zero", site.incoming / "zero-image.jpg")
    (site.incoming / "zero-image.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "capture_id": "zero-image",
                "site_id": "demo-site",
                "captured_at": "2026-11-25T08:00:00+01:00",
            }
        )
    )
    os.mkfifo(site.incoming / "fifo-image.jpg")
    (site.incoming / "fifo-image.json").write_text(
        (site.incoming / "zero-image.json").read_text().replace("zero-image", "fifo-image")
    )
    service = run_service(site, recorder)
    try:
        site.drop(site.scenario)
        all_verdicts_in(site, recorder)
        wait_until(lambda: {"linked-sidecar", "zero-image", "fifo-image"} <= set(reasons(site)), 10, "rejections")
        assert_alive(service)
    finally:
        service.stop()
    rejected = reasons(site)
    assert {k: rejected[k]["reason"] for k in ("linked-sidecar", "zero-image", "fifo-image")} == dict.fromkeys(
        ("linked-sidecar", "zero-image", "fifo-image"), "not_a_file"
    )
    assert "symbolic link" in rejected["linked-sidecar"]["message"]
    assert target.read_text() == "{}"  # a link is moved, never followed
    assert set(recorder.verdicts) == set(good(site))


def drop_with_image(site: Site, capture: DemoCapture, change: Any) -> None:
    """Drop one scenario capture with its JPEG replaced by ``change(jpeg)``: the image first, the sidecar last."""
    staging = site.root / "staging"
    staging.mkdir(exist_ok=True)
    i = int(capture.capture_id.split("-")[1])
    write_capture(capture, staging, start_time() + timedelta(seconds=5 * i), seed=1000 + i)
    image = staging / f"{capture.capture_id}.jpg"
    image.write_bytes(change(image.read_bytes()))
    os.rename(image, site.incoming / image.name)
    os.rename(staging / f"{capture.capture_id}.json", site.incoming / f"{capture.capture_id}.json")


def with_repeated_scans(jpeg: bytes) -> bytes:
    progressive = progressive_of(jpeg)
    frame = read_structure(progressive)
    return repeated_scans(progressive, 5000, frame.width, frame.height)  # minutes for the bare decoder


def test_a_repeated_scan_jpeg_and_cut_jpegs_are_rejected_with_their_reason_and_the_rest_goes_through(
    tmp_path: Path, models: Path, broker: MosquittoBroker
) -> None:
    """The 95 s stall and the match on half an image: refused before (or right after) decoding, counted."""
    site = make_site(tmp_path / "site", models, broker.port, n=16)
    judged = [c for c in site.scenario if c.expect != "rejected"]
    hostile, cut, fake_end, progressive = judged[:4]
    recorder = Recorder()
    service = run_service(site, recorder)
    try:
        drop_with_image(site, hostile, with_repeated_scans)
        drop_with_image(site, cut, lambda d: d[: len(d) // 2])
        drop_with_image(site, fake_end, lambda d: d[: len(d) // 2] + EOI)
        drop_with_image(site, progressive, progressive_of)  # a sound progressive JPEG is judged as any other
        site.drop([c for c in site.scenario if c not in (hostile, cut, fake_end, progressive)])
        all_verdicts_in(site, recorder, extra=-3)
        poisoned = {hostile.capture_id, cut.capture_id, fake_end.capture_id}
        wait_until(lambda: poisoned <= set(reasons(site)), 10, "the three rejections")
        assert_alive(service)
        counters = service.heartbeat()["spool"]
    finally:
        service.stop()
    rejected = reasons(site)
    assert rejected[hostile.capture_id]["reason"] == "corrupt_image"
    assert "again or out of order (a repeated scan)" in rejected[hostile.capture_id]["message"]
    assert rejected[cut.capture_id]["reason"] == "truncated_jpeg"
    assert "no end-of-image marker FFD9" in rejected[cut.capture_id]["message"]
    assert rejected[fake_end.capture_id]["reason"] == "corrupt_image"
    assert "decoder's uniform grey fill" in rejected[fake_end.capture_id]["message"]
    scenario_corrupt = sum(c.bad == "corrupt_jpeg" for c in site.scenario)
    assert counters["rejected.corrupt_image"] == 2 + scenario_corrupt
    assert counters["rejected.truncated_jpeg"] == 1
    assert set(recorder.verdicts) == set(good(site)) - poisoned
    assert progressive.capture_id in recorder.verdicts
    assert site.files_in("incoming") == [] and site.files_in("processing") == []


# ---------------------------------------------------------------- 7. housekeeping and state.db


def processed_days_ago(db: Path, days: float, capture_ids: list[str]) -> None:
    when = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="milliseconds")
    with sqlite3.connect(db) as conn:
        conn.executemany("UPDATE processed SET processed_at = ? WHERE capture_id = ?", [(when, c) for c in capture_ids])


def test_the_housekeeping_loop_prunes_old_processed_rows_counts_them_and_keeps_unsent_flags(
    tmp_path: Path, models: Path
) -> None:
    """The running agent's housekeeping; the retention is never shorter than spool.retention_days."""
    site = make_site(
        tmp_path / "site",
        models,
        free_port(),  # no broker: the old flag stays unsent
        n=16,
        overrides={"outbox": {"processed_retention_days": 10}, "spool": {"retention_days": 60}},
    )
    db = site.cfg.outbox.db
    old = [f"old-{i}" for i in range(30)]
    recent = [f"recent-{i}" for i in range(5)]
    with Outbox(db) as ob:
        ob.record_many([(c, "match", None, None) for c in old + recent])
        ob.record("old-flag", "mismatch", {"event_id": str(uuid.uuid4())}, f"{site.cfg.topic_root}/events/mismatch")
    processed_days_ago(db, 90, [*old, "old-flag"])
    processed_days_ago(db, 30, recent)  # past outbox.processed_retention_days, within spool.retention_days
    service = run_service(site)
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,), daemon=True)
    runner.start()  # run() does its housekeeping at once, then hourly
    try:
        wait_until(lambda: service.heartbeat()["outbox"]["processed_pruned"] == 30, 30, "the housekeeping's prune")
        time.sleep(0.5)
        assert service.heartbeat()["outbox"]["processed_pruned"] == 30
        assert service.heartbeat()["errors"]["housekeeping"] == 0
    finally:
        stop.set()
        runner.join(30)
        service.stop()
    with Outbox(db) as ob:
        assert ob.processed_count() == 6
        assert ob.has_unsent("old-flag") and all(ob.is_processed(c) for c in recent)


def smash_page_holding(db: Path, needle: bytes, page_size: int = 4096) -> None:
    """Garbage over the page of state.db holding ``needle`` (a failing SD card)."""
    conn = sqlite3.connect(db)
    try:  # every committed page into the main file first
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    at = db.read_bytes().find(needle)
    assert at > 0, needle
    with db.open("r+b") as f:
        f.seek(at // page_size * page_size)
        f.write(bytes(range(256)) * (page_size // 256))


def test_a_corrupt_state_db_is_salvaged_at_start_and_its_unsent_flags_are_sent(
    tmp_path: Path, models: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """It used to stop the start with "sqlite3 FILE .recover": now the file is moved aside, the flags go out."""
    site = make_site(tmp_path / "site", models, free_port(), n=16)  # no broker yet: the flags stay unsent
    first = run_service(site, Recorder())
    try:
        site.drop(site.scenario)
        wait_until(lambda: site.processed_count() == site.expected_verdicts(), 90, "every verdict to be durable")
    finally:
        first.stop()
    db = site.cfg.outbox.db
    with Outbox(db) as ob:
        unsent = {json.loads(r.payload)["capture_id"]: r.event_id for r in ob.pending(100)}
    assert set(unsent) == set(site.expected_flags())
    match = next(c.capture_id for c in site.scenario if c.expect == "match")
    smash_page_holding(db, match.encode())  # the processed rows' page: the flags' events survive
    cfg = site.cfg.model_copy(update={"mqtt": site.cfg.mqtt.model_copy(update={"port": broker.port})})
    central = Subscriber("127.0.0.1", broker.port).start()
    try:
        with caplog.at_level(logging.ERROR, logger="iaflash.agent.outbox.salvage"):
            service = Service(cfg)
            service.start()  # used to stop here, naming sqlite3's .recover
        try:
            assert central.wait_for(len(unsent), timeout=30)
            (note,) = service.heartbeat()["outbox"]["salvaged"]
            assert_alive(service)
        finally:
            service.stop()
        events = central.events
    finally:
        central.stop()
    assert sorted(e["event_id"] for e in events) == sorted(unsent.values())  # the same events, none lost
    assert note["unsent_salvaged"] == len(unsent) and note["flags_to_check_count"] == 0
    moved = Path(note["moved_to"])
    assert moved.exists() and moved.name.startswith("state.db.corrupt-")
    (logged,) = [r.getMessage() for r in caplog.records if "was corrupt" in r.getMessage()]
    assert moved.name in logged and f"{len(unsent)} unsent events" in logged and "no flag is in doubt" in logged
    doctor = check_outbox(cfg)
    assert doctor.status == "warn" and moved.name in doctor.finding and "delete both" in doctor.fix
    with Outbox(db) as ob:
        assert ob.depth() == 0 and all(ob.is_processed(c) for c in unsent)  # rebuilt from the events
    for path in (moved, Path(f"{moved}.json")):
        path.unlink()  # the operator's fix: the state clears
    assert salvage_notes(db) == [] and check_outbox(cfg).status == "ok"


@needs_root
def test_a_full_state_db_disk_at_start_waits_instead_of_stopping_then_starts_by_itself(
    tmp_path: Path, models: Path, broker: MosquittoBroker, tmpfs: Any
) -> None:
    """Before the outbox can create its tables: the start waits (one ERROR), then the captures go through."""
    state = tmpfs(tmp_path / "state", size="2m")
    site = make_site(
        tmp_path / "site",
        models,
        broker.port,
        n=16,
        overrides={"outbox": {"db": str(state / "state.db")}, "spool": {"min_free_mb": 0}},
    )
    filler = state / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError:  # ENOSPC: the file system is full
            pass
    recorder = Recorder()
    service = Service(site.cfg, on_verdict=recorder)
    stop = threading.Event()
    errors: list[BaseException] = []

    def start() -> None:
        try:
            service.start(stop)
        except BaseException as exc:  # the test reports it below
            errors.append(exc)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    try:
        starter.join(3)
        assert starter.is_alive() and not errors  # waiting for room, not stopped
        filler.unlink()
        starter.join(30)
        assert not starter.is_alive() and not errors, errors
        site.drop(site.scenario)
        all_verdicts_in(site, recorder)
        assert_alive(service)
    finally:
        stop.set()
        starter.join(10)
        service.stop()
    assert set(recorder.verdicts) == set(good(site))
