"""Trust with limits: key roles, expiry, revocation lists, rollback protection (docs/SIGNING.md).

Real Ed25519 keys made by the tests, real bundles (tiny ONNX models), real registry subset files
imported into real SQLite caches, the real trust state file and the real CLIs. The command path
(revoke_keys, registry_sync, replay on a second box) is tested in tests/test_commands_handlers.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from onnx_builders import LABELS, classifier_onnx

from iaflash.agent.config import Config, parse_config
from iaflash.agent.pipeline.models import load_model_set, record_model_set
from iaflash.agent.registry.cache import import_signed_subset, read_state, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id as hmac_key_id
from iaflash.engines.bundle import MANIFEST_FILE, Bundle, write_bundle
from iaflash.engines.cli import main as engines_cli
from iaflash.engines.errors import KeyExpired, KeyRevoked, RollbackRefused, SignatureError, UntrustedKey, WrongRole
from iaflash.engines.keys import read_public_key
from iaflash.engines.manifest import Manifest, Preprocessing
from iaflash.engines.revocation import build_revocation_list
from iaflash.engines.rollback import BundleMark, check_bundle_version, compare_versions
from iaflash.engines.sigdoc import sign_bytes
from iaflash.engines.signing import (
    TrustState,
    TrustStore,
    generate_keypair,
    install_revocations,
    load_private_key,
    load_trusted_bundle,
    sign_bundle,
    sign_file,
)

HMAC = bytes(range(32))
PLATE = "AB-123-CD"
ROLES = ("models", "registry", "commands", "revocation")


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """keys/<role>.key (one key per role, each .pub in trust/<role>/) and the box's state directory."""
    (tmp_path / "keys").mkdir()
    for role in ROLES:
        _, pub = generate_keypair(tmp_path / "keys" / role, role=role)
        (tmp_path / "trust" / role).mkdir(parents=True)
        shutil.copy(pub, tmp_path / "trust" / role / pub.name)
    (tmp_path / "state").mkdir()
    return tmp_path


def key(box: Path, role: str) -> Path:
    return box / "keys" / f"{role}.key"


def kid(private: Path) -> str:
    return read_public_key(private.with_suffix(".pub")).key_id


def state_file(box: Path) -> Path:
    return box / "state" / "trust-state.json"


def bundle(path: Path, version: str, signer: Path | None, name: str = "tiny-classifier") -> Bundle:
    made = write_bundle(
        path,
        onnx_bytes=classifier_onnx(num_classes=len(LABELS), height=8, width=8, batch="N"),
        labels=LABELS,
        name=name,
        version=version,
        input_name="input",
        input_shape=["N", 3, 8, 8],
        preprocessing=Preprocessing(height=8, width=8),
        output_name="logits",
    )
    if signer is not None:
        sign_bundle(path, signer)
    return made


def load(box: Path, path: Path, *, record: bool = True) -> Bundle:
    return load_trusted_bundle(path, box / "trust", False, state_file=state_file(box), record=record)


def subset(path: Path, seq: int, signer: Path, *, dataset: str = "siv", make: str = "RENAULT") -> Path:
    rows = [(PLATE, make, "CLIO", "VP", "CI")]
    write_subset(path, dataset_id=dataset, seq=seq, key_id=hmac_key_id(HMAC), records=records_from_plates(HMAC, rows))
    sign_file(path, signer)
    return path


def import_into(box: Path, file: Path, db: Path | None = None) -> tuple[int, str | None]:
    state, signer = import_signed_subset(
        db or box / "state" / "registry.db",
        file,
        trust_dir=box / "trust",
        allow_unsigned=False,
        expected_key_id=hmac_key_id(HMAC),
        state_file=state_file(box),
    )
    return state.seq, signer


def refused(box: Path) -> dict[str, int]:
    return TrustState(state_file(box)).summary()["refused"]


# ---------------------------------------------------------------- roles


