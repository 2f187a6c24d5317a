"""The inference backend interface and :func:`create_backend`.

A backend loads one bundle's model and runs NCHW batches through it. Native libraries
(onnxruntime, tensorrt) are imported inside ``is_available()``/``load()``, never when this
module is imported, so ``import engines`` works on a machine without them.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from iaflash.engines.bundle import Bundle
from iaflash.engines.errors import InferenceError

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "BackendInfo",
    "TensorSpec",
]

logger = logging.getLogger(__name__)

BACKEND_KINDS: tuple[str, ...] = ("onnxruntime", "tensorrt")
"""Every concrete backend kind, in the order ``auto`` tries them last-to-first (tensorrt first)."""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its name, shape (ints, or a name/None for a dynamic axis) and dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str

    @property
    def batch_dynamic(self) -> bool:
        return not isinstance(self.shape[0], int)


@dataclass(frozen=True)
class BackendInfo:
    """What a loaded backend runs on; ``engine_key`` changes whenever the compiled engine would."""

    kind: str
    precision: str
    device: str
    versions: dict[str, str]
    engine_key: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "precision": self.precision,
            "device": self.device,
            "versions": dict(self.versions),
            "engine_key": self.engine_key,
        }


class Backend(abc.ABC):
    """One model loaded into one inference runtime.

    Subclasses implement ``load``, ``_run`` and ``close`` and the three properties; ``infer``
    validates every batch against ``input_spec`` before ``_run`` sees it.
    """

    kind: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> tuple[bool, str]:
        """Whether this backend can run here, and a human-readable reason either way."""

    @abc.abstractmethod
    def load(self, bundle: Bundle) -> None:
        """Load the bundle's model; raises ModelLoadError if the runtime refuses it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime's resources; the backend may be loaded again afterwards."""

    @property
    @abc.abstractmethod
    def input_spec(self) -> TensorSpec:
        """The model input; non-batch dims are concrete ints once loaded."""

    @property
    @abc.abstractmethod
    def output_spec(self) -> TensorSpec:
        """The model output."""

    @property
    @abc.abstractmethod
    def info(self) -> BackendInfo:
        """Kind, precision, device, library versions and engine key of the loaded model."""

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch already checked against ``input_spec``."""

    def warmup(self) -> None:
        """Run one all-zero batch of one, so the first real capture does not pay for lazy init."""
        spec = self.input_spec
        dims = spec.shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise InferenceError(
                f"cannot warm up: input '{spec.name}' has dynamic dims {spec.shape}; "
                "fix: give concrete sizes in the manifest's input_shape"
            )
        shape = (1, *(int(d) for d in dims if d is not None))
        self.infer(np.zeros(shape, dtype=np.dtype(spec.dtype)))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (N first) and return the output, N first; bad input raises InferenceError."""
        self._check(batch)
        return self._run(batch)

    def _check(self, batch: np.ndarray) -> None:
        spec = self.input_spec
        if not isinstance(batch, np.ndarray):
            raise InferenceError(f"input '{spec.name}': expected a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.dtype(spec.dtype):
            raise InferenceError(
                f"input '{spec.name}': expected dtype {spec.dtype}, got {batch.dtype}; "
                f"fix: convert with batch.astype(np.{spec.dtype})"
            )
        if batch.ndim != len(spec.shape):
            raise InferenceError(
                f"input '{spec.name}': expected {len(spec.shape)} dims {_dims(spec)}, "
                f"got {batch.ndim} dims {list(batch.shape)}"
            )
        dims = zip(batch.shape[1:], spec.shape[1:], strict=True)
        bad = any(isinstance(want, int) and have != want for have, want in dims)
        if bad or batch.shape[0] < 1:
            raise InferenceError(f"input '{spec.name}': expected shape {_dims(spec)}, got {list(batch.shape)}")

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _dims(spec: TensorSpec) -> str:
    """``spec.shape`` as ``[1, 3, 224, 224]`` (dynamic axes by name), for error messages only."""
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"
