"""The native TensorRT backend: runs a cached (or freshly built) plan on the GPU.

Supports TensorRT 8.5/8.6 (JetPack 5 / 6.0) and 10.x through the name-based tensor API only:
``num_io_tensors``/``get_tensor_name``/``get_tensor_mode``/``get_tensor_shape``/
``get_tensor_dtype``, ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3``.
The binding API (binding indices, ``execute_v2`` with a bindings list) was removed in
TensorRT 10 and is never used.

A runner allocates pinned host and device buffers once, for the largest batch of the
optimisation profile, and owns one CUDA stream; ``infer`` copies in, executes, copies out
and synchronises. Batches below the maximum set the input shape; bigger ones run in chunks.
Every call pushes the CUDA primary context (see :mod:`iaflash.engines.cuda`), so the runner can be
used from the agent's inference worker thread. ``tensorrt`` is imported inside functions only.

Building the plan is :mod:`iaflash.engines.trt_build` (:func:`compile_plan`, re-exported here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from iaflash.engines.base import Backend, BackendInfo, TensorSpec
from iaflash.engines.build import BuildEnv, load_or_build, read_plan_meta
from iaflash.engines.bundle import Bundle
from iaflash.engines.cuda import available as cuda_available
from iaflash.engines.errors import CudaError, InferenceError, ModelLoadError, UnusablePlan
from iaflash.engines.options import BuildOptions, Progress
from iaflash.engines.trt_build import (
    compile_plan,
    enum_name,
    import_tensorrt,
    native_errors,
    open_device,
    tensorrt_logger,
)

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


class _Runner:
    """One deserialised engine, its execution context, buffers and stream."""

    def __init__(self, path: Path, bundle: Bundle) -> None:
        self.path = path
        self._trt = import_tensorrt()
        self._cuda = open_device(ModelLoadError)
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[np.ndarray, int]] = {}
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        try:
            with self._cuda.context(), native_errors(ModelLoadError, str(path)):
                self._open(bundle)
        except BaseException:
            self.close()
            raise

    def _open(self, bundle: Bundle) -> None:
        self._runtime = self._trt.Runtime(tensorrt_logger(self._trt))
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
            is_input = enum_name(self._engine.get_tensor_mode(name)) == "INPUT"
            dtype = np.dtype(_NP_DTYPES.get(enum_name(self._engine.get_tensor_dtype(name)), "float32"))
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
        with self._lock, self._cuda.context(), native_errors(InferenceError, f"TensorRT run of {self.input_name!r}"):
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
            trt = import_tensorrt()
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
