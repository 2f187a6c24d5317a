"""The idempotent steps of an enrolment: each says what it would change, then changes only that.

Every step has ``pending()`` (None when the box already matches, else what would change, in words)
and ``apply()``. Owners are names resolved on this machine: when we are not root, or the service
user does not exist here, a step changes modes only and says which owner it would have set.
Files are written atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from iaflash.provisioning.enrol.source import EnrolError, sha256_file

__all__ = ["Box", "Dir", "File", "Owner", "ServiceUser", "Step", "Tree"]

GPU_GROUPS = ("video", "render")  # Jetson /dev/nvhost-*, /dev/nvmap (video); /dev/dri/renderD* (render)
INGRESS_GROUP = "iaflash-ingress"  # the radar feed's group: may write into spool/incoming (systemd/iaflash.sysusers)


@dataclass(frozen=True)
class Owner:
    user: str  # "root" or the service user
    group: str  # "root" or the service user's group


@dataclass
class Box:
    """Where and as whom we install: ``root`` prefixes every path; ``user`` is the service account."""

    root: Path
    user: str
    euid: int = field(default_factory=os.geteuid)

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def is_system(self) -> bool:
        """Installing into the running system (``--root /``): users, groups and systemd are real."""
        return self.root.resolve() == Path("/")

    @property
    def group(self) -> str:
        """The service user's primary group (its own, as useradd --user-group makes it)."""
        try:
            return grp.getgrgid(pwd.getpwnam(self.user).pw_gid).gr_name
        except KeyError:
            return self.user

    @property
    def service(self) -> Owner:
        return Owner(self.user, self.group)

    @property
    def config_owner(self) -> Owner:
        return Owner("root", self.group)

    def ids(self, owner: Owner) -> tuple[int, int] | None:
        """(uid, gid) to chown to, or None when we cannot (not root, or the names don't exist here)."""
        if self.euid != 0:
            return None
        try:
            return pwd.getpwnam(owner.user).pw_uid, grp.getgrnam(owner.group).gr_gid
        except KeyError:
            return None

    def owner_note(self, owner: Owner) -> str:
        """Empty when the owner can be set, else what would be set (``ownership_problem`` says why)."""
        if self.ids(owner) is not None or (owner == Owner("root", "root") and self.euid == 0):
            return ""
        return f" (would chown {owner.user}:{owner.group})"

    def ownership_problem(self) -> str | None:
        """Why owners are not set, or None when they are."""
        if self.euid != 0:
            return "not root: modes are set, owners are not (run it with sudo on the box)"
        if self.ids(self.service) is None:
            return f"user {self.user} does not exist on this machine: modes are set, owners are not"
        return None


def _differences(path: Path, mode: int, owner: Owner, box: Box) -> list[str]:
    st = path.lstat()
    out = []
    if stat.S_IMODE(st.st_mode) != mode:
        out.append(f"mode {stat.S_IMODE(st.st_mode):o} -> {mode:o}")
    ids = box.ids(owner)
    if ids is not None and (st.st_uid, st.st_gid) != ids:
        out.append(f"owner -> {owner.user}:{owner.group}")
    return out


def _set_meta(path: Path, mode: int, owner: Owner, box: Box) -> None:
    ids = box.ids(owner)
    if ids is not None:
        os.chown(path, *ids, follow_symlinks=False)
    os.chmod(path, mode)


class Step:
    """One step: ``pending()`` says what it would change (None: nothing), ``apply()`` changes it."""

    name: str
    note: str = ""  # said whether or not the step changes something (e.g. a chown it cannot do)
    skipped: str | None = None  # why this step does not apply here

    def pending(self) -> str | None:
        raise NotImplementedError

    def apply(self) -> None:
        raise NotImplementedError


