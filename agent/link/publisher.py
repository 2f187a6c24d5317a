"""The publisher thread: outbox rows -> MQTT QoS 1 -> PUBACK -> row deleted.

It is the one thread that turns PUBACKs into outbox changes (the link's ``on_publish`` only
enqueues them). It opens its own :class:`~iaflash.agent.outbox.store.Outbox` inside :meth:`Publisher.run`.

Guarantees:

* a row is deleted only on a successful PUBACK; a refused one (MQTT 5 reason >= 128, e.g. 135
  "Not authorized") stays, is deferred with a growing delay, counted and logged once;
* PUBACKs are settled in groups: the PUBACKs waiting in the link's queue (up to ``ACK_BATCH_MAX``)
  are drained and written in ONE outbox transaction (:meth:`Outbox.settle`), so the disk sees one
  fsync per batch instead of one per event. That transaction runs in the settle thread
  (:mod:`iaflash.agent.link.settler`) while this thread keeps publishing; one batch at a time, the
  next one growing meanwhile. ``acked``/``refused`` move only after the commit. A crash (even
  SIGKILL) between the PUBACK and the commit leaves the rows in the outbox: they are published
  again, a duplicate and never a loss. A failed commit keeps the batch in memory; it is submitted
  again after a pause (``unsettled`` in :meth:`Publisher.stats` shows it);
* in-flight entries survive a disconnect: paho resends them on reconnect with the same mid;
* an entry unacknowledged for ``republish_after_s`` while connected is published again (same
  payload, same ``event_id``); at-least-once delivery, consumers dedupe on ``event_id``;
* on start every row left in the outbox (e.g. by a crash) is published again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from iaflash.agent.config import MqttConfig
from iaflash.agent.errors import IaflashError, OutboxError
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.link.settler import Settler
from iaflash.agent.outbox.salvage import mark_suspect
from iaflash.agent.outbox.store import Outbox, OutboxRow, is_corruption

__all__ = ["Publisher"]

log = logging.getLogger(__name__)

ACK_WAIT_S = 0.05  # longest idle wait per loop turn: bounds publish latency, avoids spinning
ACK_BATCH_MAX = 1000  # PUBACKs settled per outbox transaction at most
SETTLE_POLL_S = 0.002  # idle wait per loop turn while a batch is being committed
SETTLER_OPEN_WAIT_S = 5.0
STATS_EVERY_S = 0.25
RETRY_MIN_S = 5.0
RETRY_MAX_S = 300.0
ERROR_PAUSE_S = 1.0


@dataclass
class _InFlight:
    row: OutboxRow
    sent_at: float
    mids: set[int] = field(default_factory=set)


@dataclass
class _Ack:
    """A PUBACK received for an in-flight row, waiting for its batch's commit."""

    entry: _InFlight
    success: bool
    reason: str


def _retry_delay(attempts: int) -> float:
    return float(min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(attempts, 16)))


