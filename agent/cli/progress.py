"""Progress on stderr for the agent's and the technician's long commands (evaluate, registry import).

:func:`progress_callback` yields a ``progress(done, total)`` callback: a transient rich bar when
stderr is a terminal, otherwise one plain line (``<label>: <done>/<total>[ <unit>]``) each time a
further tenth of the work is done, so logs and pipes stay short. stdout is never touched: it is
kept for ``--json`` documents.

``iaflash-engines build`` keeps its own display in :mod:`iaflash.engines.cli_build`: ``engines`` may not
import ``agent``, and a build reports named stages with a fraction (``progress(stage, fraction)``),
not counted items, so it has nothing to share with this one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

__all__ = ["progress_callback"]


@contextmanager
def progress_callback(label: str, unit: str = "") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback: a rich bar on a terminal, else a plain line per 10% on stderr.

    ``unit`` (e.g. ``"records"``) ends each plain line; ``total`` may be 0 (nothing to do).
    """
    if sys.stderr.isatty():
        from rich.console import Console  # noqa: PLC0415  # keeps `--help` fast
        from rich.progress import Progress  # noqa: PLC0415

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    suffix = f" {unit}" if unit else ""
    last = [-1]

    def plain(done: int, total: int) -> None:
        tenth = done * 10 // total if total else 10
        if tenth != last[0]:
            last[0] = tenth
            click.echo(f"{label}: {done}/{total}{suffix}", err=True)

    yield plain
