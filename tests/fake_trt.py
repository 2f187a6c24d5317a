"""Thin fakes of the native boundary: the ``tensorrt`` module and ``pycuda.driver``.

Only what engines/trt.py, engines/build.py and engines/cuda.py call exists here, so a call to
anything else (the removed binding API: ``get_binding_index``, ``execute_v2``, ``num_bindings``…)
raises AttributeError. The fake "GPU" is a dict of bytearrays; a fake plan embeds the ONNX
model, and the fake engine runs it with onnxruntime on what was copied to "device memory",
so the numbers the tests check are real. The fake driver keeps a per-thread context stack
like the real one: a copy or an execute with no context current raises LogicError.

Install with :func:`install` (a pytest ``monkeypatch``), which also returns the state the
tests inspect (push/pop counts, builds, knobs to make the build or deserialisation fail).
"""

from __future__ import annotations

import enum
import importlib.machinery
import json
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MAGIC = b"FAKEPLAN1\n"


@dataclass
class State:
    """What the tests inspect and the knobs they turn."""

    pushes: int = 0
    pops: int = 0
    builds: int = 0
    build_error: Exception | None = None  # raised by build_serialized_network
    build_returns_none: bool = False
    deserialize_none: int = 0  # how many next deserialisations return None
    build_gate: threading.Event | None = None  # the build waits on it (tests of the background swap)
    flags: set[str] = field(default_factory=set)
    calibration_batches: int = 0
    memory: dict[int, bytearray] = field(default_factory=dict)
    next_ptr: int = 0x1000
    local: threading.local = field(default_factory=threading.local)


STATE = State()


def _stack() -> list[Any]:
    if not hasattr(STATE.local, "stack"):
        STATE.local.stack = []
    return STATE.local.stack  # type: ignore[no-any-return]


def _require_context(what: str) -> None:
    if not _stack():
        raise LogicError(f"{what} failed: invalid device context (no context current in this thread)")


# ---------------------------------------------------------------- pycuda.driver


class Error(Exception):
    pass


class LogicError(Error):
    pass


class _Context:
    def push(self) -> None:
        STATE.pushes += 1
        _stack().append(self)

    @staticmethod
    def pop() -> None:
        STATE.pops += 1
        _stack().pop()

    def detach(self) -> None:
        pass


class Device:
    def __init__(self, ordinal: int) -> None:
        if ordinal != 0:
            raise LogicError(f"cuDeviceGet failed: invalid device ordinal {ordinal}")

    def name(self) -> str:
        return "Orin (fake)"

    def compute_capability(self) -> tuple[int, int]:
        return (8, 7)

    def retain_primary_context(self) -> _Context:
        return _Context()


class DeviceAllocation:
    def __init__(self, nbytes: int) -> None:
        self.ptr = STATE.next_ptr
        STATE.next_ptr += nbytes + 256
        STATE.memory[self.ptr] = bytearray(nbytes)

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        _require_context("cuMemFree")
        STATE.memory.pop(self.ptr)


class Stream:
    def __init__(self) -> None:
        _require_context("cuStreamCreate")
        self.handle = 0xBEEF

    def synchronize(self) -> None:
        _require_context("cuStreamSynchronize")


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _require_context("cuMemAlloc")
    return DeviceAllocation(nbytes)


def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Any = None) -> None:
    _require_context("cuMemcpyHtoDAsync")
    data = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
    STATE.memory[int(dest)][: data.size] = data.tobytes()


def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Any = None) -> None:
    _require_context("cuMemcpyDtoHAsync")
    raw = STATE.memory[int(src)][: dest.nbytes]
    dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(raw), dtype=np.uint8)


def _pycuda_driver() -> types.ModuleType:
    drv = types.ModuleType("pycuda.driver")
    drv.__dict__.update(
        Error=Error,
        LogicError=LogicError,
        Context=_Context,
        Device=Device,
        Stream=Stream,
        init=lambda: None,
        get_driver_version=lambda: 12020,
        get_version=lambda: (12, 2, 0),
        pagelocked_empty=np.empty,
        mem_alloc=mem_alloc,
        memcpy_htod_async=memcpy_htod_async,
        memcpy_dtoh_async=memcpy_dtoh_async,
    )
    return drv


# ---------------------------------------------------------------- tensorrt


class ILogger:
    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class IProgressMonitor:
    def __init__(self) -> None:
        pass


class IInt8EntropyCalibrator2:
    def __init__(self) -> None:
        pass


@dataclass
class _Input:
    name: str
    shape: tuple[int, ...]


