"""Errors raised by the inference layer.

``engines`` knows nothing of the agent, so the ROOT of the project's one exception tree,
:class:`IaflashError`, lives here (the lowest layer); ``iaflash.agent.errors`` re-exports it
with everything below and draws the whole tree::

    IaflashError
    └── EngineError
    ├── BackendUnavailable   the backend's library or device is missing (is_available() said why)
    ├── BundleError          a model bundle is missing a file, fails its sha256, or has a bad manifest
    │   └── SignatureError   a bundle or signed file is unsigned, altered after signing, or its .sig is malformed
    │       ├── UnreadableFile   a signed file, its .sig or a key cannot be read (permissions, I/O): nothing checked
    │       ├── UntrustedKey the signature is by a key that is not in the trust store
    │       │   ├── WrongRole    the key is trusted, but for another role (docs/SIGNING.md#roles)
    │       │   ├── KeyExpired   the key's not_after has passed
    │       │   └── KeyRevoked   the key is on the revocation list this box applied
    │       └── RollbackRefused  validly signed, but older than what this box already applied
    ├── ModelLoadError       the runtime refused the model file (corrupt ONNX, bad plan)
    │   └── UnusablePlan     TensorRT refused a cached plan: it is discarded and rebuilt
    ├── CudaError            a CUDA call failed (no device, out of memory, driver too old)
    └── InferenceError       a batch had the wrong shape/dtype, or the runtime failed while running
"""

from __future__ import annotations

import errno
from pathlib import Path


class IaflashError(Exception):
    """The root of every error the project raises (agent, engines, provisioning, central)."""


class EngineError(IaflashError):
    """Base class for every error raised by ``engines``."""


class BackendUnavailable(EngineError):
    """The requested backend cannot run on this machine."""


class BundleError(EngineError):
    """A model bundle is invalid: missing file, sha256 mismatch, bad manifest or labels."""


class SignatureError(BundleError):
    """A signature is missing, malformed, or does not match the signed bytes (see iaflash.engines.signing)."""


class UnreadableFile(SignatureError):
    """A signed file, its signature or a key file cannot be read (permission, I/O error): nothing was checked.

    Not a verdict on the signature: ``path`` is the file that could not be read, ``error`` the
    OSError; the message names both and the fix for that cause (a permission is not fixed by a copy).
    """

    def __init__(self, what: str, path: Path | str, error: OSError) -> None:
        self.path, self.error = Path(path), error
        super().__init__(
            f"{what} {path} cannot be read ({error.strerror or error}); fix: {unreadable_fix(path, error)}"
        )


def unreadable_fix(path: Path | str, error: OSError) -> str:
    """How to fix ``error`` on reading ``path``: by its cause (permission, a folder, else the storage)."""
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"let the user running this read it and enter every folder above it (`namei -l {path}` shows the "
            "owners and modes), or run the command with sudo; the file itself is not damaged"
        )
    if error.errno == errno.EISDIR:
        return "it is a folder: give the path of the file"
    return f"check the storage holding it (`dmesg`, `ls -l {path}`), then copy the file again"


class UntrustedKey(SignatureError):
    """A valid-looking signature by a key whose id is not in the trust store."""


class WrongRole(UntrustedKey):
    """The signing key is in the trust store, but not for the role this content needs."""


class KeyExpired(UntrustedKey):
    """The signing key's ``not_after`` is in the past (box time)."""


class KeyRevoked(UntrustedKey):
    """The signing key is listed by the revocation list this box applied."""


class RollbackRefused(SignatureError):
    """Signed content older than what this box already applied (bundle version, registry seq, revocation list)."""


class ModelLoadError(EngineError):
    """The runtime could not load the model file."""


class InferenceError(EngineError):
    """A call to ``infer`` failed: wrong input shape/dtype or a runtime failure."""


class UnusablePlan(ModelLoadError):
    """TensorRT refused a cached plan (deserialisation returned None): it is discarded and rebuilt."""


class CudaError(EngineError):
    """A CUDA call failed (no device, out of memory, bad pointer, driver too old)."""
