"""``iaflash-central enrolment build``: the bundle holds the site's plate key and the box's TLS key, so
neither it nor any copy of a secret in it is ever readable by another user, whatever central's umask."""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from provisioning_box import CentralFiles, central_files, tls_files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> CentralFiles:
    return central_files(tmp_path_factory.mktemp("central"))


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Central's shell as many have it: umask 022 (new files 0644)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_the_archive_is_readable_by_its_owner_only(files: CentralFiles, tmp_path: Path) -> None:
    """The .tar.gz carries plate.key and client.key: it is written 0600, and they are 0600 inside it."""
    ca, cert, key = tls_files(tmp_path / "pki")
    out = files.build(
        tmp_path / "enrol-A13-box-01.tar.gz", "mqtts://127.0.0.1:8883", "--ca", str(ca), "--cert", str(cert),
        "--key", str(key),
    )  # fmt: skip
    assert mode(out) == 0o600
    with tarfile.open(out, "r:gz") as tar:
        modes = {Path(m.name).name: m.mode for m in tar.getmembers() if m.isfile()}
    assert modes["plate.key"] == 0o600 and modes["client.key"] == 0o600
    assert modes["ca.pem"] == 0o644 and modes["enrol.json"] == 0o644  # what is not secret stays readable
