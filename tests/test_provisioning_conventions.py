"""CLI conventions of ``iaflash-provision``: a JSON error document with --json, an idempotent delta re-import."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from provisioning_box import CentralFiles, central_files

from iaflash.agent.registry.cache import import_subset, read_state, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.engines.signing import sign_file
from iaflash.provisioning.cli import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> CentralFiles:
    return central_files(tmp_path_factory.mktemp("central"))


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def box(files: CentralFiles, tmp_path: Path) -> Path:
    bundle = files.build(tmp_path / "bundle", "mqtt://127.0.0.1:1")
    result = CliRunner().invoke(cli, ["enrol", str(bundle), "--root", str(tmp_path / "box"), "--broker-timeout", "0.2"])
    assert result.exit_code == 0, result.output
    return tmp_path / "box/etc/iaflash/agent.toml"


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["registry", "import", "/nonexistent/siv.jsonl.gz"], "registry.hmac_key_file"),  # no key on this machine
        (["registry", "status", "--db", "/nonexistent/registry.db"], "/nonexistent/registry.db: no registry cache"),
        (["enrol", "/nonexistent/bundle.tar.gz"], "/nonexistent/bundle.tar.gz: no such folder or archive"),
        (["tail", "--file", "/nonexistent/agent.log", "--no-follow"], "/nonexistent/agent.log: cannot read"),
    ],
    ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else "",
)
def test_a_failure_with_json_prints_the_error_document_on_stdout(args: list[str], where: str) -> None:
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert (
        doc["ok"] is False
        and doc["exit_code"] == 1
        and doc["command"] == " ".join(args[:2] if args[0] == "registry" else args[:1])
    )
    assert where in doc["error"] and doc["fix"]  # what and where, and how to fix it
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.output


def test_without_json_a_failure_prints_nothing_on_stdout() -> None:
    result = CliRunner().invoke(cli, ["registry", "import", "/nonexistent/siv.jsonl.gz"])
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.startswith("error: ")


def test_re_importing_the_last_delta_says_already_at_seq_and_changes_nothing(
    files: CentralFiles, box: Path, tmp_path: Path
) -> None:
    delta = tmp_path / "siv-0002.jsonl.gz"
    records = records_from_plates(files.key, [("GH-789-JK", "FIAT", "500", "VP", "CI")])
    write_subset(
        delta, kind="delta", dataset_id="siv-A13", seq=2, base_seq=1, key_id=key_id(files.key), records=records
    )
    sign_file(delta, files.publisher, signer="registry-publisher")
    first = CliRunner().invoke(cli, ["registry", "import", str(delta), "--config", str(box)])
    assert first.exit_code == 0, first.output
    db = box.parent.parent.parent / "var/lib/iaflash/registry.db"
    before = read_state(db)
    again = CliRunner().invoke(cli, ["registry", "import", str(delta), "--config", str(box)])
    assert again.exit_code == 0, again.output
    assert (
        "already at seq 2: siv-0002.jsonl.gz (delta seq 2 of siv-A13) was applied before; nothing changed"
        in again.output
    )
    doc = json.loads(CliRunner().invoke(cli, ["registry", "import", str(delta), "--config", str(box), "--json"]).stdout)
    assert doc["already_applied"] is True and doc["state"]["seq"] == 2 and doc["records"] == 0
    assert read_state(db) == before  # not even imported_at moved


def test_an_applied_delta_is_verified_before_it_is_called_already_applied(
    files: CentralFiles, box: Path, tmp_path: Path
) -> None:
    """A copy of the applied delta whose signature no longer holds is refused, never "already at seq"."""
    delta = tmp_path / "siv-0002.jsonl.gz"
    records = records_from_plates(files.key, [("GH-789-JK", "FIAT", "500", "VP", "CI")])
    write_subset(
        delta, kind="delta", dataset_id="siv-A13", seq=2, base_seq=1, key_id=key_id(files.key), records=records
    )
    sign_file(delta, files.publisher, signer="registry-publisher")
    assert CliRunner().invoke(cli, ["registry", "import", str(delta), "--config", str(box)]).exit_code == 0
    forged = tmp_path / "forged" / delta.name
    forged.parent.mkdir()
    other = records_from_plates(files.key, [("ZZ-999-ZZ", "FIAT", "PANDA", "VP", "CI")])
    write_subset(forged, kind="delta", dataset_id="siv-A13", seq=2, base_seq=1, key_id=key_id(files.key), records=other)
    (forged.parent / f"{delta.name}.sig").write_bytes((tmp_path / f"{delta.name}.sig").read_bytes())
    result = CliRunner().invoke(cli, ["registry", "import", str(forged), "--config", str(box)])
    assert result.exit_code == 1 and "already at seq" not in result.output, result.output
    assert "signature" in result.output.lower() or "sha256" in result.output.lower(), result.output


def test_the_cache_itself_says_already_at_seq_instead_of_gap(files: CentralFiles, tmp_path: Path) -> None:
    """Any other caller of the import (the registry_sync command) gets the same words, not "request a snapshot"."""
    from iaflash.agent.errors import RegistryError

    db, kid = tmp_path / "registry.db", key_id(files.key)
    snap = tmp_path / "snap.jsonl.gz"
    write_subset(snap, kind="snapshot", dataset_id="d", seq=1, key_id=kid, records=records_from_plates(files.key, []))
    import_subset(db, snap, expected_key_id=kid)
    delta = tmp_path / "delta.jsonl.gz"
    write_subset(delta, kind="delta", dataset_id="d", seq=2, base_seq=1, key_id=kid, records=[])
    import_subset(db, delta, expected_key_id=kid)
    with pytest.raises(RegistryError, match=r"already at seq 2: this delta \(seq 2\) was applied before") as err:
        import_subset(db, delta, expected_key_id=kid)
    assert "request a snapshot" not in str(err.value)


def test_doctor_says_which_backend_the_box_will_really_use_and_why(box: Path) -> None:
    result = CliRunner().invoke(cli, ["doctor", "--config", str(box), "--json", "--broker-timeout", "0.2"])
    (backends,) = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "backends"]
    assert backends["status"] == "ok"
    assert backends["finding"].startswith(
        "the agent will use ONNX Runtime on the CPU, because model.backend = auto and TensorRT cannot run here: "
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="judging another user's access needs root")
def test_doctor_warns_when_the_service_user_cannot_open_the_gpu(tmp_path: Path) -> None:
    """A Jetson whose service user is not in group video would quietly run on the CPU: say it, with the fix."""
    from iaflash.provisioning.doctor.checks import gpu_access_problem

    node = tmp_path / "nvmap"  # stands for /dev/nvmap: root:root 0660
    node.touch()
    node.chmod(0o660)
    problem = gpu_access_problem("nobody", (str(node),))
    assert problem == f"user nobody cannot open {node} (group root, and nobody is not in it)"
    node.chmod(0o666)
    assert gpu_access_problem("nobody", (str(node),)) is None
    assert gpu_access_problem("nobody", (str(tmp_path / "absent"),)) is None  # no GPU here: nothing to say
