"""``model install``, ``model rollback`` and ``model list``, step by step (docs/BUNDLES.md).

install: measure the source → room check → stage it into the store → verify it as the agent will
(signature, revocations, sha256s, and the engines' rollback rule: never older than the newest this
box ran, unless a signed rollback) → trial load → slot, name and version checks → rename into
``<name>/<version>`` → switch the slot's link → record → reload the agent (and switch back if it
refuses) → prune.
Nothing of the box changes before the switch; any refusal before it leaves the box as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iaflash.agent.config import Config
from iaflash.agent.errors import ModelStoreError
from iaflash.engines.bundle import MANIFEST_FILE, Bundle
from iaflash.engines.errors import RollbackRefused
from iaflash.provisioning.model.agent import AgentReload, agent_report, reload_agent, running_pid
from iaflash.provisioning.model.source import measure, remove_tree, stage
from iaflash.provisioning.model.steps import Report, Say, signer_of, trial_load, verify
from iaflash.provisioning.model.store import HISTORY_KEPT, SLOTS, ModelStore, Slot, now_text, slot_of
from iaflash.provisioning.ownership import chown_like

__all__ = ["install", "switch_and_reload"]

MIB = 1 << 20


def size_text(n: float) -> str:
    """``17 KiB``, ``23.4 MiB``, ``1.2 GiB``."""
    if n < MIB:
        return f"{n / 1024:.0f} KiB"
    return f"{n / MIB:.1f} MiB" if n < 1024 * MIB else f"{n / (1024 * MIB):.1f} GiB"


def _slot_for(cfg: Config, bundle: Bundle, wanted: str | None) -> Slot:
    task = bundle.manifest.task
    if wanted is not None:
        slot = slot_of(cfg, wanted)
    elif task == "classifier":
        slot = slot_of(cfg, "classifier")
    else:
        configured = [s for s in (slot_of(cfg, "detector"), slot_of(cfg, "evidence")) if s.link is not None]
        if len(configured) != 1:
            raise ModelStoreError(
                f"{bundle.manifest.name} {bundle.manifest.version} is a detector: say which one it replaces; fix: "
                "add --slot detector (model.detector_bundle, the vehicle detector) or --slot evidence "
                "(evidence.detector_bundle, the face/person/plate detector)"
            )
        slot = configured[0]
    if slot.task != task:
        raise ModelStoreError(
            f"{bundle.manifest.name} {bundle.manifest.version} is a {task} bundle, the {slot.name} slot "
            f"({slot.config_key}) takes a {slot.task}; fix: choose the right bundle or --slot"
        )
    if slot.link is None:
        raise ModelStoreError(
            f"{slot.config_key} is not set in the config, so the agent would not load this {task}; fix: set "
            f'{slot.config_key.split(".")[1]} = "/var/lib/iaflash/models/{slot.name}" under '
            f"[{slot.config_key.split('.')[0]}], then run the command again"
        )
    return slot


def _check_room(store: ModelStore, need: int, cfg: Config) -> str:
    free, floor = store.free_bytes(), cfg.spool.min_free_mb * MIB
    if free - need < floor:
        raise ModelStoreError(
            f"not enough room in {store.root}: the bundle needs {size_text(need)}, {size_text(free)} are free, "
            f"and {cfg.spool.min_free_mb} MiB must stay free (spool.min_free_mb: below it the agent pauses intake); "
            "fix: free space (old evidence in spool/done, or fewer model versions: model.keep_versions), then try "
            "again"
        )
    return f"{size_text(need)} needed, {size_text(free)} free, {cfg.spool.min_free_mb} MiB kept free"


def _entry(
    store: ModelStore, bundle: Bundle, where: Path, signer: dict[str, str] | None, source: str
) -> dict[str, Any]:
    m = bundle.manifest
    size = sum(p.stat().st_size for p in where.rglob("*") if p.is_file())
    return {
        "name": m.name,
        "version": m.version,
        "task": m.task,
        "dir": store.relative(where),
        "installed_at": now_text(),
        "bytes": size,
        "model_sha256": bundle.model_sha256,
        "signed_by": signer,
        "source": source,
    }


def _adopt(cfg: Config, store: ModelStore, slot: Slot, state: dict[str, Any], report: Report) -> None:
    """A hand-copied bundle folder at the slot's path becomes an installed version, then a link."""
    link = slot.link
    assert link is not None
    if link.is_symlink() or not link.is_dir():
        return
    bundle = verify(cfg, link)
    target = store.version_dir(bundle.manifest.name, bundle.manifest.version)
    if target.exists():
        raise ModelStoreError(
            f"{link}: a folder, not a link, and {target} exists already; fix: move the folder away "
            f"(sudo mv {link} {link}.old), then run the command again"
        )
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.rename(link, target)  # the link path is missing until the symlink below replaces it (microseconds)
    ModelStore.switch(link, target)
    state["installed"].append(_entry(store, bundle, target, signer_of(cfg, target), str(link)))
    state["history"].append(_hist(store, target, bundle, "adopt"))
    report.step("adopt", f"{link} was a folder ({bundle.manifest.name} {bundle.manifest.version}): moved to {target}")


