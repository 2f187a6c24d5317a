"""The ONNX Runtime backend: the default everywhere.

It runs on the CPU, and prefers the TensorRT then CUDA execution providers when the installed
onnxruntime build has them. ``onnxruntime`` is imported inside ``is_available()``/``load()``
only; its exceptions are mapped to ModelLoadError/InferenceError in :func:`_ort_errors`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iaflash.engines.base import Backend, BackendInfo, TensorSpec
from iaflash.engines.bundle import Bundle
from iaflash.engines.errors import EngineError, InferenceError, ModelLoadError

__all__ = ["OnnxRuntimeBackend"]

logger = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_TRT = "TensorrtExecutionProvider"
_RUN_FIX = "check the batch against input_spec; if it matches, the model failed at run time"
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
}

ProviderEntry = str | tuple[str, dict[str, Any]]


@functools.cache
def _caught() -> tuple[type[Exception], ...]:
    """What :func:`_ort_errors` maps: onnxruntime's native exceptions, RuntimeError, ValueError.

    Looked up once: ``_ort_errors`` runs on every infer call.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as state  # noqa: PLC0415  # native, lazy

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
        "NotFound",
    )
    return (*(getattr(state, n) for n in names if hasattr(state, n)), RuntimeError, ValueError)


@contextlib.contextmanager
def _ort_errors(error: type[EngineError], where: str, fix: str) -> Iterator[None]:
    """The one place where onnxruntime's exceptions become ours."""
    caught = _caught()
    try:
        yield
    except caught as exc:
        raise error(f"{where}: {exc}; fix: {fix}") from exc


def _providers(available: Sequence[str], cache_dir: Path) -> list[ProviderEntry]:
    """TensorRT EP (fp16, engine cache in ``cache_dir``), then CUDA, then CPU, as far as installed."""
    chosen: list[ProviderEntry] = []
    if _TRT in available:
        chosen.append(
            (
                _TRT,
                {
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache_dir),
                },
            )
        )
    if _CUDA in available:
        chosen.append(_CUDA)
    chosen.append(_CPU)
    return chosen


def _spec(node: Any) -> TensorSpec:
    dims = tuple(d if isinstance(d, (int, str)) else None for d in node.shape)
    return TensorSpec(name=node.name, shape=dims, dtype=_ORT_DTYPES.get(node.type, node.type))


def _find(nodes: Sequence[Any], name: str, role: str, model: Path) -> Any:
    for node in nodes:
        if node.name == name:
            return node
    names = ", ".join(repr(n.name) for n in nodes)
    raise ModelLoadError(
        f"{model}: the manifest's {role}_name {name!r} is not in the model (it has {names}); "
        f"fix: set {role}_name in manifest.json to one of those and re-pack the bundle"
    )


def _merge_input(model_spec: TensorSpec, bundle: Bundle) -> TensorSpec:
    """The model's input spec with dynamic non-batch dims filled from the manifest's input_shape."""
    manifest = bundle.manifest
    fix = "make the manifest's input_shape/input_dtype match the ONNX model and re-pack the bundle"
    if len(model_spec.shape) != len(manifest.input_shape):
        raise ModelLoadError(
            f"{bundle.model_path}: input {model_spec.name!r} has shape {list(model_spec.shape)}, "
            f"manifest says {list(manifest.input_shape)}; fix: {fix}"
        )
    if model_spec.dtype != manifest.input_dtype:
        raise ModelLoadError(
            f"{bundle.model_path}: input {model_spec.name!r} is {model_spec.dtype}, "
            f"manifest says {manifest.input_dtype}; fix: {fix}"
        )
    dims: list[int | str | None] = [model_spec.shape[0]]
    for axis in range(1, len(model_spec.shape)):
        have, want = model_spec.shape[axis], manifest.input_shape[axis]
        if isinstance(have, int) and isinstance(want, int) and have != want:
            raise ModelLoadError(
                f"{bundle.model_path}: input {model_spec.name!r} has {have} at axis {axis}, "
                f"manifest says {want}; fix: {fix}"
            )
        dims.append(have if isinstance(have, int) else want)
    return TensorSpec(name=model_spec.name, shape=tuple(dims), dtype=model_spec.dtype)


