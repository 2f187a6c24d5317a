"""engines.signing and engines.keys: key files, detached Ed25519 signatures, the trust store, signed bundles.

Every test uses real key files, real bundles (tiny ONNX models) and real signature files in tmp_path.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import re
import stat
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner
from onnx_builders import make_bundle

from iaflash.engines.bundle import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, load_bundle
from iaflash.engines.cli import main as engines_cli
from iaflash.engines.errors import BundleError, EngineError, SignatureError, UntrustedKey
from iaflash.engines.prehash import digest_bytes
from iaflash.engines.signing import (
    WHOLE_FILE_LIMIT,
    TrustStore,
    bundle_verifier,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_trusted_bundle,
    open_trusted_file,
    public_key_bytes,
    read_trusted_file,
    read_verified_file,
    sign_bundle,
    sign_bytes,
    sign_file,
    verify_bundle,
    verify_file,
)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A keys/ directory holding publisher.key/.pub and stranger.key/.pub."""
    root = tmp_path / "keys"
    root.mkdir()
    generate_keypair(root / "publisher")
    generate_keypair(root / "stranger")
    return root


@pytest.fixture
def trust(tmp_path: Path, keys: Path) -> Path:
    """A trust store that holds only the publisher's public key, trusted for bundles and registry files."""
    root = tmp_path / "trust"
    for role in ("models", "registry"):
        (root / role).mkdir(parents=True)
        (root / role / "publisher.pub").write_bytes((keys / "publisher.pub").read_bytes())
    return root


# ---------------------------------------------------------------- keys


def test_keypair_round_trip_files_modes_and_key_id(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "acme")
    assert (key_path.name, pub_path.name) == ("acme.key", "acme.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    private, public = load_private_key(key_path), load_public_key(pub_path)
    raw = public_key_bytes(public)
    assert raw == public_key_bytes(private.public_key())
    assert pub_path.read_text().split()[0] == raw.hex()
    assert len(key_id(raw)) == 16 and key_id(raw) in pub_path.read_text()


def test_generate_keypair_never_overwrites_an_existing_key(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path / "acme")
    before = key_path.read_bytes()
    with pytest.raises(SignatureError, match=r"acme\.key already exists"):
        generate_keypair(tmp_path / "acme")
    assert key_path.read_bytes() == before


def test_private_key_readable_by_others_is_refused(keys: Path) -> None:
    (keys / "publisher.key").chmod(0o644)
    with pytest.raises(SignatureError, match=r"readable by group/others.*chmod 600"):
        load_private_key(keys / "publisher.key")


def test_public_key_given_as_private_key_says_so(keys: Path) -> None:
    with pytest.raises(SignatureError, match=r"publisher\.pub is a public key; fix: sign with the matching \.key"):
        load_private_key(keys / "publisher.pub")


def test_private_key_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.key"
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(SignatureError, match="is not a PEM private key"):
        load_private_key(path)


def test_public_key_file_may_carry_comments(tmp_path: Path, keys: Path) -> None:
    raw_hex = (keys / "publisher.pub").read_text().split()[0]
    path = tmp_path / "commented.pub"
    path.write_text(f"# the model publisher\n{raw_hex.upper()}   # acme, 2026\n\n")
    assert public_key_bytes(load_public_key(path)).hex() == raw_hex


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("abcd\n", "is not 64 hex characters"),
        ("zz" * 32 + "\n", "is not 64 hex characters"),
        ("# only a comment\n", "expected one key line, found 0"),
        ("00" * 32 + "\n" + "11" * 32 + "\n", "expected one key line, found 2"),
    ],
)
def test_malformed_public_key_names_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.pub"
    path.write_text(content)
    with pytest.raises(SignatureError, match=rf"public key {path}: .*{problem}"):
        load_public_key(path)


# ---------------------------------------------------------------- bytes and trust store


