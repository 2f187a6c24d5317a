"""A signed subset file, or its ``.sig``, that cannot be read: a clear error with the fix, never a raw OSError.

The signature check reads the file and its ``.sig`` before the registry's own error handling sees
them: a permission error there used to escape as a raw ``PermissionError`` (a traceback at the
technician's prompt), or as a ``SignatureError`` whose fix was "check the path". Now the engines
raise :class:`UnreadableFile` (the path, the OSError, the fix for its cause) and the registry import
turns it into :class:`RegistryFileError`, counted ``unreadable_registry`` in the trust state like
the other refusals of a registry file, with the cache left as it was.

Real files, real signatures, real kernel checks: as root (modes do not bind root) the reads run
with the effective uid of ``nobody``; otherwise chmod 000 does it. A folder given as the ``.sig``
(EISDIR) needs neither.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from iaflash.agent.errors import RegistryFileError, UnreadableFile
from iaflash.agent.registry.cache import import_signed_subset, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.engines.signing import TrustState, generate_keypair, open_trusted_file, sign_file, signature_path
from iaflash.provisioning.cli import cli

KEY = bytes(range(32))
KID = key_id(KEY)
FLEET = [("AB-123-CD", "RENAULT", "CLIO", "VP", "CI")]
ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def box() -> Iterator[Path]:
    """trust/registry/ with central's key, a state folder the reader may write, in a folder it may enter."""
    root = Path(tempfile.mkdtemp(prefix="iaflash-sigread-"))
    root.chmod(0o755)
    (root / "keys").mkdir()
    (root / "trust" / "registry").mkdir(parents=True)
    _, pub = generate_keypair(root / "keys" / "publisher", role="registry")
    shutil.copy(pub, root / "trust" / "registry" / pub.name)
    (root / "state").mkdir()
    if ROOT:
        nobody = pwd.getpwnam("nobody")
        os.chown(root / "state", nobody.pw_uid, nobody.pw_gid)
    try:
        yield root
    finally:
        for folder, _, _ in os.walk(root):
            os.chmod(folder, 0o755)  # what a test locked, so that it can be removed
        shutil.rmtree(root, ignore_errors=True)


def signed_subset(box: Path) -> Path:
    """``site/siv-1.jsonl.gz`` and its ``.sig``, readable by anyone (as copied from a USB stick)."""
    folder = box / "site"
    folder.mkdir(mode=0o755)
    path = folder / "siv-1.jsonl.gz"
    write_subset(path, dataset_id="siv", seq=1, key_id=KID, records=records_from_plates(KEY, FLEET))
    sign_file(path, box / "keys" / "publisher.key")
    path.chmod(0o644)
    return path


def lock(path: Path) -> None:
    """Make ``path`` (a file, or a folder: not enterable) unreadable for the reader of :func:`as_reader`."""
    path.chmod((0o700 if path.is_dir() else 0o600) if ROOT else 0o000)
    if not ROOT and os.access(path, os.R_OK):
        pytest.skip("this user reads files of mode 000 (a capability): the permission cannot be exercised")


@contextlib.contextmanager
def as_reader() -> Iterator[None]:
    """As root, the block runs with the effective uid and gid of ``nobody`` (root ignores modes)."""
    if not ROOT:
        yield
        return
    nobody = pwd.getpwnam("nobody")
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def import_into(box: Path, file: Path) -> None:
    import_signed_subset(
        box / "state" / "registry.db",
        file,
        trust_dir=box / "trust",
        allow_unsigned=False,
        expected_key_id=KID,
        state_file=box / "state" / "trust-state.json",
    )


def refused(box: Path) -> dict[str, int]:
    return dict(TrustState(box / "state" / "trust-state.json").summary()["refused"])


@pytest.mark.parametrize("locked", ["file", "signature", "folder"])
def test_an_unreadable_subset_sig_or_folder_is_a_registry_file_error_with_the_fix_and_is_counted(
    box: Path, locked: str
) -> None:
    file = signed_subset(box)
    sig = signature_path(file)
    lock({"file": file, "signature": sig, "folder": file.parent}[locked])
    named = sig if locked == "signature" else file  # a folder it may not enter: the file is what it reads first
    with as_reader(), pytest.raises(RegistryFileError) as info:
        import_into(box, file)
    message = str(info.value)
    assert message.startswith(f"{named}: cannot be read: [Errno 13] Permission denied"), message
    assert f"fix: let the user running the import read it and enter every folder above it (`namei -l {named}`" in (
        message
    )
    assert message.endswith("or run the import with sudo; the file itself is not damaged")
    assert isinstance(info.value.__cause__, UnreadableFile) and info.value.__cause__.error.errno == errno.EACCES
    assert refused(box) == {"unreadable_registry": 1}
    assert not (box / "state" / "registry.db").exists()  # nothing was imported, no cache was made


def test_a_folder_above_the_file_is_reported_by_the_engines_as_unreadable_not_as_a_raw_permission_error(
    box: Path,
) -> None:
    """open_trusted_file (also central's enrolment check) used to let ``Path.exists``'s PermissionError out."""
    file = signed_subset(box)
    lock(file.parent)
    with as_reader(), pytest.raises(UnreadableFile) as info:
        open_trusted_file(file, box / "trust", False)
    sig = signature_path(file)
    assert (info.value.path, info.value.error.errno) == (sig, errno.EACCES)
    assert str(info.value).startswith(f"signature {sig} cannot be read (Permission denied); fix: let the user ")
    assert f"`namei -l {sig}`" in str(info.value)


def test_a_folder_where_the_sig_should_be_is_refused_with_its_cause_and_counted(box: Path) -> None:
    """Runs as any user: EISDIR is no permission, so the fix is not the permission one."""
    file = signed_subset(box)
    sig = signature_path(file)
    sig.unlink()
    sig.mkdir()
    with pytest.raises(RegistryFileError) as info:
        import_into(box, file)
    assert str(info.value) == (
        f"{sig}: cannot be read: [Errno 21] Is a directory: '{sig}'; fix: it is a folder: give the path of the "
        "file; nothing was imported"
    )
    assert refused(box) == {"unreadable_registry": 1}


def test_the_registry_import_command_says_error_with_the_fix_instead_of_a_traceback(box: Path) -> None:
    file = signed_subset(box)
    key_file = box / "hmac.key"
    key_file.write_text(KEY.hex() + "\n")
    key_file.chmod(0o600)
    if ROOT:
        nobody = pwd.getpwnam("nobody")
        os.chown(key_file, nobody.pw_uid, nobody.pw_gid)  # the reader's own key: only the subset is locked
    config = box / "agent.toml"
    config.write_text(
        f'[registry]\ndb = "{box / "state" / "registry.db"}"\nhmac_key_file = "{key_file}"\n'
        f'[security]\ntrust_dir = "{box / "trust"}"\n'
    )
    lock(file.parent)
    with as_reader():
        result = CliRunner().invoke(cli, ["registry", "import", str(file), "--config", str(config), "--json"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: {file}: cannot be read: [Errno 13] Permission denied")
    doc = json.loads(result.stdout)
    assert doc["error"].startswith(f"{file}: cannot be read") and doc["fix"].startswith("let the user running")
    assert refused(box) == {"unreadable_registry": 1}
