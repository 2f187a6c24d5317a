"""Per-site plate keys: central keeps one key per scope, builds each subset with one, boxes accept only theirs.

What a stolen box reveals is tested the way a thief would do it: enumerate the plate space, hash
each candidate with the key found on the box, and look the hash up in a registry cache.
"""

from __future__ import annotations

import csv
import hmac
import json
import sqlite3
import stat
from collections.abc import Iterator
from hashlib import sha256
from itertools import product
from pathlib import Path

import pytest
from click.testing import CliRunner

from iaflash.agent.errors import RegistryError
from iaflash.agent.registry.cache import Registry, import_subset
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.central.subsets import PlateKeys, registry_group

LETTERS = "CDEFGH"


def plate_space() -> Iterator[str]:
    """A slice of the SIV space (AB-001-CC .. AB-999-HH: 35,964 plates), small enough for a test."""
    for n, (a, b) in product(range(1, 1000), product(LETTERS, LETTERS)):
        yield f"AB-{n:03d}-{a}{b}"


SPACE = list(plate_space())
SITE_PLATES = {"site-a": SPACE[100:120], "site-b": SPACE[20000:20020]}


def write_csv(path: Path, plates: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["plate", "make", "model", "genre", "body"])
        w.writerows([p, "RENAULT", "CLIO", "VP", "CI"] for p in plates)
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(registry_group, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def keygen(key_dir: Path, scope: str, *extra: str) -> dict[str, str]:
    return json.loads(run("keygen", scope, "--key-dir", str(key_dir), "--json", *extra))  # type: ignore[no-any-return]  # a JSON object


def build(tmp_path: Path, key_dir: Path, scope: str, seq: int, plates: list[str], *extra: str) -> Path:
    out = tmp_path / f"{scope}-{seq:04d}.jsonl.gz"
    csv_file = write_csv(tmp_path / f"{scope}-{seq}.csv", plates)
    run("build", "--csv", str(csv_file), "--key-dir", str(key_dir), "--scope", scope,
        "--dataset-id", f"siv-{scope}", "--seq", str(seq), "--out", str(out), *extra)  # fmt: skip
    return out


def reverse(cache: Path, key: bytes) -> set[str]:
    """What a thief holding ``key`` learns from ``cache``: every plate of the space whose HMAC is in it."""
    with sqlite3.connect(cache) as db:
        stored = {bytes(r[0]) for r in db.execute("SELECT plate_key FROM vehicles")}
    return {p for p in SPACE if hmac.new(key, p.encode("ascii"), sha256).digest() in stored}


def test_keygen_writes_one_0600_key_per_scope_and_never_overwrites_one_without_rotate(tmp_path: Path) -> None:
    key_dir = tmp_path / "plate-keys"
    a, b = keygen(key_dir, "site-a"), keygen(key_dir, "site-b")
    assert a["key_id"] != b["key_id"] and a["retired"] is None
    for doc in (a, b):
        path = Path(doc["file"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and key_id(load_hmac_key(path.read_bytes())) == doc["key_id"]
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    again = CliRunner().invoke(registry_group, ["keygen", "site-a", "--key-dir", str(key_dir)])
    assert again.exit_code == 1 and f"already has key {a['key_id']}; fix: pass --rotate" in again.output
    assert key_id(PlateKeys(key_dir).load("site-a")) == a["key_id"]  # unchanged
    missing = CliRunner().invoke(registry_group, ["build", "--csv", str(write_csv(tmp_path / "x.csv", [])),
                                 "--key-dir", str(key_dir), "--scope", "site-zz", "--dataset-id", "d",
                                 "--seq", "1", "--out", str(tmp_path / "x.jsonl.gz")])  # fmt: skip
    assert (
        missing.exit_code == 1
        and "no plate key for scope site-zz; fix: iaflash-central registry keygen" in missing.output
    )
    bad = CliRunner().invoke(registry_group, ["keygen", "../etc", "--key-dir", str(key_dir)])
    assert bad.exit_code == 1 and "is not a name of 1-64 letters" in bad.output


def test_a_stolen_box_s_key_reverses_its_own_subset_and_nothing_of_another_site_s(tmp_path: Path) -> None:
    """The issue's attack (enumerate the plate space under the box's key), on a slice of the space."""
    key_dir = tmp_path / "plate-keys"
    caches = {}
    for scope, plates in SITE_PLATES.items():
        keygen(key_dir, scope)
        caches[scope] = tmp_path / f"{scope}.db"
        import_subset(caches[scope], build(tmp_path, key_dir, scope, 1, plates),
                      expected_key_id=key_id(PlateKeys(key_dir).load(scope)))  # fmt: skip
    key_a, key_b = PlateKeys(key_dir).load("site-a"), PlateKeys(key_dir).load("site-b")
    assert reverse(caches["site-a"], key_a) == set(SITE_PLATES["site-a"])  # a box reveals its own subset ...
    assert reverse(caches["site-b"], key_a) == set()  # ... and, with its key, nothing of another site's
    assert reverse(caches["site-b"], key_b) == set(SITE_PLATES["site-b"])  # (control: B's key does reverse B)


def test_rotation_a_box_accepts_only_subsets_of_the_key_it_holds(tmp_path: Path) -> None:
    """The rule: one key per box; a subset whose key id is not the box's key id is refused, cache untouched."""
    key_dir = tmp_path / "plate-keys"
    old_id = keygen(key_dir, "site-a")["key_id"]
    db = tmp_path / "box.db"
    import_subset(db, build(tmp_path, key_dir, "site-a", 1, SITE_PLATES["site-a"]), expected_key_id=old_id)
    old_key = PlateKeys(key_dir).load("site-a")

    rotated = keygen(key_dir, "site-a", "--rotate")
    new_id = rotated["key_id"]
    assert rotated["retired"] == old_id and (key_dir / "retired" / f"site-a.{old_id}.key").is_file()
    new_snapshot = build(tmp_path, key_dir, "site-a", 2, SITE_PLATES["site-a"])
    with pytest.raises(RegistryError, match=f"hashed with key {new_id}, this box's key is {old_id}"):
        import_subset(db, new_snapshot, expected_key_id=old_id)  # the box does not hold the new key yet
    with Registry(db, old_key) as reg:
        state = reg.state()
        assert state is not None and (state.seq, state.key_id) == (1, old_id)  # untouched: still matches
        assert reg.lookup(SITE_PLATES["site-a"][0]) is not None

    new_key = PlateKeys(key_dir).load("site-a")  # the box is given the new key, then the new snapshot
    state = import_subset(db, new_snapshot, expected_key_id=new_id)
    assert (state.seq, state.key_id) == (2, new_id)
    with Registry(db, new_key) as reg:
        assert reg.lookup(SITE_PLATES["site-a"][0]) is not None
    with Registry(db, old_key) as reg:
        assert reg.lookup(SITE_PLATES["site-a"][0]) is None  # the old key no longer finds anything

    old_delta = tmp_path / "old-delta.jsonl.gz"
    run("build", "--csv", str(write_csv(tmp_path / "d.csv", SPACE[:1])),
        "--key-file", str(key_dir / "retired" / f"site-a.{old_id}.key"), "--dataset-id", "siv-site-a",
        "--seq", "3", "--kind", "delta", "--base-seq", "2", "--out", str(old_delta))  # fmt: skip
    with pytest.raises(RegistryError, match=f"hashed with key {old_id}, this box's key is {new_id}"):
        import_subset(db, old_delta, expected_key_id=new_id)
    assert reverse(db, old_key) == set()


def test_a_key_file_that_is_not_the_key_the_config_names_is_refused(tmp_path: Path) -> None:
    key_dir = tmp_path / "plate-keys"
    a, b = keygen(key_dir, "site-a"), keygen(key_dir, "site-b")
    raw_b = Path(b["file"]).read_bytes()
    assert key_id(load_hmac_key(raw_b, b["key_id"])) == b["key_id"]
    with pytest.raises(RegistryError) as err:
        load_hmac_key(raw_b, a["key_id"])  # box A given site B's key file
    assert f"HMAC key has id {b['key_id']}, but the config names {a['key_id']}" in str(err.value)
    assert "fix: install this site's current key" in str(err.value)
    assert raw_b.decode().strip() not in str(err.value)  # the key itself is never shown


def test_the_box_refuses_to_import_with_a_key_file_its_config_does_not_name(tmp_path: Path) -> None:
    """``iaflash-provision registry import`` (the technician's import) checks ``[registry] hmac_key_id``."""
    from iaflash.provisioning.cli import cli

    key_dir = tmp_path / "plate-keys"
    a, b = keygen(key_dir, "site-a"), keygen(key_dir, "site-b")
    snapshot = build(tmp_path, key_dir, "site-b", 1, SITE_PLATES["site-b"])
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[registry]\ndb = "{tmp_path / "box.db"}"\nhmac_key_file = "{b["file"]}"\nhmac_key_id = "{a["key_id"]}"\n'
        "[security]\nallow_unsigned = true\n"
    )
    result = CliRunner().invoke(cli, ["registry", "import", str(snapshot), "--config", str(config)])
    assert (
        result.exit_code == 1 and f"HMAC key has id {b['key_id']}, but the config names {a['key_id']}" in result.output
    )
    assert not (tmp_path / "box.db").exists() or Registry(tmp_path / "box.db", b"k" * 32).state() is None