class Dir(Step):
    def __init__(self, box: Box, path: str, mode: int, owner: Owner) -> None:
        self.box, self.path, self.mode, self.owner = box, box.at(path), mode, owner
        self.name = f"folder {self.path}"

    def pending(self) -> str | None:
        if not self.path.is_dir():
            return f"create (mode {self.mode:o}, {self.owner.user}:{self.owner.group})"
        diff = _differences(self.path, self.mode, self.owner, self.box)
        return ", ".join(diff) or None

    def apply(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _set_meta(self.path, self.mode, self.owner, self.box)


class File(Step):
    """A file whose content comes from ``source`` (a path) or ``content`` (bytes)."""

    def __init__(
        self,
        box: Box,
        path: str,
        mode: int,
        owner: Owner,
        *,
        source: Path | None = None,
        content: bytes | None = None,
        keep_previous: bool = False,
        what: str = "file",
    ) -> None:
        assert (source is None) != (content is None)
        self.box, self.path, self.mode, self.owner = box, box.at(path), mode, owner
        self.source, self.content, self.keep_previous = source, content, keep_previous
        self.name = f"{what} {self.path}"

    def _bytes(self) -> bytes:
        if self.content is not None:
            return self.content
        assert self.source is not None
        return self.source.read_bytes()

    def pending(self) -> str | None:
        if not self.path.is_file():
            return f"install (mode {self.mode:o}, {self.owner.user}:{self.owner.group})"
        if self.path.read_bytes() != self._bytes():
            kept = f" (the old one is kept as {self.path.name}.previous)" if self.keep_previous else ""
            return f"replace: its content differs{kept}"
        return ", ".join(_differences(self.path, self.mode, self.owner, self.box)) or None

    def apply(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self._bytes()
        if self.path.is_file() and self.path.read_bytes() == data:
            _set_meta(self.path, self.mode, self.owner, self.box)
            return
        if self.keep_previous and self.path.is_file():
            shutil.copy2(self.path, self.path.with_name(self.path.name + ".previous"))
        tmp = self.path.with_name(f".{self.path.name}.enrol-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            _set_meta(tmp, self.mode, self.owner, self.box)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class Tree(Step):
    """A bundle folder: the files of ``source`` under ``files`` (relative paths), replaced as a whole."""

    def __init__(self, box: Box, path: str, source: Path, files: list[str], owner: Owner, what: str = "bundle") -> None:
        self.box, self.path, self.source, self.files, self.owner = box, box.at(path), source, files, owner
        self.name = f"{what} {self.path}"
        if self.path.is_symlink():  # the model store's link to the version in use (iaflash-provision model)
            self.skipped = (
                f"{self.path} is a link managed by the model store: kept; to install the bundle's model, "
                f"iaflash-provision model install {source}"
            )

    def _present(self) -> list[str]:
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())

    def pending(self) -> str | None:
        if not self.path.is_dir():
            return f"install {len(self.files)} files"
        if self._present() != sorted(self.files):
            return "replace: its files differ from the bundle's"
        changed = [f for f in self.files if sha256_file(self.path / f) != sha256_file(self.source / f)]
        if changed:
            return f"replace: {len(changed)} files differ ({', '.join(changed[:3])})"
        modes = [
            p
            for p in (self.path, *(self.path / f for f in self.files))
            if _differences(p, self._mode(p), self.owner, self.box)
        ]
        return f"fix the mode or owner of {len(modes)} files" if modes else None

    @staticmethod
    def _mode(path: Path) -> int:
        return 0o750 if path.is_dir() else 0o640

    def apply(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.enrol-tmp")
        old = self.path.with_name(f".{self.path.name}.enrol-old")
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        for rel in self.files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.source / rel, tmp / rel)
        for p in sorted(tmp.rglob("*"), reverse=True):
            _set_meta(p, self._mode(p), self.owner, self.box)
        _set_meta(tmp, 0o750, self.owner, self.box)
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(tmp, self.path)
        if old.exists():
            shutil.rmtree(old)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _member(user: str, group: str) -> bool:
    try:
        entry = pwd.getpwnam(user)
        return grp.getgrnam(group).gr_gid in os.getgrouplist(user, entry.pw_gid)
    except KeyError:
        return False


class ServiceUser(Step):
    """The account the unit runs as, in the radar feed's group and the GPU groups that exist (Jetson: video, render)."""

    def __init__(self, box: Box, home: str, run: Callable[[list[str]], None] | None = None) -> None:
        self.box, self.home = box, Path(home)
        self.name = f"service user {box.user}"
        self._run = run or _run
        if not box.is_system:
            self.skipped = f"--root {box.root} is not /; on the box this runs: {self.commands_text()}"

    def commands(self) -> list[list[str]]:
        """What systemd/iaflash.sysusers declares, done with the shadow tools, plus the GPU groups present."""
        user, out = self.box.user, []
        try:
            pwd.getpwnam(user)
            exists = True
        except KeyError:
            exists = False
        if not exists:
            out.append(
                ["useradd", "--system", "--user-group", "--home-dir", str(self.home), "--no-create-home",
                 "--shell", "/usr/sbin/nologin", user]
            )  # fmt: skip
        if not _group_exists(INGRESS_GROUP):
            out.append(["groupadd", "--system", INGRESS_GROUP])
        wanted = [INGRESS_GROUP, *(g for g in GPU_GROUPS if _group_exists(g))]
        groups = [g for g in wanted if not (exists and _member(user, g))]
        if groups:
            out.append(["usermod", "--append", "--groups", ",".join(groups), user])
        return out

    def commands_text(self) -> str:
        return "; ".join(" ".join(c) for c in self.commands()) or "nothing to do"

    def pending(self) -> str | None:
        if not self.box.is_system:
            return None
        cmds = self.commands()
        return f"run {self.commands_text()}" if cmds else None

    def apply(self) -> None:
        if self.box.euid != 0:
            raise EnrolError(f"creating {self.box.user} needs root; fix: sudo iaflash-provision enrol ...")
        for argv in self.commands():
            self._run(argv)


def _run(argv: list[str]) -> None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise EnrolError(f"{argv[0]}: cannot run ({exc.strerror}); fix: install the shadow utilities (passwd)") from exc
    if out.returncode != 0:
        raise EnrolError(f"{' '.join(argv)} failed: {out.stderr.strip()}; fix: run it by hand and read its error")
