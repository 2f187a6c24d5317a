"""``iaflash-provision tail``: the verdicts the agent commits, live, with their reasons.

The source is the agent's own log: it writes one line per committed verdict (capture id, outcome,
reason, stage timings, event id; never a plate). Under systemd that line is in the journal, read
with ``journalctl -u iaflash-agent.service -o cat``; an agent run by hand or by another supervisor
writes it to stderr, which ``--file`` follows (``-`` reads stdin). Both log formats are read: JSON
(the default, one object per line, a journald ``<N>`` priority prefix allowed) and text (which carries
``[reason: ...]``). Why the log and not ``state.db``: the outbox keeps each verdict's outcome, but
not its reason, and only until central acknowledges it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import click

from iaflash.agent.config import OUTCOMES
from iaflash.agent.errors import ProvisioningError
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR
from iaflash.provisioning.doctor.report import UNIT
from iaflash.provisioning.output import print_error

__all__ = ["VerdictLine", "parse_line", "tail_command"]

_PRIORITY = re.compile(r"^<[0-7]>")
_TEXT = re.compile(
    r"^(?P<ts>\S+ \S+) \w+ \S+: capture (?P<capture_id>\S+): (?P<verdict>[a-z_]+(?:/[a-z]+)?)"
    r"(?: \[reason: (?P<reason>.*)\])?$"
)
CHOICES = (*OUTCOMES, "flag")  # flag: a mismatch, the verdicts central reviews


@dataclass(frozen=True)
class VerdictLine:
    ts: str
    capture_id: str
    outcome: str
    level: str | None
    reason: str
    event_id: str | None
    total_ms: float | None

    def text(self) -> str:
        label = self.outcome + (f"/{self.level}" if self.level else "")
        ms = "" if self.total_ms is None else f"  ({self.total_ms:.0f} ms)"
        sent = f"  event {self.event_id[:8]}" if self.event_id else ""
        return f"{self.ts}  {self.capture_id}  {label:<16}  {self.reason}{ms}{sent}"


def _from_json(doc: dict[str, Any]) -> VerdictLine | None:
    verdict, capture = doc.get("verdict"), doc.get("capture_id")
    if not isinstance(verdict, str) or not isinstance(capture, str):
        return None
    outcome, _, level = verdict.partition("/")
    stages = doc.get("stage_ms")
    total = stages.get("total") if isinstance(stages, dict) else None
    return VerdictLine(
        str(doc.get("ts", "")),
        capture,
        outcome,
        level or None,
        str(doc.get("reason", "")),
        doc.get("event_id") if isinstance(doc.get("event_id"), str) else None,
        float(total) if isinstance(total, (int, float)) else None,
    )


def parse_line(line: str) -> VerdictLine | None:
    """The verdict a log line reports, or None for any other line."""
    line = _PRIORITY.sub("", line.strip())
    if line.startswith("{"):
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        return _from_json(doc) if isinstance(doc, dict) else None
    found = _TEXT.match(line)
    if found is None:
        return None
    outcome, _, level = found["verdict"].partition("/")
    return VerdictLine(found["ts"], found["capture_id"], outcome, level or None, found["reason"] or "", None, None)


def _follow_file(path: Path, history: int, follow: bool, poll_s: float = 0.2) -> Iterator[str]:
    """The last ``history`` lines of ``path``, then (``follow``) every new line; survives truncation and rotation."""
    try:
        fh = path.open("r", encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ProvisioningError(f"{path}: cannot read the agent's log ({exc.strerror}); fix: check --file") from exc
    try:
        yield from deque(fh, maxlen=history) if history else ()
        fh.seek(0, 2)
        pending = ""
        while follow:
            chunk = fh.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                yield from lines
                continue
            if _replaced(path, fh):
                fh.close()
                fh = path.open("r", encoding="utf-8", errors="replace")
                pending = ""
                continue
            time.sleep(poll_s)
    finally:
        fh.close()


def _replaced(path: Path, fh: IO[str]) -> bool:
    """The file was truncated or rotated away (a new file under the same name)."""
    try:
        now = path.stat()
    except OSError:
        return False
    opened = os.fstat(fh.fileno())
    return (now.st_ino, now.st_dev) != (opened.st_ino, opened.st_dev) or now.st_size < fh.tell()


def _journal(unit: str, history: int, follow: bool) -> Iterator[str]:
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        raise ProvisioningError(
            "journalctl is not installed here; fix: give the agent's log file with --file PATH (or - for stdin)"
        )
    argv = [journalctl, "-u", unit, "-o", "cat", "--no-pager", "-n", str(history), *(["-f"] if follow else [])]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        try:
            yield from proc.stdout
        finally:
            proc.terminate()
        if proc.wait() != 0 and proc.stderr is not None:
            problem = proc.stderr.read().strip()
            if problem:
                raise ProvisioningError(f"journalctl -u {unit}: {problem}; fix: run it with sudo, or use --file PATH")


def _wanted(line: VerdictLine, outcomes: tuple[str, ...]) -> bool:
    if not outcomes:
        return True
    return line.outcome in outcomes or ("flag" in outcomes and line.outcome == "mismatch")


@click.command("tail", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per verdict on stdout.")
@click.option("--outcome", "outcomes", type=click.Choice(CHOICES), multiple=True, help="Only these (repeatable).")
@click.option("--file", "log_file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
              help="Follow this log file of the agent (- for stdin) instead of the journal.")  # fmt: skip
@click.option("--unit", default=UNIT, show_default=True, help="The agent's systemd unit (journal source).")
@click.option("--lines", "history", type=click.IntRange(0, 100_000), default=20, show_default=True,
              help="Past log lines to start from.")  # fmt: skip
@click.option("--no-follow", is_flag=True, help="Print the past verdicts and exit.")
@click.option("--count", type=click.IntRange(1), default=None, help="Exit after N verdicts.")
def tail_command(
    as_json: bool,
    outcomes: tuple[str, ...],
    log_file: Path | None,
    unit: str,
    history: int,
    no_follow: bool,
    count: int | None,
) -> None:
    """Show the verdicts the agent commits, live, each with its reason (Ctrl-C stops).

    Reads the agent's log: the journal of iaflash-agent.service (run it with sudo, or be in the
    systemd-journal group), or --file for an agent whose stderr goes to a file. Lines:
    time, capture id, outcome[/level], reason, total ms, and the event id when one was sent.

    \b
    Example:
      sudo iaflash-provision tail
      sudo iaflash-provision tail --outcome flag --outcome inconclusive
      iaflash-provision tail --file /var/log/iaflash-agent.log --json --count 10
    """
    if log_file is None:
        source = _journal(unit, history, not no_follow)
    elif str(log_file) == "-":
        source = iter(sys.stdin)
    else:
        source = _follow_file(log_file, history, not no_follow)
    shown = 0
    try:
        for raw in source:
            line = parse_line(raw)
            if line is None or not _wanted(line, outcomes):
                continue
            click.echo(json.dumps(asdict(line), sort_keys=True) if as_json else line.text())
            sys.stdout.flush()  # a live view, also through a pipe (| grep, | tee)
            shown += 1
            if count is not None and shown >= count:
                break
    except ProvisioningError as exc:
        print_error("tail", str(exc), EXIT_ERROR, as_json)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        pass
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
