"""The native TensorRT backend, and the TensorRT side of engine building.

Supports TensorRT 8.5/8.6 (JetPack 5 / 6.0) and 10.x through the name-based tensor API only:
``num_io_tensors``/``get_tensor_name``/``get_tensor_mode``/``get_tensor_shape``/
``get_tensor_dtype``, ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3``.
The binding API (binding indices, ``execute_v2`` with a bindings list) was removed in
TensorRT 10 and is never used.

A runner allocates pinned host and device buffers once, for the largest batch of the
optimisation profile, and owns one CUDA stream; ``infer`` copies in, executes, copies out
and synchronises. Batches below the maximum set the input shape; bigger ones run in chunks.
Every call pushes the CUDA primary context (see :mod:`engines.cuda`), so the runner can be
used from the agent's inference worker thread. ``tensorrt`` is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Backend, BackendInfo, TensorSpec
from engines.build import (
    BuildEnv,
    BuildOptions,
    Progress,
    UnusablePlan,
    atomic_write,
    load_or_build,
    read_plan_meta,
)
from engines.bundle import Bundle
from engines.cuda import Cuda, CudaError, open_cuda
from engines.cuda import available as cuda_available
from engines.errors import EngineError, InferenceError, ModelLoadError

__all__ = ["TensorRTBackend", "compile_plan"]

logger = logging.getLogger(__name__)

_NP_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}
_LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING}
_trt_log_lock = threading.Lock()
_trt_log: list[Any] = []  # TensorRT wants one logger per process: made once, kept alive


def _import_trt() -> Any:
    return importlib.import_module("tensorrt")


def _name(value: Any) -> str:
    return str(getattr(value, "name", value)).rsplit(".", 1)[-1]


def _trt_logger(trt: Any) -> Any:
    """An ILogger that sends TensorRT's messages to this module's logger (INFO/VERBOSE at DEBUG)."""
    with _trt_log_lock:
        if not _trt_log:

            class _Logger(trt.ILogger):  # type: ignore[misc]  # tensorrt is untyped (Any)
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    logger.log(_LEVELS.get(_name(severity), logging.DEBUG), "tensorrt: %s", msg)

            _trt_log.append(_Logger())
        return _trt_log[0]


@contextlib.contextmanager
def _native_errors(error: type[EngineError], where: str) -> Iterator[None]:
    """The one place where tensorrt's and CUDA's exceptions become ours."""
    try:
        yield
    except CudaError as exc:
        raise error(f"{where}: {exc}") from exc
    except (RuntimeError, TypeError, ValueError) as exc:
        raise error(f"{where}: TensorRT failed: {exc}") from exc


def _open_cuda(error: type[EngineError]) -> Cuda:
    try:
        return open_cuda()
    except CudaError as exc:
        raise error(str(exc)) from exc


# ---------------------------------------------------------------- building


def _parse(trt: Any, network: Any, bundle: Bundle, profiles: dict[str, list[list[int]]]) -> None:
    parser = trt.OnnxParser(network, _trt_logger(trt))
    if not parser.parse_from_file(str(bundle.model_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        lines = "".join(
            f"\n  - node {getattr(e, 'node', lambda: '?')()}: {getattr(e, 'desc', e.__str__)()}" for e in errors
        )
        raise ModelLoadError(
            f"{bundle.model_path}: the TensorRT ONNX parser refused the model; fix: the file is corrupt or uses "
            "operators/an opset this TensorRT does not support: re-pack it, or re-export it (see docs/JETSON.md); "
            f"{len(errors)} parser errors:{lines}"
        )
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    for name, (_low, _opt, high) in profiles.items():
        if name not in inputs:
            raise ModelLoadError(
                f"{bundle.model_path}: the manifest's input_name {name!r} is not in the model "
                f"(it has {', '.join(map(repr, inputs))}); fix: correct input_name and re-pack"
            )
        for axis, (have, want) in enumerate(zip(inputs[name], high, strict=False)):
            if axis > 0 and have >= 0 and have != want:
                raise ModelLoadError(
                    f"{bundle.model_path}: input {name!r} has {have} at axis {axis}, manifest says "
                    f"{want}; fix: make the manifest's input_shape match the ONNX model"
                )


def _set_precision(trt: Any, builder: Any, config: Any, precision: str) -> str:
    if precision == "fp32":
        return "fp32"
    fast16 = bool(getattr(builder, "platform_has_fast_fp16", True))
    if fast16:
        config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without int8 kernels fall back to fp16
    elif precision == "fp16":
        logger.warning("this GPU has no fast FP16; building the engine in FP32")
        return "fp32"
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    return precision


def _calibrator(trt: Any, cuda: Cuda, batches: Sequence[np.ndarray], cache: Path) -> Any:
    """An entropy calibrator (IInt8EntropyCalibrator2) fed by NCHW float32 numpy batches."""
    data = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]  # tensorrt is untyped (Any)
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.next = 0
            self.ptr = cuda.device_alloc(max(b.nbytes for b in data))
            self.stream = cuda.stream_create()

        def get_batch_size(self) -> int:
            return int(data[0].shape[0])

        def get_batch(self, names: Sequence[str], *_: Any) -> list[int] | None:
            if self.next >= len(data):
                return None
            cuda.htod_async(self.ptr, data[self.next], self.stream)
            cuda.stream_synchronize(self.stream)
            self.next += 1
            logger.debug("calibration batch %d/%d for %s", self.next, len(data), ",".join(names))
            return [self.ptr]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, blob: Any) -> None:
            atomic_write(cache, bytes(blob))

        def release(self) -> None:
            cuda.device_free(self.ptr)
            cuda.stream_destroy(self.stream)

    return _Calibrator()


def _monitor(trt: Any, progress: Progress, cancel: threading.Event | None) -> Any:
    """TensorRT 10's IProgressMonitor reporting top-level steps as build progress 0.15..0.95."""
    if not hasattr(trt, "IProgressMonitor"):
        return None  # TensorRT 8.x: only the stages are reported

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc]  # tensorrt is untyped (Any)
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.top: dict[str, int] = {}
            self.done = 0.15

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                self.top[phase_name] = max(int(num_steps), 1)

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name in self.top:
                self.done = max(self.done, 0.15 + 0.8 * (step + 1) / self.top[phase_name])
                progress("build", min(self.done, 0.95))
            return not (cancel is not None and cancel.is_set())  # False asks TensorRT to cancel

        def phase_finish(self, phase_name: str) -> None:
            self.top.pop(phase_name, None)

    return _Monitor()


