"""Training progress: one line per epoch (epoch, loss, val top-1, elapsed, ETA).

On a terminal the current epoch's batches update one line in place; otherwise (a log file,
CI) only whole lines are written, so a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "fmt_duration"]


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Reports phases, batches and epochs to ``stream`` (stderr by default)."""

    def __init__(self, epochs: int, stream: TextIO | None = None, start_epoch: int = 0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.epochs = epochs
        self.start = time.monotonic()
        self.first_epoch = start_epoch
        self._last_batch = 0.0
        self.epochs_start = self.start

    def start_epochs(self) -> None:
        """Mark the end of set-up (feature caching), so the ETA counts epochs only."""
        self.epochs_start = time.monotonic()

    def note(self, text: str) -> None:
        self.stream.write(f"[{fmt_duration(time.monotonic() - self.start)}] {text}\n")
        self.stream.flush()

    def batch(self, epoch: int, done: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if not self.tty or now - self._last_batch < 0.5:
            return
        self._last_batch = now
        self.stream.write(f"\repoch {epoch + 1}/{self.epochs} batch {done}/{total} loss {loss:.4f}   ")
        self.stream.flush()

    def eta(self, epoch: int) -> float:
        done = epoch + 1 - self.first_epoch
        per_epoch = (time.monotonic() - self.epochs_start) / max(1, done)
        return per_epoch * (self.epochs - epoch - 1)

    def epoch(self, epoch: int, loss: float, top1: float, make_top1: float) -> None:
        elapsed = time.monotonic() - self.start
        line = (
            f"epoch {epoch + 1}/{self.epochs} loss {loss:.4f} val top-1 {top1:.4f} make top-1 {make_top1:.4f} "
            f"elapsed {fmt_duration(elapsed)} ETA {fmt_duration(self.eta(epoch))}"
        )
        self.stream.write(("\r" if self.tty else "") + line + "\n")
        self.stream.flush()
