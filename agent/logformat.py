"""The service's log lines: journald priorities, and the verdict's reason in text logs.

* Under systemd, stderr goes to the journal, which gives every line the unit's one priority
  unless the line starts with ``<N>`` (sd-daemon(3)): each line gets the syslog priority of its
  level (``<3>`` ERROR, ``<4>`` WARNING, ``<6>`` INFO, ``<7>`` DEBUG), so ``journalctl -p warning``
  and the journal's colours work. The prefix is written only when stderr IS the journal stream
  (``$JOURNAL_STREAM`` names its device and inode), never into a file or a terminal.
* The text format appends ``[reason: ...]`` to a line that carries a reason (the verdict line);
  the JSON format already holds every field.

``iaflash-provision tail`` reads both formats.
"""

from __future__ import annotations

import logging
import os
import sys

from iaflash.agent.health import setup_logging

__all__ = ["LineFormat", "configure_logging", "journal_priority", "stderr_is_journal"]

_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (journald's ``<N>``)."""
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


def stderr_is_journal() -> bool:
    """stderr is the stream systemd connected to the journal (``JOURNAL_STREAM=<dev>:<inode>``)."""
    try:
        dev, ino = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class LineFormat(logging.Formatter):
    """Wraps the chosen formatter: the reason in text lines, the journal priority on every line."""

    def __init__(self, inner: logging.Formatter, *, text: bool, journal: bool) -> None:
        super().__init__()
        self.inner, self.text, self.journal = inner, text, journal

    def format(self, record: logging.LogRecord) -> str:
        out = self.inner.format(record)
        reason = getattr(record, "reason", None)
        if self.text and reason:
            first, sep, rest = out.partition("\n")
            out = f"{first} [reason: {reason}]{sep}{rest}"
        if self.journal:
            prio = journal_priority(record.levelno)
            out = "\n".join(f"<{prio}>{line}" for line in out.split("\n"))
        return out


def configure_logging(level: str = "INFO", fmt: str = "json", *, journal: bool | None = None) -> None:
    """The service's logging: :func:`iaflash.agent.health.setup_logging`, its lines wrapped by :class:`LineFormat`."""
    setup_logging(level, fmt)
    on_journal = stderr_is_journal() if journal is None else journal
    for handler in logging.getLogger().handlers:
        inner = handler.formatter or logging.Formatter()
        handler.setFormatter(LineFormat(inner, text=fmt == "text", journal=on_journal))