def _timing_cache(config: Any, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(data), False):
        logger.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _network(trt: Any, builder: Any, bundle: Bundle, profiles: dict[str, list[list[int]]]) -> Any:
    """An explicit-batch network parsed from the bundle's ONNX (the flag is implicit from TensorRT 10)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    major = int(str(trt.__version__).split(".")[0])
    network = builder.create_network(1 << int(flag) if flag is not None and major < 10 else 0)
    _parse(trt, network, bundle, profiles)
    return network


def _config(
    trt: Any,
    cuda: Cuda,
    builder: Any,
    options: BuildOptions,
    profiles: dict[str, list[list[int]]],
    calibration: Sequence[np.ndarray] | None,
    calibration_cache: Path,
) -> tuple[Any, str, Any]:
    """The builder config: workspace, the profile, precision flags and (int8) the calibrator."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    effective = _set_precision(trt, builder, config, options.precision)
    calibrator = None
    if effective == "int8" and calibration:
        calibrator = _calibrator(trt, cuda, calibration, calibration_cache)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    return config, effective, calibrator


def compile_plan(
    bundle: Bundle,
    options: BuildOptions,
    *,
    profiles: dict[str, list[list[int]]],
    timing_cache: Path,
    calibration: Sequence[np.ndarray] | None,
    calibration_cache: Path,
    progress: Progress,
    cancel: threading.Event | None = None,
) -> tuple[bytes, str]:
    """ONNX → serialised plan with TensorRT; returns (plan bytes, effective precision)."""
    trt = _import_trt()
    cuda = _open_cuda(ModelLoadError)
    try:
        with cuda.context(), _native_errors(ModelLoadError, f"TensorRT build of {bundle.model_path}"):
            progress("parse", 0.0)
            builder = trt.Builder(_trt_logger(trt))
            network = _network(trt, builder, bundle, profiles)
            progress("configure", 0.1)
            config, effective, calibrator = _config(
                trt, cuda, builder, options, profiles, calibration, calibration_cache
            )
            _timing_cache(config, timing_cache)
            monitor = _monitor(trt, progress, cancel)  # kept referenced until the build ends
            if monitor is not None:
                config.progress_monitor = monitor
            progress("build", 0.15)
            try:
                serialized = builder.build_serialized_network(network, config)
            finally:
                if calibrator is not None:
                    calibrator.release()
            if serialized is None:
                raise ModelLoadError(
                    f"{bundle.model_path}: TensorRT could not build an engine (cancelled, or see the "
                    "tensorrt log lines above); fix: check the workspace size and the model's operators"
                )
            with contextlib.suppress(OSError):
                atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
            return bytes(serialized), effective
    finally:
        cuda.close()


