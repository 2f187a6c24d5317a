"""The backend factory: names a backend kind and creates it. It sits above the interface
(:mod:`iaflash.engines.base`) and every implementation, so the interface knows none of them.

Native libraries stay lazy: the implementations import them in ``is_available()``/``load()``.
"""

from __future__ import annotations

import logging

from iaflash.engines.base import BACKEND_KINDS, Backend
from iaflash.engines.errors import BackendUnavailable
from iaflash.engines.onnxrt import OnnxRuntimeBackend
from iaflash.engines.options import BuildOptions
from iaflash.engines.swap import SwappingBackend
from iaflash.engines.trt import TensorRTBackend

__all__ = ["BACKEND_KINDS", "backend_availability", "create_backend"]

logger = logging.getLogger(__name__)


def backend_availability(kind: str) -> tuple[bool, str]:
    """``(available, reason)`` for one of :data:`BACKEND_KINDS`."""
    if kind == "onnxruntime":
        return OnnxRuntimeBackend.is_available()
    if kind == "tensorrt":
        return TensorRTBackend.is_available()
    raise BackendUnavailable(f"unknown backend {kind!r}: choose one of auto, {', '.join(BACKEND_KINDS)}")


def create_backend(kind: str = "auto", *, threads: int = 0, build: BuildOptions | None = None) -> Backend:
    """A new, unloaded backend of ``kind``: "onnxruntime", "tensorrt" or "auto".

    "auto" is a SwappingBackend when TensorRT can run here (ONNX Runtime on the CPU while the
    TensorRT plan builds, then TensorRT), else plain ONNX Runtime. ``threads`` is the intra-op
    thread count (0 = one per core); ``build`` the TensorRT precision, workspace, max batch
    and plan cache. Raises BackendUnavailable, with the reason, when the named backend cannot run here.
    """
    if kind == "auto":
        ok, reason = backend_availability("tensorrt")
        if ok:
            return SwappingBackend(threads=threads, options=build)
        logger.info("TensorRT backend not available (%s); falling back to ONNX Runtime", reason)
        return create_backend("onnxruntime", threads=threads)
    ok, reason = backend_availability(kind)
    if not ok:
        label = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}[kind]
        raise BackendUnavailable(f"{label} backend not available: {reason}")
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(threads=threads)
    return TensorRTBackend(options=build)
