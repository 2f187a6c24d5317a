"""The loaded models as one unit: classifier, optional detector, and everything derived from them.

A :class:`ModelSet` holds the classifier backend and bundle, the vehicle detector (when configured),
the taxonomy, the decision policy (the bundle's operating point) and the intake's
:class:`~iaflash.agent.capture.intake.Preparer` (preprocessing and crop contract). A reload builds
and warms a whole new set beside the running one; :class:`~iaflash.agent.pipeline.pipeline.Pipeline`
swaps them between two captures.

Each capture holds the set it was taken in with (:meth:`ModelSet.acquire` at claim time,
:meth:`ModelSet.release` once its verdict is decided): a capture claimed before the swap finishes on
the old set, start to end, so its preprocessing and its classifier always match. The old set is
closed only once no capture holds it (:meth:`ModelSet.wait_idle`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iaflash.agent.capture.intake import Preparer
from iaflash.agent.config import Config
from iaflash.agent.decision.operating import Policy, decision_policy
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle
from iaflash.engines.errors import BundleError
from iaflash.engines.factory import backend_availability, create_backend
from iaflash.engines.options import BuildOptions
from iaflash.engines.signing import load_trusted_bundle, record_bundle

__all__ = ["ModelSet", "backend_reason", "load_model_set", "record_model_set"]

log = logging.getLogger(__name__)


@dataclass
class ModelSet:
    """One generation of loaded models and what the pipeline derives from them."""

    generation: int
    backend: Backend
    bundle: Bundle
    detector: tuple[Backend, Bundle] | None
    taxonomy: Taxonomy
    policy: Policy
    label_categories: tuple[str, ...] | None
    preparer: Preparer
    model_info: dict[str, str]
    configured_backend: str = "auto"
    tensorrt_reason: str = ""
    owned: bool = True  # close the backends when this set is closed (False: the caller owns them)
    loaded_at: float = field(default_factory=time.time)
    _users: int = 0
    _retired: bool = False
    _closed: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def from_parts(
        cls,
        cfg: Config,
        backend: Backend,
        bundle: Bundle,
        detector: tuple[Backend, Bundle] | None,
        *,
        generation: int = 1,
        owned: bool = False,
        tensorrt_reason: str = "",
    ) -> ModelSet:
        """Derive taxonomy, policy and preparer from loaded backends (raises TaxonomyError on bad labels)."""
        taxonomy = Taxonomy.from_bundle(bundle, min_score=cfg.registry.fuzzy_min_score)
        # The bundle's fitted operating point; [decision] may only make it stricter (agent/decision/operating.py).
        policy = decision_policy(cfg.decision, bundle.manifest.operating_point)
        for note in policy.notes:
            log.warning("%s", note)
        categories = tuple(lb.category for lb in bundle.labels) if any(lb.category for lb in bundle.labels) else None
        info = {"name": bundle.manifest.name, "version": bundle.manifest.version}
        if detector is not None:
            info["detector"] = f"{detector[1].manifest.name} {detector[1].manifest.version}"
        return cls(
            generation=generation,
            backend=backend,
            bundle=bundle,
            detector=detector,
            taxonomy=taxonomy,
            policy=policy,
            label_categories=categories,
            preparer=Preparer(cfg.spool, bundle.manifest, detector),
            model_info=info,
            configured_backend=cfg.model.backend,
            tensorrt_reason=tensorrt_reason,
            owned=owned,
        )

    # -- captures holding this set ---------------------------------------------------------
    def acquire(self) -> None:
        with self._cond:
            self._users += 1

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._users -= n
            if self._users <= 0:
                self._cond.notify_all()

    @property
    def users(self) -> int:
        with self._cond:
            return self._users

    def retire(self) -> None:
        """No capture takes this set any more (the pipeline swapped it out)."""
        with self._cond:
            self._retired = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no capture holds this set; False when some still do after ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: self._users <= 0, timeout)

    def close(self) -> None:
        """Close the backends this set owns (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if not self.owned:
            return
        for backend in (self.backend, self.detector[0] if self.detector else None):
            if backend is not None:
                backend.close()

    # -- what the agent reports ------------------------------------------------------------
    def verdict_model(self) -> dict[str, str]:
        """Model and backend for a verdict (read each time: "auto" swaps to TensorRT when its build ends)."""
        info = self.backend.info
        return {**self.model_info, "backend": info.kind, "device": info.device}

    def describe(self) -> dict[str, Any]:
        """The heartbeat's ``model`` object: classifier, detector, backend and why, operating point."""
        m = self.bundle.manifest
        op = self.policy.operating_point
        doc: dict[str, Any] = {
            "generation": self.generation,
            "loaded_at": round(self.loaded_at, 3),
            "name": m.name,
            "version": m.version,
            "path": str(self.bundle.path),
            "sha256": self.bundle.model_sha256,
            **_backend_doc(self.backend, self.configured_backend, self.tensorrt_reason),
            "operating_point": None
            if op is None
            else {**op.summary(), "flags_allowed": not self.policy.no_flag_reason},
            "no_flag_reason": self.policy.no_flag_reason,
            "detector": None,
        }
        if self.detector is not None:
            backend, bundle = self.detector
            doc["detector"] = {
                "name": bundle.manifest.name,
                "version": bundle.manifest.version,
                "path": str(bundle.path),
                "sha256": bundle.model_sha256,
                **_backend_doc(backend, self.configured_backend, self.tensorrt_reason),
            }
        return doc


def _backend_doc(backend: Backend, configured: str, tensorrt_reason: str) -> dict[str, Any]:
    info = backend.info
    return {
        "backend": info.kind,
        "device": info.device,
        "precision": info.precision,
        "backend_reason": backend_reason(configured, backend, tensorrt_reason),
        "engine_build": getattr(backend, "build_state", None),
    }


def backend_reason(configured: str, backend: Backend, tensorrt_reason: str) -> str:
    """Why this backend serves: configured, TensorRT missing (and why), or a plan still building."""
    kind = backend.info.kind
    if configured != "auto":
        return f"model.backend = {configured}: {kind} as configured"
    state = getattr(backend, "build_state", None)
    if state is None:  # plain ONNX Runtime: auto found no TensorRT
        return f"model.backend = auto and TensorRT cannot run here ({tensorrt_reason or 'not available'}): {kind}"
    if state == "building":
        return "model.backend = auto: TensorRT plan building in the background, ONNX Runtime (CPU) serves meanwhile"
    if state == "failed":
        error = getattr(backend, "build_error", None)
        return f"model.backend = auto: the TensorRT build failed ({error}), so ONNX Runtime (CPU) serves"
    return f"model.backend = auto: TensorRT can run here, {kind} serves ({state})"


def _build_options(cfg: Config) -> BuildOptions:
    m = cfg.model
    return BuildOptions(
        precision=m.precision, workspace_mb=m.workspace_mb, max_batch=m.max_batch, cache_dir=m.engine_cache_dir
    )


def _load_backend(cfg: Config, bundle: Bundle) -> Backend:
    backend = create_backend(cfg.model.backend, threads=cfg.model.threads, build=_build_options(cfg))
    try:
        backend.load(bundle)
        backend.warmup()
    except BaseException:
        backend.close()
        raise
    return backend


def _resolved(path: Path) -> Path:
    """The bundle directory a stable path (a link made by `model install`) names right now.

    Resolved once, so every file of one load comes from one version even if the link moves meanwhile.
    """
    return Path(path).resolve()


def _load_checked(cfg: Config, path: Path) -> Bundle:
    """A bundle the agent may run: signed by a models key, not revoked, and not older than what this box
    ran under its name (docs/SIGNING.md#rollback); :func:`load_model_set` records it once all loaded."""
    sec = cfg.security
    return load_trusted_bundle(path, sec.trust_dir, sec.allow_unsigned, state_file=cfg.trust_state_file)


def load_detector_bundle(cfg: Config) -> Bundle | None:
    """The signed vehicle detector bundle of ``model.detector_bundle``, or None when none is configured."""
    if cfg.model.detector_bundle is None:
        return None
    path = _resolved(cfg.model.detector_bundle)
    bundle = _load_checked(cfg, path)
    if bundle.manifest.task != "detector" or bundle.manifest.detector is None:
        raise BundleError(
            f"{cfg.model.detector_bundle}: model.detector_bundle points at a "
            f"{bundle.manifest.task} bundle; fix: give a bundle packed with --task detector"
        )
    return bundle


def record_model_set(cfg: Config, models: ModelSet) -> None:
    """Write the versions this box runs from now on into the trust state: never lower later.

    Called once the set is really in use (at start, or after a reload's swap), never before: a
    reload that loaded a set but did not swap it in must not make the running version a rollback.
    """
    for ran in (models.bundle, None if models.detector is None else models.detector[1]):
        if ran is not None:
            record_bundle(cfg.trust_state_file, ran)


def load_model_set(cfg: Config, generation: int = 1, *, record: bool = True) -> ModelSet:
    """Load, verify and warm up the bundles the config's paths name now, as one owned ModelSet.

    Raises the loading error (SignatureError, BundleError, BackendUnavailable, ModelLoadError,
    TaxonomyError...) after closing whatever was already loaded: nothing is left half open.
    """
    path = _resolved(cfg.model.bundle)
    bundle = _load_checked(cfg, path)
    if bundle.manifest.task != "classifier":
        raise BundleError(
            f"{cfg.model.bundle}: model.bundle points at a {bundle.manifest.task} bundle; "
            "fix: give the classifier bundle (packed with --task classifier)"
        )
    tensorrt_reason = backend_availability("tensorrt")[1] if cfg.model.backend == "auto" else ""
    loaded: list[Backend] = []
    try:
        loaded.append(_load_backend(cfg, bundle))
        detector_bundle = load_detector_bundle(cfg)
        detector = None
        if detector_bundle is not None:
            loaded.append(_load_backend(cfg, detector_bundle))
            detector = (loaded[-1], detector_bundle)
        models = ModelSet.from_parts(
            cfg, loaded[0], bundle, detector, generation=generation, owned=True, tensorrt_reason=tensorrt_reason
        )
        if record:  # a reload records after its swap (Service.reload)
            record_model_set(cfg, models)
        return models
    except BaseException:
        for backend in loaded:
            backend.close()
        raise
