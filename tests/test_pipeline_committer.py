"""agent.pipeline.committer on its own (no broker, no model): verdicts become durable in one
transaction per group, flags become outbox events, files move to done/ only after the commit,
and a capture already processed never yields a second event."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest

from iaflash.agent.capture.intake import Work
from iaflash.agent.capture.spool import Spool
from iaflash.agent.config import Config, parse_config
from iaflash.agent.decision.verdict import Prediction, Verdict
from iaflash.agent.demo.runner import demo_config
from iaflash.agent.demo.scenario import build_scenario, start_time, write_capture
from iaflash.agent.errors import OutboxError
from iaflash.agent.outbox.events import validate_event
from iaflash.agent.outbox.salvage import check_and_salvage
from iaflash.agent.outbox.store import Outbox
from iaflash.agent.pipeline.committer import Committer, Decided
from iaflash.agent.registry.record import RegistryRecord


@pytest.fixture
def site(tmp_path: Path) -> tuple[Config, Spool, list[str]]:
    cfg = parse_config(demo_config(tmp_path, 1, "5"))
    spool = Spool(cfg.spool.dir, cfg.spool)
    spool.ensure_layout()
    scenario = [c for c in build_scenario(16) if c.expect != "rejected"][:6]
    for i, c in enumerate(scenario):
        write_capture(c, spool.incoming, start_time() + timedelta(seconds=7 * i), seed=100 + i)
    return cfg, spool, [c.capture_id for c in scenario]


def _verdict(outcome: str) -> Verdict:
    if outcome != "mismatch":
        return Verdict(outcome=outcome, reason="test: " + outcome)
    return Verdict(
        outcome="mismatch",
        reason="test: P(registered make) below the threshold",
        level="make",
        p_make=0.001,
        p_model=0.001,
        top_k=(Prediction(make="PEUGEOT", model="3008", p=0.99),),
        registry=RegistryRecord(make="TOYOTA", model="YARIS", genre="VP", body="CI"),
        thresholds={"make_threshold": 0.05},
        model={"name": "test", "version": "1", "backend": "onnxruntime", "device": "cpu"},
    )


def _decided(spool: Spool, capture_id: str, outcome: str) -> Decided:
    claimed = spool.claim(capture_id)
    assert claimed is not None
    work = Work(claimed=claimed, tensor=None, image_problem=None, started=time.perf_counter())
    return Decided(work=work, verdict=_verdict(outcome), plate_key=bytes(32))


def _run(committer: Committer, items: list[Decided]) -> None:
    committer.thread.start()
    for item in items:
        committer.put(item)
    committer.inputs_done()
    committer.thread.join(30)
    assert not committer.thread.is_alive() and committer.fatal is None


def test_flags_become_valid_outbox_events_and_every_capture_moves_to_done(
    site: tuple[Config, Spool, list[str]],
) -> None:
    cfg, spool, ids = site
    outcomes = ["mismatch", "match", "mismatch", "inconclusive", "match", "unknown_plate"]
    committer = Committer(cfg, spool)
    _run(committer, [_decided(spool, cid, o) for cid, o in zip(ids, outcomes, strict=True)])
    with Outbox(cfg.outbox.db) as outbox:
        events = [json.loads(r.payload) for r in outbox.pending(100)]
        assert all(outbox.is_processed(cid) for cid in ids)
    assert sorted(e["capture_id"] for e in events) == sorted([ids[0], ids[2]])
    for event in events:
        validate_event(event)
        assert event["verdict"]["outcome"] == "mismatch" and event["verdict"]["level"] == "make"
    assert sorted(p.stem for p in (spool.root / "done").glob("*.json")) == sorted(ids)
    assert list((spool.root / "processing").iterdir()) == []
    assert committer.outcomes["mismatch/make"] == 2 and committer.outcomes["match"] == 2
    assert len(committer.latencies_ms) == 6


def test_a_capture_committed_twice_yields_one_event(site: tuple[Config, Spool, list[str]]) -> None:
    """The processed table makes the commit idempotent: a redo after a crash adds nothing."""
    cfg, spool, ids = site
    first = _decided(spool, ids[0], "mismatch")
    _run(Committer(cfg, spool), [first])
    # the same capture, decided again (as after a crash between the commit and the move)
    again = Decided(work=first.work, verdict=first.verdict, plate_key=first.plate_key)
    _run(Committer(cfg, spool), [again])
    with Outbox(cfg.outbox.db) as outbox:
        assert [json.loads(r.payload)["capture_id"] for r in outbox.pending(100)] == [ids[0]]


def test_the_callback_sees_each_verdict_after_it_is_durable(site: tuple[Config, Spool, list[str]]) -> None:
    cfg, spool, ids = site
    seen: list[tuple[str, bool]] = []

    def on_verdict(capture: object, verdict: Verdict, event: object) -> None:
        with Outbox(cfg.outbox.db) as outbox:
            seen.append((verdict.outcome, outbox.is_processed(capture.capture_id)))  # type: ignore[attr-defined]

    _run(Committer(cfg, spool, on_verdict=on_verdict), [_decided(spool, ids[1], "match")])
    assert seen == [("match", True)]


def test_a_state_db_found_corrupt_while_running_stops_the_commit_thread_and_the_next_start_salvages_it(
    site: tuple[Config, Spool, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    """Retrying a damaged file forever would stop the site: the agent exits, systemd restarts it, the start salvages."""
    cfg, spool, ids = site
    db = cfg.outbox.db
    with Outbox(db) as outbox:
        outbox.record_many([(f"old-{i}", "match", None, None) for i in range(3000)])
    size = db.stat().st_size
    with db.open("r+b") as f:  # every page but the schema's: the next insert reads garbage
        f.seek(2 * 4096)
        f.write(bytes(range(256)) * ((size - 2 * 4096) // 256))
    committer = Committer(cfg, spool)
    committer.thread.start()
    committer.put(_decided(spool, ids[0], "mismatch"))
    committer.inputs_done()
    committer.thread.join(30)
    assert isinstance(committer.fatal, OutboxError) and "malformed" in str(committer.fatal)
    assert any("the agent stops so that its next start" in r.getMessage() for r in caplog.records)
    assert (spool.root / "processing" / f"{ids[0]}.json").exists()  # nothing lost: redone after the restart
    assert Path(f"{db}.suspect").is_file()  # the mark: salvaged at the next start even if quick_check passed
    note = check_and_salvage(db)  # what the next start does first
    assert note is not None and note["state"] == "salvaged"
    assert not Path(f"{db}.suspect").exists()
    with Outbox(db) as outbox:
        assert spool.recover(outbox.is_processed) == (0, 1)  # requeued, judged again
