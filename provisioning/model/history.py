"""``model rollback`` and ``model list``: back to an installed version, and what is installed where.

Rollback without a version goes one step back in the slot's history (install, install, rollback,
rollback walks back two installs); with a version it switches to that installed version. The
target is verified again first (the trust store or the revocation list may have changed since).

A box never runs a version older than the newest it ran (docs/SIGNING.md#rollback): a rollback by
the technician on the box is the one local exception. It is recorded in the trust state before the
switch (that name now runs the target, the newest it ran stays as it was), so the agent accepts it;
it is undone if the agent refuses the switch. Any other way back needs a publisher-signed rollback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from iaflash.agent.config import Config
from iaflash.agent.errors import ModelStoreError
from iaflash.engines.errors import EngineError
from iaflash.engines.rollback import BundleMark, compare_versions
from iaflash.engines.trust_state import TrustState
from iaflash.provisioning.model.agent import agent_report, running_pid
from iaflash.provisioning.model.install import switch_and_reload
from iaflash.provisioning.model.steps import Report, Say, verify
from iaflash.provisioning.model.store import SLOTS, ModelStore, Slot, slot_of

__all__ = ["listing", "rollback", "rollback_target"]


def _installed(store: ModelStore, state: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in state["installed"] if (store.root / e["dir"]).is_dir()]


def rollback_target(
    store: ModelStore, state: dict[str, Any], current: Path | None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The history entry one step back (still installed), and the history with it on top."""
    history = list(state["history"])
    while history and (store.root / history[-1]["dir"]).resolve() == current:
        history.pop()
    while history and not (store.root / history[-1]["dir"]).is_dir():
        history.pop()
    return (history[-1] if history else None), history


def _named(store: ModelStore, state: dict[str, Any], wanted: str, current: Path | None, slot: Slot) -> dict[str, Any]:
    installed = _installed(store, state)
    name, _, version = wanted.rpartition("/")
    matches = [e for e in installed if e["version"] == version and (not name or e["name"] == name)]
    if len(matches) > 1:
        current_name = next((e["name"] for e in installed if (store.root / e["dir"]).resolve() == current), None)
        matches = [e for e in matches if e["name"] == current_name] or matches
    if not matches:
        have = ", ".join(f"{e['name']}/{e['version']}" for e in installed) or "none"
        raise ModelStoreError(
            f"{wanted} is not installed in the {slot.name} slot (installed: {have}); fix: install it with "
            "`iaflash-provision model install BUNDLE`, or give one of the installed versions"
        )
    if len(matches) > 1:
        raise ModelStoreError(
            f"{wanted} names {len(matches)} installed models; fix: give NAME/VERSION "
            f"({', '.join(e['name'] + '/' + e['version'] for e in matches)})"
        )
    return matches[0]


def rollback(
    cfg: Config,
    version: str | None,
    *,
    slot_name: str = "classifier",
    reload: bool = True,
    wait_s: float = 60.0,
    say: Say | None = None,
) -> Report:
    """Switch the slot back one step (``version`` None) or to the installed ``version`` (or NAME/VERSION)."""
    slot = slot_of(cfg, slot_name)
    report = Report("model rollback", slot.name, say)
    if slot.link is None:
        raise ModelStoreError(f"{slot.config_key} is not set in the config: nothing to roll back")
    store = ModelStore(cfg.model.store_dir)
    with store.locked():
        doc = store.read_state()
        state = store.slot_state(doc, slot.name)
        saved = list(state["history"])
        current = store.current(slot.link)
        if version is None:
            entry, history = rollback_target(store, state, current)
            if entry is None:
                have = ", ".join(f"{e['name']}/{e['version']}" for e in _installed(store, state)) or "none"
                raise ModelStoreError(
                    f"the {slot.name} slot has no earlier version to go back to (installed: {have}); fix: give a "
                    "version (`model rollback VERSION`) or install one"
                )
            state["history"] = history[:-1]  # switch_and_reload puts the target back on top
        else:
            entry = _named(store, state, version, current, slot)
            if current is not None and (store.root / entry["dir"]).resolve() == current:
                report.step("unchanged", f"{entry['name']} {entry['version']} is in use already ({slot.link})")
                return report
            dirs = [h["dir"] for h in state["history"]]
            if entry["dir"] in dirs:  # going back to it: forget what came after
                state["history"] = state["history"][: len(dirs) - 1 - dirs[::-1].index(entry["dir"])]
        target = store.root / entry["dir"]
        undo = _allow_locally(cfg, entry["name"], entry["version"], report)
        try:
            bundle = verify(cfg, target)
        except ModelStoreError:
            undo()
            raise
        report.step("verify", f"{entry['name']} {entry['version']}: signature and every sha256 still check out")
        return switch_and_reload(
            cfg, store, doc, slot, target, bundle, "rollback", report, reload, wait_s, restore_history=saved, undo=undo
        )