def test_keygen_writes_the_role_and_expiry_that_the_trust_store_reads_back(tmp_path: Path) -> None:
    when = datetime(2027, 6, 30, 23, 59, 59, tzinfo=timezone.utc)
    _, pub = generate_keypair(tmp_path / "acme-registry", role="registry", not_after=when)
    text = pub.read_text()
    assert "\nrole: registry" in text and "\nnot_after: 2027-06-30T23:59:59+00:00" in text
    parsed = read_public_key(pub)
    assert (parsed.role, parsed.not_after, parsed.name) == ("registry", when, "acme-registry")
    result = CliRunner().invoke(
        engines_cli,
        ["keygen", "--out", str(tmp_path / "cmd"), "--role", "commands", "--not-after", "2027-01-31", "--json"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["role"], doc["not_after"]) == ("commands", "2027-01-31T23:59:59+00:00")
    assert read_public_key(tmp_path / "cmd.pub").role == "commands"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("role: admin\n", "role 'admin' does not exist"),
        ("not_after: tomorrow\n", "not_after 'tomorrow' is not an ISO 8601 time"),
        ("owner: bob\n", "unknown field 'owner'"),
        ("role: models\nrole: models\n", "field 'role' is given twice"),
    ],
)
def test_bad_field_lines_in_a_pub_are_refused_naming_the_file(tmp_path: Path, content: str, problem: str) -> None:
    _, pub = generate_keypair(tmp_path / "k")
    pub.write_text(pub.read_text() + content)
    with pytest.raises(SignatureError, match=rf"public key {pub}: {problem}"):
        read_public_key(pub)


def test_a_bundle_signed_by_a_registry_key_is_refused_naming_the_key_its_role_and_the_role_needed(box: Path) -> None:
    model = bundle(box / "model", "1.0.0", None)
    signing_key = key(box, "registry")
    # sign_bundle refuses a key whose .pub says another role; an attacker's tool would not: sign anyway
    moved = box / "loose" / "registry.key"
    moved.parent.mkdir()
    shutil.copy(signing_key, moved)
    moved.chmod(0o600)
    sign_bundle(model.path, moved)
    with pytest.raises(WrongRole) as err:
        load(box, model.path)
    message = str(err.value)
    assert f"signed by key registry (id {kid(signing_key)}, role registry)" in message
    assert "model bundles need a key of role models" in message and "fix: sign it with the models key" in message
    assert refused(box) == {"wrong_role": 1}
    assert TrustState(state_file(box)).bundle_mark("tiny-classifier") is None  # nothing recorded


def test_a_registry_file_signed_by_the_model_key_is_refused_and_the_cache_is_unchanged(box: Path) -> None:
    assert import_into(box, subset(box / "s1.jsonl.gz", 1, key(box, "registry"))) == (1, "registry")
    bad = subset(box / "s2.jsonl.gz", 2, key(box, "models"), make="BMW")
    with pytest.raises(WrongRole, match=r"registry subset files need a key of role registry"):
        import_into(box, bad)
    state = read_state(box / "state" / "registry.db")
    assert state is not None and state.seq == 1
    assert refused(box) == {"wrong_role": 1}


def test_the_signing_tools_refuse_a_key_of_another_role_before_anything_is_signed(box: Path) -> None:
    model = bundle(box / "model", "1.0.0", None)
    with pytest.raises(WrongRole, match=r"registry\.key is a registry key .* need a key of role models"):
        sign_bundle(model.path, key(box, "registry"))
    assert not (model.path / "manifest.sig").exists()
    file = box / "s.jsonl.gz"
    file.write_bytes(b"x")
    result = CliRunner().invoke(engines_cli, ["sign", str(file), "--key", str(key(box, "commands"))])
    assert result.exit_code == 1 and "is a commands key" in result.output
    assert not file.with_name(file.name + ".sig").exists()


def test_a_pub_whose_role_line_disagrees_with_its_folder_is_refused(box: Path) -> None:
    shutil.copy(box / "trust" / "commands" / "commands.pub", box / "trust" / "models" / "commands.pub")
    with pytest.raises(SignatureError, match=r"says 'role: commands' but it sits in .*models \(role models\); fix"):
        TrustStore.from_dir(box / "trust")


def test_the_flat_layout_still_works_for_every_role_with_a_deprecation_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private, pub = generate_keypair(tmp_path / "publisher")
    (tmp_path / "flat").mkdir()
    shutil.copy(pub, tmp_path / "flat" / pub.name)
    model = bundle(tmp_path / "model", "1.0.0", private)
    with caplog.at_level(logging.WARNING, logger="iaflash.engines.trust"):
        assert load_trusted_bundle(model.path, tmp_path / "flat", False).manifest.version == "1.0.0"
    assert "uses the flat layout (deprecated)" in caplog.text and "see docs/SIGNING.md#migration" in caplog.text
    store = TrustStore.from_dir(tmp_path / "flat")
    assert store.flat and [k.role for k in store.keys] == [None]
    assert store.check(b"x", _sign(private, b"x"), role="commands").role is None  # any role, as before