# ---------------------------------------------------------------- running


class _Runner:
    """One deserialised engine, its execution context, buffers and stream."""

    def __init__(self, path: Path, bundle: Bundle) -> None:
        self.path = path
        self._trt = _import_trt()
        self._cuda = _open_cuda(ModelLoadError)
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[np.ndarray, int]] = {}
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        try:
            with self._cuda.context(), _native_errors(ModelLoadError, str(path)):
                self._open(bundle)
        except BaseException:
            self.close()
            raise

    def _open(self, bundle: Bundle) -> None:
        self._runtime = self._trt.Runtime(_trt_logger(self._trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise UnusablePlan(
                f"{self.path}: TensorRT could not deserialise the plan (damaged, or built by "
                "another TensorRT); it will be rebuilt"
            )
        self._context = self._engine.create_execution_context()
        io = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            is_input = _name(self._engine.get_tensor_mode(name)) == "INPUT"
            dtype = np.dtype(_NP_DTYPES.get(_name(self._engine.get_tensor_dtype(name)), "float32"))
            io[name] = (is_input, tuple(int(d) for d in self._engine.get_tensor_shape(name)), dtype)
        self.input_name, self.output_name = _check_io(io, bundle, self.path)
        shape = io[self.input_name][1]
        if any(d < 0 for d in shape):
            shape = tuple(int(d) for d in self._engine.get_tensor_profile_shape(self.input_name, 0)[2])
        self.max_input = shape
        self._stream = self._cuda.stream_create()
        self._handle = self._cuda.stream_handle(self._stream)
        self._allocate(io)
        batch = bundle.manifest.input_shape[0]
        self.input_spec = TensorSpec(self.input_name, (batch, *shape[1:]), str(io[self.input_name][2]))
        out = self._buffers[self.output_name][0]
        self.output_spec = TensorSpec(self.output_name, (batch, *out.shape[1:]), str(out.dtype))
        classes = out.shape[-1]
        if bundle.manifest.task == "classifier" and classes != len(bundle.labels):
            raise ModelLoadError(
                f"{bundle.model_path}: output {self.output_name!r} has {classes} classes but labels.csv "
                f"has {len(bundle.labels)} rows; fix: re-pack the bundle with this model's labels"
            )

    def _allocate(self, io: dict[str, tuple[bool, tuple[int, ...], np.dtype[Any]]]) -> None:
        if not self._context.set_input_shape(self.input_name, self.max_input):
            raise ModelLoadError(f"{self.path}: TensorRT refused input shape {list(self.max_input)}")
        for name, (is_input, _shape, dtype) in io.items():
            full = self.max_input if is_input else tuple(int(d) for d in self._context.get_tensor_shape(name))
            if any(d < 0 for d in full):
                raise ModelLoadError(
                    f"{self.path}: output {name!r} has a data-dependent shape {list(full)}, "
                    "which this backend does not support; fix: use onnxruntime for this model"
                )
            host = self._cuda.pinned_empty(full, dtype)
            self._buffers[name] = (host, self._cuda.device_alloc(host.nbytes))
            self._context.set_tensor_address(name, self._buffers[name][1])

    def run(self, batch: np.ndarray) -> np.ndarray:
        step = self.max_input[0]
        with self._lock, self._cuda.context(), _native_errors(InferenceError, f"TensorRT run of {self.input_name!r}"):
            if self._context is None:
                raise InferenceError("tensorrt backend is closed; fix: call load(bundle) first")
            parts = [self._run_chunk(batch[i : i + step]) for i in range(0, batch.shape[0], step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        shape = (chunk.shape[0], *self.max_input[1:])
        if not self._context.set_input_shape(self.input_name, shape):
            raise InferenceError(f"TensorRT refused input shape {list(shape)} (profile max {list(self.max_input)})")
        host_in, dev_in = self._buffers[self.input_name]
        view_in = host_in[: chunk.shape[0]]
        np.copyto(view_in, chunk)
        self._cuda.htod_async(dev_in, view_in, self._stream)
        if not self._context.execute_async_v3(self._handle):
            raise InferenceError("TensorRT execute_async_v3 failed (see the tensorrt log lines)")
        out_shape = tuple(int(d) for d in self._context.get_tensor_shape(self.output_name))
        host_out, dev_out = self._buffers[self.output_name]
        view_out = host_out.reshape(-1)[: int(np.prod(out_shape))].reshape(out_shape)
        self._cuda.dtoh_async(view_out, dev_out, self._stream)
        self._cuda.stream_synchronize(self._stream)
        result: np.ndarray = view_out.copy()
        return result

    def close(self) -> None:
        with self._lock, contextlib.ExitStack() as stack:
            with contextlib.suppress(CudaError):
                stack.enter_context(self._cuda.context())
            for _host, ptr in self._buffers.values():
                with contextlib.suppress(CudaError):
                    self._cuda.device_free(ptr)
            self._buffers.clear()
            if self._stream is not None:
                with contextlib.suppress(CudaError):
                    self._cuda.stream_destroy(self._stream)
            self._context = self._engine = self._stream = None  # freed while the context is current
        self._cuda.close()


def _check_io(io: dict[str, tuple[bool, Any, Any]], bundle: Bundle, path: Path) -> tuple[str, str]:
    inputs = [n for n, (is_input, *_rest) in io.items() if is_input]
    outputs = [n for n, (is_input, *_rest) in io.items() if not is_input]
    manifest = bundle.manifest
    if inputs != [manifest.input_name]:
        raise ModelLoadError(
            f"{path}: the engine's inputs are {inputs}, the manifest's input_name is "
            f"{manifest.input_name!r}; this backend runs single-input models; fix: rebuild the plan"
        )
    if manifest.output_name not in outputs:
        raise ModelLoadError(
            f"{path}: the manifest's output_name {manifest.output_name!r} is not in the engine "
            f"(it has {', '.join(map(repr, outputs))}); fix: correct output_name and re-pack"
        )
    return manifest.input_name, manifest.output_name


class TensorRTBackend(Backend):
    """Native TensorRT on the GPU; ``load`` uses the cached plan or builds it (minutes on a Jetson).

    ``options``: precision/workspace/max batch/cache dir. ``env``: the build environment (detected
    by default). ``build=False`` refuses to build a missing plan (ModelLoadError instead).
    """

    kind = "tensorrt"

    def __init__(
        self,
        *,
        options: BuildOptions | None = None,
        env: BuildEnv | None = None,
        build: bool = True,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self._options = options or BuildOptions()
        self._env = env
        self._build = build
        self._progress = progress
        self._cancel = cancel
        self._runner: _Runner | None = None
        self._info: BackendInfo | None = None

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("tensorrt") is None:
            return False, "python package 'tensorrt' is not installed (on a Jetson it comes with JetPack)"
        try:
            trt = _import_trt()
        except (ImportError, OSError) as exc:
            return False, f"python package 'tensorrt' cannot be imported ({exc})"
        ok, reason = cuda_available()
        if not ok:
            return False, f"tensorrt {trt.__version__} is installed but CUDA is not usable: {reason}"
        return True, f"tensorrt {trt.__version__} on {reason}"

    def load(self, bundle: Bundle) -> None:
        self.close()
        if not bundle.model_path.is_file():
            raise ModelLoadError(f"{bundle.model_path}: model file is missing; fix: re-install or re-pack the bundle")
        env = self._env or BuildEnv.detect()
        runner = load_or_build(
            bundle,
            self._options,
            lambda path: _Runner(path, bundle),
            env=env,
            build=self._build,
            progress=self._progress,
            cancel=self._cancel,
        )
        meta = read_plan_meta(runner.path) or {}
        self._info = BackendInfo(
            kind=self.kind,
            precision=str(meta.get("precision", self._options.precision)),
            device=env.gpu,
            versions={
                "tensorrt": env.tensorrt,
                "cuda_runtime": env.cuda_runtime,
                "cuda_driver": env.cuda_driver,
                "numpy": np.__version__,
            },
            engine_key=str(meta.get("key", "")),
        )
        self._runner = runner
        logger.info(
            "loaded %s %s with TensorRT %s on %s (%s, plan %s)",
            bundle.manifest.name,
            bundle.manifest.version,
            env.tensorrt,
            env.gpu,
            self._info.precision,
            runner.path,
        )

    def _loaded(self) -> tuple[_Runner, BackendInfo]:
        if self._runner is None or self._info is None:
            raise InferenceError("tensorrt backend is not loaded; fix: call load(bundle) first")
        return self._runner, self._info

    @property
    def input_spec(self) -> TensorSpec:
        return self._loaded()[0].input_spec

    @property
    def output_spec(self) -> TensorSpec:
        return self._loaded()[0].output_spec

    @property
    def info(self) -> BackendInfo:
        return self._loaded()[1]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._loaded()[0].run(np.ascontiguousarray(batch))

    def close(self) -> None:
        runner, self._runner, self._info = self._runner, None, None
        if runner is not None:
            runner.close()
