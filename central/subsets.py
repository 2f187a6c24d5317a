"""Central side: per-site plate keys, and hashed registry subset files built from a CSV of clear plates.

The CSV (UTF-8, header row) has columns ``plate,make,model,genre,body`` and, for deltas, an optional
``op`` column (``upsert`` or ``delete``; a delete needs only the plate). Plates are normalised and
hashed with ONE plate key: the key of the site (or region) the subset is for, so that a stolen box's
key reverses at most its own subset. Central keeps one key per scope in a key directory
(:class:`PlateKeys`: ``<dir>/<scope>.key``, 0600, retired keys under ``<dir>/retired/``); the clear
plates never leave central. Errors never echo a plate. docs/REGISTRY.md#plate-keys-one-per-site-or-region.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from iaflash.agent.errors import IaflashError, PlateError, RegistryError
from iaflash.agent.registry.cache import records_from_plates, write_subset
from iaflash.agent.registry.plates import MIN_KEY_BYTES, key_id, load_hmac_key, plate_key

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_REQUIRED = ("plate", "make", "model", "genre", "body")
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class PlateKeys:
    """Central's plate keys, one per scope (a site id, or a region whose sites share one key).

    ``<root>/<scope>.key`` is the scope's current key (hex, mode 0600, in a 0700 directory);
    :meth:`create` with ``rotate=True`` moves the previous one to ``<root>/retired/<scope>.<key id>.key``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, scope: str) -> Path:
        if not _SCOPE.fullmatch(scope):
            raise RegistryError(
                f"plate key scope {scope!r} is not a name of 1-64 letters, digits, '.', '_' or '-'; "
                "fix: use the site id (or a region name)"
            )
        return self.root / f"{scope}.key"

    def load(self, scope: str) -> bytes:
        """The scope's current key; RegistryError naming the fix when there is none."""
        path = self.path(scope)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(
                f"{path}: no plate key for scope {scope}; fix: iaflash-central registry keygen {scope} "
                f"--key-dir {self.root}"
            ) from None
        return load_hmac_key(raw)

    def create(self, scope: str, *, rotate: bool = False) -> tuple[str, Path, str | None]:
        """A new random key for ``scope``: (its key id, its file, the retired key's id or None)."""
        path = self.path(scope)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        old_id = key_id(self.load(scope)) if path.exists() else None
        if old_id is not None and not rotate:
            raise RegistryError(
                f"{path}: scope {scope} already has key {old_id}; fix: pass --rotate to replace it "
                "(the old key is kept under retired/)"
            )
        key = secrets.token_bytes(MIN_KEY_BYTES)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if old_id is not None:
            retired = self.root / "retired"
            retired.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, retired / f"{scope}.{old_id}.key")
        os.replace(tmp, path)
        return key_id(key), path, old_id


