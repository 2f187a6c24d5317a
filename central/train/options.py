"""The click options ``train`` and ``train-detector`` share (same names, types and meaning).

Each command keeps its own options where its defaults or help differ (work folder, epochs, input
size, learning rate...). Imports click only: ``iaflash-central -h`` works without the ``[train]`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

__all__ = ["shared_options"]

F = TypeVar("F", bound=Callable[..., Any])

_SHARED: tuple[Callable[[F], F], ...] = (
    click.option(
        "--key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Model publisher's Ed25519 key (PUBLISHER.key) to sign the bundle.",
    ),
    click.option(
        "--trust-dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Check the signed bundle against this trust store, as the box does.",
    ),
    click.option(
        "--backbone",
        type=click.Choice(["lite0", "tiny"]),
        default="lite0",
        show_default=True,
        help="lite0: EfficientNet-Lite0 with packaged ImageNet weights; tiny: a test-sized network.",
    ),
    click.option(
        "--weights",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Your own Lite0 state dict instead of the packaged ImageNet weights.",
    ),
    click.option(
        "--stop-after",
        type=click.IntRange(min=0),
        default=None,
        help="Stop after this many epochs in all (resume later with the same --workdir).",
    ),
    click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--version", "version", default="1.0.0", show_default=True, help="Bundle version."),
    click.option("--json", "as_json", is_flag=True, help="Print the training report as JSON on stdout."),
)


def shared_options(command: F) -> F:
    """Add the shared options to ``command`` (they are listed after its own in ``--help``)."""
    for option in reversed(_SHARED):
        command = option(command)
    return command
