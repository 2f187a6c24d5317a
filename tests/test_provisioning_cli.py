"""``iaflash-provision registry ...`` and the central ``registry build`` command, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from iaflash.agent.registry.cache import Registry, import_subset, records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id
from iaflash.agent.registry.record import RegistryRecord
from iaflash.central.subsets import registry_group
from iaflash.engines.signing import generate_keypair, sign_file
from iaflash.provisioning.cli import cli

KEY = bytes(range(32))
KID = key_id(KEY)
FLEET = [("AB-123-CD", "RENAULT", "CLIO", "VP", "CI"), ("1234 AB 75", "CITROEN", "2CV", "VP", None)]
PROVISION = Path(sys.executable).parent / "iaflash-provision"


_OPENED: list[Registry] = []


def opened(path: Path, key: bytes = KEY) -> Registry:
    """A Registry closed at the end of the test (see _close_registries)."""
    reg = Registry(path, key)
    _OPENED.append(reg)
    return reg


@pytest.fixture(autouse=True)
def _close_registries() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "hmac.key"
    path.write_text(KEY.hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def publisher(tmp_path: Path) -> Path:
    """Central's signing key (keys/publisher.key); its .pub is copied into the box's trust store."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "trust").mkdir()
    key, pub = generate_keypair(tmp_path / "keys" / "publisher")
    (tmp_path / "trust" / "publisher.pub").write_bytes(pub.read_bytes())
    return key


@pytest.fixture
def config(tmp_path: Path, key_file: Path, publisher: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[registry]\ndb = "{tmp_path / "registry.db"}"\nhmac_key_file = "{key_file}"\n'
        f'max_age_hours = 48\n[security]\ntrust_dir = "{tmp_path / "trust"}"\n'
    )
    return path


@pytest.fixture
def snap(tmp_path: Path, publisher: Path) -> Path:
    """A snapshot signed by the publisher (snap.jsonl.gz.sig beside it)."""
    path = tmp_path / "snap.jsonl.gz"
    write_subset(path, dataset_id="siv-test", seq=1, key_id=KID, records=records_from_plates(KEY, FLEET))
    sign_file(path, publisher)
    return path


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("path", list(commands(cli)), ids=lambda p: " ".join(p) or "(root)")
def test_every_provision_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "-h"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert "iaflash-provision" in result.output