def _rows_from_csv(path: Path, hmac_key: bytes) -> Iterator[dict[str, Any]]:
    """Subset records from the CSV, in file order; errors name the CSV line, never the plate."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise RegistryError(
                f"{path}: CSV lacks columns {missing}; fix: the header row must be plate,make,model,genre,body[,op]"
            )
        for raw in reader:
            line = reader.line_num
            row = {k: (v or "").strip() for k, v in raw.items() if isinstance(k, str)}
            op = row.get("op") or "upsert"
            try:
                if op == "delete":
                    yield {"op": "delete", "plate_key": plate_key(hmac_key, row["plate"]).hex()}
                    continue
                if op != "upsert":
                    raise RegistryError(f"{path}:{line}: op must be upsert or delete; fix: correct the op column")
                if not (row["make"] and row["model"]):
                    raise RegistryError(f"{path}:{line}: make and model are required; fix: fill them in")
                yield from records_from_plates(
                    hmac_key, [(row["plate"], row["make"], row["model"], row["genre"] or None, row["body"] or None)]
                )
            except PlateError as exc:
                raise PlateError(f"{path}:{line}: {exc}; fix: correct or remove that row") from exc


@click.group("registry", context_settings=CONTEXT)
def registry_group() -> None:
    """Registry subset files for the edge boxes.

    \b
    Example:
      iaflash-central registry keygen site-042 --key-dir /etc/iaflash-central/plate-keys
      iaflash-central registry build --csv site-042.csv --key-dir /etc/iaflash-central/plate-keys \\
          --scope site-042 --dataset-id siv-2026-11 --seq 1 --out site-042-0001.jsonl.gz
    """


@registry_group.command("keygen", context_settings=CONTEXT)
@click.argument("scope")
@click.option(
    "--key-dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="Central's plate-key directory."
)
@click.option("--rotate", is_flag=True, help="Replace the scope's key (the old one moves to retired/).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of text.")
def keygen(scope: str, key_dir: Path, rotate: bool, as_json: bool) -> None:
    """Make the plate key of SCOPE (a site id, or a region whose sites share a key).

    The box of that site gets a copy of the key file (mode 0600) and names its id in
    ``[registry] hmac_key_id``. Every subset for the scope is built with --scope SCOPE.

    \b
    Example:
      iaflash-central registry keygen site-042 --key-dir /etc/iaflash-central/plate-keys
      iaflash-central registry keygen site-042 --key-dir /etc/iaflash-central/plate-keys --rotate
    """
    try:
        kid, path, old = PlateKeys(key_dir).create(scope, rotate=rotate)
    except OSError as exc:
        click.echo(f"error: {exc.filename}: {exc.strerror}; fix: check the path and its permissions", err=True)
        sys.exit(1)
    except IaflashError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"command": "keygen", "scope": scope, "key_id": kid, "file": str(path), "retired": old}))
        return
    click.echo(f"scope {scope}: key id {kid} in {path}" + (f" (retired {old})" if old else ""))
    click.echo(
        f'box: copy it to the box\'s key file (mode 0600) and set [registry] hmac_key_id = "{kid}"; '
        f"build its subsets with --scope {scope}",
        err=True,
    )


@registry_group.command("build", context_settings=CONTEXT)
@click.option(
    "--csv",
    "csv_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="CSV with columns plate,make,model,genre,body[,op] (clear plates).",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The plate key to hash with (hex, >= 64 characters); or --key-dir with --scope.",
)
@click.option(
    "--key-dir", type=click.Path(path_type=Path, file_okay=False), help="Central's plate-key directory (with --scope)."
)
@click.option("--scope", help="Site id (or region) whose key hashes this subset: <key-dir>/<scope>.key.")
@click.option("--dataset-id", required=True, help="Identifier of the dataset this file belongs to.")
@click.option("--seq", required=True, type=click.IntRange(min=0), help="Sequence number of this file.")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Output file (.jsonl.gz), written atomically.",
)
@click.option(
    "--kind",
    type=click.Choice(["snapshot", "delta"]),
    default="snapshot",
    show_default=True,
    help="A snapshot replaces the cache; a delta applies on top of --base-seq.",
)
@click.option(
    "--base-seq", type=click.IntRange(min=0), default=None, help="For a delta: the seq the box's cache must be at."
)
def build(
    csv_path: Path,
    key_file: Path | None,
    key_dir: Path | None,
    scope: str | None,
    dataset_id: str,
    seq: int,
    out: Path,
    kind: str,
    base_seq: int | None,
) -> None:
    """Hash the plates of a CSV into a subset file for the boxes of one key scope.

    \b
    Example:
      iaflash-central registry build --csv changes.csv --key-dir /etc/iaflash-central/plate-keys \\
          --scope site-042 --dataset-id siv-2026-11 --seq 2 --kind delta --base-seq 1 --out site-042-0002.jsonl.gz
    """
    if (kind == "delta") != (base_seq is not None):
        raise click.UsageError("--base-seq is required with --kind delta and refused with a snapshot")
    if (key_file is None) == (key_dir is None) or (key_dir is None) != (scope is None):
        raise click.UsageError("give either --key-file, or --key-dir with --scope")
    try:
        hmac_key = (
            PlateKeys(key_dir).load(str(scope))
            if key_dir is not None
            else load_hmac_key(Path(str(key_file)).read_bytes())
        )
        count = write_subset(
            out,
            kind=kind,
            dataset_id=dataset_id,
            seq=seq,
            key_id=key_id(hmac_key),
            records=_rows_from_csv(csv_path, hmac_key),
            base_seq=base_seq,
        )
    except OSError as exc:
        click.echo(f"error: {exc.filename}: {exc.strerror}; fix: check the path", err=True)
        sys.exit(1)
    except IaflashError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"wrote {out}: {kind} {dataset_id} seq {seq}, {count} records, key id {key_id(hmac_key)}")
