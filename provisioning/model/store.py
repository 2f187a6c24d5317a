"""The model store on disk: versions side by side, the state file, the lock, the atomic switch, pruning.

A *slot* is one config path the agent loads a bundle from: ``classifier`` (``model.bundle``),
``detector`` (``model.detector_bundle``) and ``evidence`` (``evidence.detector_bundle``). Installing
makes that path a symlink to ``<store_dir>/<name>/<version>``; switching replaces the symlink with
one ``rename``, so the agent sees the old bundle or the new one, never a mix.

``<store_dir>/.store.json`` (written atomically) keeps, per slot, the versions in install order and
the history of switches (the last one is in use). The symlink itself is the truth about what is in
use: the state file only adds what a symlink cannot say. Which versions a box may run is the trust
state's business (``trust-state.json``, docs/SIGNING.md#rollback), not this file's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from iaflash.agent.config import Config
from iaflash.agent.errors import ModelStoreError
from iaflash.engines.atomic import write_atomic
from iaflash.provisioning.model.source import remove_tree

__all__ = ["SLOTS", "ModelStore", "Slot", "slot_of"]

STATE_FILE = ".store.json"
LOCK_FILE = ".lock"
STATE_FORMAT = "iaflash-model-store"
HISTORY_KEPT = 50
LOCK_WAIT_S = 10.0
SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


@dataclass(frozen=True)
class Slot:
    """One config path the agent loads a bundle from, and the bundle task it needs."""

    name: str
    config_key: str
    task: str
    link: Path | None  # None: the config does not set this path


SLOTS = ("classifier", "detector", "evidence")


def slot_of(cfg: Config, name: str) -> Slot:
    """The slot ``name`` with the path the config gives it (None when unset)."""
    if name == "classifier":
        return Slot(name, "model.bundle", "classifier", cfg.model.bundle)
    if name == "detector":
        return Slot(name, "model.detector_bundle", "detector", cfg.model.detector_bundle)
    if name == "evidence":
        return Slot(name, "evidence.detector_bundle", "detector", cfg.evidence.detector_bundle)
    raise ModelStoreError(f"unknown model slot {name!r}; fix: use one of {', '.join(SLOTS)}")


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_segment(value: str, what: str) -> str:
    """A manifest name or version used as a folder name: letters, digits, ``._+-``, no leading dot."""
    if not SAFE_SEGMENT.fullmatch(value) or value in (".", ".."):
        raise ModelStoreError(
            f"the bundle's {what} {value[:80]!r} cannot name a folder (letters, digits and ._+- only, "
            f"at most 128, not starting with a dot); fix: ask the publisher to re-pack it with another {what}"
        )
    return value


class ModelStore:
    """``<store_dir>``: installed versions, the state file and the lock of ``model`` commands."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- the folder, the lock, the state -------------------------------------------------
    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise ModelStoreError(
                f"{self.root}: cannot create the model store ({exc.strerror}); fix: run as root (sudo) or set "
                "model.store_dir to a folder you may write"
            ) from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One ``model`` command at a time on this store (waits up to 10 s for another one)."""
        self.ensure()
        try:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ModelStoreError(
                f"{self.root / LOCK_FILE}: cannot open ({exc.strerror}); fix: run as root (sudo)"
            ) from exc
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ModelStoreError(
                            f"{self.root}: another `iaflash-provision model` command is running; "
                            "fix: wait for it to finish, then try again"
                        ) from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    def read_state(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"format": STATE_FORMAT, "version": 1, "slots": {}}
        except (OSError, ValueError) as exc:
            raise ModelStoreError(
                f"{path}: unreadable ({exc}); the installed versions are still in {self.root}; fix: move the file "
                "aside (it is rebuilt from the next install), then run the command again"
            ) from exc
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or not isinstance(doc.get("slots"), dict):
            raise ModelStoreError(f"{path}: not a model store state file; fix: move it aside and try again")
        return doc

    def write_state(self, doc: dict[str, Any]) -> None:
        write_atomic(self.root / STATE_FILE, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)

    @staticmethod
    def slot_state(doc: dict[str, Any], slot: str) -> dict[str, Any]:
        state: dict[str, Any] = doc["slots"].setdefault(slot, {})
        state.setdefault("installed", [])
        state.setdefault("history", [])
        state.pop("highest", None)  # kept by the trust state now (docs/SIGNING.md#rollback)
        return state

    # -- paths -----------------------------------------------------------------------------
    def version_dir(self, name: str, version: str) -> Path:
        return self.root / check_segment(name, "name") / check_segment(version, "version")

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def staging_dir(self) -> Path:
        """A fresh private folder inside the store (same file system: the final step is a rename)."""
        self.ensure()
        for _ in range(100):
            path = self.root / f".staging-{os.getpid()}-{time.monotonic_ns() % 10**9}"
            try:
                path.mkdir(mode=0o755)
            except FileExistsError:
                continue
            return path
        raise ModelStoreError(f"{self.root}: cannot create a staging folder; fix: remove old .staging-* folders")

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    # -- the switch ------------------------------------------------------------------------
    @staticmethod
    def current(link: Path) -> Path | None:
        """The version folder ``link`` points at (resolved), or None when it is missing or not a link."""
        if not link.is_symlink():
            return None
        return link.resolve()

    @staticmethod
    def switch(link: Path, target: Path) -> None:
        """Point ``link`` at ``target`` atomically: a new symlink renamed over the old one, then fsync."""
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() and not link.is_symlink():
            raise ModelStoreError(
                f"{link}: is a folder or file, not a link made by `model install`; fix: move it away "
                f"(sudo mv {link} {link}.old), then run the command again"
            )
        tmp = link.with_name(f".{link.name}.switch-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.path.relpath(target, link.parent), tmp)
        try:
            os.replace(tmp, link)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with contextlib.suppress(OSError):
            fd = os.open(link.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- pruning ---------------------------------------------------------------------------
    @staticmethod
    def by_recent_use(state: dict[str, Any]) -> list[str]:
        """The slot's installed folders, most recently used first (switched to, else installed)."""
        order: list[str] = []
        for entry in reversed(state["history"]):
            if entry["dir"] not in order:
                order.append(entry["dir"])
        order += [e["dir"] for e in reversed(state["installed"]) if e["dir"] not in order]
        installed = {e["dir"] for e in state["installed"]}
        return [d for d in order if d in installed]

    def prune(self, state: dict[str, Any], keep: int, protect: set[Path]) -> list[dict[str, Any]]:
        """Remove this slot's versions beyond the ``keep`` most recently used (never one in ``protect``).

        Returns the entries removed. Another slot's versions are never touched: they are in ``protect``.
        """
        installed: list[dict[str, Any]] = state["installed"]
        kept_recent = set(self.by_recent_use(state)[:keep])
        removed, remaining = [], []
        for entry in installed:
            path = (self.root / entry["dir"]).resolve()
            if entry["dir"] in kept_recent or path in protect:
                remaining.append(entry)
                continue
            remove_tree(path)
            remove_tree(path.with_name(path.name + ".trt-cache"))  # onnxruntime's TensorRT cache beside it
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the name's folder, once its last version is gone
            removed.append(entry)
        state["installed"] = remaining
        return removed

    def protected(self, doc: dict[str, Any], slot: str, links: list[Path], running: list[Path]) -> set[Path]:
        """Every folder in use: the slots' links, the agent's loaded bundles, and other slots' versions."""
        out = {p for p in (self.current(link) for link in links) if p is not None}
        out |= {Path(p).resolve() for p in running}
        for other, state in doc["slots"].items():
            if other != slot:
                out |= {(self.root / e["dir"]).resolve() for e in state.get("installed", [])}
        return out