def _hist(store: ModelStore, where: Path, bundle: Bundle, action: str) -> dict[str, str]:
    m = bundle.manifest
    return {"name": m.name, "version": m.version, "dir": store.relative(where), "at": now_text(), "action": action}


def _find(state: dict[str, Any], name: str, version: str) -> dict[str, Any] | None:
    return next((e for e in state["installed"] if e["name"] == name and e["version"] == version), None)


def _same_bundle(store: ModelStore, target: Path, staged: Path) -> bool:
    from iaflash.engines.bundle import sha256_file  # noqa: PLC0415  # only for this comparison

    return sha256_file(target / "manifest.json") == sha256_file(staged / "manifest.json")


def _verify_new(cfg: Config, store: ModelStore, staged: Path, shown: Path) -> Bundle:
    """verify(); an older version refused by the rollback rule says so, and how to go back to an installed one."""
    try:
        return verify(cfg, staged, shown=shown)
    except ModelStoreError as exc:
        if not isinstance(exc.__cause__, RollbackRefused):
            raise
        hint = ""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, ModelStoreError):
            doc = json.loads((staged / MANIFEST_FILE).read_bytes())
            if store.version_dir(str(doc["name"]), str(doc["version"])).is_dir():
                hint = (
                    f"; {doc['name']} {doc['version']} is still installed here: a technician goes back to it with "
                    f"`iaflash-provision model rollback {doc['version']}`"
                )
        raise ModelStoreError(f"{exc}{hint}") from exc.__cause__


def install(
    cfg: Config,
    source_path: Path,
    *,
    slot_name: str | None = None,
    reload: bool = True,
    wait_s: float = 60.0,
    say: Say | None = None,
) -> Report:
    """Install the bundle (folder or archive) at ``source_path`` and switch its slot to it."""
    store = ModelStore(cfg.model.store_dir)
    report = Report("model install", slot_name or "?", say)
    with store.locked():
        source = measure(source_path)
        report.step("source", f"{source.kind} {source.path}: {len(source.files)} files, {size_text(source.size)}")
        report.step("room", _check_room(store, source.size, cfg))
        staged = store.staging_dir()
        try:
            stage(source, staged)
            bundle = _verify_new(cfg, store, staged, source.path)
            signer = signer_of(cfg, staged)
            m = bundle.manifest
            report.step(
                "verify",
                f"{m.name} {m.version} ({m.task}), "
                + (
                    f"signed by {signer['name']} (key id {signer['key_id']}) at {signer['signed_at']}"
                    if signer
                    else "NOT signed (security.allow_unsigned = true)"
                )
                + ", every file matches its sha256",
            )
            report.step("trial", f"loads and runs in ONNX Runtime (CPU): {trial_load(bundle, source.path)}")
            slot = _slot_for(cfg, bundle, slot_name)
            report.slot = slot.name
            return _install_staged(cfg, store, slot, staged, bundle, signer, str(source.path), report, reload, wait_s)
        finally:
            remove_tree(staged)


