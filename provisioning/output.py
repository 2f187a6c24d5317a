"""Output shared by the technician's commands: the ``--json`` error document and plain check lines.

With ``--json``, a command that fails still prints ONE JSON document on stdout (so a script or
support always gets something to parse), besides the ``error: ...`` line on stderr::

    {"ok": false, "command": "enrol", "exit_code": 1, "error": "<what and where>", "fix": "<how>"}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import click

from iaflash.provisioning.doctor.report import Check, split_fix

__all__ = ["LABEL", "check_lines", "error_document", "print_error"]

LABEL = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip", "error": "ERROR"}


def error_document(command: str, message: str, exit_code: int) -> dict[str, Any]:
    """The stable failure document: what went wrong and how to fix it, split from ``what; fix: how``."""
    what, fix = split_fix(message, "")
    if not fix and ". fix: " in message:
        what, _, fix = message.partition(". fix: ")
    return {"ok": False, "command": command, "exit_code": exit_code, "error": what, "fix": fix}


def print_error(command: str, message: str, exit_code: int, as_json: bool) -> None:
    """``error: <message>`` on stderr; with ``as_json`` also the error document on stdout."""
    click.echo(f"error: {message}", err=True)
    if as_json:
        click.echo(json.dumps(error_document(command, message, exit_code), indent=2, sort_keys=True))


def check_lines(checks: Iterable[Check]) -> list[str]:
    """doctor's plain layout: status, name, finding; the fix indented below a check that is not ok."""
    out = []
    for c in checks:
        out.append(f"{LABEL[c.status]:<5} {c.name:<13} {c.finding}")
        if c.fix and c.status != "ok":
            out.append(f"{'':<20}fix: {c.fix}")
    return out
