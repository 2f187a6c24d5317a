"""``iaflash-engines keygen | sign | verify | allow-rollback``: the publishers' key and signature tools.

``pack`` lives in :mod:`iaflash.engines.cli_pack`; both use the shared CLI helpers of
:mod:`iaflash.engines.cli_common`.

Exit codes: 0 ok, 1 operational error, 2 usage error, 3 check found problems (``verify``).
With ``--json`` each command prints one JSON document on stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import datetime, time, timezone
from pathlib import Path
from typing import Any

import click

from iaflash.engines.atomic import write_atomic
from iaflash.engines.bundle import MANIFEST_FILE, SIGNATURE_FILE, load_bundle
from iaflash.engines.cli_common import CONTEXT, EXIT_PROBLEMS, emit, fail, json_option, public_key_id
from iaflash.engines.errors import BundleError, EngineError, SignatureError
from iaflash.engines.keys import parse_not_after
from iaflash.engines.rollback import compare_versions
from iaflash.engines.signing import (
    ROLES,
    TrustState,
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
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default=None,
    help="What the key signs: models (bundles), registry (subset files), commands, revocation (lists). "
    "Written into PREFIX.pub; boxes keep it in trust_dir/ROLE/.",
)
@click.option(
    "--not-after",
    "not_after",
    default=None,
    metavar="WHEN",
    help="Expiry written into PREFIX.pub: a date (valid through that day, UTC) or an ISO 8601 time with offset.",
)
@json_option
def keygen(prefix: Path, role: str | None, not_after: str | None, as_json: bool) -> None:
    """Make a new Ed25519 key pair for one role.

    Keep PREFIX.key secret (mode 0600, never on a radar box); copy PREFIX.pub into each box's
    trust store, in the folder of its role (security.trust_dir/ROLE/). The key's name is the file
    name without .pub.

    \b
    Example:
      iaflash-engines keygen --out keys/acme-models --role models --not-after 2027-12-31
      scp keys/acme-models.pub box:/etc/iaflash/trust/models/
    """
    try:
        expiry = _expiry(not_after) if not_after is not None else None
        key_path, pub_path = generate_keypair(prefix, role=role, not_after=expiry)
        kid = public_key_id(key_path)
    except SignatureError as exc:
        fail(str(exc))
    where = f"trust_dir/{role}/" if role else "the trust store (give --role to say which folder)"
    click.echo(f"keep {key_path} secret; distribute {pub_path} into {where}", err=True)
    emit(
        as_json,
        {
            "private_key": str(key_path),
            "public_key": str(pub_path),
            "key_id": kid,
            "name": prefix.name,
            "role": role,
            "not_after": None if expiry is None else expiry.isoformat(timespec="seconds"),
        },
        [f"private key: {key_path}", f"public key:  {pub_path}", f"key id:      {kid}"]
        + ([f"role:        {role}"] if role else [])
        + ([f"not after:   {expiry.isoformat(timespec='seconds')}"] if expiry else []),
    )


def _expiry(text: str) -> datetime:
    """--not-after: a date means through the end of that day (UTC); else an ISO 8601 time with offset."""
    if len(text) == 10:
        try:
            day = datetime.strptime(text, "%Y-%m-%d").date()
        except ValueError:
            pass
        else:
            return datetime.combine(day, time(23, 59, 59), timezone.utc)
    return parse_not_after(text, "--not-after")


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

    A bundle is checked (every sha256) before it is signed. A key whose .pub (beside the .key)
    names a role is refused for the other kind: a bundle needs a models key, a file a registry key.

    \b
    Example:
      iaflash-engines sign bundle/ --key keys/acme-models.key
      iaflash-engines sign subset-000042.jsonl.gz --key keys/acme-registry.key
    """
    try:
        if target.is_dir():
            sig = sign_bundle(target, key_path, signer)
        else:
            sig = sign_file(target, key_path, signer, version=sig_format, role="registry")
        kid = public_key_id(key_path)
    except EngineError as exc:
        fail(str(exc))
    kind = "bundle" if target.is_dir() else "file"
    doc = {"target": str(target), "kind": kind, "signature": str(sig), "key_id": kid, "signer": signer or key_path.stem}
    emit(as_json, doc, [f"signed {kind} {target}: {sig} (key id {kid}, signer {doc['signer']})"])


