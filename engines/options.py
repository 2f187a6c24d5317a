"""How TensorRT engines are built (precision, workspace, batch, cache): a leaf module.

Shared by the backend factory, the TensorRT backend and the build step, so none of them has
to import another to name these types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from iaflash.engines.bundle import Bundle

__all__ = ["DEFAULT_CACHE_DIR", "PRECISIONS", "BuildOptions", "Progress"]

DEFAULT_CACHE_DIR = Path("/var/lib/iaflash/engines")
"""Same default as the agent's ``[model] engine_cache_dir``."""
PRECISIONS = ("fp16", "fp32", "int8")

Progress = Callable[[str, float], None]
"""``progress(stage, fraction)``: stage is parse, configure, build, write or done; fraction 0..1."""


@dataclass(frozen=True)
class BuildOptions:
    """How engines are built and where plans are cached (the agent's ``[model]`` keys).

    ``cache_dir`` None keeps plans beside the bundle, in ``<bundle dir>.engines``; the agent
    passes its ``engine_cache_dir`` (default :data:`DEFAULT_CACHE_DIR`).
    """

    precision: str = "fp16"
    workspace_mb: int = 1024
    max_batch: int = 4
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.max_batch < 1 or self.workspace_mb < 1:
            raise ValueError(f"max_batch and workspace_mb must be >= 1, got {self.max_batch}, {self.workspace_mb}")

    def cache_for(self, bundle: Bundle) -> Path:
        """The plan cache directory for ``bundle``."""
        return self.cache_dir or bundle.path.with_name(bundle.path.name + ".engines")
