"""``auto``: serve with ONNX Runtime while the TensorRT plan builds in the background, then swap.

:class:`SwappingBackend` is what :func:`iaflash.engines.base.create_backend` returns for ``auto`` when
TensorRT can run here. The build itself (key, cache, compile) is :mod:`iaflash.engines.build`'s;
this module only owns the background thread and the swap between two infer calls.
``tensorrt`` and ``onnxruntime`` are imported by the backends' ``load()``, never at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import numpy as np

from iaflash.engines.base import Backend, BackendInfo, TensorSpec
from iaflash.engines.build import BuildEnv
from iaflash.engines.bundle import Bundle
from iaflash.engines.errors import EngineError, InferenceError
from iaflash.engines.onnxrt import OnnxRuntimeBackend
from iaflash.engines.options import BuildOptions
from iaflash.engines.trt import TensorRTBackend

__all__ = ["SwappingBackend"]

# The swap is reported as part of engine building: its lines keep the logger name they had before
# this module was split out of iaflash.engines.build, so journald filters on "iaflash.engines.build" still see them.
logger = logging.getLogger("iaflash.engines.build")


def _lower_priority() -> None:
    """Linux niceness is per thread: make the builder thread (and TensorRT's helpers) nice 19."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class SwappingBackend(Backend):
    """``auto``: serve with ONNX Runtime (CPU) at once, build the TensorRT plan in the background,
    then swap to TensorRT between two infer calls. A cached plan is used straight away.

    ``build_state`` is one of idle, building, swapped, failed; ``build_error`` says why it failed.
    ``swapped``/``finished`` are events the agent (and tests) may wait on.
    """

    kind = "auto"

    def __init__(
        self,
        *,
        threads: int = 0,
        options: BuildOptions | None = None,
        env: BuildEnv | None = None,
        join_timeout_s: float = 10.0,
    ) -> None:
        self._threads = threads
        self._options = options or BuildOptions()
        self._env = env
        self._join_timeout_s = join_timeout_s
        self._lock = threading.RLock()
        self._active: Backend | None = None
        self._builder: threading.Thread | None = None
        self._stop = threading.Event()
        self.swapped = threading.Event()
        self.finished = threading.Event()
        self.build_state = "idle"
        self.build_error: str | None = None

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return OnnxRuntimeBackend.is_available()

    def load(self, bundle: Bundle) -> None:
        self.close()
        self._stop, self.swapped, self.finished = threading.Event(), threading.Event(), threading.Event()
        self.build_error = None
        cached = TensorRTBackend(options=self._options, env=self._env, build=False)
        try:
            cached.load(bundle)
        except EngineError as exc:
            logger.info("no usable TensorRT plan yet (%s); serving with ONNX Runtime while it builds", exc)
        else:
            self._set(cached, "swapped")
            return
        cpu = OnnxRuntimeBackend(threads=self._threads, providers=["CPUExecutionProvider"])
        cpu.load(bundle)
        self._set(cpu, "building")
        self._builder = threading.Thread(
            target=self._build_and_swap, args=(bundle,), name="iaflash-engine-build", daemon=True
        )
        self._builder.start()

    def _set(self, backend: Backend, state: str) -> None:
        with self._lock:
            self._active, self.build_state = backend, state
        if state == "swapped":
            self.swapped.set()
            self.finished.set()

    def _build_and_swap(self, bundle: Bundle) -> None:
        _lower_priority()
        backend = TensorRTBackend(
            options=self._options, env=self._env, progress=_ProgressLog(bundle), cancel=self._stop
        )
        try:
            backend.load(bundle)
            backend.warmup()
        except Exception as exc:  # noqa: BLE001  # a failed background build must never stop serving
            self._failed(bundle, backend, exc)
            return
        with self._lock:
            old = None if self._stop.is_set() else self._active
            if old is not None:
                self._active, self.build_state = backend, "swapped"
        if old is None:
            backend.close()  # closed while building: drop the new engine
        else:
            old.close()
            logger.info(
                "swapped %s %s from onnxruntime to tensorrt (%s on %s, engine %.16s…)",
                bundle.manifest.name,
                bundle.manifest.version,
                backend.info.precision,
                backend.info.device,
                backend.info.engine_key,
            )
            self.swapped.set()
        self.finished.set()

    def _failed(self, bundle: Bundle, backend: Backend, exc: Exception) -> None:
        backend.close()
        with self._lock:
            self.build_state, self.build_error = "failed", str(exc)
        logger.warning(
            "TensorRT engine for %s %s failed (%s); staying on ONNX Runtime",
            bundle.manifest.name,
            bundle.manifest.version,
            exc,
        )
        self.finished.set()

    def _current(self) -> Backend:
        with self._lock:
            if self._active is None:
                raise InferenceError("auto backend is not loaded; fix: call load(bundle) first")
            return self._active

    @property
    def input_spec(self) -> TensorSpec:
        return self._current().input_spec

    @property
    def output_spec(self) -> TensorSpec:
        return self._current().output_spec

    @property
    def info(self) -> BackendInfo:
        return self._current().info

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:  # the swap waits for the call in flight
            return self._current()._run(batch)

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every named output, when the active backend can give them (multi-output NMS detectors)."""
        self._check(batch)
        with self._lock:
            active = self._current()
            method = getattr(active, "infer_outputs", None)
            if method is None:
                raise InferenceError(
                    f"the active {active.kind} backend returns only the manifest's output; fix: export the "
                    "detector with one packed output (see docs/DETECTOR.md)"
                )
            result: dict[str, np.ndarray] = method(batch)
            return result

    def close(self) -> None:
        self._stop.set()
        builder, self._builder = self._builder, None
        if builder is not None and builder is not threading.current_thread():
            builder.join(self._join_timeout_s)
            if builder.is_alive():
                logger.warning(
                    "engine build still running after %.0f s; its result will be dropped", self._join_timeout_s
                )
        with self._lock:
            active, self._active = self._active, None
            self.build_state = "idle"
        if active is not None:
            active.close()


class _ProgressLog:
    """Logs a background build's progress: every stage, and every 10 % of the build stage."""

    def __init__(self, bundle: Bundle) -> None:
        self._what = f"{bundle.manifest.name} {bundle.manifest.version}"
        self._last = ("", -1)

    def __call__(self, stage: str, fraction: float) -> None:
        tenth = int(fraction * 10)
        if (stage, tenth) != self._last:
            self._last = (stage, tenth)
            logger.info("engine build %s: %s %d%%", self._what, stage, int(fraction * 100))