# ---------------------------------------------------------------- verify


def _verify_target(target: Path, trust: TrustStore, role: str) -> dict[str, Any]:
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
    data, verified = read_verified_file(target, trust, role=role)
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
    help="Trust store: directory of trusted keys, one folder per role.",
)
@click.option(
    "--state",
    "state_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The box's trust state (e.g. /var/lib/iaflash/trust-state.json): its revocation list is applied.",
)
@json_option
def verify(target: Path, trust_dir: Path, state_file: Path | None, as_json: bool) -> None:
    """Check a bundle's (or signed file's) signature against a trust store, then every file's sha256.

    A bundle needs a key of role models, a file (registry subset) a key of role registry.
    Exits 3 when the target is unsigned, altered, signed by an untrusted, revoked or expired key
    or one of another role, or broken.

    \b
    Example:
      iaflash-engines verify /var/lib/iaflash/models/classifier --trust /etc/iaflash/trust
      iaflash-engines verify subset-000042.jsonl.gz --trust /etc/iaflash/trust --json
    """
    try:
        trust = TrustStore.from_dir(trust_dir, state=None if state_file is None else TrustState(state_file))
    except SignatureError as exc:
        fail(str(exc))
    try:
        checked = _verify_target(target, trust, "registry")
        doc: dict[str, Any] = {"ok": True, "target": str(target), **checked, "error": None}
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


# ---------------------------------------------------------------- allow-rollback


@click.command("allow-rollback", context_settings=CONTEXT)
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--from",
    "replaces",
    required=True,
    metavar="VERSION",
    help="The newest version of this bundle's name that this rollback may replace on a box.",
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The model publisher's private key (role models).",
)
@click.option("--signer", help="Name recorded in the signature (default: the key file's name).")
@json_option
def allow_rollback(bundle_dir: Path, replaces: str, key_path: Path, signer: str | None, as_json: bool) -> None:
    """Turn an older bundle into a signed rollback: boxes that ran up to --from VERSION may go back to it.

    Writes allow_rollback_from into BUNDLE_DIR/manifest.json and signs the bundle again. A box
    never otherwise installs or loads a version older than the newest it ran (docs/SIGNING.md#rollback);
    it refuses this rollback too once it has run a version above --from.

    \b
    Example:
      cp -r bundles/vmmr-2026.11.0 rollback/ && \\
      iaflash-engines allow-rollback rollback/vmmr-2026.11.0 --from 2026.12.0 --key keys/acme-models.key
    """
    try:
        bundle = load_bundle(bundle_dir)
        version = bundle.manifest.version
        order = compare_versions(version, replaces)
        if order is None or order >= 0:
            fail(
                f"{bundle_dir}: version {version} is not older than --from {replaces} (dotted integers, e.g. "
                "2026.11.0); fix: give the newer version the boxes run now"
            )
        manifest = replace(bundle.manifest, allow_rollback_from=replaces).to_dict()
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"  # as write_bundle writes it
        write_atomic(bundle_dir / MANIFEST_FILE, text.encode("utf-8"))
        sig = sign_bundle(bundle_dir, key_path, signer)
        kid = public_key_id(key_path)
    except EngineError as exc:
        fail(str(exc))
    doc = {"bundle": str(bundle_dir), "name": bundle.manifest.name, "version": version, "allow_rollback_from": replaces}
    emit(
        as_json,
        {**doc, "signature": str(sig), "key_id": kid},
        [
            f"{bundle.manifest.name} {version}: a signed rollback for boxes that ran up to {replaces}",
            f"  signed {sig} (key id {kid})",
        ],
    )


commands = [keygen, sign, verify, allow_rollback]  # pack: iaflash.engines.cli_pack.commands