def test_a_pub_left_beside_the_role_folders_is_trusted_for_nothing(box: Path, caplog: pytest.LogCaptureFixture) -> None:
    private, pub = generate_keypair(box / "keys" / "stray")
    shutil.copy(pub, box / "trust" / pub.name)
    with caplog.at_level(logging.WARNING, logger="iaflash.engines.trust"):
        store = TrustStore.from_dir(box / "trust")
    assert "stray.pub sit outside the role folders and are trusted for nothing" in caplog.text
    with pytest.raises(UntrustedKey, match="not in the trust store"):
        store.check(b"x", _sign(private, b"x"), role="models")


def _sign(private: Path, data: bytes) -> dict[str, Any]:
    return sign_bytes(data, load_private_key(private), private.stem)


# ---------------------------------------------------------------- expiry


def test_an_expired_key_is_refused_with_its_expiry_date_and_a_current_one_accepted(box: Path) -> None:
    past = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=1)
    future = past + timedelta(days=400)
    old, old_pub = generate_keypair(box / "keys" / "old-models", role="models", not_after=past)
    new, new_pub = generate_keypair(box / "keys" / "new-models", role="models", not_after=future)
    for pub in (old_pub, new_pub):
        shutil.copy(pub, box / "trust" / "models" / pub.name)
    stale = bundle(box / "stale", "1.0.0", old)
    with pytest.raises(KeyExpired) as err:
        load(box, stale.path)
    assert f"signed by key old-models (id {kid(old)}, role models), which expired at {past.isoformat()}" in str(
        err.value
    )
    assert "fix: get it re-signed with a current key" in str(err.value)
    assert load(box, bundle(box / "fresh", "1.0.0", new).path).manifest.version == "1.0.0"
    assert refused(box) == {"expired_key": 1}


# ---------------------------------------------------------------- revocation


def revocation_list(box: Path, seq: int, *revoked: Path, signer: str = "revocation") -> dict[str, Any]:
    pairs = [(kid(k), f"{k.stem} key leaked") for k in revoked]
    return build_revocation_list(seq, pairs, load_private_key(key(box, signer)), signer)


def test_a_revoked_key_is_refused_for_bundles_and_registry_files_and_nothing_changes(box: Path) -> None:
    model = bundle(box / "model", "1.0.0", key(box, "models"))
    assert load(box, model.path).manifest.version == "1.0.0"
    assert import_into(box, subset(box / "s1.jsonl.gz", 1, key(box, "registry")))[0] == 1
    doc = revocation_list(box, 1, key(box, "models"), key(box, "registry"))
    applied, changed = install_revocations(doc, box / "trust", TrustState(state_file(box)), where="list.json")
    assert changed and applied.seq == 1 and set(applied.key_ids) == {kid(key(box, "models")), kid(key(box, "registry"))}
    with pytest.raises(
        KeyRevoked, match=r"signed by key models .*revoked by the revocation list seq 1 .*models key leaked"
    ):
        load(box, model.path)
    with pytest.raises(KeyRevoked, match=r"signed by key registry "):
        import_into(box, subset(box / "s2.jsonl.gz", 2, key(box, "registry"), make="BMW"))
    state = read_state(box / "state" / "registry.db")
    assert state is not None and state.seq == 1
    assert refused(box) == {"revoked_key": 2}


def test_an_older_revocation_list_never_replaces_a_newer_one(box: Path) -> None:
    state = TrustState(state_file(box))
    newer, older = revocation_list(box, 3, key(box, "models")), revocation_list(box, 2, key(box, "registry"))
    install_revocations(newer, box / "trust", state, where="newer.json")
    with pytest.raises(RollbackRefused, match=r"revocation list seq 2 is older than the applied seq 3"):
        install_revocations(older, box / "trust", state, where="older.json")
    other_same_seq = revocation_list(box, 3, key(box, "commands"))
    with pytest.raises(RollbackRefused, match=r"differs from the list of the same seq"):
        install_revocations(other_same_seq, box / "trust", state, where="other.json")
    applied = state.revocation()
    assert applied is not None and applied.seq == 3 and applied.key_ids == (kid(key(box, "models")),)
    assert refused(box) == {"rollback_revocation": 2}


