"""The doctor's report types and shared constants (see provisioning/doctor.py)."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "warn", "fail", "skip", "error"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skip", "error")
DEFAULT_CONFIG = Path("/etc/iaflash/agent.toml")
SERVICE_USER = "iaflash"  # User= in systemd/iaflash-agent.service
UNIT = "iaflash-agent.service"
SPOOL_DIRS = ("incoming", "processing", "done", "rejected")
INCOMING_MAX_AGE_S = 300.0  # a capture waiting longer than this: the agent is probably not running
OUTBOX_MAX_AGE_S = 3600.0  # an event unsent for longer than this: the broker is probably unreachable
RECENT_REJECT_S = 86_400.0  # rejections in the last day are a warning; older ones are history


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    finding: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    """Every check, in order; ``exit_code`` follows STYLE.md (0 ok, 1 doctor broke, 3 problems found)."""

    config: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return not any(c.status in ("fail", "error") for c in self.checks)

    @property
    def exit_code(self) -> int:
        statuses = {c.status for c in self.checks}
        return 1 if "error" in statuses else 3 if "fail" in statuses else 0

    def summary(self) -> dict[str, int]:
        counts = collections.Counter(c.status for c in self.checks)
        return {s: counts.get(s, 0) for s in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "config": self.config,
            "checks": [c.to_dict() for c in self.checks],
            "summary": self.summary(),
        }


def split_fix(message: str, default_fix: str) -> tuple[str, str]:
    """Our errors read ``what; fix: how`` or ``what (fix: how)``: split them into finding and fix."""
    for sep in ("; fix: ", " (fix: ", "; Fix: ", ". Fix: "):
        if sep in message:
            what, _, how = message.partition(sep)
            return what, how.rstrip(")") if sep.startswith(" (") else how
    return message, default_fix


def age_text(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )
