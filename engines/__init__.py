"""Inference only: model bundles and the backends that run them. Knows nothing of radars or MQTT.

Importing this package loads no native library; backends import theirs in ``load()``.
"""

from __future__ import annotations

from engines.base import BACKEND_KINDS, Backend, BackendInfo, TensorSpec, backend_availability, create_backend
from engines.bundle import Bundle, Label, Manifest, Preprocessing, load_bundle, write_bundle
from engines.errors import BackendUnavailable, BundleError, EngineError, InferenceError, ModelLoadError

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "BackendInfo",
    "BackendUnavailable",
    "Bundle",
    "BundleError",
    "EngineError",
    "InferenceError",
    "Label",
    "Manifest",
    "ModelLoadError",
    "Preprocessing",
    "TensorSpec",
    "backend_availability",
    "create_backend",
    "load_bundle",
    "write_bundle",
]
