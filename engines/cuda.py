"""A tiny CUDA shim over whichever of pycuda or cuda-python is installed.

The native TensorRT backend needs very little of CUDA: the device's name and compute
capability, the driver and runtime versions, pinned host buffers, device buffers, async
copies on a stream, and a stream to run on. NVIDIA's samples used pycuda up to TensorRT 8.6
and cuda-python after it; JetPack 5 images usually have the first, JetPack 6 either, so
:func:`open_cuda` takes pycuda when importable and cuda-python otherwise. Neither is imported
when this module is imported.

Threads and contexts. pycuda works with the driver API: a CUDA context is current in
the thread that made it current, and only there. The agent loads its model in the main
thread but runs inference in a worker thread, where no context would be current and every
copy would fail with "invalid device context". :class:`_PyCuda` therefore retains the
device's *primary* context (the one the runtime API and TensorRT use too) and every public
call goes through :meth:`Cuda.context`, which pushes it on the calling thread's stack and
pops it afterwards. Callers that make TensorRT calls wrap those in ``with cuda.context():``
too. cuda-python's runtime API makes the primary context current on first use in each
thread by itself, so its ``context()`` only selects the device.

Every native failure becomes :class:`CudaError`; callers map it to ModelLoadError or
InferenceError with the operation in the message.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import importlib
import importlib.util
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from iaflash.engines.errors import CudaError

__all__ = ["Cuda", "CudaError", "available", "format_cuda_version", "open_cuda"]

logger = logging.getLogger(__name__)


def format_cuda_version(value: int) -> str:
    """CUDA's integer version (12020) as text ("12.2")."""
    return f"{value // 1000}.{(value % 1000) // 10}"


class Cuda(abc.ABC):
    """The minimal CUDA surface the TensorRT backend uses; one instance per device and runner."""

    library: str

    @abc.abstractmethod
    def context(self) -> contextlib.AbstractContextManager[None]:
        """Make this device's primary context current in the calling thread for the block."""

    @abc.abstractmethod
    def device_name(self) -> str: ...

    @abc.abstractmethod
    def compute_capability(self) -> tuple[int, int]: ...

    @abc.abstractmethod
    def driver_version(self) -> str: ...

    @abc.abstractmethod
    def runtime_version(self) -> str: ...

    @abc.abstractmethod
    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A page-locked host array (needed for truly asynchronous copies)."""

    @abc.abstractmethod
    def device_alloc(self, nbytes: int) -> int:
        """Allocate device memory; returns the device pointer as an int."""

    @abc.abstractmethod
    def device_free(self, ptr: int) -> None: ...

    @abc.abstractmethod
    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        """Copy the contiguous host array ``src`` to device pointer ``dst`` on ``stream``."""

    @abc.abstractmethod
    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        """Copy ``dst.nbytes`` from device pointer ``src`` into the contiguous host array ``dst``."""

    @abc.abstractmethod
    def stream_create(self) -> Any: ...

    @abc.abstractmethod
    def stream_handle(self, stream: Any) -> int:
        """The ``cudaStream_t`` as an int, as ``execute_async_v3`` wants it."""

    @abc.abstractmethod
    def stream_synchronize(self, stream: Any) -> None: ...

    @abc.abstractmethod
    def stream_destroy(self, stream: Any) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Release what this shim holds (pycuda: the retained primary context)."""


# ---------------------------------------------------------------- pycuda