class _Network:
    def __init__(self) -> None:
        self.model: onnx.ModelProto | None = None
        self.path = ""

    def _inputs(self) -> list[_Input]:
        assert self.model is not None
        return [
            _Input(i.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim))
            for i in self.model.graph.input
        ]

    @property
    def num_inputs(self) -> int:
        return len(self._inputs())

    def get_input(self, index: int) -> _Input:
        return self._inputs()[index]


class _ParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def node(self) -> int:
        return -1

    def desc(self) -> str:
        return self.text


class OnnxParser:
    def __init__(self, network: _Network, logger: ILogger) -> None:
        self.network, self.errors = network, list[_ParserError]()

    def parse_from_file(self, path: str) -> bool:
        try:
            self.network.model = onnx.load(path)
        except Exception as exc:
            self.errors = [
                _ParserError(f"ModelImporter: failed to parse ONNX: {type(exc).__name__}"),
                _ParserError("In node -1 (parseGraph): INVALID_GRAPH"),
            ]
            return False
        self.network.path = path
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> _ParserError:
        return self.errors[index]


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        self.shapes[name] = [list(low), list(opt), list(high)]


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data or b"fake-timing-cache"

    def serialize(self) -> bytes:
        return self.data


class BuilderConfig:
    def __init__(self) -> None:
        self.profiles: list[_Profile] = []
        self.progress_monitor: Any = None
        self.int8_calibrator: Any = None
        self.timing_cache: _TimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        assert size > 0

    def set_flag(self, flag: BuilderFlag) -> None:
        STATE.flags.add(flag.name)

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return 0

    def set_calibration_profile(self, profile: _Profile) -> bool:
        return True

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(data)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        assert self.timing_cache is not None
        return self.timing_cache


class Builder:
    platform_has_fast_fp16 = True

    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> _Network:
        return _Network()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: BuilderConfig) -> bytes | None:
        _require_context("build")
        STATE.builds += 1
        if STATE.build_gate is not None:
            assert STATE.build_gate.wait(10), "the test never opened the build gate"
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, 2)
            for step in range(2):
                if not monitor.step_complete("Building engine", step):
                    return None
            monitor.phase_finish("Building engine")
        if config.int8_calibrator is not None:
            _calibrate(config.int8_calibrator)
        if STATE.build_error is not None:
            raise STATE.build_error
        if STATE.build_returns_none or network.model is None:
            return None
        meta = {"profile": config.profiles[0].shapes}
        return MAGIC + json.dumps(meta).encode() + b"\n" + bytes(network.model.SerializeToString())


def _calibrate(calibrator: Any) -> None:
    size = calibrator.get_batch_size()
    assert calibrator.read_calibration_cache() is None
    while (ptrs := calibrator.get_batch(["input"])) is not None:
        assert len(STATE.memory[ptrs[0]]) >= size * 4
        STATE.calibration_batches += 1
    calibrator.write_calibration_cache(b"fake-calibration")


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
        _require_context("deserialize")
        if STATE.deserialize_none > 0:
            STATE.deserialize_none -= 1
            return None
        if not data.startswith(MAGIC):
            return None
        header, model = data[len(MAGIC) :].split(b"\n", 1)
        return _Engine(json.loads(header)["profile"], model)


_DTYPES = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32}


class _Engine:
    """Name-based API only; there is no binding API on purpose."""

    def __init__(self, profile: dict[str, list[list[int]]], model: bytes) -> None:
        self.profile = profile
        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        graph = onnx.load_from_string(model).graph
        self.tensors = [(v, TensorIOMode.INPUT) for v in graph.input] + [(v, TensorIOMode.OUTPUT) for v in graph.output]

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return str(self.tensors[index][0].name)

    def _value(self, name: str) -> Any:
        return next(v for v, _mode in self.tensors if v.name == name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return next(mode for v, mode in self.tensors if v.name == name)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        dims = self._value(name).type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)

    def get_tensor_dtype(self, name: str) -> DataType:
        return _DTYPES[self._value(name).type.tensor_type.elem_type]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        assert profile_index == 0
        return [tuple(s) for s in self.profile[name]]

    def create_execution_context(self) -> _ExecutionContext:
        return _ExecutionContext(self)


