"""The commit stage: verdicts become durable, in groups, off the inference thread.

The inference thread hands each decided capture over; this thread writes as many as are
waiting in ONE SQLite transaction (``processed`` rows + outbox events: one fsync for the
group), then moves their files to done/, then logs and counts them. Durability order is
unchanged: nothing is published or moved before its transaction commits.
"""

from __future__ import annotations

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
from iaflash.agent.health import Liveness
from iaflash.agent.outbox.events import build_event, topic_for
from iaflash.agent.outbox.store import Outbox, Recorded

log = logging.getLogger(__name__)

GROUP_MAX = 64
QUEUE_DEPTH = 64

VerdictCallback = Callable[[Capture, Verdict, "dict[str, Any] | None"], None]


@dataclass
class Decided:
    """A capture with its verdict, waiting to be made durable."""

    work: Work
    verdict: Verdict
    plate_key: bytes | None


class Committer:
    """Owns the commit thread, its outbox connection, and the per-verdict counters."""

    def __init__(self, cfg: Config, spool: Spool, on_verdict: VerdictCallback | None = None) -> None:
        self.cfg, self.spool, self.on_verdict = cfg, spool, on_verdict
        self.outcomes: Counter[str] = Counter()
        self.latencies_ms: list[float] = []
        self.stage_samples: dict[str, list[float]] = {}
        self.liveness = Liveness(stuck_after_s=60.0)
        self.fatal: BaseException | None = None
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
                group = self._group()
                if group is None:
                    if self._inputs_done.is_set() and self._queue.empty():
                        return
                    continue
                self.liveness.begin()
                try:
                    self._commit(outbox, group)
                finally:
                    self.liveness.end()
        except BaseException as exc:  # disk full, a bug: the service exits and systemd restarts it
            log.exception("commit thread failed")
            self.fatal = exc
        finally:
            if outbox is not None:
                outbox.close()

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
        )
        return capture.capture_id, verdict.outcome, event, topic_for(self.cfg.topic_root, verdict.outcome)

    def _commit(self, outbox: Outbox, group: list[Decided]) -> None:
        t = time.perf_counter()
        rows = [self._event(item) for item in group]
        fresh = outbox.record_many(rows)
        commit_ms = (time.perf_counter() - t) * 1e3
        for item, row, is_new in zip(group, rows, fresh, strict=True):
            capture_id = row[0]
            if not is_new:
                log.info("capture %s was already processed; not sent twice", capture_id)
            self.spool.finish(capture_id)
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
            self.on_verdict(capture, verdict, event)
