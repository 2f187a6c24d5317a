"""The running agent, seen from ``iaflash-provision model``: its pid, SIGHUP, and its report of the reload.

The agent holds ``<state dir>/agent.lock`` (the folder of ``outbox.db``) with its pid in it, and
writes ``<state dir>/models.json`` after it starts and after every reload
(:func:`iaflash.agent.health.write_model_report`): what it loaded, and whether the last reload worked.
:func:`reload_agent` sends SIGHUP and waits for that report to count one more reload.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iaflash.agent.config import Config
from iaflash.agent.health import lock_holder, model_report_path, read_model_report

__all__ = ["AgentReload", "agent_report", "reload_agent", "running_pid"]

POLL_S = 0.1


@dataclass
class AgentReload:
    """What happened to the running agent: ``state`` and a sentence (with the fix when there is one)."""

    state: str  # reloaded, failed, not_running, not_sent, no_answer, skipped
    detail: str
    pid: int | None = None
    report: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.state in ("reloaded", "not_running", "skipped")

    def to_dict(self) -> dict[str, Any]:
        last = (self.report or {}).get("last_reload")
        return {"state": self.state, "detail": self.detail, "pid": self.pid, "last_reload": last}


def state_dir(cfg: Config) -> Path:
    return cfg.outbox.db.parent


def running_pid(cfg: Config) -> int | None:
    """The pid of the agent running on this config's state folder, or None."""
    return lock_holder(state_dir(cfg))


def agent_report(cfg: Config) -> dict[str, Any] | None:
    """The running (or last) agent's ``models.json``, or None."""
    return read_model_report(model_report_path(state_dir(cfg)))


def _reload_count(report: dict[str, Any] | None) -> int:
    reloads = (report or {}).get("reloads") or {}
    return int(reloads.get("ok", 0)) + int(reloads.get("failed", 0))


def hup_command(pid: int) -> str:
    return f"sudo kill -HUP {pid}"


def reload_agent(cfg: Config, *, wait_s: float, expect: Path | None, slot_key: str) -> AgentReload:
    """SIGHUP the running agent and wait up to ``wait_s`` for its report; ``expect``: the folder it must load."""
    pid = running_pid(cfg)
    if pid is None:
        return AgentReload(
            "not_running",
            "the agent is not running: it loads this version when it starts (sudo systemctl start iaflash-agent)",
        )
    before = agent_report(cfg)
    count = _reload_count(before) if before and before.get("pid") == pid else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return AgentReload("not_running", "the agent stopped meanwhile: it loads this version when it starts", pid)
    except PermissionError:
        return AgentReload(
            "not_sent",
            f"not allowed to signal the agent (pid {pid}); it still runs the old version; fix: {hup_command(pid)}",
            pid,
        )
    deadline = time.monotonic() + wait_s
    report = before
    while time.monotonic() < deadline:
        report = agent_report(cfg)
        if report and report.get("pid") == pid and _reload_count(report) > count:
            return _judge(report, pid, expect, slot_key)
        time.sleep(POLL_S)
    return AgentReload(
        "no_answer",
        f"the agent (pid {pid}) got SIGHUP but did not report a reload within {wait_s:g} s; fix: look at "
        "`journalctl -u iaflash-agent -n 50` (a large model may still be loading), then `model list`",
        pid,
        report,
    )


def _judge(report: dict[str, Any], pid: int, expect: Path | None, slot_key: str) -> AgentReload:
    last = report.get("last_reload") or {}
    if not last.get("ok"):
        return AgentReload("failed", str(last.get("error") or "the agent did not say why"), pid, report)
    part = {"model.bundle": "classifier", "model.detector_bundle": "detector"}.get(slot_key)
    loaded = (report.get(part) or {}) if part else {}
    if expect is not None and part is not None and Path(str(loaded.get("path", ""))).resolve() != expect.resolve():
        return AgentReload(
            "failed",
            f"the agent reloaded but loaded {loaded.get('path')}, not {expect}; fix: check that {slot_key} in the "
            "config the agent runs with is the path `model install` switched",
            pid,
            report,
        )
    text = f"{loaded.get('name')} {loaded.get('version')}" if loaded else "the new bundles"
    return AgentReload("reloaded", f"the agent (pid {pid}) runs {text} now, without a restart", pid, report)
