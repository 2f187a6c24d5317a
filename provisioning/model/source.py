"""A bundle to install: a folder, or a tar archive (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz``, ``.tar.bz2``).

:func:`measure` says how many bytes staging needs (before anything is written, for the room check);
:func:`stage` copies the bundle's regular files into a fresh folder of the store. An archive is
read member by member and never extracted by ``tarfile`` itself: only regular files and folders,
with relative names that stay inside the bundle, are accepted (no links, devices, ``..`` or absolute
paths); one top folder around the bundle is stripped. Files are written 0644, folders 0755.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from iaflash.agent.errors import ModelStoreError
from iaflash.engines.bundle import MANIFEST_FILE

__all__ = ["MAX_FILES", "Source", "measure", "stage"]

MAX_FILES = 1000  # a bundle has a handful; an archive with more is not a bundle
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """What will be staged: ``files`` (relative name → size) and their total."""

    path: Path
    kind: str  # "folder" or "archive"
    files: dict[str, int]
    strip: str = ""  # the archive's top folder, removed from every name

    @property
    def size(self) -> int:
        return sum(self.files.values())


def _fix_archive(path: Path) -> str:
    return (
        f"fix: give the bundle folder, or a tar archive of it made with `tar -czf bundle.tgz -C {path.parent} "
        "BUNDLE_FOLDER`"
    )


def _safe_name(name: str, archive: Path) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ModelStoreError(f"{archive}: member {name!r} leaves the bundle folder; refused. {_fix_archive(archive)}")
    return PurePosixPath(*[p for p in rel.parts if p != "."])


def _archive_files(path: Path) -> tuple[dict[str, int], str]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ModelStoreError(f"{path}: not a readable tar archive ({exc}); {_fix_archive(path)}") from exc
    if len(members) > MAX_FILES:
        raise ModelStoreError(f"{path}: {len(members)} members, more than a bundle has; {_fix_archive(path)}")
    files: dict[str, int] = {}
    for m in members:
        rel = _safe_name(m.name, path)
        if m.isdir():
            continue
        if not rel.parts:
            raise ModelStoreError(f"{path}: a file member without a name; {_fix_archive(path)}")
        if not m.isfile():
            raise ModelStoreError(
                f"{path}: member {m.name!r} is a link or a special file; a bundle holds regular files only. "
                f"{_fix_archive(path)}"
            )
        files[str(rel)] = m.size
    tops = {PurePosixPath(name).parts[0] for name in files}
    strip = ""
    if MANIFEST_FILE not in files and len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in files):
        strip = tops.pop()
        files = {str(PurePosixPath(*PurePosixPath(n).parts[1:])): size for n, size in files.items()}
    if MANIFEST_FILE not in files:
        raise ModelStoreError(f"{path}: the archive holds no {MANIFEST_FILE} at its top; {_fix_archive(path)}")
    return files, strip


def _folder_files(path: Path) -> dict[str, int]:
    if not (path / MANIFEST_FILE).is_file():
        raise ModelStoreError(
            f"{path}: no {MANIFEST_FILE} in this folder, so it is not a model bundle; fix: give the folder that "
            "holds manifest.json, manifest.sig, model.onnx and labels.csv"
        )
    files: dict[str, int] = {}
    for entry in sorted(path.rglob("*")):
        rel = entry.relative_to(path)
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            raise ModelStoreError(
                f"{entry}: a link or a special file inside the bundle; a bundle holds regular files only; "
                "fix: copy the bundle again (cp -rL) or re-pack it"
            )
        if entry.is_file():
            files[rel.as_posix()] = entry.stat().st_size
    if len(files) > MAX_FILES:
        raise ModelStoreError(f"{path}: {len(files)} files, more than a bundle has; fix: give the bundle folder")
    return files


def measure(path: Path) -> Source:
    """What staging ``path`` will write; raises ModelStoreError for anything that is not a bundle."""
    path = Path(path)
    if path.is_dir():
        return Source(path, "folder", _folder_files(path))
    if not path.exists():
        raise ModelStoreError(f"{path}: no such file or folder; fix: check the path (a bundle folder or archive)")
    files, strip = _archive_files(path)
    return Source(path, "archive", files, strip)


def _copy(reader: IO[bytes], target: Path, size: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := reader.read(_CHUNK):
            written += len(chunk)
            if written > size:
                break
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if written != size:
        raise ModelStoreError(f"{target.name}: changed size while it was copied; fix: copy the bundle again")


def stage(source: Source, dest: Path) -> None:
    """Write the bundle's files into the empty folder ``dest`` (0644 files, 0755 folders), fsync'd."""
    if source.kind == "folder":
        for rel, size in source.files.items():
            with (source.path / rel).open("rb") as reader:
                _copy(reader, dest / rel, size)
        return
    try:
        with tarfile.open(source.path, "r:*") as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                member = _safe_name(m.name, source.path)
                if source.strip:
                    member = PurePosixPath(*member.parts[1:])
                data = tar.extractfile(m)
                if data is None:  # pragma: no cover - isfile() members always have data
                    continue
                with data:
                    _copy(data, dest / str(member), m.size)
    except (tarfile.TarError, EOFError) as exc:
        raise ModelStoreError(f"{source.path}: the archive is damaged ({exc}); {_fix_archive(source.path)}") from exc


def remove_tree(path: Path) -> None:
    """Remove a staged or pruned folder; a missing one is fine."""
    shutil.rmtree(path, ignore_errors=True)
