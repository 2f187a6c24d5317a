"""Central's branch of the project's one exception tree (the root is iaflash.engines.errors)::

IaflashError
└── CentralError           a central tool cannot do its job; the message says where and the fix
    ├── StoreError         the flag store (SQLite or PostgreSQL) cannot be opened or used
    ├── DataError          a training label file or photo folder cannot be used (also a ValueError)
    ├── WeightsError       pretrained weights missing, corrupted or not fitting the network
    └── ExportError        the exported ONNX model does not reproduce the PyTorch model
"""

from __future__ import annotations

from iaflash.engines.errors import IaflashError

__all__ = ["CentralError", "DataError", "ExportError", "StoreError", "WeightsError"]


class CentralError(IaflashError):
    """Base class of central's errors."""


class StoreError(CentralError):
    """The store cannot be opened or used: the message says which database and how to fix it."""


class DataError(CentralError, ValueError):
    """A label file or photo folder cannot be used; the message says where and how to fix it."""


class WeightsError(CentralError, RuntimeError):
    """A pretrained weights file is missing, corrupted or does not fit the network."""


class ExportError(CentralError, RuntimeError):
    """The exported model does not reproduce the PyTorch model."""