class Publisher(threading.Thread):
    """Drains the outbox to the link; ``stats()`` may be called from any thread."""

    def __init__(
        self,
        outbox_path: Path,
        link: MqttLink,
        cfg: MqttConfig,
        heartbeat: Callable[[], dict[str, Any]] | None = None,
        heartbeat_topic: str | None = None,
    ) -> None:
        super().__init__(name="publisher", daemon=True)
        self.outbox_path = Path(outbox_path)
        self.link = link
        self.cfg = cfg
        self.heartbeat = heartbeat
        self.heartbeat_topic = heartbeat_topic
        self.error: BaseException | None = None
        self._stop_evt = threading.Event()
        self._lock = threading.Lock()
        self._counts = {
            "published": 0,
            "acked": 0,
            "refused": 0,
            "republished": 0,
            "publish_errors": 0,
            "heartbeats": 0,
            "settles": 0,
        }
        self._gauges: dict[str, Any] = {"inflight": 0, "depth": None, "oldest_age_s": None}
        self._by_seq: dict[int, _InFlight] = {}
        self._by_mid: dict[int, int] = {}
        self._unsettled: dict[int, _Ack] = {}  # seq -> PUBACK received, not yet handed to the settler
        self._settling: dict[int, _Ack] = {}  # the batch the settler is committing now
        self._settler: Settler | None = None
        self._was_connected = False
        self._next_heartbeat = 0.0
        self._next_stats = 0.0
        self._last_error: str | None = None

    # ----- public -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """published, acked, refused, republished, publish_errors, heartbeats, settles (outbox transactions
        that settled PUBACKs), inflight, depth, oldest_age_s, unsettled (PUBACKs received and not yet
        written to the outbox, including those still queued)."""
        unsettled = len(self._unsettled) + len(self._settling) + self.link.acks.qsize()
        with self._lock:
            return {**self._counts, **self._gauges, "unsettled": unsettled}

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after a last drain of the acks already received (does not wait for the outbox)."""
        self._stop_evt.set()
        if self.is_alive():
            self.join(timeout)

    # ----- thread -------------------------------------------------------------------------
    def run(self) -> None:
        outbox = self._open()
        if outbox is None:
            return
        self._settler = Settler(self.outbox_path)
        self._settler.start()
        self._settler.ready.wait(SETTLER_OPEN_WAIT_S)  # both connections open before the first publish
        try:
            while not self._stop_evt.is_set():
                self._turn(outbox)
            if self.error is None:  # a corrupt outbox (self.error) is left as it is, for the salvage
                self._finish()
                self._refresh_stats(outbox, force=True)
        except BaseException as exc:
            self.error = exc
            log.exception("publisher stopped on an unexpected error; unsent events stay in %s", self.outbox_path)
            raise
        finally:
            self._settler.stop()
            outbox.close()

    def _open(self) -> Outbox | None:
        while not self._stop_evt.is_set():
            try:
                return Outbox(self.outbox_path)
            except IaflashError as exc:
                self._note_error(exc)
                self._stop_evt.wait(ERROR_PAUSE_S)
        return None

    def _turn(self, outbox: Outbox) -> None:
        try:
            self._drain_acks(wait=SETTLE_POLL_S if self._settling else ACK_WAIT_S)
            connected = self.link.connected
            if connected and not self._was_connected:
                self._on_reconnect()
            self._was_connected = connected
            if connected:
                self._republish_stale()
                self._top_up(outbox)
                self._maybe_heartbeat(outbox)
            self._refresh_stats(outbox)
        except IaflashError as exc:  # outbox or link trouble: keep everything, retry shortly
            if isinstance(exc, OutboxError) and exc.__cause__ is not None and is_corruption(exc.__cause__):
                mark_suspect(self.outbox_path, str(exc))  # retrying a damaged file would hold its flags for ever
                log.error("publisher: state.db is corrupt (%s): the agent stops; its next start salvages it", exc)
                self.error = exc
                self._stop_evt.set()
                return
            self._note_error(exc)
            self._stop_evt.wait(ERROR_PAUSE_S)

    def _count(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self._counts[counter] += n
            self._gauges["inflight"] = self._awaiting()

    def _note_error(self, exc: Exception) -> None:
        self._count("publish_errors")
        message = str(exc)
        if message != self._last_error:
            log.error("publisher: %s; retrying every %.0f s", message, ERROR_PAUSE_S)
        self._last_error = message

    # ----- acks ---------------------------------------------------------------------------
    def _awaiting(self) -> int:
        """Rows published and still waiting for their PUBACK (acked, not yet settled, ones excluded)."""
        return len(self._by_seq) - len(self._unsettled) - len(self._settling)

    def _drain_acks(self, wait: float) -> None:
        """Collect the PUBACKs waiting (the first for up to ``wait`` s); hand a batch to the settler when it is free."""
        self._collect_acks(wait)
        self._check_settled(timeout=None)
        if not self._settling and self._unsettled:
            self._submit()

    def _collect_acks(self, wait: float) -> None:
        try:
            ack = self.link.acks.get(timeout=wait) if wait > 0 else self.link.acks.get_nowait()
        except queue.Empty:
            return
        while True:
            self._note_ack(*ack)
            if len(self._unsettled) >= ACK_BATCH_MAX:
                return
            try:
                ack = self.link.acks.get_nowait()
            except queue.Empty:
                return

    def _note_ack(self, mid: int, success: bool, reason: str) -> None:
        seq = self._by_mid.pop(mid, None)
        entry = self._by_seq.get(seq) if seq is not None else None
        if seq is None or entry is None or seq in self._settling:
            return  # status/heartbeat, a duplicate whose row was settled, or one being settled now
        earlier = self._unsettled.get(seq)
        if earlier is None or (success and not earlier.success):  # one success among copies is enough
            self._unsettled[seq] = _Ack(entry, success, reason)

    def _submit(self) -> None:
        assert self._settler is not None  # started in run()
        self._settling, self._unsettled = self._unsettled, {}
        acked = [seq for seq, ack in self._settling.items() if ack.success]
        refused = [
            (seq, f"broker refused: {ack.reason}", _retry_delay(ack.entry.row.attempts))
            for seq, ack in self._settling.items()
            if not ack.success
        ]
        self._settler.submit(acked, refused)

    def _check_settled(self, timeout: float | None) -> bool:
        """Take the settler's outcome if there is one (waiting up to ``timeout`` s); True once nothing is pending.

        A failed batch goes back to the unsettled ones and its error is raised (the turn pauses).
        """
        if not self._settling:
            return True
        assert self._settler is not None  # started in run()
        try:
            outcome = self._settler.done.get(timeout=timeout) if timeout else self._settler.done.get_nowait()
        except queue.Empty:
            return False
        batch, self._settling = self._settling, {}
        if outcome is not None:
            for seq, ack in batch.items():
                if seq not in self._unsettled or (ack.success and not self._unsettled[seq].success):
                    self._unsettled[seq] = ack
            raise outcome
        refused = 0
        for seq, ack in batch.items():
            if not ack.success:
                refused += 1
                self._log_refusal(ack, _retry_delay(ack.entry.row.attempts))
            self._forget(seq)
        self._count("acked", len(batch) - refused)
        self._count("refused", refused)
        self._count("settles")
        return True

    def _finish(self) -> None:
        """On stop: settle what was acknowledged so far; what cannot be settled stays (republished later)."""
        try:
            self._collect_acks(wait=0.0)
            for _ in range(2):  # the batch in hand, then the acks that came meanwhile
                if not self._check_settled(timeout=5.0):
                    log.warning("publisher stopping: a settle is still running; its rows may be published again")
                    return
                if self._unsettled:
                    self._submit()
            self._check_settled(timeout=5.0)
        except IaflashError as exc:
            log.warning("publisher stopping: %s; those rows stay in the outbox and are published again", exc)

    @staticmethod
    def _log_refusal(ack: _Ack, delay: float) -> None:
        row = ack.entry.row
        log.log(
            logging.WARNING if row.attempts == 0 else logging.DEBUG,
            "broker refused event %s on %s: %s; kept in the outbox, retry in %.0f s "
            "(fix: allow this device to publish under its topic prefix in the broker ACL)",
            row.event_id,
            row.topic,
            ack.reason,
            delay,
        )

    def _forget(self, seq: int) -> None:
        entry = self._by_seq.pop(seq, None)
        if entry is not None:
            for mid in entry.mids:
                self._by_mid.pop(mid, None)

    # ----- publishing ---------------------------------------------------------------------
    def _on_reconnect(self) -> None:
        now = time.monotonic()
        for entry in self._by_seq.values():  # paho resends these itself; restart their clocks
            entry.sent_at = now
        self._next_heartbeat = 0.0

    def _send(self, entry: _InFlight) -> None:
        mid = self.link.publish(entry.row.topic, entry.row.payload, qos=1)
        stale = self._by_seq.get(self._by_mid.get(mid, entry.row.seq))
        if stale is not None and stale is not entry:
            stale.mids.discard(mid)  # the 16-bit mid wrapped onto an old duplicate's mid
        self._by_mid[mid] = entry.row.seq
        entry.mids.add(mid)
        entry.sent_at = time.monotonic()

    def _top_up(self, outbox: Outbox) -> None:
        room = self.cfg.max_inflight - self._awaiting()
        if room <= 0 or len(self._unsettled) >= ACK_BATCH_MAX:
            return
        for row in outbox.pending(room, exclude=self._by_seq.keys()):
            entry = _InFlight(row=row, sent_at=time.monotonic())
            self._by_seq[row.seq] = entry
            try:
                self._send(entry)
            except IaflashError as exc:
                self._forget(row.seq)
                outbox.defer(row.seq, str(exc), _retry_delay(row.attempts))
                raise
            self._count("published")

    def _republish_stale(self) -> None:
        limit = time.monotonic() - self.cfg.republish_after_s
        for seq, entry in list(self._by_seq.items()):
            if entry.sent_at <= limit and seq not in self._unsettled and seq not in self._settling:
                log.info(
                    "event %s unacknowledged for %.0f s while connected: publishing it again",
                    entry.row.event_id,
                    self.cfg.republish_after_s,
                )
                self._send(entry)
                self._count("republished")

    # ----- heartbeat and stats ------------------------------------------------------------
    def _maybe_heartbeat(self, outbox: Outbox) -> None:
        if self.heartbeat_topic is None or time.monotonic() < self._next_heartbeat:
            return
        self._next_heartbeat = time.monotonic() + self.cfg.heartbeat_interval_s
        doc: dict[str, Any] = {}
        if self.heartbeat is not None:
            try:
                doc.update(self.heartbeat())
            except Exception:  # a broken probe must not stop the publisher
                log.exception("heartbeat callback failed; sending the publisher's stats only")
        self._refresh_stats(outbox, force=True)
        doc.update(self.stats())
        doc["at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.link.publish(self.heartbeat_topic, json.dumps(doc, separators=(",", ":")).encode(), qos=0)
        self._count("heartbeats")

    def _refresh_stats(self, outbox: Outbox, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_stats:
            return
        self._next_stats = now + STATS_EVERY_S
        depth, oldest = outbox.depth(), outbox.oldest_age_s()
        with self._lock:
            self._gauges = {
                "inflight": self._awaiting(),
                "depth": depth,
                "oldest_age_s": None if oldest is None else round(oldest, 3),
            }
