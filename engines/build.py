"""TensorRT engine building: the staleness key, the plan cache, and building or reusing a plan.

A plan is only valid for the exact software and hardware that built it, so it is cached
under a *staleness key*: the sha256 of canonical JSON (sorted keys, no spaces) covering the
ONNX sha256, the TensorRT, CUDA runtime and driver versions, the GPU name and compute
capability, ``/etc/nv_tegra_release``, the precision, the workspace, the optimisation
profiles and :data:`RECIPE_VERSION`. Cache layout (see docs/JETSON.md)::

    <cache_dir>/<name>-<version>-<key[:16]>.plan    the serialised engine, written atomically
    <cache_dir>/<name>-<version>-<key[:16]>.json    sidecar: full key, its inputs, plan sha256
    <cache_dir>/timing-<env[:16]>.cache             TensorRT timing cache (speeds up rebuilds)
    <cache_dir>/calib-<onnx[:16]>-<set[:16]>.cache  INT8 calibration cache, per calibration set

The TensorRT side of a build (parser, builder config, INT8 calibrator) is :mod:`iaflash.engines.trt_build`;
the serve-while-building swap is :mod:`iaflash.engines.swap`; build options are the leaf
:mod:`iaflash.engines.options`. ``tensorrt`` is imported inside the functions that need it, never at import time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from iaflash.engines.atomic import write_atomic
from iaflash.engines.bundle import Bundle, sha256_file
from iaflash.engines.cuda import open_cuda
from iaflash.engines.errors import BackendUnavailable, CudaError, ModelLoadError, UnusablePlan
from iaflash.engines.options import DEFAULT_CACHE_DIR, BuildOptions, Progress
from iaflash.engines.trt_build import compile_plan

__all__ = [
    "RECIPE_VERSION",
    "BuildEnv",
    "UnusablePlan",
    "build_engine",
    "cached_plan",
    "load_or_build",
    "plan_key",
    "plan_path",
    "profile_shapes",
    "read_plan_meta",
    "staleness_key",
]

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1
"""Bump when the way engines are built changes (flags, profiles), so every cached plan is rebuilt."""
TEGRA_RELEASE = Path("/etc/nv_tegra_release")

Profiles = dict[str, list[list[int]]]
T = TypeVar("T")


@dataclass(frozen=True)
class BuildEnv:
    """The software and hardware a plan is bound to; :meth:`detect` reads them from this machine."""

    tensorrt: str
    cuda_runtime: str
    cuda_driver: str
    gpu: str
    compute_capability: str
    tegra_release: str | None = None

    @classmethod
    def detect(cls, *, device: int = 0, tegra_release: Path = TEGRA_RELEASE) -> BuildEnv:
        """Ask tensorrt and CUDA; BackendUnavailable (with the reason) when either is missing."""
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError as exc:
            raise BackendUnavailable(f"python package 'tensorrt' cannot be imported ({exc})") from exc
        try:
            cuda = open_cuda(device)
        except CudaError as exc:
            raise BackendUnavailable(str(exc)) from exc
        try:
            major, minor = cuda.compute_capability()
            return cls(
                tensorrt=str(trt.__version__),
                cuda_runtime=cuda.runtime_version(),
                cuda_driver=cuda.driver_version(),
                gpu=cuda.device_name(),
                compute_capability=f"{major}.{minor}",
                tegra_release=_read_text(tegra_release),
            )
        finally:
            cuda.close()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _digest(doc: Mapping[str, Any]) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _key_inputs(
    onnx_sha256: str, precision: str, workspace_mb: int, max_batch: int, env: BuildEnv, profiles: Profiles | None
) -> dict[str, Any]:
    return {
        "onnx_sha256": onnx_sha256,
        "tensorrt": env.tensorrt,
        "cuda_runtime": env.cuda_runtime,
        "cuda_driver": env.cuda_driver,
        "gpu": env.gpu,
        "compute_capability": env.compute_capability,
        "tegra_release": env.tegra_release,
        "precision": precision,
        "workspace_mb": workspace_mb,
        "max_batch": max_batch,
        "profiles": profiles if profiles is not None else {"*": [[1], [1], [max_batch]]},
        "recipe": RECIPE_VERSION,
    }


def staleness_key(
    onnx_sha256: str,
    *,
    precision: str,
    workspace_mb: int,
    max_batch: int,
    env: BuildEnv,
    profiles: Profiles | None = None,
) -> str:
    """sha256 of the canonical JSON of everything that makes a plan valid (see the module doc).

    ``profiles`` maps input name to [min, opt, max] shapes; by default only the batch range.
    """
    return _digest(_key_inputs(onnx_sha256, precision, workspace_mb, max_batch, env, profiles))


def profile_shapes(bundle: Bundle, max_batch: int) -> Profiles:
    """The optimisation profile of the bundle's input: batch 1..max_batch (opt 1), or its fixed batch.

    opt is 1 because a radar site sees captures one at a time; bigger batches only form in bursts.
    """
    manifest = bundle.manifest
    pp = manifest.preprocessing
    dims = [
        d if isinstance(d, int) else fallback
        for d, fallback in zip(manifest.input_shape, (0, 3, pp.height, pp.width), strict=True)
    ]
    batch = manifest.input_shape[0]
    low, opt, high = (batch, batch, batch) if isinstance(batch, int) else (1, 1, max_batch)
    return {manifest.input_name: [[low, *dims[1:]], [opt, *dims[1:]], [high, *dims[1:]]]}


def plan_key(bundle: Bundle, options: BuildOptions, env: BuildEnv) -> tuple[str, dict[str, Any]]:
    """The staleness key of ``bundle`` built with ``options`` on ``env``, and the document it hashes."""
    inputs = _key_inputs(
        bundle.model_sha256,
        options.precision,
        options.workspace_mb,
        options.max_batch,
        env,
        profile_shapes(bundle, options.max_batch),
    )
    return _digest(inputs), inputs


def plan_path(bundle: Bundle, key: str, cache_dir: Path) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{bundle.manifest.name}-{bundle.manifest.version}")
    return cache_dir / f"{safe}-{key[:16]}.plan"


def read_plan_meta(plan: Path) -> dict[str, Any] | None:
    """The sidecar JSON of a plan, or None when it is missing or unreadable."""
    try:
        meta = json.loads(plan.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def cached_plan(bundle: Bundle, key: str, cache_dir: Path, *, inputs: Mapping[str, Any] | None = None) -> Path | None:
    """The cached plan recorded under ``key``, or None (missing, stale or damaged: the log says why)."""
    path = plan_path(bundle, key, cache_dir)
    meta = read_plan_meta(path)
    if meta is None or not path.is_file():
        _log_stale(bundle, key, cache_dir, inputs)
        return None
    if meta.get("key") != key:
        logger.info("cached plan %s is stale: recorded key %.16s… differs from %.16s…", path, meta.get("key"), key)
        return None
    if meta.get("plan_sha256") != sha256_file(path):
        logger.warning("cached plan %s is damaged (sha256 differs from its sidecar); it will be rebuilt", path)
        return None
    return path


def _log_stale(bundle: Bundle, key: str, cache_dir: Path, inputs: Mapping[str, Any] | None) -> None:
    prefix = plan_path(bundle, key, cache_dir).name[: -len(key[:16]) - len(".plan")]
    for sidecar in sorted(cache_dir.glob(f"{prefix}*.json")):
        recorded = read_plan_meta(sidecar.with_suffix(".plan")) or {}
        old = recorded.get("inputs") or {}
        changed = sorted(k for k in set(old) | set(inputs or {}) if old.get(k) != (inputs or {}).get(k))
        logger.info("cached plan %s is stale (changed: %s)", sidecar.with_suffix(".plan"), ", ".join(changed) or "key")
    logger.info("no valid TensorRT plan for %s %s in %s", bundle.manifest.name, bundle.manifest.version, cache_dir)


def _store(
    bundle: Bundle, plan: bytes, key: str, inputs: Mapping[str, Any], cache_dir: Path, extra: dict[str, Any]
) -> Path:
    path = plan_path(bundle, key, cache_dir)
    write_atomic(path, plan)
    meta = {
        "key": key,
        "inputs": dict(inputs),
        "plan_sha256": hashlib.sha256(plan).hexdigest(),
        "plan_bytes": len(plan),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    write_atomic(path.with_suffix(".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    for old in cache_dir.glob(path.name[: -len(key[:16]) - len(".plan")] + "*.plan"):
        if old != path:  # same bundle version, other key: stale for good on this box
            logger.info("removing stale plan %s", old)
            for stale in (old, old.with_suffix(".json")):
                stale.unlink(missing_ok=True)
    return path


def build_engine(
    bundle: Bundle,
    *,
    precision: str = "fp16",
    workspace_mb: int = 1024,
    max_batch: int = 4,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: Progress | None = None,
    calibration: Sequence[np.ndarray] | None = None,
    env: BuildEnv | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Build ``bundle``'s ONNX model into a TensorRT plan in ``cache_dir`` and return its path.

    INT8 needs ``calibration`` (NCHW float32 batches, preprocessed like captures). Parser
    errors and build failures raise ModelLoadError; nothing partial is left in ``cache_dir``.
    """
    options = BuildOptions(precision=precision, workspace_mb=workspace_mb, max_batch=max_batch, cache_dir=cache_dir)
    _require_calibration(bundle, precision, calibration)
    env = env or BuildEnv.detect()
    key, inputs = plan_key(bundle, options, env)
    report = progress or (lambda _stage, _fraction: None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    plan, effective = compile_plan(
        bundle,
        options,
        profiles=profile_shapes(bundle, max_batch),
        timing_cache=cache_dir / f"timing-{_digest(env.to_dict())[:16]}.cache",
        calibration=calibration,
        calibration_cache=cache_dir / f"calib-{bundle.model_sha256[:16]}-{_batches_digest(calibration)[:16]}.cache",
        progress=report,
        cancel=cancel,
    )
    report("write", 0.97)
    seconds = round(time.monotonic() - started, 1)
    path = _store(bundle, plan, key, inputs, cache_dir, {"precision": effective, "build_seconds": seconds})
    logger.info("built TensorRT plan %s (%s, %d bytes) in %.1f s", path, effective, len(plan), seconds)
    report("done", 1.0)
    return path


def _require_calibration(bundle: Bundle, precision: str, calibration: Sequence[np.ndarray] | None) -> None:
    if precision == "int8" and not calibration:
        raise ModelLoadError(
            f"{bundle.path}: int8 needs a calibration set; fix: iaflash-engines build {bundle.path} "
            "--precision int8 --calibration DIR_OF_JPEGS (and check accuracy before deploying it)"
        )


def _batches_digest(batches: Sequence[np.ndarray] | None) -> str:
    """The calibration set's identity: a new set must not reuse the old set's calibration cache."""
    digest = hashlib.sha256()
    for batch in batches or ():
        digest.update(np.ascontiguousarray(batch).tobytes())
    return digest.hexdigest()


def load_or_build(
    bundle: Bundle,
    options: BuildOptions,
    opener: Callable[[Path], T],
    *,
    env: BuildEnv,
    build: bool = True,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> T:
    """Open the cached plan with ``opener``; build it when missing or stale, and rebuild it once
    when ``opener`` raises UnusablePlan. With ``build=False`` a missing plan is a ModelLoadError.
    """
    key, inputs = plan_key(bundle, options, env)
    cache_dir = options.cache_for(bundle)
    path = cached_plan(bundle, key, cache_dir, inputs=inputs)

    def _build() -> Path:
        if not build:
            raise _no_plan(bundle, cache_dir)
        return build_engine(
            bundle,
            precision=options.precision,
            workspace_mb=options.workspace_mb,
            max_batch=options.max_batch,
            cache_dir=cache_dir,
            progress=progress,
            env=env,
            cancel=cancel,
        )

    path = path or _build()
    try:
        return opener(path)
    except UnusablePlan as exc:
        logger.warning("TensorRT refused cached plan %s (%s); discarding and rebuilding it", path, exc)
        for stale in (path, path.with_suffix(".json")):
            stale.unlink(missing_ok=True)
        return opener(_build())


def _no_plan(bundle: Bundle, cache_dir: Path) -> ModelLoadError:
    return ModelLoadError(
        f"no valid TensorRT plan for {bundle.manifest.name} {bundle.manifest.version} in "
        f"{cache_dir}; fix: iaflash-engines build {bundle.path} --cache-dir {cache_dir}"
    )
