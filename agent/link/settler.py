"""The publisher's settle thread: batches of PUBACKs written to the outbox, off the publish loop.

An outbox transaction that deletes a batch of delivered rows costs one fsync (1–5 ms here).
The publisher hands each batch to this thread and keeps publishing while it commits, so the
fsync overlaps the network round trips instead of stalling them. One batch is settled at a
time; the next one grows while the disk works (group commit).

The thread opens its OWN :class:`~iaflash.agent.outbox.store.Outbox` connection (one per
thread, WAL) and touches nothing else: the publisher thread owns every in-memory structure and
learns each batch's outcome from :attr:`Settler.done` (``None``, or the exception it raised).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

from iaflash.agent.errors import IaflashError
from iaflash.agent.outbox.store import Outbox

__all__ = ["Settler"]

log = logging.getLogger(__name__)

_Job = tuple[list[int], list[tuple[int, str, float]]]


class Settler:
    """One thread, one outbox connection, one batch at a time."""

    def __init__(self, outbox_path: Path) -> None:
        self.outbox_path = Path(outbox_path)
        self.done: queue.Queue[BaseException | None] = queue.Queue()
        self.ready = threading.Event()  # set once the thread tried to open its connection
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="publisher-settle", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, acked: Sequence[int], refused: Sequence[tuple[int, str, float]]) -> None:
        """Queue one batch (see :meth:`Outbox.settle`); its outcome arrives on :attr:`done`."""
        self._jobs.put((list(acked), list(refused)))

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the batch in hand, then end the thread."""
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        outbox: Outbox | None = None
        try:
            try:
                outbox = Outbox(self.outbox_path)
            except IaflashError as exc:  # opened again with the first batch; that batch reports the error
                log.debug("settle thread: %s; opening again with the first batch", exc)
            self.ready.set()
            while (job := self._jobs.get()) is not None:
                try:
                    outbox = outbox or Outbox(self.outbox_path)
                    outbox.settle(*job)
                except IaflashError as exc:  # the publisher keeps the batch and submits it again
                    self.done.put(exc)
                    continue
                self.done.put(None)
        except BaseException as exc:  # a bug: the publisher re-raises it and stops, the rows stay
            log.exception("settle thread stopped on an unexpected error; the rows stay in the outbox")
            self.done.put(exc)
            raise
        finally:
            self.ready.set()
            if outbox is not None:
                outbox.close()
