"""The TensorRT side of engine building: ONNX → serialised plan (:func:`compile_plan`).

Parses the bundle's ONNX model, configures the builder (workspace, the optimisation profile,
precision flags, the INT8 entropy calibrator, the timing cache), reports progress through
TensorRT 10's IProgressMonitor and serialises the engine. The staleness key and the plan
cache around it are :mod:`iaflash.engines.build`'s. This module is also where ``tensorrt`` is imported
(:func:`import_tensorrt`), its ILogger bridged to :mod:`logging` (:func:`tensorrt_logger`) and
its and CUDA's exceptions mapped to ours (:func:`native_errors`); :mod:`iaflash.engines.trt` shares them.
``tensorrt`` is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from iaflash.engines.atomic import write_atomic
from iaflash.engines.bundle import Bundle
from iaflash.engines.cuda import Cuda, open_cuda
from iaflash.engines.errors import CudaError, EngineError, ModelLoadError

if TYPE_CHECKING:  # annotations only
    from iaflash.engines.options import BuildOptions, Progress

__all__ = ["compile_plan", "enum_name", "import_tensorrt", "native_errors", "open_device", "tensorrt_logger"]

# Split out of iaflash.engines.trt: TensorRT's own messages (build and runtime) keep that logger name.
logger = logging.getLogger("iaflash.engines.trt")

_LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING}
_trt_log_lock = threading.Lock()
_trt_log: list[Any] = []  # TensorRT wants one logger per process: made once, kept alive


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, imported now (never at import time of this module)."""
    return importlib.import_module("tensorrt")


def enum_name(value: Any) -> str:
    """``DataType.FLOAT`` → ``FLOAT``: the member name of a TensorRT enum value, across versions."""
    return str(getattr(value, "name", value)).rsplit(".", 1)[-1]


def tensorrt_logger(trt: Any) -> Any:
    """An ILogger that sends TensorRT's messages to this module's logger (INFO/VERBOSE at DEBUG)."""
    with _trt_log_lock:
        if not _trt_log:

            class _Logger(trt.ILogger):  # type: ignore[misc]  # tensorrt is untyped (Any)
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    logger.log(_LEVELS.get(enum_name(severity), logging.DEBUG), "tensorrt: %s", msg)

            _trt_log.append(_Logger())
        return _trt_log[0]


@contextlib.contextmanager
def native_errors(error: type[EngineError], where: str) -> Iterator[None]:
    """The one place where tensorrt's and CUDA's exceptions become ours."""
    try:
        yield
    except CudaError as exc:
        raise error(f"{where}: {exc}") from exc
    except (RuntimeError, TypeError, ValueError) as exc:
        raise error(f"{where}: TensorRT failed: {exc}") from exc


def open_device(error: type[EngineError]) -> Cuda:
    """The CUDA device (see :func:`iaflash.engines.cuda.open_cuda`); a CudaError becomes ``error``."""
    try:
        return open_cuda()
    except CudaError as exc:
        raise error(str(exc)) from exc


# ---------------------------------------------------------------- building


def _parse(trt: Any, network: Any, bundle: Bundle, profiles: dict[str, list[list[int]]]) -> None:
    parser = trt.OnnxParser(network, tensorrt_logger(trt))
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
            write_atomic(cache, bytes(blob))

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
    trt = import_tensorrt()
    cuda = open_device(ModelLoadError)
    try:
        with cuda.context(), native_errors(ModelLoadError, f"TensorRT build of {bundle.model_path}"):
            progress("parse", 0.0)
            builder = trt.Builder(tensorrt_logger(trt))
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
            plan = _serialize(builder, network, config, calibrator, bundle)
            with contextlib.suppress(OSError):
                write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
            return plan, effective
    finally:
        cuda.close()


def _serialize(builder: Any, network: Any, config: Any, calibrator: Any, bundle: Bundle) -> bytes:
    """Build and serialise the engine; the calibrator's device buffer is freed whatever happens."""
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
    return bytes(serialized)
