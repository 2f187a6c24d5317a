"""The one "wait until" helper of the suite: poll a condition instead of sleeping for timing."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float, what: str = "the condition") -> bool:
    """Poll ``predicate`` every 20 ms until it is truthy; True, or AssertionError after ``timeout`` s.

    Returning True lets callers write ``assert wait_until(...)``; raising names what never happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
