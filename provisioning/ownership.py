"""Files a technician's command writes as root for the agent: they get the agent's owner.

The agent runs as the service user (``User=iaflash`` in systemd/iaflash-agent.service); a file that
``sudo iaflash-provision ...`` leaves owned by root is one the agent cannot update (a permission
error in the daemon). Both helpers do nothing unless the command runs as root.

* :func:`chown_like` (``model install``): the new files get the owner of the folder they were put in.
* :func:`give_to_agent` (``registry import``): each file gets the owner of its folder when that is not
  root (the state directory belongs to the service user), else the service user's; when neither can
  be, it returns what is wrong with the fix instead of leaving it unsaid.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Iterable
from pathlib import Path

from iaflash.provisioning.doctor.report import SERVICE_USER, UNIT

__all__ = ["chown_like", "give_to_agent"]


def _chown(paths: Iterable[Path], uid: int, gid: int) -> None:
    """``paths`` and everything under those that are folders (links themselves, never their targets)."""
    for path in paths:
        for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
            with contextlib.suppress(OSError):
                os.chown(p, uid, gid, follow_symlinks=False)


def chown_like(folder: Path, paths: Iterable[Path]) -> None:
    """As root, ``paths`` (and what is under them) get the owner of ``folder`` (the service user reads there)."""
    if os.geteuid() != 0:
        return
    st = folder.stat()
    _chown(paths, st.st_uid, st.st_gid)


def give_to_agent(paths: Iterable[Path], user: str = SERVICE_USER) -> list[str]:
    """As root, hand the files of ``paths`` that exist to the agent; the warnings (with their fix) where it can't.

    A file in a folder that belongs to someone else than root gets that folder's owner, like
    :func:`chown_like`. In a folder of root's, it gets ``user``'s uid and gid, and the folder is
    named (the agent must be able to create the SQLite ``-wal`` and ``-shm`` files beside it); without
    such a user on this host, the files stay root's and the warning says how to fix it.
    """
    if os.geteuid() != 0:
        return []
    warnings: list[str] = []
    for path in (p for p in paths if os.path.lexists(p)):
        folder = path.absolute().parent
        if folder.stat().st_uid != 0:
            chown_like(folder, [path])
            continue
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            warnings.append(
                f"{path} belongs to root, like its folder {folder}, and this host has no user {user} to give it to: "
                f"the agent, which runs as {user} (User= in {UNIT}), could not update it; fix: create the user "
                f"(`systemd-sysusers`, with systemd/iaflash.sysusers installed), then `chown {user}: {folder} {path}`"
            )
            continue
        _chown([path], account.pw_uid, account.pw_gid)
        warning = (
            f"{folder} belongs to root: the agent ({user}) cannot create files there (the registry cache's -wal "
            f"and -shm, a new trust state); fix: `chown {user}: {folder}`"
        )
        if warning not in warnings:
            warnings.append(warning)
    return warnings