def test_sign_and_verify_bytes_returns_the_trust_store_name(keys: Path, trust: Path) -> None:
    doc = sign_bytes(b"payload", load_private_key(keys / "publisher.key"), signer="claimed-name")
    assert doc["format"] == "iaflash-signature" and doc["version"] == 1 and doc["algorithm"] == "ed25519"
    assert len(base64.b64decode(doc["signature"])) == 64
    store = TrustStore.from_dir(trust)
    assert store.names == ("publisher",)
    assert store.key_ids == (doc["key_id"],)
    assert store.verify(b"payload", doc, role="models") == "publisher"  # the store's name, not the document's claim
    assert store.check(b"payload", doc, role="models").signer == "claimed-name"


def test_signature_document_survives_a_json_round_trip(keys: Path, trust: Path) -> None:
    doc = json.loads(json.dumps(sign_bytes(b"x", load_private_key(keys / "publisher.key"), "p")))
    assert TrustStore.from_dir(trust).verify(b"x", doc, role="models") == "publisher"


def test_tampered_data_is_refused(keys: Path, trust: Path) -> None:
    doc = sign_bytes(b"payload", load_private_key(keys / "publisher.key"), "publisher")
    with pytest.raises(SignatureError, match="signature does not match: the data was altered after signing") as err:
        TrustStore.from_dir(trust).verify(b"payl0ad", doc, role="models")
    assert not isinstance(err.value, UntrustedKey)


def test_key_id_swapped_to_another_trusted_key_does_not_verify(tmp_path: Path, keys: Path, trust: Path) -> None:
    (trust / "models" / "stranger.pub").write_bytes((keys / "stranger.pub").read_bytes())
    doc = sign_bytes(b"payload", load_private_key(keys / "publisher.key"), "publisher")
    doc["key_id"] = key_id(public_key_bytes(load_public_key(keys / "stranger.pub")))
    with pytest.raises(SignatureError, match="signature does not match"):
        TrustStore.from_dir(trust).verify(b"payload", doc, role="models")


def test_untrusted_key_is_refused_naming_its_id_and_the_trusted_ones(keys: Path, trust: Path) -> None:
    doc = sign_bytes(b"payload", load_private_key(keys / "stranger.key"), "stranger")
    with pytest.raises(UntrustedKey) as err:
        TrustStore.from_dir(trust).verify(b"payload", doc, role="models")
    message = str(err.value)
    assert f"signed by key id {doc['key_id']} which is not in the trust store {trust}" in message
    assert "(trusted for models: publisher)" in message
    assert f"add the publisher's .pub to {trust / 'models'}" in message


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"format": "other"}, "field 'format' is 'other'"),
        ({"version": 3}, "field 'version' is 3, this agent reads 1 or 2"),
        ({"version": True}, "field 'version' is True"),
        ({"algorithm": "rsa"}, "field 'algorithm' is 'rsa'"),
        ({"signature": "!!not base64!!"}, "'signature' is not base64"),
        ({"signature": base64.b64encode(b"short").decode()}, "'signature' is 5 bytes, Ed25519 gives 64"),
        ({"key_id": 42}, "field 'key_id' must be a non-empty string"),
        ({"signer": ""}, "field 'signer' must be a non-empty string"),
        ({"signer": "evil\nFAKE LOG LINE"}, "'signer' must be printable"),
        ({"key_id": "not-hex\n"}, "'key_id' .* is not 16 hex"),
        ({"signed_at": "yesterday"}, "'signed_at' is not ISO 8601"),
    ],
)
def test_malformed_signature_document_is_refused(
    keys: Path, trust: Path, change: dict[str, object], problem: str
) -> None:
    doc = {**sign_bytes(b"payload", load_private_key(keys / "publisher.key"), "publisher"), **change}
    with pytest.raises(SignatureError, match=f"malformed signature .*{problem}"):
        TrustStore.from_dir(trust).verify(b"payload", doc, role="models")


