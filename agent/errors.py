"""The one exception tree of the project.

Every error says what failed, where (file, config key, capture id) and how to fix it::

    IaflashError
    ├── ConfigError            config file unreadable or invalid; carries a list of ConfigIssue
    ├── CaptureRejected        a capture's image or sidecar is bad; it goes to rejected/ with this reason
    ├── PlateError             a plate string does not normalise to a French SIV or FNI plate
    ├── RegistryError          the SIV cache or a subset file is unusable
    │   ├── RegistryFileError  a subset file is malformed (line number given)
    │   ├── AlreadyApplied     a signed delta the cache applied already (exit 0: nothing to do)
    │   └── RegistryUnavailable  the cache file is corrupt, unreadable or missing (verdicts: inconclusive)
    ├── OutboxError            the SQLite outbox could not be written or read
    ├── LinkError              the MQTT link is misconfigured (paho errors are mapped here)
    ├── InstanceLocked         another agent already runs on this state directory (its pid is named)
    ├── ProvisioningError      a provisioning bundle is unusable, or an enrol/selftest/tail step failed
    ├── CommandError           a refused or failed command from central (``code`` is the answer's error code)
    ├── CalibrationError       calibration or fitting cannot run (bad inputs, unwritable output)
    ├── DatasetError           an evaluation dataset is unusable (file and row named)
    ├── AnonymiseError         an image could not be anonymised; it is not sent (docs/EVIDENCE.md)
    ├── ExportError            a dataset export cannot run (bad source, output folder not empty)
    ├── ModelStoreError        a model install, switch or rollback refused (unsigned, downgrade, no room...)
    └── EngineError            (iaflash.engines.errors, re-exported)
        ├── BackendUnavailable
        ├── BundleError
        │   ├── TaxonomyError  the bundle's labels cannot form a taxonomy (one spelling, two groups)
        │   └── SignatureError
        │       ├── UnreadableFile  a signed file, its .sig or a key cannot be read (counted unreadable_registry)
        │       ├── UntrustedKey
        │       │   ├── WrongRole
        │       │   ├── KeyExpired
        │       │   └── KeyRevoked
        │       └── RollbackRefused
        ├── ModelLoadError
        │   └── UnusablePlan
        ├── CudaError
        └── InferenceError

Central's tools add their own branch (CentralError: StoreError, DataError, WeightsError,
ExportError) in iaflash.central.errors. The root, IaflashError, is defined in
iaflash.engines.errors (the lowest layer) so the engines' errors belong to the same tree;
tests/test_errors.py checks that every exception class of the project is in it and drawn here.
"""

from __future__ import annotations

from dataclasses import dataclass

from iaflash.engines.errors import (
    BackendUnavailable,
    BundleError,
    CudaError,
    EngineError,
    IaflashError,
    InferenceError,
    KeyExpired,
    KeyRevoked,
    ModelLoadError,
    RollbackRefused,
    SignatureError,
    UnreadableFile,
    UntrustedKey,
    UnusablePlan,
    WrongRole,
)

__all__ = [
    "AlreadyApplied",
    "AnonymiseError",
    "BackendUnavailable",
    "BundleError",
    "CalibrationError",
    "CaptureRejected",
    "CommandError",
    "ConfigError",
    "ConfigIssue",
    "CudaError",
    "DatasetError",
    "EngineError",
    "ExportError",
    "IaflashError",
    "InferenceError",
    "InstanceLocked",
    "KeyExpired",
    "KeyRevoked",
    "LinkError",
    "ModelLoadError",
    "ModelStoreError",
    "OutboxError",
    "PlateError",
    "ProvisioningError",
    "RegistryError",
    "RegistryFileError",
    "RegistryUnavailable",
    "RollbackRefused",
    "SignatureError",
    "TaxonomyError",
    "UnreadableFile",
    "UntrustedKey",
    "UnusablePlan",
    "WrongRole",
]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file: where it is, what is wrong, how to fix it."""

    file: str
    key: str
    problem: str
    fix: str
    line: int | None = None  # 1-based line of the key in the file, when it is there

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.problem} (fix: {self.fix})"


class ConfigError(IaflashError):
    """The config file cannot be used. ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class CaptureRejected(IaflashError):
    """A capture cannot be processed. ``reason`` is a short stable code for counters."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class PlateError(IaflashError):
    """A plate string is not a French plate in SIV or FNI format."""


class RegistryError(IaflashError):
    """The registry cache or a subset file cannot be used."""


class RegistryFileError(RegistryError):
    """A registry subset file is malformed."""


class AlreadyApplied(RegistryError):
    """A signed delta the cache applied already: nothing to import (checked after its signature)."""


class RegistryUnavailable(RegistryError):
    """The registry cache cannot be read (corrupt, unreadable, missing): no lookup can be trusted."""


class OutboxError(IaflashError):
    """The durable outbox failed."""


class LinkError(IaflashError):
    """The MQTT link is misconfigured or its library failed."""


class InstanceLocked(IaflashError):
    """Another agent process holds the single-instance lock of this state directory."""


class ProvisioningError(IaflashError):
    """``iaflash-provision enrol/selftest/tail``: an unusable provisioning bundle or a failed step."""


class CommandError(IaflashError):
    """A refused or failed command; ``code`` is the response's ``error.code``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class CalibrationError(IaflashError):
    """Calibration cannot run: bad inputs, or the new bundle cannot be written where asked."""


class DatasetError(IaflashError):
    """The evaluation dataset is unusable; the message names the file and row."""


class AnonymiseError(IaflashError):
    """An image could not be anonymised (decode, detector, encode, metadata check): it never leaves the box."""


class ExportError(IaflashError):
    """``iaflash-central export-dataset`` cannot run: a bad source or an output folder that is not empty."""


class ModelStoreError(IaflashError):
    """``iaflash-provision model``: an install, switch or rollback that was refused; nothing was changed."""


class TaxonomyError(BundleError, ValueError):
    """The bundle's labels cannot form a taxonomy (one spelling names two label groups)."""
