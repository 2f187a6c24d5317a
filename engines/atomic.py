"""Atomic file writes: readers see the old file or the whole new one, never a torn one.

The bytes go to a temporary file in the target's directory (``.<name>.<random>.tmp``, so the
rename never crosses a filesystem and :mod:`iaflash.agent.capture.spool`-style scanners skip it), which is
flushed and fsync'd, then ``os.replace``'d onto the target; the directory is fsync'd last so the
rename itself survives a power cut. On any error the temporary file is removed, the target is
left as it was, and the exception propagates.

- :func:`write_atomic` writes bytes already in memory (plans, manifests, keys, signatures);
- :func:`open_atomic` yields the open temporary file, for streamed writes (a gzip'd subset file).

The temporary file is created 0600 (``mkstemp``); ``mode`` sets its permissions before any byte
is written, so a private key is never readable by others, even for an instant. Without ``mode``
the target keeps the 0600 of ``mkstemp``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["open_atomic", "write_atomic"]


@contextlib.contextmanager
def open_atomic(path: Path, *, mode: int | None = None) -> Iterator[IO[bytes]]:
    """A binary file that becomes ``path`` atomically when the ``with`` block ends without error.

    Example::

        with open_atomic(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(payload)

    Whatever wraps the yielded file must be closed inside the block (as above), so that its last
    bytes are written before the file is fsync'd and renamed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring), with permissions ``mode``."""
    with open_atomic(path, mode=mode) as fh:
        fh.write(data)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; best effort (some filesystems refuse to open directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