def test_trust_store_with_a_bad_pub_file_names_it(trust: Path) -> None:
    (trust / "models" / "broken.pub").write_text("hello\n")
    with pytest.raises(SignatureError, match=rf"public key {trust / 'models' / 'broken.pub'}:"):
        TrustStore.from_dir(trust)


def test_missing_trust_store_directory_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match=r"trust store .*nowhere is not a directory; fix: create it"):
        TrustStore.from_dir(tmp_path / "nowhere")


def test_trust_store_ignores_files_that_are_not_pub(trust: Path) -> None:
    (trust / "README").write_text("copy publishers' .pub files here\n")
    assert TrustStore.from_dir(trust).names == ("publisher",)


# ---------------------------------------------------------------- files (registry subsets)


def _subset(tmp_path: Path) -> Path:
    path = tmp_path / "subset-000042.jsonl.gz"
    lines = [{"type": "snapshot", "seq": 42}, {"plate_key": "ab" * 32, "make": "RENAULT", "op": "upsert"}]
    path.write_bytes(gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode()))
    return path


def test_registry_file_signed_and_verified(tmp_path: Path, keys: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    sig = sign_file(subset, keys / "publisher.key")
    assert sig == tmp_path / "subset-000042.jsonl.gz.sig"
    assert json.loads(sig.read_text())["signer"] == "publisher"
    assert verify_file(subset, TrustStore.from_dir(trust), role="registry") == "publisher"
    data, verified = read_verified_file(subset, TrustStore.from_dir(trust), role="registry")
    assert data == subset.read_bytes() and verified.key_id == json.loads(sig.read_text())["key_id"]


def test_registry_file_altered_after_signing_is_refused(tmp_path: Path, keys: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    sign_file(subset, keys / "publisher.key", signer="central")
    subset.write_bytes(subset.read_bytes() + b"\x00")
    with pytest.raises(SignatureError, match=rf"{subset}: signature does not match"):
        verify_file(subset, TrustStore.from_dir(trust), role="registry")


def test_unsigned_registry_file_says_how_to_sign_it(tmp_path: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    with pytest.raises(
        SignatureError,
        match=r"not signed: .*subset-000042\.jsonl\.gz\.sig is missing; "
        r"fix: sign it with iaflash-engines sign",
    ):
        verify_file(subset, TrustStore.from_dir(trust), role="registry")


def test_signature_file_that_is_not_json_is_refused(tmp_path: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    (tmp_path / "subset-000042.jsonl.gz.sig").write_text("-----BEGIN SIGNATURE-----\n")
    with pytest.raises(SignatureError, match=r"malformed signature .*\.sig: not JSON"):
        verify_file(subset, TrustStore.from_dir(trust), role="registry")


# ---------------------------------------------------------------- bundles


def test_signed_bundle_loads_and_reports_its_signer(tmp_path: Path, keys: Path, trust: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    sig = sign_bundle(bundle.path, keys / "publisher.key")
    assert sig == bundle.path / SIGNATURE_FILE
    loaded, verified = verify_bundle(bundle.path, TrustStore.from_dir(trust))
    assert loaded.manifest == bundle.manifest
    assert verified is not None and verified.name == "publisher"
    assert load_trusted_bundle(bundle.path, trust, allow_unsigned=False).model_sha256 == bundle.model_sha256


def test_manifest_altered_after_signing_is_refused_by_the_signature(tmp_path: Path, keys: Path, trust: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    sign_bundle(bundle.path, keys / "publisher.key")
    manifest = bundle.path / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"temperature": 1.0', '"temperature": 9.0'))
    with pytest.raises(SignatureError, match=rf"{manifest}: signature does not match"):
        load_trusted_bundle(bundle.path, trust, allow_unsigned=False)
    with pytest.raises(SignatureError, match="signature does not match"):  # allow_unsigned never excuses it
        load_trusted_bundle(bundle.path, trust, allow_unsigned=True)


def test_model_altered_after_signing_fails_its_sha256(tmp_path: Path, keys: Path, trust: Path) -> None:
    """The signature over the manifest still checks out; the manifest's sha256 catches model.onnx."""
    bundle = make_bundle(tmp_path / "b")
    sign_bundle(bundle.path, keys / "publisher.key")
    model = bundle.path / MODEL_FILE
    model.write_bytes(model.read_bytes() + b"\x00")
    with pytest.raises(BundleError, match=r"model\.onnx sha256 .* does not match manifest\.json") as err:
        load_trusted_bundle(bundle.path, trust, allow_unsigned=False)
    assert not isinstance(err.value, SignatureError)


def test_unsigned_bundle_is_refused_by_default(tmp_path: Path, trust: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(
        SignatureError,
        match=rf"bundle {bundle.path} is not signed: .*manifest\.sig is missing; "
        "fix: sign it with iaflash-engines sign",
    ):
        load_trusted_bundle(bundle.path, trust, allow_unsigned=False)


def test_unsigned_bundle_accepted_with_allow_unsigned_logs_a_warning_per_load(
    tmp_path: Path, trust: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = make_bundle(tmp_path / "b")
    caplog.set_level(logging.WARNING, logger="iaflash.engines.signing")
    verifier = bundle_verifier(TrustStore.from_dir(trust), allow_unsigned=True)
    assert load_bundle(bundle.path, verify=verifier).manifest == bundle.manifest
    load_bundle(bundle.path, verify=verifier)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = f"bundle {bundle.path} is NOT signed; accepted because security.allow_unsigned = true"
    assert warnings == [expected, expected]


def test_bundle_signed_by_an_untrusted_key_is_refused_naming_the_key_id(
    tmp_path: Path, keys: Path, trust: Path
) -> None:
    bundle = make_bundle(tmp_path / "b")
    sign_bundle(bundle.path, keys / "stranger.key")
    stranger_id = key_id(public_key_bytes(load_public_key(keys / "stranger.pub")))
    for allow_unsigned in (False, True):
        with pytest.raises(UntrustedKey, match=f"signed by key id {stranger_id} which is not in the trust store"):
            load_trusted_bundle(bundle.path, trust, allow_unsigned=allow_unsigned)


def test_signature_errors_are_bundle_and_engine_errors(tmp_path: Path, trust: Path) -> None:
    """The agent already handles EngineError/BundleError at start: a refused signature needs no new branch."""
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(EngineError):
        load_trusted_bundle(bundle.path, trust, allow_unsigned=False)
    assert issubclass(UntrustedKey, SignatureError) and issubclass(SignatureError, BundleError)


def test_sign_bundle_refuses_a_broken_bundle_and_writes_no_signature(tmp_path: Path, keys: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle.path / MODEL_FILE).write_bytes(b"changed")
    with pytest.raises(BundleError, match=r"model\.onnx sha256"):
        sign_bundle(bundle.path, keys / "publisher.key")
    assert not (bundle.path / SIGNATURE_FILE).exists()


def test_missing_trust_dir_refuses_unless_allow_unsigned(
    tmp_path: Path, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = make_bundle(tmp_path / "b")
    sign_bundle(bundle.path, keys / "publisher.key")
    with pytest.raises(SignatureError, match=r"trust store .*nowhere is not a directory"):
        load_trusted_bundle(bundle.path, tmp_path / "nowhere", allow_unsigned=False)
    caplog.set_level(logging.WARNING, logger="iaflash.engines.signing")
    assert load_trusted_bundle(bundle.path, tmp_path / "nowhere", allow_unsigned=True).path == bundle.path
    assert any("signature NOT checked" in r.getMessage() for r in caplog.records)


def test_manifest_may_not_list_its_own_signature(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    manifest = bundle.path / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["files"][SIGNATURE_FILE] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"lists 'manifest\.sig', which is not a plain file name"):
        load_bundle(bundle.path)


def test_malformed_bundle_signature_names_the_sig_file(tmp_path: Path, trust: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle.path / SIGNATURE_FILE).write_text("{}\n")
    with pytest.raises(SignatureError, match=rf"malformed signature {bundle.path / SIGNATURE_FILE}: field 'format'"):
        load_trusted_bundle(bundle.path, trust, allow_unsigned=True)


def test_read_trusted_file_for_the_registry_import(
    tmp_path: Path, keys: Path, trust: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Signed: the verified bytes; unsigned: refused, or read with a warning under allow_unsigned."""
    subset = _subset(tmp_path)
    with pytest.raises(SignatureError, match="not signed"):
        read_trusted_file(subset, trust, allow_unsigned=False)
    caplog.set_level(logging.WARNING, logger="iaflash.engines.signing")
    assert read_trusted_file(subset, trust, allow_unsigned=True) == (subset.read_bytes(), None)
    assert "NOT signed or not checked" in caplog.text
    sign_file(subset, keys / "stranger.key")
    with pytest.raises(UntrustedKey):
        read_trusted_file(subset, trust, allow_unsigned=True)
    sign_file(subset, keys / "publisher.key")
    data, verified = read_trusted_file(subset, trust, allow_unsigned=False)
    assert data == subset.read_bytes() and verified is not None and verified.name == "publisher"


# ---------------------------------------------------------------- format 2 (prehashed) and streamed checks


def test_sign_file_writes_format_2_over_the_files_sha256_and_size(tmp_path: Path, keys: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    doc = json.loads(sign_file(subset, keys / "publisher.key").read_text())
    data = subset.read_bytes()
    assert (doc["version"], doc["digest"], doc["sha256"], doc["size"]) == (
        2,
        "sha256",
        hashlib.sha256(data).hexdigest(),
        len(data),
    )
    message = (
        b"iaflash-signature/2\nsha256 " + hashlib.sha256(data).hexdigest().encode() + f"\nsize {len(data)}\n".encode()
    )
    load_public_key(keys / "publisher.pub").verify(base64.b64decode(doc["signature"]), message)  # raises if not
    assert verify_file(subset, TrustStore.from_dir(trust), role="registry") == "publisher"
    assert TrustStore.from_dir(trust).check(data, doc, role="registry").name == "publisher"  # from bytes too


def test_open_trusted_file_checks_then_streams_the_same_bytes_in_bounded_memory(
    tmp_path: Path, keys: Path, trust: Path
) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        for i in range(48):  # 48 MiB
            fh.write(hashlib.sha256(str(i).encode()).digest() * (1 << 15))
    sign_file(big, keys / "publisher.key")
    tracemalloc.start()
    try:
        with open_trusted_file(big, trust, allow_unsigned=False) as trusted:
            assert trusted.verified is not None and trusted.verified.name == "publisher"
            h, n = hashlib.sha256(), 0
            while chunk := trusted.stream.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
            trusted.confirm()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (h.hexdigest(), n) == (hashlib.sha256(big.read_bytes()).hexdigest(), 48 << 20)
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB for a 48 MiB file"


def test_a_file_rewritten_between_check_and_read_is_refused_on_confirm(tmp_path: Path, keys: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    sign_file(subset, keys / "publisher.key")
    with open_trusted_file(subset, trust, allow_unsigned=False) as trusted:
        with open(subset, "r+b") as fh:
            fh.write(b"\x00")
        trusted.stream.read(5)  # the consumer stops early: confirm reads (and hashes) the rest
        with pytest.raises(SignatureError, match=r"subset-000042\.jsonl\.gz: changed while it was being read.*fix:"):
            trusted.confirm()


def test_a_format_1_signature_still_verifies_and_is_read_from_memory(tmp_path: Path, keys: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    doc = json.loads(sign_file(subset, keys / "publisher.key", version=1).read_text())
    assert doc["version"] == 1 and "sha256" not in doc
    with open_trusted_file(subset, trust, allow_unsigned=False) as trusted:
        assert trusted.verified is not None and trusted.verified.name == "publisher"
        original = subset.read_bytes()
        subset.write_bytes(b"replaced")  # the verified bytes are already in memory
        assert trusted.stream.read() == original
        trusted.confirm()


def test_a_large_file_with_a_format_1_signature_is_refused_with_the_fix(
    tmp_path: Path, keys: Path, trust: Path
) -> None:
    big = tmp_path / "big.jsonl.gz"
    with open(big, "wb") as fh:
        fh.truncate(WHOLE_FILE_LIMIT + 1)  # sparse: nothing is written
    doc = sign_bytes(b"not read", load_private_key(keys / "publisher.key"), "publisher")  # a format-1 document
    (tmp_path / "big.jsonl.gz.sig").write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match=r"format 1 .*64 MiB.*fix: re-sign it at central .*\(format 2\)"):
        open_trusted_file(big, trust, allow_unsigned=False)


def test_check_digest_refuses_a_format_1_document(keys: Path, trust: Path) -> None:
    doc = sign_bytes(b"payload", load_private_key(keys / "publisher.key"), "publisher")
    with pytest.raises(SignatureError, match=r"format 1 .*cannot be checked without holding the file in memory"):
        TrustStore.from_dir(trust).check_digest(digest_bytes(b"payload"), doc, role="registry")


def test_a_truncated_file_names_both_sizes(tmp_path: Path, keys: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    sign_file(subset, keys / "publisher.key")
    data = subset.read_bytes()
    subset.write_bytes(data[:-3])
    with pytest.raises(SignatureError, match=rf"file is {len(data) - 3} bytes, it was signed at {len(data)} bytes"):
        open_trusted_file(subset, trust, allow_unsigned=False)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"digest": "md5"}, "'digest' is 'md5'"),
        ({"sha256": "AB" * 32}, "'sha256' is not 64 lowercase hex"),
        ({"size": -1}, "'size' is not a byte count"),
        ({"size": True}, "'size' is not a byte count"),
    ],
)
def test_malformed_format_2_fields_are_refused(
    tmp_path: Path, keys: Path, trust: Path, change: dict[str, object], problem: str
) -> None:
    subset = _subset(tmp_path)
    sig = sign_file(subset, keys / "publisher.key")
    sig.write_text(json.dumps({**json.loads(sig.read_text()), **change}))
    with pytest.raises(SignatureError, match=re.escape(problem)):
        open_trusted_file(subset, trust, allow_unsigned=False)


def test_an_unsigned_file_is_streamed_only_when_allowed(tmp_path: Path, trust: Path) -> None:
    subset = _subset(tmp_path)
    with open_trusted_file(subset, trust, allow_unsigned=True) as trusted:
        assert trusted.verified is None and trusted.stream.read() == subset.read_bytes()
        trusted.confirm()
    with pytest.raises(SignatureError, match="not signed"):
        open_trusted_file(subset, trust, allow_unsigned=False)


@pytest.mark.parametrize("fmt", ["1", "2"])
def test_the_sign_command_writes_the_format_asked_and_verify_accepts_both(
    tmp_path: Path, keys: Path, trust: Path, fmt: str
) -> None:
    subset = _subset(tmp_path)
    runner = CliRunner()
    result = runner.invoke(engines_cli, ["sign", str(subset), "--key", str(keys / "publisher.key"), "--format", fmt])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "subset-000042.jsonl.gz.sig").read_text())["version"] == int(fmt)
    result = runner.invoke(engines_cli, ["verify", str(subset), "--trust", str(trust), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["name"] == "publisher"
    bad = runner.invoke(engines_cli, ["sign", str(subset), "--key", str(keys / "publisher.key"), "--format", "3"])
    assert bad.exit_code == 2 and "3 is not in the range 1<=x<=2" in bad.output