class _ExecutionContext:
    """set_input_shape / get_tensor_shape / set_tensor_address / execute_async_v3, nothing else."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        low, _opt, high = self.engine.profile[name]
        shape = tuple(shape)
        if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes[name]
        batch = next(iter(self.shapes.values()))[0]
        return tuple(batch if d < 0 else d for d in self.engine.get_tensor_shape(name))

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        _require_context("enqueueV3")
        feeds = {}
        for name, shape in self.shapes.items():
            count = int(np.prod(shape)) * 4
            feeds[name] = np.frombuffer(bytes(STATE.memory[self.addresses[name]][:count]), np.float32).reshape(shape)
        outputs = [v.name for v, mode in self.engine.tensors if mode == TensorIOMode.OUTPUT]
        for name, value in zip(outputs, self.engine.session.run(outputs, feeds), strict=True):
            data = np.ascontiguousarray(value).view(np.uint8).reshape(-1).tobytes()
            STATE.memory[self.addresses[name]][: len(data)] = data
        return True


def _tensorrt(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__dict__.update(
        __version__=version,
        ILogger=ILogger,
        Logger=ILogger,
        TensorIOMode=TensorIOMode,
        DataType=DataType,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        BuilderFlag=BuilderFlag,
        MemoryPoolType=MemoryPoolType,
        IInt8EntropyCalibrator2=IInt8EntropyCalibrator2,
        Builder=Builder,
        OnnxParser=OnnxParser,
        Runtime=Runtime,
    )
    if int(version.split(".", maxsplit=1)[0]) >= 10:
        trt.IProgressMonitor = IProgressMonitor  # type: ignore[attr-defined]  # TensorRT 10 only
    return trt


def install(monkeypatch: pytest.MonkeyPatch, *, version: str = "10.3.0") -> State:
    """Put the fake ``tensorrt`` and ``pycuda`` into sys.modules for one test; returns fresh state."""
    STATE.__init__()  # type: ignore[misc]  # reset in place: tests hold a reference to STATE
    trt = _tensorrt(version)
    pycuda = types.ModuleType("pycuda")
    driver = _pycuda_driver()
    pycuda.driver = driver  # type: ignore[attr-defined]  # module attribute, as in the real package
    for name, module in (("tensorrt", trt), ("pycuda", pycuda), ("pycuda.driver", driver)):
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    return STATE


# ---------------------------------------------------------------- cuda-python (cuda.bindings.runtime)


def _cudart() -> types.ModuleType:
    """The few cudart calls the shim makes; each returns (error, *values) like cuda-python."""
    cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorMemoryAllocation": 2})
    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
    ok, kinds = cudaError_t, cudaMemcpyKind
    pinned: dict[int, Any] = {}

    def malloc_host(nbytes: int) -> tuple[Any, int]:
        buf = np.zeros(nbytes, np.uint8)
        pinned[buf.ctypes.data] = buf
        return ok.cudaSuccess, buf.ctypes.data

    def malloc(nbytes: int) -> tuple[Any, int]:
        if nbytes > 1 << 30:
            return ok.cudaErrorMemoryAllocation, 0
        return ok.cudaSuccess, DeviceAllocation(nbytes).ptr

    def memcpy(dst: int, src: int, count: int, kind: Any, stream: int) -> tuple[Any]:
        import ctypes  # only this fake needs raw pointers

        if kind == kinds.cudaMemcpyHostToDevice:
            STATE.memory[dst][:count] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(STATE.memory[src][:count]), count)
        return (ok.cudaSuccess,)

    props = types.SimpleNamespace(name=b"Orin (fake)\x00", major=8, minor=7)
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.__dict__.update(
        cudaError_t=ok,
        cudaMemcpyKind=kinds,
        cudaGetErrorString=lambda err: (ok.cudaSuccess, b"out of memory"),
        cudaSetDevice=lambda device: (ok.cudaSuccess,),
        cudaGetDeviceProperties=lambda device: (ok.cudaSuccess, props),
        cudaDriverGetVersion=lambda: (ok.cudaSuccess, 12060),
        cudaRuntimeGetVersion=lambda: (ok.cudaSuccess, 12020),
        cudaMallocHost=malloc_host,
        cudaFreeHost=lambda ptr: (ok.cudaSuccess, pinned.pop(ptr))[:1],
        cudaMalloc=malloc,
        cudaFree=lambda ptr: (ok.cudaSuccess, STATE.memory.pop(ptr))[:1],
        cudaMemcpyAsync=memcpy,
        cudaStreamCreate=lambda: (ok.cudaSuccess, 7),
        cudaStreamSynchronize=lambda stream: (ok.cudaSuccess,),
        cudaStreamDestroy=lambda stream: (ok.cudaSuccess,),
    )
    return rt


def install_cuda_python(monkeypatch: pytest.MonkeyPatch) -> State:
    """Only cuda-python (no pycuda): ``cuda``, ``cuda.bindings`` and ``cuda.bindings.runtime``."""
    STATE.__init__()  # type: ignore[misc]  # reset in place: tests hold a reference to STATE
    runtime = _cudart()
    monkeypatch.setitem(sys.modules, "pycuda", None)
    for name, module in (
        ("cuda", types.ModuleType("cuda")),
        ("cuda.bindings", types.ModuleType("cuda.bindings")),
        ("cuda.bindings.runtime", runtime),
    ):
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    return STATE
