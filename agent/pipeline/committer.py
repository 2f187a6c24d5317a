"""The commit stage: verdicts become durable, in groups, off the inference thread.

The inference thread hands each decided capture over; this thread writes as many as are
waiting in ONE SQLite transaction (``processed`` rows + outbox events: one fsync for the
group), then moves their files to done/, then logs and counts them. Durability order is
unchanged: nothing is published or moved before its transaction commits.

Failures it survives (docs/RELIABILITY.md): a commit that fails (disk full, read-only file
system, I/O error on state.db) pauses commits with one ERROR and retries the same group until it
goes through (the captures wait in processing/, nothing is lost), except a corrupt state.db, which
stops the agent so that the next start salvages it (agent/outbox/salvage.py); a move to done/ that fails
after the commit is retried later (the verdict is already durable); an unexpected error while
building one capture's event rejects that capture (``internal_error``). A capture id that was
already processed with OTHER content (a radar whose counter reset) is committed under a derived
id ``<id>-dup-<sha256[:12]>`` (counted in ``duplicate_ids``), never dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iaflash.agent.capture.intake import Work
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.capture.spool import Spool
from iaflash.agent.config import Config
from iaflash.agent.decision.verdict import Verdict
from iaflash.agent.errors import OutboxError
from iaflash.agent.health import Liveness
from iaflash.agent.outbox.events import build_event, topic_for
from iaflash.agent.outbox.salvage import mark_suspect
from iaflash.agent.outbox.store import Outbox, Recorded, is_corruption

log = logging.getLogger(__name__)

GROUP_MAX = 64
QUEUE_DEPTH = 64
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0  # a failed commit is retried with this backoff, forever

VerdictCallback = Callable[[Capture, Verdict, "dict[str, Any] | None"], None]


@dataclass
class Decided:
    """A capture with its verdict, waiting to be made durable."""

    work: Work
    verdict: Verdict
    plate_key: bytes | None
    spool_id: str | None = None  # the name of its files in the spool, when it is processed under a derived id


class Committer:
    """Owns the commit thread, its outbox connection, and the per-verdict counters."""

    def __init__(self, cfg: Config, spool: Spool, on_verdict: VerdictCallback | None = None) -> None:
        self.cfg, self.spool, self.on_verdict = cfg, spool, on_verdict
        self.outcomes: Counter[str] = Counter()
        self.latencies_ms: list[float] = []
        self.stage_samples: dict[str, list[float]] = {}
        self.liveness = Liveness(stuck_after_s=60.0)
        self.fatal: BaseException | None = None
        self.errors: Counter[str] = Counter()  # commit_failures, finish_failures, internal_error, duplicate_ids
        self.paused: str | None = None  # why commits are paused (shown in the heartbeat), None when flowing
        self._unfinished: list[str] = []  # committed, but the move to done/ failed: retried each loop
        self._queue: queue.Queue[Decided] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._inputs_done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="commit", daemon=True)

    def put(self, item: Decided) -> None:
        """Hand a verdict over; blocks while the commit queue is full (back-pressure, never a drop)."""
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.fatal is not None:
                    return  # the capture stays in processing/ and is redone after the restart

    def inputs_done(self) -> None:
        """No more verdicts will come: commit what is queued, then stop."""
        self._inputs_done.set()

    def _group(self) -> list[Decided] | None:
        try:
            group = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return None
        while len(group) < GROUP_MAX:
            try:
                group.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return group

    def _loop(self) -> None:
        outbox = None
        try:
            outbox = Outbox(self.cfg.outbox.db)  # this thread's own connection
            while True:
                self._retry_finish()
                group = self._group()
                if group is None:
                    if self._inputs_done.is_set() and self._queue.empty():
                        return
                    continue
                outbox = self._commit_until_done(outbox, group)
        except BaseException as exc:  # disk full, a bug: the service exits and systemd restarts it
            log.exception("commit thread failed")
            self.fatal = exc
        finally:
            if outbox is not None:
                outbox.close()

    def _commit_until_done(self, outbox: Outbox, group: list[Decided]) -> Outbox:
        """Commit ``group``, retrying with backoff while the store fails; returns the (maybe reopened) outbox."""
        delay = RETRY_MIN_S
        while True:
            self.liveness.begin()
            try:
                self._commit(outbox, group)
                break
            except OutboxError as exc:
                self.errors["commit_failures"] += 1
                if exc.__cause__ is not None and is_corruption(exc.__cause__):
                    mark_suspect(outbox.path, str(exc))  # the next start salvages it even if quick_check passes
                    log.error(
                        "state.db is corrupt (%s): the agent stops so that its next start moves the file aside "
                        "and salvages its unsent events; %d verdict(s) are redone then (captures in processing/)",
                        exc,
                        len(group),
                    )
                    raise
                if self.paused is None:
                    log.error(
                        "commits paused: %s; %d verdict(s) wait in memory (their captures stay in processing/) "
                        "and are retried every %.0f-%.0f s by themselves",
                        exc,
                        len(group),
                        RETRY_MIN_S,
                        RETRY_MAX_S,
                    )
                self.paused = str(exc)
            finally:
                self.liveness.end()  # a paused store is not a stuck thread: the watchdog keeps being fed
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            outbox = self._reopen(outbox)
        if self.paused is not None:
            log.warning("commits resumed: the outbox %s accepts writes again", self.cfg.outbox.db)
            self.paused = None
        return outbox

    def _reopen(self, outbox: Outbox) -> Outbox:
        """A fresh connection after a failure (a file system remounted read-write needs one)."""
        try:
            fresh = Outbox(self.cfg.outbox.db)
        except OutboxError:
            return outbox
        with contextlib.suppress(OutboxError):
            outbox.close()
        return fresh

    def _finish(self, capture_id: str) -> None:
        try:
            self.spool.finish(capture_id)
        except OSError as exc:  # the verdict is durable: moving the files can wait (recovery also does it)
            self.errors["finish_failures"] += 1
            log.error(
                "capture %s: verdict committed but its files cannot move to done/ (%s); retried later", capture_id, exc
            )
            self._unfinished.append(capture_id)

    def _retry_finish(self) -> None:
        pending, self._unfinished = self._unfinished, []
        for capture_id in pending:
            try:
                self.spool.finish(capture_id)
            except FileNotFoundError:
                continue  # finished meanwhile
            except OSError:
                self._unfinished.append(capture_id)

    def _identity(self, outbox: Outbox, item: Decided) -> Decided:
        """The item itself, or (its id processed before with other content) the item under a derived id."""
        capture = item.work.claimed.capture
        if not outbox.is_processed(capture.capture_id):
            return item
        digest = item.work.claimed.content_sha256
        if self.spool.done_sha256(capture.capture_id) == digest:
            return item  # the same capture again: recorded once, not sent twice
        derived = f"{capture.capture_id[:100]}-dup-{digest[:12]}"
        resent = outbox.is_processed(derived)  # this reused content was already processed: recorded once
        if not resent:
            self.errors["duplicate_ids"] += 1
        log.log(
            logging.INFO if resent else logging.WARNING,
            "capture id %s was already processed with other content (a radar counter reset?): "
            "this capture is processed as %s (fix: make the radar's capture ids unique)",
            capture.capture_id,
            derived,
            extra={"capture_id": derived, "reused_capture_id": capture.capture_id},
        )
        item.work.evidence["reused_capture_id"] = capture.capture_id
        claimed = dataclasses.replace(item.work.claimed, capture=dataclasses.replace(capture, capture_id=derived))
        work = dataclasses.replace(item.work, claimed=claimed)
        return dataclasses.replace(item, work=work, spool_id=capture.capture_id)

    def _event(self, item: Decided) -> Recorded:
        capture, verdict, work = item.work.claimed.capture, item.verdict, item.work
        if verdict.outcome not in self.cfg.mqtt.publish:
            return capture.capture_id, verdict.outcome, None, None
        doc = verdict.to_dict(extended=True)
        doc["evidence"] = {**doc.get("evidence", {}), "image": work.evidence}
        event = build_event(
            verdict=doc,
            site_id=self.cfg.site.site_id,
            device_id=self.cfg.site.device_id,
            capture_id=capture.capture_id,
            captured_at=capture.captured_at.isoformat(),
            plate_key=None if item.plate_key is None else item.plate_key.hex(),
            timings_ms={k: round(v, 2) for k, v in work.timings.items()},
            equipment=capture.equipment,
            lane=capture.lane,
        )
        return capture.capture_id, verdict.outcome, event, topic_for(self.cfg.topic_root, verdict.outcome)

    def _prepare(self, outbox: Outbox, group: list[Decided]) -> tuple[list[str], list[Decided], list[Recorded]]:
        """(spool ids, items, rows) of the group; a capture whose event cannot be built is rejected here."""
        ids, items, rows = [], [], []
        for item in group:
            spool_id = item.spool_id or item.work.claimed.capture.capture_id
            try:
                ready = self._identity(outbox, item)
                row = self._event(ready)
            except OutboxError:
                raise
            except Exception as exc:  # noqa: BLE001  # one capture never stops the site
                self.errors["internal_error"] += 1
                self.spool.reject_internal(spool_id, "building its event", exc)
                continue
            ids.append(spool_id)
            items.append(ready)
            rows.append(row)
        return ids, items, rows

    def _commit(self, outbox: Outbox, group: list[Decided]) -> None:
        t = time.perf_counter()
        ids, items, rows = self._prepare(outbox, group)
        group[:] = items  # a retry after a failed commit does not reject or rename twice
        if not rows:
            return
        fresh = outbox.record_many(rows)
        commit_ms = (time.perf_counter() - t) * 1e3
        for spool_id, item, row, is_new in zip(ids, items, rows, fresh, strict=True):
            capture_id = row[0]
            if not is_new:
                log.info("capture %s was already processed; not sent twice", capture_id)
            self._finish(spool_id)
            timings = item.work.timings
            timings["commit"] = commit_ms
            timings["total"] = (time.perf_counter() - item.work.started) * 1e3
            self._account(item.work.claimed.capture, item.verdict, row[2] if is_new else None, timings)

    def _account(
        self, capture: Capture, verdict: Verdict, event: dict[str, Any] | None, timings: dict[str, float]
    ) -> None:
        key = verdict.outcome if verdict.level is None else f"{verdict.outcome}/{verdict.level}"
        self.outcomes[key] += 1
        self.latencies_ms.append(timings["total"])
        del self.latencies_ms[:-1000]
        for stage, ms in timings.items():
            samples = self.stage_samples.setdefault(stage, [])
            samples.append(ms)
            del samples[:-1000]
        log.info(
            "capture %s: %s",
            capture.capture_id,
            key,
            extra={
                "capture_id": capture.capture_id,
                "verdict": key,
                "reason": verdict.reason,
                "stage_ms": {k: round(v, 1) for k, v in timings.items()},
                "event_id": None if event is None else event["event_id"],
            },
        )
        if self.on_verdict is not None:
            try:
                self.on_verdict(capture, verdict, event)
            except Exception:  # the verdict is durable: a consumer's bug must not stop the commits
                self.errors["on_verdict"] += 1
                log.exception("capture %s: the verdict callback failed (the verdict is committed)", capture.capture_id)