class _PyCuda(Cuda):
    library = "pycuda"

    def __init__(self, device: int) -> None:
        self._drv: Any = importlib.import_module("pycuda.driver")
        self._lock = threading.Lock()
        self._allocations: dict[int, Any] = {}  # pointer -> DeviceAllocation (freed on GC otherwise)
        with self._errors("initialise the CUDA driver"):
            self._drv.init()
            self._device = self._drv.Device(device)
            self._ctx: Any = self._device.retain_primary_context()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._drv.Error as exc:
            raise CudaError(f"CUDA (pycuda) could not {what}: {exc}") from exc

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        if self._ctx is None:
            raise CudaError("the CUDA context was released; fix: create a new runner")
        with self._errors("push the primary context"):
            self._ctx.push()
        try:
            yield
        finally:
            with self._errors("pop the primary context"):
                self._drv.Context.pop()

    def device_name(self) -> str:
        return str(self._device.name())

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self._device.compute_capability()
        return int(major), int(minor)

    def driver_version(self) -> str:
        return format_cuda_version(int(self._drv.get_driver_version()))

    def runtime_version(self) -> str:
        return ".".join(str(v) for v in self._drv.get_version()[:2])

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        with self.context(), self._errors(f"allocate pinned host memory {shape}"):
            return np.asarray(self._drv.pagelocked_empty(shape, dtype))

    def device_alloc(self, nbytes: int) -> int:
        with self.context(), self._errors(f"allocate {nbytes} bytes of device memory"):
            allocation = self._drv.mem_alloc(max(nbytes, 1))
        with self._lock:
            self._allocations[int(allocation)] = allocation
        return int(allocation)

    def device_free(self, ptr: int) -> None:
        with self._lock:
            allocation = self._allocations.pop(ptr, None)
        if allocation is not None:
            with self.context(), self._errors("free device memory"):
                allocation.free()

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        with self._errors("copy host to device"):
            self._drv.memcpy_htod_async(dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        with self._errors("copy device to host"):
            self._drv.memcpy_dtoh_async(dst, src, stream)

    def stream_create(self) -> Any:
        with self.context(), self._errors("create a stream"):
            return self._drv.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_synchronize(self, stream: Any) -> None:
        with self._errors("synchronise the stream"):
            stream.synchronize()

    def stream_destroy(self, stream: Any) -> None:
        """pycuda frees a Stream when it is garbage-collected; nothing to do here."""

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            with self._errors("release the primary context"):
                ctx.detach()


# ---------------------------------------------------------------- cuda-python


def _import_cudart() -> Any:
    """cuda-python >= 12.6 has ``cuda.bindings.runtime``; older releases ``cuda.cudart``."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


class _CudaPython(Cuda):
    library = "cuda-python"

    def __init__(self, device: int) -> None:
        self._rt: Any = _import_cudart()
        self._device = device
        self._pinned: dict[int, int] = {}  # id(array base) -> host pointer, freed in close()
        self._call("cudaSetDevice", device)
        self._props = self._call("cudaGetDeviceProperties", device)

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self._rt, name)(*args)
        err, values = result[0], result[1:]
        if err != self._rt.cudaError_t.cudaSuccess:
            text = self._rt.cudaGetErrorString(err)[1]
            raise CudaError(f"CUDA (cuda-python) {name} failed: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else (values or None)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        self._call("cudaSetDevice", self._device)
        yield

    def device_name(self) -> str:
        name = self._props.name
        return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")

    def compute_capability(self) -> tuple[int, int]:
        return int(self._props.major), int(self._props.minor)

    def driver_version(self) -> str:
        return format_cuda_version(int(self._call("cudaDriverGetVersion")))

    def runtime_version(self) -> str:
        return format_cuda_version(int(self._call("cudaRuntimeGetVersion")))

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        ptr = int(self._call("cudaMallocHost", nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        array: np.ndarray = np.ctypeslib.as_array(raw).view(np.uint8)[: int(np.prod(shape)) * dtype.itemsize]
        self._pinned[id(raw)] = ptr  # the array keeps ``raw`` alive; close() frees the pinned memory
        return array.view(dtype).reshape(shape)

    def device_alloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", max(nbytes, 1)))

    def device_free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes, kind, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes, kind, stream)

    def stream_create(self) -> Any:
        return self._call("cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", stream)

    def close(self) -> None:
        pinned, self._pinned = self._pinned, {}
        for ptr in pinned.values():
            self._call("cudaFreeHost", ptr)


# ---------------------------------------------------------------- selection


def _library() -> str | None:
    if importlib.util.find_spec("pycuda") is not None:
        return "pycuda"
    with contextlib.suppress(ImportError, ValueError):
        if importlib.util.find_spec("cuda") is not None and (
            importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart")
        ):
            return "cuda-python"
    return None


def open_cuda(device: int = 0) -> Cuda:
    """A shim for ``device`` over pycuda (preferred) or cuda-python; CudaError if neither works."""
    library = _library()
    if library is None:
        raise CudaError(
            "neither pycuda nor cuda-python is installed; fix: pip install pycuda "
            "(JetPack 5/6) or cuda-python matching the CUDA version"
        )
    try:
        return _PyCuda(device) if library == "pycuda" else _CudaPython(device)
    except ImportError as exc:
        raise CudaError(f"{library} cannot be imported ({exc}); fix: reinstall it against this CUDA") from exc


def available() -> tuple[bool, str]:
    """Whether a CUDA device can be used here, and why (not)."""
    try:
        cuda = open_cuda()
    except CudaError as exc:
        return False, str(exc)
    try:
        major, minor = cuda.compute_capability()
        return True, (
            f"{cuda.device_name()} (sm_{major}{minor}) via {cuda.library}, "
            f"driver {cuda.driver_version()}, runtime {cuda.runtime_version()}"
        )
    except CudaError as exc:
        return False, str(exc)
    finally:
        cuda.close()
