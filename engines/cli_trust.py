"""``iaflash-engines trust list | sign-revocations | install-revocations``: audit the trust store, revoke keys.

* ``list``: every trusted key with its role, id, expiry and status (ok, expired, revoked), and the
  revocation list the box applied: what a reviewer reads to know who may sign what on a box.
* ``sign-revocations`` (at the revocation authority, offline): write a signed revocation list.
* ``install-revocations`` (on the box, as root or the agent's user): verify a list and apply it to
  the box's trust state; an older list than the applied one is refused. Central can also send it
  over the command channel (``revoke_keys``, docs/MQTT.md#commands).

Exit codes: 0 ok, 1 operational error (refused list, bad key), 2 usage error. docs/SIGNING.md#revocation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from iaflash.engines.atomic import write_atomic
from iaflash.engines.cli_common import CONTEXT, emit, fail, json_option
from iaflash.engines.errors import EngineError
from iaflash.engines.keys import load_private_key
from iaflash.engines.revocation import build_revocation_list
from iaflash.engines.signing import TrustState, TrustStore, check_signing_role, install_revocations

__all__ = ["commands"]

DEFAULT_TRUST = Path("/etc/iaflash/trust")
DEFAULT_STATE = Path("/var/lib/iaflash/trust-state.json")  # beside the default [registry] db

_trust_option = click.option(
    "--trust",
    "trust_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_TRUST,
    show_default=True,
    help="Trust store: one folder of .pub files per role ([security] trust_dir).",
)
_state_option = click.option(
    "--state",
    "state_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_STATE,
    show_default=True,
    help="The box's trust state: trust-state.json in the directory of [registry] db.",
)


@click.group("trust", context_settings=CONTEXT)
def trust_group() -> None:
    """The trust store by role, and revocation lists.

    \b
    Example:
      iaflash-engines trust list --trust /etc/iaflash/trust
      iaflash-engines trust install-revocations revoked-0003.json
    """


@trust_group.command("list", context_settings=CONTEXT)
@_trust_option
@_state_option
@json_option
def list_cmd(trust_dir: Path, state_file: Path, as_json: bool) -> None:
    """Every trusted key: role, name, key id, not_after and status; and the applied revocation list.

    \b
    Example:
      iaflash-engines trust list --trust /etc/iaflash/trust --json
    """
    try:
        state = TrustState(state_file)
        trust = TrustStore.from_dir(trust_dir, state=state)
        summary = state.summary()
    except EngineError as exc:
        fail(str(exc))
    keys = [{**k.to_dict(), "status": trust.status(k)} for k in trust.keys]
    doc: dict[str, Any] = {
        "trust_dir": str(trust_dir),
        "layout": "flat (deprecated)" if trust.flat else "roles",
        "keys": keys,
        "revocation_seq": summary["revocation_seq"],
        "refused": summary["refused"],
    }
    lines = [f"{trust_dir}: {doc['layout']} layout, {len(keys)} keys, revocation list seq {summary['revocation_seq']}"]
    lines += [
        f"  {k['role'] or 'any':<10} {k['name']:<24} {k['key_id']}  not_after {k['not_after'] or '-':<25} {k['status']}"
        for k in keys
    ]
    emit(as_json, doc, lines)


def _entries(pairs: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        kid, sep, reason = pair.partition("=")
        if not sep or not kid or not reason:
            raise click.UsageError(f"--revoke {pair!r}: expected KEY_ID=REASON (the reason is shown in refusals)")
        out.append((kid.strip().lower(), reason.strip()))
    return out


@trust_group.command("sign-revocations", context_settings=CONTEXT)
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The revocation authority's private key (role revocation).",
)
@click.option("--seq", type=click.IntRange(min=1), required=True, help="Above the seq of every list issued before.")
@click.option(
    "--revoke",
    "pairs",
    multiple=True,
    metavar="KEY_ID=REASON",
    help="A key to revoke (repeatable). The list is complete: repeat every key revoked before.",
)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="The list to write (JSON).")
@click.option("--signer", help="Name recorded in the signature (default: the key file's name).")
@json_option
def sign_cmd(key_path: Path, seq: int, pairs: tuple[str, ...], out: Path, signer: str | None, as_json: bool) -> None:
    """Write a signed revocation list: every key id a box must no longer trust.

    \b
    Example:
      iaflash-engines trust sign-revocations --key keys/acme-revocation.key --seq 3 \\
          --revoke 176f808f64b32a16="laptop stolen 2026-12-01" --out revoked-0003.json
    """
    entries = _entries(pairs)
    try:
        check_signing_role(key_path, "revocation")
        doc = build_revocation_list(seq, entries, load_private_key(key_path), signer or key_path.stem)
        write_atomic(out, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode=0o644)
    except EngineError as exc:
        fail(str(exc))
    emit(
        as_json,
        {"out": str(out), "seq": seq, "revoked": [k for k, _ in entries], "key_id": doc["signature"]["key_id"]},
        [f"wrote {out}: revocation list seq {seq}, {len(entries)} key(s) revoked"],
    )


@trust_group.command("install-revocations", context_settings=CONTEXT)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_trust_option
@_state_option
@json_option
def install_cmd(file: Path, trust_dir: Path, state_file: Path, as_json: bool) -> None:
    """Verify a revocation list (role revocation) and apply it to this box; an older list is refused.

    The running agent applies it at its next check of a signature (no restart). Run it as the
    agent's user or as root.

    \b
    Example:
      iaflash-engines trust install-revocations /media/usb/revoked-0003.json
    """
    try:
        try:
            doc = json.loads(file.read_bytes())
        except (OSError, ValueError) as exc:
            fail(f"{file}: not a readable JSON revocation list ({exc}); fix: copy it again from the authority")
        parsed, changed = install_revocations(doc, trust_dir, TrustState(state_file), where=str(file))
    except EngineError as exc:
        fail(str(exc))
    what = "applied" if changed else "already applied"
    emit(
        as_json,
        {"file": str(file), "state": str(state_file), "changed": changed, **parsed.summary()},
        [f"revocation list seq {parsed.seq} {what}: {len(parsed.revoked)} key(s) revoked, in {state_file}"],
    )


commands = [trust_group]