@pytest.mark.parametrize("path", list(commands(registry_group)), ids=lambda p: " ".join(p) or "(group)")
def test_every_central_registry_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(registry_group, [*path, "-h"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output


def test_import_json_document_on_stdout(config: Path, snap: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["registry", "import", str(snap), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["command"] == "registry import"
    assert doc["file"] == str(snap) and doc["db"] == str(tmp_path / "registry.db")
    assert doc["records"] == 2 and doc["seconds"] >= 0 and doc["records_per_s"] >= 0
    assert {k: doc["state"][k] for k in ("dataset_id", "seq", "key_id", "kind", "count")} == {
        "dataset_id": "siv-test",
        "seq": 1,
        "key_id": KID,
        "kind": "snapshot",
        "count": 2,
    }
    assert "importing snap.jsonl.gz: 2/2 records" in result.stderr
    assert doc["signed_by"] == "publisher"
    assert opened(tmp_path / "registry.db").lookup("ab 123 cd") == RegistryRecord("RENAULT", "CLIO", "VP", "CI")


def test_import_text_summary_and_key_file_option(snap: Path, key_file: Path, config: Path, tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    result = CliRunner().invoke(
        cli, ["registry", "import", str(snap), "--db", str(db), "--key-file", str(key_file), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert "imported snapshot siv-test seq 1: 2 records" in result.stdout
    assert "records/s" in result.stdout


def test_status_json_reports_dataset_seq_key_age_and_count(config: Path, snap: Path, tmp_path: Path) -> None:
    import_subset(tmp_path / "registry.db", snap, expected_key_id=KID)
    result = CliRunner().invoke(cli, ["registry", "status", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["state"]["seq"] == 1 and doc["state"]["count"] == 2 and doc["state"]["key_id"] == KID
    assert doc["max_age_hours"] == 48 and doc["stale"] is False and 0 <= doc["age_hours"] < 1
    text = CliRunner().invoke(cli, ["registry", "status", "--config", str(config)])
    assert "dataset siv-test seq 1" in text.stdout and f"key id {KID}" in text.stdout


def test_status_of_a_corrupt_cache_exits_1_with_the_fix_re_import_a_snapshot(tmp_path: Path, snap: Path) -> None:
    """It used to say all was well while the agent crash-looped on the same file."""
    db = tmp_path / "registry.db"
    import_subset(db, snap, expected_key_id=KID)
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * (size - 4096))
    result = CliRunner().invoke(cli, ["registry", "status", "--db", str(db)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {db}: corrupt") and "re-import a snapshot" in result.stderr


def test_status_of_a_missing_cache_exits_1_naming_the_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["registry", "status", "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'none.db'}: no registry cache here; fix:")
    assert result.stdout == ""


@pytest.mark.parametrize("case", ["missing", "not-gzip", "key-mismatch", "unsigned", "tampered", "untrusted"])
def test_import_errors_exit_1_with_a_message_naming_the_file(
    case: str, config: Path, publisher: Path, tmp_path: Path
) -> None:
    file = tmp_path / f"{case}.jsonl.gz"
    if case != "missing":
        other = bytes(range(50, 82)) if case == "key-mismatch" else KEY
        write_subset(file, dataset_id="x", seq=1, key_id=key_id(other), records=records_from_plates(other, FLEET))
    if case == "not-gzip":
        file.write_text("hello\n")
    if case == "untrusted":
        publisher = generate_keypair(tmp_path / "keys" / "stranger")[0]
    if case not in ("missing", "unsigned"):
        sign_file(file, publisher)
    if case == "tampered":
        data = file.read_bytes()
        file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = CliRunner().invoke(cli, ["registry", "import", str(file), "--config", str(config), "--json"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {file}")
    assert "fix:" in result.stderr or case == "untrusted"  # engines' message: "add the publisher's .pub ..."
    doc = json.loads(result.stdout)  # --json: the error document on stdout (provisioning/output.py)
    assert (doc["ok"], doc["command"], doc["exit_code"]) == (False, "registry import", 1) and str(file) in doc["error"]
    assert not (tmp_path / "registry.db").exists() or opened(tmp_path / "registry.db").state() is None


def test_unsigned_file_is_imported_when_the_config_allows_it(snap: Path, config: Path, tmp_path: Path) -> None:
    (tmp_path / "snap.jsonl.gz.sig").unlink()
    refused = CliRunner().invoke(cli, ["registry", "import", str(snap), "--config", str(config)])
    assert refused.exit_code == 1
    assert f"error: {snap}: not signed" in refused.stderr and "allow_unsigned" in refused.stderr
    config.write_text(config.read_text() + "allow_unsigned = true\n")
    result = CliRunner().invoke(cli, ["registry", "import", str(snap), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["signed_by"], doc["state"]["seq"]) == (None, 1)


def test_key_file_readable_by_others_is_refused(snap: Path, key_file: Path, tmp_path: Path) -> None:
    key_file.chmod(0o644)
    result = CliRunner().invoke(
        cli, ["registry", "import", str(snap), "--db", str(tmp_path / "r.db"), "--key-file", str(key_file)]
    )
    assert result.exit_code == 1
    assert f"chmod 600 {key_file}" in result.stderr


def test_missing_configured_key_exits_1_with_the_config_key(snap: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[registry]\ndb = "{tmp_path / "r.db"}"\nhmac_key_file = "{tmp_path / "absent.key"}"\n')
    result = CliRunner().invoke(cli, ["registry", "import", str(snap), "--config", str(cfg)])
    assert result.exit_code == 1
    assert "registry.hmac_key_file" in result.stderr


def test_usage_error_exits_2() -> None:
    assert CliRunner().invoke(cli, ["registry", "import"]).exit_code == 2
    assert CliRunner().invoke(cli, ["registry", "status", "--bogus"]).exit_code == 2


def test_installed_entry_point_imports_with_plain_progress_on_stderr(config: Path, snap: Path) -> None:
    proc = subprocess.run(
        [str(PROVISION), "registry", "import", str(snap), "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"]["seq"] == 1
    assert "importing snap.jsonl.gz: 2/2 records" in proc.stderr
    bad = subprocess.run(
        [str(PROVISION), "registry", "import", "/nonexistent/x.gz", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "error: /nonexistent/x.gz: no such file" in bad.stderr


def test_central_build_makes_files_the_box_imports(
    tmp_path: Path, key_file: Path, config: Path, publisher: Path
) -> None:
    csv1 = tmp_path / "siv.csv"
    csv1.write_text("plate,make,model,genre,body\nab 123 cd,RENAULT,CLIO,VP,CI\n1234 AB 75,CITROEN,2CV,VP,\n")
    csv2 = tmp_path / "changes.csv"
    csv2.write_text("plate,make,model,genre,body,op\nAB-123-CD,,,,,delete\nEF-456-GH,FIAT,500,VP,CI,upsert\n")
    out1, out2 = tmp_path / "s1.jsonl.gz", tmp_path / "s2.jsonl.gz"
    base = ["build", "--key-file", str(key_file), "--dataset-id", "siv-test"]
    r1 = CliRunner().invoke(registry_group, [*base, "--csv", str(csv1), "--seq", "1", "--out", str(out1)])
    r2 = CliRunner().invoke(
        registry_group,
        [*base, "--csv", str(csv2), "--seq", "2", "--out", str(out2), "--kind", "delta", "--base-seq", "1"],
    )
    assert (r1.exit_code, r2.exit_code) == (0, 0), r1.output + r2.output
    for out in (out1, out2):
        sign_file(out, publisher)  # central: iaflash-engines sign OUT --key keys/publisher.key
        assert CliRunner().invoke(cli, ["registry", "import", str(out), "--config", str(config)]).exit_code == 0
    reg = opened(tmp_path / "registry.db")
    assert reg.lookup("AB-123-CD") is None
    assert reg.lookup("ef456gh") == RegistryRecord("FIAT", "500", "VP", "CI")
    assert reg.lookup("1234-AB-75") == RegistryRecord("CITROEN", "2CV", "VP", None)
    assert reg.state().seq == 2  # type: ignore[union-attr]  # two imports above


def test_central_build_refuses_a_bad_plate_without_echoing_it(tmp_path: Path, key_file: Path) -> None:
    csv = tmp_path / "siv.csv"
    csv.write_text("plate,make,model,genre,body\nAB-123-CD,RENAULT,CLIO,VP,CI\nQO-999-XY,FIAT,500,,\n")
    result = CliRunner().invoke(
        registry_group,
        [
            "build",
            "--csv",
            str(csv),
            "--key-file",
            str(key_file),
            "--dataset-id",
            "d",
            "--seq",
            "1",
            "--out",
            str(tmp_path / "o.gz"),
        ],
    )
    assert result.exit_code == 1
    assert f"{csv}:3:" in result.stderr
    assert "QO-999-XY" not in result.output
    assert not (tmp_path / "o.gz").exists()


def test_central_build_delta_needs_base_seq(tmp_path: Path, key_file: Path) -> None:
    result = CliRunner().invoke(
        registry_group,
        [
            "build",
            "--csv",
            "x.csv",
            "--key-file",
            str(key_file),
            "--dataset-id",
            "d",
            "--seq",
            "2",
            "--kind",
            "delta",
            "--out",
            str(tmp_path / "o.gz"),
        ],
    )
    assert result.exit_code == 2
