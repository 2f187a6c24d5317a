"""What a ``model`` command did, step by step: the text lines and the ``--json`` document come from one list.

Also the shared checks of install and rollback: :func:`verify` (the agent's own
``load_trusted_bundle``, so the box accepts exactly what the agent will), :func:`trial_load`
(the model runs in ONNX Runtime on the CPU) and :func:`signer_of`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iaflash.agent.config import Config
from iaflash.agent.errors import ModelStoreError
from iaflash.engines.bundle import SIGNATURE_FILE, Bundle
from iaflash.engines.errors import EngineError
from iaflash.engines.onnxrt import OnnxRuntimeBackend
from iaflash.engines.signing import TrustStore, load_trusted_bundle, read_signature

__all__ = ["Report", "signer_of", "trial_load", "verify"]

Say = Callable[[str, str], None]


@dataclass
class Report:
    """One command's steps, outcome and details; ``say`` prints each step as it happens (text mode)."""

    command: str
    slot: str
    say: Say | None = field(default=None, repr=False)
    steps: list[dict[str, str]] = field(default_factory=list)
    changed: bool = False
    ok: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str, detail: str) -> None:
        self.steps.append({"step": name, "detail": detail})
        if self.say is not None:
            self.say(name, detail)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "slot": self.slot,
            "ok": self.ok,
            "changed": self.changed,
            "steps": self.steps,
            **self.details,
        }


def _where(text: str, staged: Path | None, shown: Path | None) -> str:
    return text.replace(str(staged), str(shown)) if staged is not None and shown is not None else text


def verify(cfg: Config, path: Path, *, shown: Path | None = None) -> Bundle:
    """Load ``path`` exactly as the agent will: signature by a ``models`` key of ``security.trust_dir``,
    not revoked, every sha256, and the version rule of the box's trust state (docs/SIGNING.md#rollback:
    never older than the newest this box ran, unless a signed rollback). Only checks: nothing is recorded.

    ``shown`` replaces ``path`` in the messages (the source the technician gave, not the staging folder).
    """
    try:
        sec = cfg.security
        return load_trusted_bundle(path, sec.trust_dir, sec.allow_unsigned, state_file=cfg.trust_state_file)
    except EngineError as exc:
        text = _where(str(exc), path, shown)
        if "fix" not in text:
            text += "; fix: get the bundle again from central, intact and signed by a key of security.trust_dir"
        raise ModelStoreError(f"refused: {text}") from exc


def signer_of(cfg: Config, path: Path) -> dict[str, str] | None:
    """Who signed the bundle at ``path`` (already verified): the trust store's name, key id, date."""
    sig = path / SIGNATURE_FILE
    if not sig.exists():
        return None
    try:
        doc = read_signature(sig, path)
        trust = TrustStore.from_dir(cfg.security.trust_dir)
    except EngineError:
        return None
    names = dict(zip(trust.key_ids, trust.names, strict=True))
    kid = str(doc.get("key_id"))
    return {"name": names.get(kid, "?"), "key_id": kid, "signed_at": str(doc.get("signed_at"))}


def trial_load(bundle: Bundle, shown: Path | None = None) -> str:
    """Load and warm the model in ONNX Runtime on the CPU (never TensorRT: no engine build here)."""
    backend = OnnxRuntimeBackend(threads=1, providers=["CPUExecutionProvider"])
    try:
        backend.load(bundle)
        backend.warmup()
        spec = backend.input_spec
    except EngineError as exc:
        raise ModelStoreError(
            f"refused: {_where(str(exc), bundle.path, shown)}: its model does not run in ONNX Runtime; "
            "fix: ask the publisher for a bundle whose model loads (`iaflash-engines verify` at central)"
        ) from exc
    finally:
        backend.close()
    return f"input {spec.name} {list(spec.shape)} {spec.dtype}"
