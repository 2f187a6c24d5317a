"""``sudo iaflash-provision registry import``: the files it writes belong to the agent's user, not root.

The agent runs as the service user; a cache, ``-wal``/``-shm`` or trust state left to root by a
technician's import is one the daemon cannot update (a permission error at its next registry_sync).
As root, the import gives each file it wrote the owner of its folder (the state directory belongs to
the service user), else the service user's, else says so with the fix. Real files, real SQLite, real
signatures, real ``chown``: the tests need root (skipped otherwise) and use ``nobody`` as the agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from iaflash.agent.registry.cache import import_subset, read_state, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.engines.signing import TrustState, generate_keypair, sign_file
from iaflash.provisioning.cli import cli
from iaflash.provisioning.doctor.report import SERVICE_USER
from iaflash.provisioning.ownership import chown_like, give_to_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")

KEY = bytes(range(32))
KID = key_id(KEY)
FLEET = [("AB-123-CD", "RENAULT", "CLIO", "VP", "CI"), ("1234 AB 75", "CITROEN", "2CV", "VP", None)]
NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None


def _nobody() -> pwd.struct_passwd:
    assert NOBODY is not None
    return NOBODY


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def box() -> Iterator[Path]:
    """keys/ (central's), trust/registry/, hmac.key; a folder nobody may enter (not pytest's 0700 tmp_path)."""
    root = Path(tempfile.mkdtemp(prefix="iaflash-owner-"))
    root.chmod(0o755)
    (root / "keys").mkdir()
    (root / "trust" / "registry").mkdir(parents=True)
    _, pub = generate_keypair(root / "keys" / "publisher", role="registry")
    shutil.copy(pub, root / "trust" / "registry" / pub.name)
    (root / "hmac.key").write_text(KEY.hex() + "\n")
    (root / "hmac.key").chmod(0o600)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def state_dir(box: Path, owner: pwd.struct_passwd | None) -> Path:
    """The box's state directory (registry.db, trust-state.json), owned by ``owner`` (None: root)."""
    folder = box / "state"
    folder.mkdir(mode=0o751)
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    return folder


def config(box: Path, folder: Path) -> Path:
    path = box / "agent.toml"
    path.write_text(
        f'[registry]\ndb = "{folder / "registry.db"}"\nhmac_key_file = "{box / "hmac.key"}"\n'
        f'[security]\ntrust_dir = "{box / "trust"}"\n'
    )
    return path


def subset(box: Path, seq: int, *, signer: str = "publisher") -> Path:
    path = box / f"siv-{seq}.jsonl.gz"
    write_subset(path, dataset_id="siv", seq=seq, key_id=KID, records=records_from_plates(KEY, FLEET))
    sign_file(path, box / "keys" / f"{signer}.key")
    return path


def owners(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_uid, p.stat().st_gid) for p in sorted(folder.iterdir())}