def test_a_revocation_list_altered_after_signing_or_signed_by_another_role_is_refused(box: Path) -> None:
    state = TrustState(state_file(box))
    doc = revocation_list(box, 1, key(box, "models"))
    doc["revoked"] = []  # the attacker un-revokes after signing
    with pytest.raises(SignatureError, match="signature does not match"):
        install_revocations(doc, box / "trust", state, where="tampered.json")
    with pytest.raises(WrongRole, match="revocation lists need a key of role revocation"):
        install_revocations(revocation_list(box, 1, signer="commands"), box / "trust", state, where="x.json")
    assert state.revocation() is None


def test_the_trust_cli_signs_installs_and_lists_revocations(box: Path) -> None:
    runner = CliRunner()
    out, models_id = box / "revoked-0001.json", kid(key(box, "models"))
    signed = runner.invoke(
        engines_cli,
        [
            *("trust", "sign-revocations", "--key", str(key(box, "revocation")), "--seq", "1"),
            *("--revoke", f"{models_id}=laptop stolen", "--out", str(out)),
        ],
    )
    assert signed.exit_code == 0, signed.output
    common = ["--trust", str(box / "trust"), "--state", str(state_file(box))]
    installed = runner.invoke(engines_cli, ["trust", "install-revocations", str(out), *common, "--json"])
    assert installed.exit_code == 0, installed.output
    assert json.loads(installed.stdout)["changed"] is True
    listed = json.loads(runner.invoke(engines_cli, ["trust", "list", *common, "--json"]).stdout)
    status = {(k["role"], k["name"]): k["status"] for k in listed["keys"]}
    assert status == {(r, r): "revoked" if r == "models" else "ok" for r in ROLES}
    assert listed["layout"] == "roles" and listed["revocation_seq"] == 1
    older = box / "revoked-0000.json"
    older.write_text(json.dumps(revocation_list(box, 1, key(box, "registry"))))
    again = runner.invoke(engines_cli, ["trust", "install-revocations", str(older), *common])
    assert again.exit_code == 1 and "differs from the list of the same seq" in again.output
    verify = runner.invoke(engines_cli, ["verify", str(bundle(box / "m", "1.0.0", key(box, "models")).path), *common])
    assert verify.exit_code == 3 and "revoked" in verify.output


# ---------------------------------------------------------------- rollback: bundles


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """The manifest of a real bundle, whose version and rollback field each case replaces."""
    return bundle(tmp_path_factory.mktemp("template") / "b", "1", None).manifest


@pytest.mark.parametrize(
    ("previous", "new", "allow_from", "expected"),
    [
        (None, "1.0", None, ("1.0", "1.0")),  # first bundle of the name
        (("2.0", "2.0"), "2.0", None, ("2.0", "2.0")),  # the version it runs: a reload
        (("2.0", "2.0"), "2.0.1", None, ("2.0.1", "2.0.1")),  # an upgrade
        (("2.0", "2.0"), "10.0", None, ("10.0", "10.0")),  # numbers, not text: 10 > 2
        (("2.0", "2.0"), "1.9", None, "older than or equal to 2.0"),
        (("2.0", "2.0"), "1.9", "2.0", ("1.9", "2.0")),  # a signed rollback: highest kept
        (("1.9", "2.0"), "2.0", None, "older than or equal to 2.0"),  # the bundle left cannot come back
        (("1.9", "2.0"), "2.1", None, ("2.1", "2.1")),
        (("2.1", "2.1"), "1.9", "2.0", "a signed rollback for boxes that ran at most 2.0"),
        (("2.0", "2.0"), "2.0-rc1", None, "cannot tell whether version '2.0-rc1' is newer"),
    ],
)
def test_check_bundle_version_rules(
    template: Manifest,
    previous: tuple[str, str] | None,
    new: str,
    allow_from: str | None,
    expected: tuple[str, str] | str,
) -> None:
    before = None if previous is None else BundleMark("tiny-classifier", *previous)
    candidate = replace(template, version=new, allow_rollback_from=allow_from)
    if isinstance(expected, str):
        with pytest.raises(RollbackRefused, match=expected):
            check_bundle_version(before, candidate)
    else:
        mark = check_bundle_version(before, candidate)
        assert (mark.current, mark.highest) == expected


