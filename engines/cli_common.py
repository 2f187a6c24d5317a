"""The one set of CLI helpers every ``iaflash-*`` command uses: help options, exit codes,
``--json`` output and ``error:`` lines.

Exit codes: 0 ok, 1 operational error, 2 usage error, 3 check found problems. With ``--json``
a command prints one JSON document on stdout; diagnostics go to stderr. It lives in engines
(the lowest layer) so the agent's, the technician's and central's CLIs share it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from iaflash.engines.signing import key_id, load_private_key, public_key_bytes

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "CONTEXT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "emit",
    "fail",
    "json_option",
    "public_key_id",
]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PROBLEMS = 0, 1, 2, 3
json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout.")


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """``error: <message>`` on stderr, then exit ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def emit(as_json: bool, doc: dict[str, Any], lines: list[str]) -> None:
    """``doc`` as JSON on stdout with ``--json``, else the human ``lines``."""
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for line in lines:
            click.echo(line)


def public_key_id(private_key_path: Path) -> str:
    """The key id of the public half of a private key file."""
    return key_id(public_key_bytes(load_private_key(private_key_path).public_key()))


def version_option(prog_name: str) -> Callable[[F], F]:
    """``--version``: the installed iaflash-edge distribution's version, for every CLI."""
    return click.version_option(package_name="iaflash-edge", prog_name=prog_name)