@contextlib.contextmanager
def as_user(account: pwd.struct_passwd) -> Iterator[None]:
    """Run the block with the effective uid and gid of ``account`` (the agent's user), then root again."""
    os.setegid(account.pw_gid)
    os.seteuid(account.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_an_import_as_root_leaves_every_file_it_wrote_to_the_owner_of_the_state_folder(box: Path) -> None:
    nobody = _nobody()
    folder = state_dir(box, nobody)
    result = CliRunner().invoke(cli, ["registry", "import", str(subset(box, 1)), "--config", str(config(box, folder))])
    assert result.exit_code == 0, result.output
    written = owners(folder)
    assert {"registry.db", "trust-state.json", "trust-state.json.lock"} <= set(written)
    assert written == dict.fromkeys(written, (nobody.pw_uid, nobody.pw_gid))
    assert "warning" not in result.stderr


def test_after_a_root_import_the_agent_user_can_update_the_cache_and_the_trust_state(box: Path) -> None:
    """What the daemon does next (a registry_sync delta, its trust mark) works as the service user."""
    nobody = _nobody()
    folder = state_dir(box, nobody)
    cfg = config(box, folder)
    assert CliRunner().invoke(cli, ["registry", "import", str(subset(box, 1)), "--config", str(cfg)]).exit_code == 0
    delta = box / "delta-2.jsonl.gz"
    write_subset(
        delta,
        dataset_id="siv",
        seq=2,
        key_id=KID,
        records=records_from_plates(KEY, FLEET[:1]),
        kind="delta",
        base_seq=1,
    )
    delta.chmod(0o644)  # write_subset writes 0600; the agent reads what it is sent
    with as_user(nobody):
        state = import_subset(folder / "registry.db", delta, expected_key_id=KID)
        TrustState(folder / "trust-state.json").set_mark("registry", {"dataset_id": "siv", "seq": 2})
    assert state.seq == 2 and state.count == 2
    mark = TrustState(folder / "trust-state.json").mark("registry")
    assert mark is not None and (mark["dataset_id"], mark["seq"]) == ("siv", 2)


def test_a_refused_import_as_root_still_leaves_the_counted_trust_state_to_the_agent_user(box: Path) -> None:
    nobody = _nobody()
    folder = state_dir(box, nobody)
    generate_keypair(box / "keys" / "stranger", role="registry")  # its .pub is not in the trust store
    cfg = config(box, folder)
    result = CliRunner().invoke(
        cli, ["registry", "import", str(subset(box, 1, signer="stranger")), "--config", str(cfg)]
    )
    assert result.exit_code == 1 and "not in the trust store" in result.stderr, result.output
    assert TrustState(folder / "trust-state.json").summary()["refused"] == {"untrusted_key": 1}
    assert owners(folder)["trust-state.json"] == (nobody.pw_uid, nobody.pw_gid)


def test_in_a_folder_of_roots_without_the_service_user_the_import_says_so_with_the_fix(box: Path) -> None:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(SERVICE_USER)
        pytest.skip(f"this host has a user {SERVICE_USER}: the files go to it (see the next test)")
    folder = state_dir(box, None)
    cfg = config(box, folder)
    result = CliRunner().invoke(cli, ["registry", "import", str(subset(box, 1)), "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    db = folder / "registry.db"
    warning = (
        f"warning: {db} belongs to root, like its folder {folder}, and this host has no user {SERVICE_USER} to give "
        f"it to: the agent, which runs as {SERVICE_USER} (User= in iaflash-agent.service), could not update it; "
        f"fix: create the user (`systemd-sysusers`, with systemd/iaflash.sysusers installed), then "
        f"`chown {SERVICE_USER}: {folder} {db}`"
    )
    assert warning in result.stderr.splitlines()
    doc = json.loads(result.stdout)
    assert warning.removeprefix("warning: ") in doc["warnings"] and doc["state"]["seq"] == 1
    assert owners(folder)["registry.db"] == (0, 0)
    assert read_state(db) is not None  # imported all the same


def test_in_a_folder_of_roots_the_files_go_to_the_service_user_and_the_folder_is_named(box: Path) -> None:
    nobody = _nobody()
    folder = state_dir(box, None)
    files = [folder / "registry.db", folder / "registry.db-wal", folder / "trust-state.json"]
    for path in files[::2]:
        path.write_bytes(b"x")
    warnings = give_to_agent(files, user=nobody.pw_name)  # registry.db-wal does not exist: skipped
    assert owners(folder) == {p.name: (nobody.pw_uid, nobody.pw_gid) for p in files[::2]}
    assert warnings == [
        f"{folder} belongs to root: the agent (nobody) cannot create files there (the registry cache's -wal and "
        f"-shm, a new trust state); fix: `chown nobody: {folder}`"
    ]
    assert folder.stat().st_uid == 0  # the folder itself is left as it was


def test_model_installs_helper_gives_a_whole_tree_the_owner_of_its_folder(box: Path) -> None:
    nobody = _nobody()
    store = state_dir(box, nobody)
    (store / "bundle" / "sub").mkdir(parents=True)
    (store / "bundle" / "sub" / "model.onnx").write_bytes(b"onnx")
    (store / "bundle" / "link").symlink_to(box / "hmac.key")  # the link is chowned, never its target
    chown_like(store, [store / "bundle"])
    tree = [store / "bundle", store / "bundle" / "sub", store / "bundle" / "sub" / "model.onnx"]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in tree} == {(nobody.pw_uid, nobody.pw_gid)}
    assert (store / "bundle" / "link").lstat().st_uid == nobody.pw_uid and (box / "hmac.key").stat().st_uid == 0


def test_not_as_root_nothing_is_chowned_and_nothing_is_said(box: Path) -> None:
    nobody = _nobody()
    folder = state_dir(box, nobody)
    mine = folder / "registry.db"
    with as_user(nobody):
        mine.write_bytes(b"x")
        assert give_to_agent([mine], user="root") == []
    assert owners(folder) == {"registry.db": (nobody.pw_uid, nobody.pw_gid)}
