"""File digests for prehashed (format 2) signatures: sha256 + size, computed in bounded memory.

Ed25519 cannot verify a message piece by piece (it hashes the whole message twice, with the
signature's R in between), so a signature over a file of any size signs its digest instead:
:func:`signed_message` is the exact byte string that a format-2 signature covers.

:class:`HashingReader` hands a file's bytes to a consumer (e.g. ``gzip.GzipFile``) while hashing
them, so a second pass over a file can prove it still has the digest that was checked on the first.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import IO, BinaryIO

__all__ = ["CHUNK", "FileDigest", "HashingReader", "digest_bytes", "digest_stream", "signed_message"]

CHUNK = 1 << 20  # bytes per read: memory stays at one chunk whatever the file size

_DOMAIN = b"iaflash-signature/2\n"  # a format-2 message can never be mistaken for a file's bytes


@dataclass(frozen=True)
class FileDigest:
    """sha256 (64 hex) and size in bytes of some content."""

    sha256: str
    size: int


def signed_message(digest: FileDigest) -> bytes:
    """What a format-2 signature covers: a domain tag, the sha256 and the size of the file."""
    return _DOMAIN + f"sha256 {digest.sha256}\nsize {digest.size}\n".encode("ascii")


def digest_bytes(data: bytes) -> FileDigest:
    return FileDigest(hashlib.sha256(data).hexdigest(), len(data))


def digest_stream(fh: BinaryIO) -> FileDigest:
    """Digest of everything left in ``fh``, read in :data:`CHUNK` pieces."""
    h, size = hashlib.sha256(), 0
    while chunk := fh.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return FileDigest(h.hexdigest(), size)


class HashingReader(io.RawIOBase):
    """A read-only view of ``raw`` that hashes every byte it hands out; closing it closes ``raw``."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self._hash = hashlib.sha256()
        self._size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]  # RawIOBase takes any buffer
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._hash.update(data)
        self._size += n
        return n

    def close(self) -> None:
        """Close this view and the file under it."""
        super().close()
        self._raw.close()

    def drain(self) -> FileDigest:
        """Read (and hash) what the consumer left unread; the digest of the whole content."""
        while chunk := self._raw.read(CHUNK):
            self._hash.update(chunk)
            self._size += len(chunk)
        return FileDigest(self._hash.hexdigest(), self._size)
