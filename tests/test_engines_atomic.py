"""iaflash.engines.atomic: the target is the old file or the whole new one, with the asked mode, no temp left."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import pytest

from iaflash.engines.atomic import open_atomic, write_atomic


def test_write_atomic_replaces_the_file_with_the_given_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.pub"
    target.write_bytes(b"old")
    write_atomic(target, b"new", mode=0o644)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.pub"]


def test_write_atomic_without_mode_gives_a_private_file(tmp_path: Path) -> None:
    target = tmp_path / "x.plan"
    write_atomic(target, b"plan")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_failed_replace_keeps_the_old_file_and_removes_the_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.key"
    target.write_bytes(b"old")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, b"new", mode=0o600)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.key"]


def test_open_atomic_streams_a_wrapped_writer_into_place(tmp_path: Path) -> None:
    target = tmp_path / "s.jsonl.gz"
    with open_atomic(target) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(b"header\n")
        gz.write(b"body\n")
    assert gzip.decompress(target.read_bytes()) == b"header\nbody\n"


def test_an_error_inside_open_atomic_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "s.jsonl.gz"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="bad record"), open_atomic(target) as fh:
        fh.write(b"half")
        raise ValueError("bad record")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["s.jsonl.gz"]


def test_one_atomic_writer_no_reexport_shim() -> None:
    """The layout rule: one owner per thing, so engines.build no longer re-exports write_atomic."""
    from iaflash.engines import build

    assert not hasattr(build, "atomic_write")
    assert build.write_atomic is write_atomic
