"""Real tmpfs mounts for the tests of full and read-only disks (root only; skipped cleanly otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="tmpfs mounts need root and mount(8)"
)

Mount = Callable[..., Path]


def tmpfs_mounts() -> Iterator[Mount]:
    """The body of the ``tmpfs`` fixture (conftest.py): ``mount(path, size)``, each unmounted at the end."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "64m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False)
        if result.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (a container without CAP_SYS_ADMIN)")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)