def _allow_locally(cfg: Config, name: str, version: str, report: Report) -> Callable[[], None]:
    """Record in the trust state that ``name`` runs ``version`` now (the technician's rollback); returns the undo."""
    trust = TrustState(cfg.trust_state_file)
    try:
        previous = trust.bundle_mark(name)
    except EngineError as exc:
        raise ModelStoreError(f"rollback refused: {exc}") from exc
    if previous is None or previous.current == version:
        return lambda: None
    newer = compare_versions(version, previous.highest)
    highest = version if newer is not None and newer > 0 else previous.highest
    trust.record_bundle(BundleMark(name, version, highest))
    report.step(
        "trust",
        f"{cfg.trust_state_file}: {name} may run {version} (a rollback by the technician, from {previous.current}); "
        f"the newest it ran stays {highest}",
    )
    return lambda: trust.record_bundle(previous)


def listing(cfg: Config) -> dict[str, Any]:
    """Every slot: its link, what it points at, the versions installed, the rollback target, the agent's view."""
    store = ModelStore(cfg.model.store_dir)
    doc = store.read_state() if store.root.is_dir() else {"slots": {}}
    pid = running_pid(cfg)
    report = agent_report(cfg)
    live = report if report and pid is not None and report.get("pid") == pid else None
    running = {
        str(Path(str(part["path"])).resolve())
        for part in ((live or {}).get("classifier"), (live or {}).get("detector"))
        if isinstance(part, dict) and part.get("path")
    }
    slots: dict[str, Any] = {}
    for name in SLOTS:
        slot = slot_of(cfg, name)
        state = ModelStore.slot_state({"slots": dict(doc["slots"])}, name)
        slots[name] = _slot_listing(store, slot, state, running)
    return {
        "command": "model list",
        "store": str(store.root),
        "keep_versions": cfg.model.keep_versions,
        "agent": {
            "pid": pid,
            "running": sorted(running),
            "last_reload": (live or {}).get("last_reload"),
            "reloads": (live or {}).get("reloads"),
        },
        "slots": slots,
    }


def _slot_listing(store: ModelStore, slot: Slot, state: dict[str, Any], running: set[str]) -> dict[str, Any]:
    if slot.link is None:
        return {"config_key": slot.config_key, "link": None, "current": None, "installed": [], "rollback_to": None}
    current = store.current(slot.link)
    kind = "link" if slot.link.is_symlink() else "folder" if slot.link.is_dir() else "missing"
    target, _ = rollback_target(store, state, current)
    versions = []
    for e in _installed(store, state):
        path = (store.root / e["dir"]).resolve()
        versions.append(
            {
                **e,
                "path": str(path),
                "current": path == current,
                "running": str(path) in running,
                "rollback_to": target is not None and target["dir"] == e["dir"],
            }
        )
    return {
        "config_key": slot.config_key,
        "link": str(slot.link),
        "link_kind": kind,
        "current": str(current) if current else None,
        "installed": versions,
        "rollback_to": f"{target['name']}/{target['version']}" if target else None,
    }