def _install_staged(
    cfg: Config,
    store: ModelStore,
    slot: Slot,
    staged: Path,
    bundle: Bundle,
    signer: dict[str, str] | None,
    source: str,
    report: Report,
    reload: bool,
    wait_s: float,
) -> Report:
    m, link = bundle.manifest, slot.link
    assert link is not None
    target = store.version_dir(m.name, m.version)
    if link.parent.resolve() == store.root.resolve() and link.name == m.name:
        raise ModelStoreError(
            f"the bundle's name {m.name!r} is also the name of {slot.config_key} ({link}) in the store folder; "
            "fix: set model.store_dir to another folder (e.g. /var/lib/iaflash/models/store)"
        )
    doc = store.read_state()
    state = store.slot_state(doc, slot.name)
    _adopt(cfg, store, slot, state, report)
    current = store.current(link)
    if target.exists():
        if not _same_bundle(store, target, staged):
            raise ModelStoreError(
                f"{m.name} {m.version} is installed already ({target}) with other content: one version, one "
                "bundle; fix: ask the publisher to re-pack it with a new version"
            )
        if current is not None and current == target.resolve():
            report.step("unchanged", f"{m.name} {m.version} is installed and in use ({link} -> {target})")
            store.write_state(doc)
            report.details = _details(store, slot, current, None, None, [])
            return report
        if _find(state, m.name, m.version) is not None:
            raise ModelStoreError(
                f"{m.name} {m.version} is installed already ({target}) but not in use; fix: switch to it with "
                f"`iaflash-provision model rollback {m.version} --slot {slot.name}`"
            )
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.rename(staged, target)
        chown_like(store.root, [target])  # as root: the service user reads and caches there
        report.step("install", f"{target}")
    else:
        report.step("install", f"{target} (already there for another slot: shared)")
    state["installed"] = [e for e in state["installed"] if e["dir"] != store.relative(target)]
    state["installed"].append(_entry(store, bundle, target, signer, source))
    return switch_and_reload(cfg, store, doc, slot, target, bundle, "install", report, reload, wait_s)


def switch_and_reload(
    cfg: Config,
    store: ModelStore,
    doc: dict[str, Any],
    slot: Slot,
    target: Path,
    bundle: Bundle,
    action: str,
    report: Report,
    reload: bool,
    wait_s: float,
    restore_history: list[dict[str, Any]] | None = None,
    undo: Callable[[], None] | None = None,
) -> Report:
    """Switch the slot's link to ``target``, record it, reload the agent (switch back if it refuses), prune.

    ``restore_history``: the slot's history to put back if the agent refuses (default: as it is now);
    ``undo``: what else to put back then (the rollback's trust-state record).
    """
    link = slot.link
    assert link is not None
    state = store.slot_state(doc, slot.name)
    saved_history = list(state["history"]) if restore_history is None else restore_history
    previous = store.current(link)
    ModelStore.switch(link, target)
    report.changed = True
    report.step("switch", f"{link} -> {target}" + (f" (was {previous})" if previous else ""))
    state["history"] = [*state["history"], _hist(store, target, bundle, action)][-HISTORY_KEPT:]
    store.write_state(doc)
    agent = reload_agent(cfg, wait_s=wait_s, expect=target, slot_key=slot.config_key) if reload else _no_reload(cfg)
    report.step("reload", agent.detail)
    if agent.state == "failed" and previous is not None:
        ModelStore.switch(link, previous)
        state["history"] = saved_history
        store.write_state(doc)
        if undo is not None:
            undo()
        report.ok = False
        report.step(
            "switch back",
            f"{link} -> {previous}: the agent keeps running it; {target.name} stays installed; fix the cause, then "
            f"`iaflash-provision model rollback {bundle.manifest.version} --slot {slot.name}`",
        )
    pruned = _prune(cfg, store, doc, slot)
    store.write_state(doc)
    for entry in pruned:
        report.step(
            "prune", f"removed {entry['name']} {entry['version']} (model.keep_versions = {cfg.model.keep_versions})"
        )
    report.details = _details(store, slot, store.current(link), previous, agent, pruned)
    return report


def _no_reload(cfg: Config) -> AgentReload:
    pid = running_pid(cfg)
    if pid is None:
        return AgentReload("not_running", "the agent is not running: it loads this version when it starts")
    return AgentReload(
        "skipped", f"--no-reload: the agent (pid {pid}) runs the old version until `sudo kill -HUP {pid}`", pid
    )


def _running_paths(cfg: Config) -> list[Path]:
    report = agent_report(cfg)
    if not report or report.get("pid") != running_pid(cfg):
        return []
    return [
        Path(str(part["path"]))
        for part in (report.get("classifier"), report.get("detector"))
        if isinstance(part, dict) and part.get("path")
    ]


def _prune(cfg: Config, store: ModelStore, doc: dict[str, Any], slot: Slot) -> list[dict[str, Any]]:
    links = [s.link for s in (slot_of(cfg, n) for n in SLOTS) if s.link is not None]
    protect = store.protected(doc, slot.name, links, _running_paths(cfg))
    return store.prune(store.slot_state(doc, slot.name), cfg.model.keep_versions, protect)


def _details(
    store: ModelStore,
    slot: Slot,
    current: Path | None,
    previous: Path | None,
    agent: AgentReload | None,
    pruned: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "link": str(slot.link),
        "current": str(current) if current else None,
        "previous": str(previous) if previous else None,
        "agent": agent.to_dict() if agent else None,
        "pruned": [f"{e['name']}/{e['version']}" for e in pruned],
    }
