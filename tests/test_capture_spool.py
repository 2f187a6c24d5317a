"""The spool: claim by atomic rename, rejection with an error JSON, finish, recovery, purge."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iaflash.agent.capture.spool import Spool, read_regular
from iaflash.agent.config import SpoolConfig
from iaflash.agent.errors import CaptureRejected

PLATE = "AB-123-CD"


def jpeg(seed: int = 0, size: int = 64) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return bytes(buf.tobytes())


def sidecar(capture_id: str, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "capture_id": capture_id,
        "site_id": "site-042",
        "captured_at": "2026-11-25T08:14:03+01:00",
        "plate": PLATE,
    }
    doc.update(extra)
    return doc


def write_capture(
    folder: Path,
    capture_id: str,
    *,
    images: list[str] | None = None,
    doc: dict[str, Any] | None = None,
    raw: bytes | None = None,
) -> list[str]:
    """Write image(s) then the sidecar last, as a radar does; return the file names written."""
    names = images if images is not None else [f"{capture_id}.jpg"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(jpeg(i))
    body = raw if raw is not None else json.dumps(doc or sidecar(capture_id)).encode()
    (folder / f"{capture_id}.json").write_bytes(body)
    return [*names, f"{capture_id}.json"]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", SpoolConfig(max_image_bytes=200_000, max_sidecar_bytes=4096))
    s.ensure_layout()
    return s


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def error_doc(spool: Spool, capture_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((spool.rejected / f"{capture_id}.error.json").read_text())
    return doc


def test_ensure_layout_creates_the_four_folders(spool: Spool) -> None:
    assert all(p.is_dir() for p in (spool.incoming, spool.processing, spool.done, spool.rejected))


def test_half_written_captures_are_not_ready(spool: Spool) -> None:
    (spool.incoming / "a.jpg").write_bytes(jpeg())  # sidecar not yet written
    (spool.incoming / "b.jpg").write_bytes(jpeg())
    (spool.incoming / "b.json.tmp").write_text("{")
    (spool.incoming / ".c.json").write_text("{")
    (spool.incoming / "d.json.part").write_text("{")
    assert spool.ready() == []


def test_ready_is_oldest_first_then_by_name(spool: Spool) -> None:
    now = time.time()
    for cid, age in (("z", 30), ("a", 10), ("m", 30), ("b", 20)):
        write_capture(spool.incoming, cid)
        t = now - age
        os.utime(spool.incoming / f"{cid}.json", (t, t))
    assert spool.ready() == ["m", "z", "b", "a"]
    assert spool.ready(limit=2) == ["m", "z"]


def test_claim_moves_sidecar_and_images_and_reads_them(spool: Spool) -> None:
    write_capture(
        spool.incoming, "c1", images=["c1_1.jpg", "c1_2.jpg"], doc=sidecar("c1", images=["c1_1.jpg", "c1_2.jpg"])
    )
    claimed = spool.claim("c1")
    assert claimed is not None
    assert claimed.capture.capture_id == "c1" and claimed.capture.plate == PLATE
    assert claimed.sidecar == spool.processing / "c1.json"
    assert claimed.images == [spool.processing / "c1_1.jpg", spool.processing / "c1_2.jpg"]
    assert claimed.image_bytes == [jpeg(0), jpeg(1)]
    assert files(spool.incoming) == set()
    assert files(spool.processing) == {"c1.json", "c1_1.jpg", "c1_2.jpg"}
    assert spool.counters()["claimed"] == 1


def test_second_claim_of_the_same_id_returns_none(spool: Spool) -> None:
    write_capture(spool.incoming, "c1")
    assert spool.claim("c1") is not None
    assert spool.claim("c1") is None
    assert spool.claim("never-existed") is None
    assert spool.counters()["claimed"] == 1


def test_same_id_arriving_while_in_flight_waits_in_incoming(spool: Spool) -> None:
    write_capture(spool.incoming, "c1")
    assert spool.claim("c1") is not None
    write_capture(spool.incoming, "c1")
    assert spool.claim("c1") is None
    assert files(spool.incoming) == {"c1.jpg", "c1.json"}
    spool.finish("c1")
    assert spool.claim("c1") is not None
    spool.finish("c1")
    assert files(spool.done) == {"c1.json", "c1.jpg", "c1~1.json", "c1~1.jpg"}


def test_claim_refuses_a_path_as_id(spool: Spool) -> None:
    with pytest.raises(ValueError, match="not a capture id"):
        spool.claim("../x")


BAD_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("notjson", {"raw": b"{not json"}, "sidecar_not_json"),
    ("invalid", {"doc": sidecar("invalid", speed_kmh=9000)}, "sidecar_invalid"),
    ("unknown", {"doc": sidecar("unknown", colour="red")}, "unknown_fields"),
    ("badts", {"doc": sidecar("badts", captured_at="2026-11-25T08:14:03")}, "bad_timestamp"),
    ("noimage", {"images": []}, "missing_image"),
    (
        "noimage2",
        {"images": ["noimage2_1.jpg"], "doc": sidecar("noimage2", images=["noimage2_1.jpg", "noimage2_2.jpg"])},
        "missing_image",
    ),
    ("mismatch", {"doc": sidecar("other-id")}, "capture_id_mismatch"),
    ("big", {"raw": json.dumps(sidecar("big", equipment="x" * 64)).encode() + b" " * 5000}, "sidecar_too_large"),
]


@pytest.mark.parametrize(("cid", "kwargs", "reason"), BAD_CASES)
def test_bad_capture_goes_to_rejected_with_error_json_and_a_good_one_beside_it_is_fine(
    spool: Spool, cid: str, kwargs: dict[str, Any], reason: str
) -> None:
    written = write_capture(spool.incoming, cid, **kwargs)
    write_capture(spool.incoming, "good")
    with pytest.raises(CaptureRejected) as info:
        spool.claim(cid)
    assert info.value.reason == reason
    err = error_doc(spool, cid)
    assert err["reason"] == reason and err["capture_id"] == cid
    assert err["source"] == str(spool.incoming / f"{cid}.json")
    assert err["message"] == str(info.value) and "Fix:" in err["message"]
    assert sorted(err["files"]) == sorted(written)
    assert files(spool.rejected) == {*written, f"{cid}.error.json"}
    assert files(spool.processing) == set()
    good = spool.claim("good")
    assert good is not None and good.image_bytes == [jpeg(0)]
    assert files(spool.incoming) == set()
    assert spool.counters()[f"rejected.{reason}"] == 1 and spool.counters()["rejected_total"] == 1


def test_too_large_and_empty_images_are_rejected(spool: Spool) -> None:
    write_capture(spool.incoming, "huge")
    (spool.incoming / "huge.jpg").write_bytes(b"\xff" * 200_001)
    write_capture(spool.incoming, "empty")
    (spool.incoming / "empty.jpg").write_bytes(b"")
    for cid, reason in (("huge", "image_too_large"), ("empty", "empty_image")):
        with pytest.raises(CaptureRejected) as info:
            spool.claim(cid)
        assert info.value.reason == reason and "max_image_bytes" in str(info.value)
        assert error_doc(spool, cid)["files"] == [f"{cid}.jpg", f"{cid}.json"]


def test_a_folder_named_as_an_image_is_rejected_not_left_in_processing(spool: Spool) -> None:
    (spool.incoming / "dir.jpg").mkdir()
    (spool.incoming / "dir.json").write_text(json.dumps(sidecar("dir")))
    with pytest.raises(CaptureRejected) as info:
        spool.claim("dir")
    assert info.value.reason == "not_a_file"
    assert files(spool.processing) == set()
    assert error_doc(spool, "dir")["files"] == ["dir.jpg", "dir.json"]


def test_bad_sidecar_name_is_rejected_under_a_safe_name(spool: Spool) -> None:
    (spool.incoming / "bad name!.json").write_bytes(json.dumps(sidecar("x")).encode())
    (spool.incoming / "_x.json").write_bytes(b"{}")
    assert spool.ready() == ["bad name!", "_x"] or spool.ready() == ["_x", "bad name!"]
    for cid in spool.ready():
        with pytest.raises(CaptureRejected) as info:
            spool.claim(cid)
        assert info.value.reason == "bad_capture_id"
    assert files(spool.incoming) == set()
    errors = [json.loads(p.read_text()) for p in spool.rejected.glob("*.error.json")]
    assert sorted(e["original_name"] for e in errors) == ["_x.json", "bad name!.json"]
    for e in errors:
        assert e["capture_id"].startswith("badid-") and (spool.rejected / e["files"][0]).is_file()
    assert spool.counters()["rejected.bad_capture_id"] == 2


def test_rejection_is_logged_once_without_the_plate(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    write_capture(spool.incoming, "c1", doc=sidecar("c1", speed_kmh=9000, plate="AB-123-CD-TOOLONGX"))
    with caplog.at_level(logging.DEBUG, logger="iaflash.agent.capture.spool"), pytest.raises(CaptureRejected):
        spool.claim("c1")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sidecar_invalid" in warnings[0].getMessage()
    assert "AB-123" not in caplog.text
    assert "AB-123" not in (spool.rejected / "c1.error.json").read_text()


def test_reject_after_claim_moves_processing_files(spool: Spool) -> None:
    write_capture(spool.incoming, "c1", images=["c1_a.jpg"], doc=sidecar("c1", images=["c1_a.jpg"]))
    assert spool.claim("c1") is not None
    path = spool.reject("c1", CaptureRejected("corrupt_jpeg", "c1_a.jpg: not a JPEG. Fix: check the camera"))
    assert path == spool.rejected / "c1.error.json"
    err = json.loads(path.read_text())
    assert err["reason"] == "corrupt_jpeg" and sorted(err["files"]) == ["c1.json", "c1_a.jpg"]
    assert files(spool.processing) == set()
    assert spool.counters()["rejected.corrupt_jpeg"] == 1


def test_error_json_never_overwrites_a_file_of_another_capture(spool: Spool) -> None:
    """A capture named "x.error" has the sidecar "x.error.json", the error file name of capture "x"."""
    write_capture(spool.incoming, "x.error", doc=sidecar("x.error", lane=99))
    write_capture(spool.incoming, "x", doc=sidecar("x", lane=99))
    for cid in ("x.error", "x"):
        with pytest.raises(CaptureRejected):
            spool.claim(cid)
    assert len(files(spool.rejected)) == 6
    assert error_doc(spool, "x.error")["capture_id"] == "x.error"


def test_finish_moves_to_done(spool: Spool) -> None:
    write_capture(spool.incoming, "c1")
    assert spool.claim("c1") is not None
    spool.finish("c1")
    assert files(spool.done) == {"c1.json", "c1.jpg"} and files(spool.processing) == set()
    assert spool.counters()["finished"] == 1
    with pytest.raises(FileNotFoundError, match="c1"):
        spool.finish("c1")


def test_recover_requeues_unprocessed_and_finishes_processed(spool: Spool) -> None:
    for cid in ("p1", "u1", "u2"):
        write_capture(spool.incoming, cid)
        assert spool.claim(cid) is not None
    (spool.processing / "orphan.jpg").write_bytes(jpeg())
    restarted = Spool(spool.root, spool.cfg)  # a new process: nothing in memory
    assert restarted.recover(lambda cid: cid == "p1") == (1, 2)
    assert files(spool.done) == {"p1.json", "p1.jpg"}
    assert files(spool.incoming) == {"u1.json", "u1.jpg", "u2.json", "u2.jpg", "orphan.jpg"}
    assert files(spool.processing) == set()
    assert sorted(restarted.ready()) == ["u1", "u2"]
    assert restarted.claim("u1") is not None
    assert restarted.counters()["requeued"] == 2


def test_orphan_files_in_incoming_are_rejected_only_when_old(spool: Spool) -> None:
    write_capture(spool.incoming, "c1")
    (spool.incoming / "lonely.jpg").write_bytes(jpeg())
    (spool.incoming / "late.jpg").write_bytes(jpeg())
    (spool.incoming / "late.jpg.part").write_bytes(b"")
    old = time.time() - 7200
    for name in ("c1.jpg", "lonely.jpg"):
        os.utime(spool.incoming / name, (old, old))
    assert spool.reject_orphans(older_than_s=3600) == 1
    assert files(spool.incoming) == {"c1.jpg", "c1.json", "late.jpg", "late.jpg.part"}
    assert error_doc(spool, "lonely.jpg")["reason"] == "orphan_file"


def test_purge_respects_age_and_keep(spool: Spool) -> None:
    for cid in ("old1", "old2", "new"):
        write_capture(spool.incoming, cid)
        assert spool.claim(cid) is not None
        spool.finish(cid)
    now = time.time()
    for cid in ("old1", "old2"):
        os.utime(spool.done / f"{cid}.json", (now - 40 * 86400, now - 40 * 86400))
    assert spool.purge(older_than_days=30, keep=lambda cid: cid == "old2", now=now) == 1
    assert files(spool.done) == {"old2.json", "old2.jpg", "new.json", "new.jpg"}
    assert spool.purge(older_than_days=30, now=now) == 1
    assert spool.purge(older_than_days=0, now=now + 1) == 1
    assert files(spool.done) == set() and spool.counters()["purged"] == 3


def test_disk_ok_compares_free_space(spool: Spool) -> None:
    assert spool.disk_ok(0) is True
    assert spool.disk_ok(10**12) is False


KINDS = st.sampled_from(["good", "good2", "late_fail", "not_json", "invalid", "missing_image", "unknown"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(KINDS, min_size=1, max_size=8), crash_at=st.integers(min_value=0, max_value=8))
def test_no_file_is_ever_lost(tmp_path: Path, kinds: list[str], crash_at: int) -> None:
    """Every file written to incoming/ ends in done/ or rejected/, through claims, rejects and a restart."""
    root = tmp_path / f"s{time.monotonic_ns()}"
    spool = Spool(root, SpoolConfig())
    spool.ensure_layout()
    written: set[str] = set()
    for i, kind in enumerate(kinds):
        cid = f"c{i}"
        if kind == "good2":
            written.update(
                write_capture(
                    spool.incoming,
                    cid,
                    images=[f"{cid}_a.jpg", f"{cid}_b.jpg"],
                    doc=sidecar(cid, images=[f"{cid}_a.jpg", f"{cid}_b.jpg"]),
                )
            )
        elif kind == "not_json":
            written.update(write_capture(spool.incoming, cid, raw=b"\x00"))
        elif kind == "missing_image":
            written.update(write_capture(spool.incoming, cid, doc=sidecar(cid, images=["nope.jpg"])))
        else:
            extra = {"speed_kmh": -5} if kind == "invalid" else {"x": 1} if kind == "unknown" else {}
            written.update(write_capture(spool.incoming, cid, doc=sidecar(cid, **extra)))
    late_fail = {f"c{i}" for i, k in enumerate(kinds) if k == "late_fail"}
    for step, cid in enumerate(spool.ready()):
        if step == crash_at:  # the process dies with this capture claimed but unfinished
            with contextlib.suppress(CaptureRejected):
                spool.claim(cid)
            break
        try:
            claimed = spool.claim(cid)
        except CaptureRejected:
            continue
        assert claimed is not None
        if cid in late_fail:
            spool.reject(cid, CaptureRejected("corrupt_jpeg", "bad JPEG"))
        else:
            spool.finish(cid)
    restarted = Spool(root, SpoolConfig())
    restarted.recover(lambda _: False)
    for cid in restarted.ready():
        try:
            if restarted.claim(cid) is not None:
                restarted.finish(cid)
        except CaptureRejected:
            pass
    assert files(spool.incoming) == set() and files(spool.processing) == set()
    ended = files(spool.done) | {f for f in files(spool.rejected) if not f.endswith(".error.json")}
    assert ended == written
    bad = sum(k in ("not_json", "invalid", "missing_image", "unknown", "late_fail") for k in kinds)
    assert len(list(spool.rejected.glob("*.error.json"))) >= bad - kinds.count("late_fail")


# ---------------------------------------------------------------- defensive reads and attempts (docs/RELIABILITY.md)


def test_a_claim_left_unfinished_is_counted_across_restarts_and_quarantined_after_max_attempts(tmp_path: Path) -> None:
    """Each start finds the capture in processing/ (the agent died on it), requeues it and claims it again."""
    cfg = SpoolConfig(max_attempts=2)
    first = Spool(tmp_path / "spool", cfg)
    first.ensure_layout()
    names = write_capture(first.incoming, "crasher")
    assert first.claim("crasher") is not None and first.attempts("crasher") == 1  # then the agent is killed
    restarted = Spool(tmp_path / "spool", cfg)
    assert restarted.recover(lambda _: False) == (0, 1)
    assert restarted.claim("crasher") is not None and restarted.attempts("crasher") == 2
    last = Spool(tmp_path / "spool", cfg)
    last.recover(lambda _: False)
    with pytest.raises(CaptureRejected) as info:
        last.claim("crasher")
    assert info.value.reason == "quarantined" and "stopped the agent 2 times" in str(info.value)
    assert files(last.rejected) == {*names, "crasher.error.json"}
    assert last.attempts("crasher") == 0 and files(last.processing) == set()


def test_a_finished_capture_leaves_no_attempt_count(spool: Spool) -> None:
    write_capture(spool.incoming, "ok")
    assert spool.claim("ok") is not None
    spool.finish("ok")
    assert list(spool.attempts_dir.iterdir()) == []


def test_a_symlinked_sidecar_is_rejected_never_followed(spool: Spool, tmp_path: Path) -> None:
    target = tmp_path / "secret.json"
    target.write_text(json.dumps(sidecar("linked")))
    os.symlink(target, spool.incoming / "linked.json")
    assert spool.ready() == ["linked"]  # listed, so it cannot sit in incoming/ forever unseen
    with pytest.raises(CaptureRejected) as info:
        spool.claim("linked")
    assert info.value.reason == "not_a_file" and "symbolic link" in str(info.value)
    assert (spool.rejected / "linked.json").is_symlink() and target.read_text().startswith("{")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_an_image_swapped_for_a_fifo_or_a_device_link_is_refused_without_blocking(spool: Spool, kind: str) -> None:
    """A FIFO used to block an intake thread forever, /dev/zero to exhaust memory."""
    image = spool.incoming / "swap.jpg"
    if kind == "fifo":
        os.mkfifo(image)
    else:
        os.symlink("/dev/zero", image)
    (spool.incoming / "swap.json").write_text(json.dumps(sidecar("swap")))
    with pytest.raises(CaptureRejected) as info:
        spool.claim("swap")
    assert info.value.reason == "not_a_file"
    assert files(spool.rejected) == {"swap.jpg", "swap.json", "swap.error.json"}


def test_read_regular_checks_type_and_size_on_the_opened_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x" * 10)
    assert read_regular(path, 10, "image", "src") == b"x" * 10
    with pytest.raises(CaptureRejected) as info:
        read_regular(path, 9, "image", "src")
    assert info.value.reason == "image_too_large"


def test_an_unexpected_error_rejects_the_capture_as_internal_error_with_an_error_id(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    write_capture(spool.incoming, "boom")
    assert spool.claim("boom") is not None
    try:
        raise RecursionError("maximum recursion depth exceeded")
    except RecursionError as exc:
        with caplog.at_level(logging.ERROR):
            error_id = spool.reject_internal("boom", "decoding it", exc)
    doc = json.loads((spool.rejected / "boom.error.json").read_text())
    assert doc["reason"] == "internal_error" and f"error id {error_id}" in doc["message"]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log under the same id
    assert spool.counters()["rejected.internal_error"] == 1 and files(spool.processing) == set()


def test_recovery_rejects_a_poison_sidecar_and_requeues_the_others(spool: Spool) -> None:
    write_capture(spool.processing, "good")
    (spool.processing / "deep.json").write_bytes(b"[" * 2000 + b"]" * 2000)  # past json's recursion limit
    (spool.processing / "deep.jpg").write_bytes(jpeg())
    assert spool.recover(lambda _: False) == (0, 2)  # reading it there used to raise RecursionError
    with pytest.raises(CaptureRejected) as info:
        spool.claim("deep")
    assert info.value.reason == "sidecar_too_deep"
    assert spool.claim("good") is not None


def test_a_processed_id_with_other_content_in_processing_is_requeued_not_finished(spool: Spool) -> None:
    """A reused id (radar counter reset) claimed before a crash must get its own verdict after it."""
    write_capture(spool.incoming, "r1")
    assert spool.claim("r1") is not None
    spool.finish("r1")
    (spool.processing / "r1.jpg").write_bytes(jpeg(seed=99))
    (spool.processing / "r1.json").write_text(json.dumps(sidecar("r1", lane=2)))
    assert spool.recover(lambda cid: cid == "r1") == (0, 1)
    assert {"r1.jpg", "r1.json"} <= files(spool.incoming)


def test_rejected_files_are_purged_after_their_retention(spool: Spool) -> None:
    (spool.rejected / "old.json").write_text("{}")
    (spool.rejected / "new.json").write_text("{}")
    old = time.time() - 10 * 86400
    os.utime(spool.rejected / "old.json", (old, old))
    assert spool.purge_rejected(older_than_days=5) == 1
    assert files(spool.rejected) == {"new.json"}


def test_disk_problem_names_the_file_system_at_fault(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", SpoolConfig())
    s.ensure_layout()
    s.watched = [s.root, tmp_path / "state"]
    assert (
        s.disk_problem(0)
        == f"{tmp_path / 'state'}: cannot be read (No such file or directory); fix: check the mount and the folder"
    )
    (tmp_path / "state").mkdir()
    assert s.disk_problem(0) is None
    assert "less than spool.min_free_mb" in (s.disk_problem(10**12) or "")