def test_compare_versions_orders_dotted_integers_only() -> None:
    assert compare_versions("2026.11.0", "2026.2.5") == 1 and compare_versions("1.0", "1") == 0
    assert compare_versions("1.2", "1.10") == -1 and compare_versions("v1", "1") is None


def test_an_older_bundle_is_refused_and_the_box_keeps_its_version(box: Path) -> None:
    models_key = key(box, "models")
    assert load(box, bundle(box / "v2", "2026.12.0", models_key).path).manifest.version == "2026.12.0"
    old = bundle(box / "v1", "2026.11.0", models_key)
    with pytest.raises(RollbackRefused) as err:
        load(box, old.path)
    message = str(err.value)
    assert f"{old.path}: bundle tiny-classifier version 2026.11.0 is older than or equal to 2026.12.0" in message
    assert "iaflash-engines allow-rollback BUNDLE --from 2026.12.0" in message
    mark = TrustState(state_file(box)).bundle_mark("tiny-classifier")
    assert mark == BundleMark("tiny-classifier", "2026.12.0", "2026.12.0")
    assert refused(box) == {"rollback_bundle": 1}
    assert load(box, bundle(box / "v3", "2026.12.1", models_key).path).manifest.version == "2026.12.1"


def test_a_signed_rollback_is_accepted_and_the_bundle_it_left_cannot_come_back(box: Path) -> None:
    models_key = key(box, "models")
    bad = bundle(box / "v2", "2026.12.0", models_key)
    assert load(box, bad.path).manifest.version == "2026.12.0"
    old = bundle(box / "v1", "2026.11.0", models_key)
    result = CliRunner().invoke(
        engines_cli, ["allow-rollback", str(old.path), "--from", "2026.12.0", "--key", str(models_key)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((old.path / MANIFEST_FILE).read_text())["allow_rollback_from"] == "2026.12.0"
    assert load(box, old.path).manifest.version == "2026.11.0"  # the signed rollback
    state = TrustState(state_file(box))
    assert state.bundle_mark("tiny-classifier") == BundleMark("tiny-classifier", "2026.11.0", "2026.12.0")
    with pytest.raises(RollbackRefused, match=r"it runs 2026\.11\.0 after a signed rollback"):
        load(box, bad.path)
    assert load(box, old.path).manifest.version == "2026.11.0"  # a restart reloads what it runs
    assert load(box, bundle(box / "v3", "2026.12.1", models_key).path).manifest.version == "2026.12.1"
    with pytest.raises(RollbackRefused, match=r"a signed rollback for boxes that ran at most 2026\.12\.0"):
        load(box, old.path)  # the rollback cannot undo a later upgrade


def test_a_rollback_field_added_by_hand_breaks_the_signature(box: Path) -> None:
    models_key = key(box, "models")
    load(box, bundle(box / "v2", "2.0.0", models_key).path)
    old = bundle(box / "v1", "1.0.0", models_key)
    doc = json.loads((old.path / MANIFEST_FILE).read_text())
    (old.path / MANIFEST_FILE).write_text(json.dumps({**doc, "allow_rollback_from": "2.0.0"}, indent=2))
    with pytest.raises(SignatureError, match="signature does not match"):
        load(box, old.path)
    assert TrustState(state_file(box)).bundle_mark("tiny-classifier") == BundleMark("tiny-classifier", "2.0.0", "2.0.0")


def test_a_check_only_load_records_nothing(box: Path) -> None:
    load(box, bundle(box / "v1", "1.0.0", key(box, "models")).path, record=False)
    assert TrustState(state_file(box)).bundle_mark("tiny-classifier") is None


# ---------------------------------------------------------------- rollback: registry files


def test_an_older_snapshot_is_refused_even_once_the_cache_is_moved_aside(box: Path) -> None:
    registry_key = key(box, "registry")
    assert import_into(box, subset(box / "s42.jsonl.gz", 42, registry_key))[0] == 42
    old = subset(box / "s41.jsonl.gz", 41, registry_key, make="BMW")
    with pytest.raises(RollbackRefused, match=r"snapshot seq 41 \(dataset siv\) is older than the applied seq 42"):
        import_into(box, old)
    db = box / "state" / "registry.db"
    state = read_state(db)
    assert state is not None and state.seq == 42
    db.rename(box / "state" / "registry.db.corrupt")  # the documented fix for a corrupt cache
    with pytest.raises(RollbackRefused, match=r"older than the applied seq 42 .*fix: import the newest file"):
        import_into(box, old)  # the trust state's mark still holds
    assert import_into(box, subset(box / "s42b.jsonl.gz", 42, registry_key))[0] == 42  # a re-import of seq 42
    assert refused(box) == {"rollback_registry": 2}


def test_another_dataset_needs_a_higher_seq(box: Path) -> None:
    registry_key = key(box, "registry")
    import_into(box, subset(box / "a.jsonl.gz", 5, registry_key, dataset="siv-2026-11"))
    same_seq = subset(box / "b.jsonl.gz", 5, registry_key, dataset="siv-2026-12")
    with pytest.raises(RollbackRefused, match=r"dataset siv-2026-12 has seq 5, the seq this box applied for .*--seq 6"):
        import_into(box, same_seq)
    assert import_into(box, subset(box / "c.jsonl.gz", 6, registry_key, dataset="siv-2026-12"))[0] == 6
    assert TrustState(state_file(box)).mark("registry") is not None


def test_a_damaged_trust_state_is_refused_with_the_fix_never_forgotten(box: Path) -> None:
    state_file(box).write_text("{not json")
    with pytest.raises(SignatureError, match=r"trust-state\.json is not JSON .*fix: restore .* from a backup"):
        load(box, bundle(box / "v1", "1.0.0", key(box, "models")).path)


# ---------------------------------------------------------------- the agent's own load


def box_config(box: Path, bundle_dir: Path) -> Config:
    """The agent's config on ``box`` with its classifier at ``bundle_dir`` (the trust state beside the registry)."""
    return parse_config(
        {
            "model": {"bundle": str(bundle_dir), "backend": "onnxruntime", "threads": 1},
            "registry": {"db": str(box / "state" / "registry.db")},
            "outbox": {"db": str(box / "state" / "state.db")},
            "security": {"trust_dir": str(box / "trust")},
        }
    )


def test_the_agent_records_what_it_runs_and_then_refuses_an_older_bundle(box: Path) -> None:
    """load_model_set (what start and reload call) checks the version, records it once the set loaded,
    and refuses to go back: the set it runs is untouched by the refusal."""
    models_key = key(box, "models")

    newer = box_config(box, bundle(box / "v2", "2.0.0", models_key).path)
    assert newer.trust_state_file == state_file(box)
    running = load_model_set(newer)
    try:
        assert TrustState(state_file(box)).bundle_mark("tiny-classifier") == BundleMark(
            "tiny-classifier", "2.0.0", "2.0.0"
        )
        with pytest.raises(RollbackRefused, match=r"version 1\.0\.0 is older than or equal to 2\.0\.0"):
            load_model_set(box_config(box, bundle(box / "v1", "1.0.0", models_key).path))
        assert running.bundle.manifest.version == "2.0.0"
    finally:
        running.close()
    assert refused(box) == {"rollback_bundle": 1}


def test_a_reload_that_loads_but_never_swaps_records_nothing(box: Path) -> None:
    """A reload loads with record=False and records after its swap: a set loaded but not put in use
    (the agent stopping meanwhile) must not make the version still running a rollback at next start."""
    models_key = key(box, "models")

    old = box_config(box, bundle(box / "v1", "1.0.0", models_key).path)
    load_model_set(old).close()  # what the box runs: 1.0.0
    loaded = load_model_set(box_config(box, bundle(box / "v2", "2.0.0", models_key).path), record=False)
    loaded.close()  # never swapped in
    assert TrustState(state_file(box)).bundle_mark("tiny-classifier") == BundleMark("tiny-classifier", "1.0.0", "1.0.0")
    again = load_model_set(old)  # the next start with the link switched back: accepted
    try:
        assert again.bundle.manifest.version == "1.0.0"
        record_model_set(old, loaded)  # what a reload does once it swapped the set in
        assert TrustState(state_file(box)).bundle_mark("tiny-classifier") == BundleMark(
            "tiny-classifier", "2.0.0", "2.0.0"
        )
    finally:
        again.close()
