"""``iaflash-engines keygen | sign | verify``: the model publisher's key and signature tools.

``pack`` lives in :mod:`iaflash.engines.cli_pack`; both use the shared CLI helpers of
:mod:`iaflash.engines.cli_common`.

Exit codes: 0 ok, 1 operational error, 2 usage error, 3 check found problems (``verify``).
With ``--json`` each command prints one JSON document on stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click

from iaflash.engines.bundle import MANIFEST_FILE, SIGNATURE_FILE
from iaflash.engines.cli_common import CONTEXT, EXIT_PROBLEMS, emit, fail, json_option, public_key_id
from iaflash.engines.errors import BundleError, EngineError, SignatureError
from iaflash.engines.signing import (
    TrustStore,
    generate_keypair,
    read_verified_file,
    sign_bundle,
    sign_file,
    signature_path,
    verify_bundle,
)

__all__ = ["commands"]

# ---------------------------------------------------------------- keygen


@click.command(context_settings=CONTEXT)
@click.option(
    "--out",
    "prefix",
    type=click.Path(path_type=Path),
    required=True,
    help="Path prefix: writes PREFIX.key (private, 0600) and PREFIX.pub (public).",
)
@json_option
def keygen(prefix: Path, as_json: bool) -> None:
    """Make a new Ed25519 publisher key pair.

    Keep PREFIX.key secret (mode 0600, never on a radar box); copy PREFIX.pub into each box's
    trust store (security.trust_dir). The key's name is the file name without .pub.

    \b
    Example:
      iaflash-engines keygen --out keys/acme-models
      scp keys/acme-models.pub box:/etc/iaflash/trust/
    """
    try:
        key_path, pub_path = generate_keypair(prefix)
        kid = public_key_id(key_path)
    except SignatureError as exc:
        fail(str(exc))
    click.echo(f"keep {key_path} secret; distribute {pub_path}", err=True)
    emit(
        as_json,
        {"private_key": str(key_path), "public_key": str(pub_path), "key_id": kid, "name": prefix.name},
        [f"private key: {key_path}", f"public key:  {pub_path}", f"key id:      {kid}"],
    )


# ---------------------------------------------------------------- sign


@click.command(context_settings=CONTEXT)
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The publisher's private key (PREFIX.key from keygen).",
)
@click.option("--signer", help="Name recorded in the signature (default: the key file's name).")
@click.option(
    "--format",
    "sig_format",
    type=click.IntRange(1, 2),
    default=2,
    show_default=True,
    help="Signature format of a file: 2 signs its sha256 and size (checked in bounded memory); 1 signs the "
    "whole file, for agents older than format 2 (docs/SIGNING.md). A bundle's manifest.sig is always format 1.",
)
@json_option
def sign(target: Path, key_path: Path, signer: str | None, sig_format: int, as_json: bool) -> None:
    """Sign a bundle directory (writes manifest.sig) or any file such as a registry subset (writes FILE.sig).

    A bundle is checked (every sha256) before it is signed.

    \b
    Example:
      iaflash-engines sign bundle/ --key keys/acme-models.key
      iaflash-engines sign subset-000042.jsonl.gz --key keys/acme-registry.key
    """
    try:
        if target.is_dir():
            sig = sign_bundle(target, key_path, signer)
        else:
            sig = sign_file(target, key_path, signer, version=sig_format)
        kid = public_key_id(key_path)
    except EngineError as exc:
        fail(str(exc))
    kind = "bundle" if target.is_dir() else "file"
    doc = {"target": str(target), "kind": kind, "signature": str(sig), "key_id": kid, "signer": signer or key_path.stem}
    emit(as_json, doc, [f"signed {kind} {target}: {sig} (key id {kid}, signer {doc['signer']})"])


# ---------------------------------------------------------------- verify


def _verify_target(target: Path, trust: TrustStore) -> dict[str, Any]:
    """The verification document of a bundle directory or a signed file; raises on a problem."""
    if target.is_dir():
        bundle, verified = verify_bundle(target, trust)
        if verified is None:  # cannot happen with allow_unsigned=False; never report an unchecked bundle as ok
            raise SignatureError(f"bundle {target}: signature was not checked")
        return {
            "kind": "bundle",
            "signature": str(target / SIGNATURE_FILE),
            **verified.to_dict(),
            "files": [MANIFEST_FILE, *sorted(bundle.manifest.files)],
            "model": f"{bundle.manifest.name} {bundle.manifest.version}",
        }
    data, verified = read_verified_file(target, trust)
    return {
        "kind": "file",
        "signature": str(signature_path(target)),
        **verified.to_dict(),
        "files": [target.name],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@click.command(context_settings=CONTEXT)
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--trust",
    "trust_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Trust store: directory of trusted publishers' .pub files.",
)
@json_option
def verify(target: Path, trust_dir: Path, as_json: bool) -> None:
    """Check a bundle's (or signed file's) signature against a trust store, then every file's sha256.

    Exits 3 when the target is unsigned, altered, signed by an untrusted key, or broken.

    \b
    Example:
      iaflash-engines verify /var/lib/iaflash/models/classifier --trust /etc/iaflash/trust
      iaflash-engines verify subset-000042.jsonl.gz --trust /etc/iaflash/trust --json
    """
    try:
        trust = TrustStore.from_dir(trust_dir)
    except SignatureError as exc:
        fail(str(exc))
    try:
        doc: dict[str, Any] = {"ok": True, "target": str(target), **_verify_target(target, trust), "error": None}
    except BundleError as exc:
        if as_json:
            click.echo(
                json.dumps(
                    {"ok": False, "target": str(target), "error": str(exc), "trusted": list(trust.names)},
                    indent=2,
                    sort_keys=True,
                )
            )
        fail(str(exc), EXIT_PROBLEMS)
    emit(
        as_json,
        doc,
        [
            f"ok: {target} ({doc['kind']}) signed by {doc['name']} (key id {doc['key_id']}) at {doc['signed_at']}",
            *(f"  checked {f}" for f in doc["files"]),
        ],
    )


commands = [keygen, sign, verify]  # pack: iaflash.engines.cli_pack.commands