def _check_classes(output: TensorSpec, bundle: Bundle) -> None:
    classes = output.shape[-1]
    if bundle.manifest.task == "classifier" and isinstance(classes, int) and classes != len(bundle.labels):
        raise ModelLoadError(
            f"{bundle.model_path}: output {output.name!r} has {classes} classes but "
            f"labels.csv has {len(bundle.labels)} rows: the labels belong to another model; "
            "fix: re-pack the bundle with this model's labels"
        )


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime with one InferenceSession per loaded bundle.

    ``threads``: intra-op threads (0 = one per core). ``providers``: force a provider list
    (e.g. ``["CPUExecutionProvider"]``); by default the best installed ones are used.
    ``cache_dir``: TensorRT EP engine cache; default ``<bundle dir>.trt-cache`` beside the bundle.
    """

    kind = "onnxruntime"

    def __init__(
        self, *, threads: int = 0, providers: Sequence[str] | None = None, cache_dir: Path | None = None
    ) -> None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = one per core), got {threads}")
        self._threads = threads
        self._forced = list(providers) if providers is not None else None
        self._cache_dir = cache_dir
        self._session: Any = None
        self._input: TensorSpec | None = None
        self._output: TensorSpec | None = None
        self._info: BackendInfo | None = None
        self._output_names: tuple[str, ...] = ()

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort  # noqa: PLC0415  # native library, imported lazily
        except ImportError as exc:
            return (
                False,
                f"python package 'onnxruntime' cannot be imported ({exc}); fix: pip install onnxruntime",
            )
        return True, f"onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}"

    def load(self, bundle: Bundle) -> None:
        import onnxruntime as ort  # noqa: PLC0415  # native library, imported lazily

        self.close()
        path = bundle.model_path
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file is missing; fix: re-install or re-pack the bundle")
        cache_dir = self._cache_dir or bundle.path.with_name(bundle.path.name + ".trt-cache")
        providers = self._forced or _providers(ort.get_available_providers(), cache_dir)
        if _TRT in [p if isinstance(p, str) else p[0] for p in providers]:
            cache_dir.mkdir(parents=True, exist_ok=True)
        session = self._open(ort, path, providers)
        model_in = _spec(_find(session.get_inputs(), bundle.manifest.input_name, "input", path))
        output = _spec(_find(session.get_outputs(), bundle.manifest.output_name, "output", path))
        self._input = _merge_input(model_in, bundle)
        _check_classes(output, bundle)
        self._output = output
        used = list(session.get_providers())
        self._info = BackendInfo(
            kind=self.kind,
            precision="fp16" if _TRT in used else "fp32",
            device="cuda:0" if (_TRT in used or _CUDA in used) else "cpu",
            versions={"onnxruntime": ort.__version__, "numpy": np.__version__},
            engine_key=_engine_key(bundle.model_sha256, ort.__version__, used),
        )
        self._output_names = tuple(o.name for o in session.get_outputs())
        self._session = session
        logger.info(
            "loaded %s %s with onnxruntime %s on %s (providers %s)",
            bundle.manifest.name,
            bundle.manifest.version,
            ort.__version__,
            self._info.device,
            ",".join(used),
        )

    def _open(self, ort: Any, path: Path, providers: Sequence[ProviderEntry]) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        # No spin-waiting between runs: in the pipelined daemon, idle ORT threads that spin steal the
        # cores that decode and the detector need (measured: benchmarks/pipeline_bench.py, docs/PERFORMANCE.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        fix = "the file is corrupt or not an ONNX model this onnxruntime supports; re-pack the bundle"
        try:
            with _ort_errors(ModelLoadError, str(path), fix):
                return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        except ModelLoadError:
            if list(providers) == [_CPU]:
                raise
            logger.warning(
                "onnxruntime could not load %s with providers %s; retrying on the CPU",
                path,
                providers,
                exc_info=True,
            )
        with _ort_errors(ModelLoadError, str(path), fix):
            return ort.InferenceSession(str(path), sess_options=opts, providers=[_CPU])

    def _loaded(self) -> tuple[Any, TensorSpec, TensorSpec, BackendInfo]:
        if self._session is None or self._input is None or self._output is None or self._info is None:
            raise InferenceError("onnxruntime backend is not loaded; fix: call load(bundle) first")
        return self._session, self._input, self._output, self._info

    @property
    def input_spec(self) -> TensorSpec:
        return self._loaded()[1]

    @property
    def output_spec(self) -> TensorSpec:
        return self._loaded()[2]

    @property
    def info(self) -> BackendInfo:
        return self._loaded()[3]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        session, spec, out, _ = self._loaded()
        batch = np.ascontiguousarray(batch)
        if spec.shape[0] == 1 and batch.shape[0] > 1:
            # Fixed batch of one: run the rows one by one so callers can micro-batch regardless.
            return np.concatenate([self._run(batch[i : i + 1]) for i in range(batch.shape[0])], axis=0)
        with _ort_errors(InferenceError, f"onnxruntime run of input {spec.name!r}", _RUN_FIX):
            result = session.run([out.name], {spec.name: batch})[0]
        return np.asarray(result)

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every named output of the graph (multi-output detectors: boxes, scores, classes)."""
        self._check(batch)
        session, spec, _, _ = self._loaded()
        with _ort_errors(InferenceError, f"onnxruntime run of input {spec.name!r}", _RUN_FIX):
            results = session.run(None, {spec.name: np.ascontiguousarray(batch)})
        return {name: np.asarray(value) for name, value in zip(self._output_names, results, strict=True)}

    def close(self) -> None:
        self._session = None
        self._input = self._output = None
        self._info = None
        self._output_names = ()


def _engine_key(model_sha256: str, ort_version: str, providers: Sequence[str]) -> str:
    """sha256 of canonical JSON of what decides the compiled engine."""
    doc = {"model_sha256": model_sha256, "onnxruntime": ort_version, "providers": list(providers)}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
