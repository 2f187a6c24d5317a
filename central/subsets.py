"""Central side: build hashed registry subset files from a CSV of clear plates.

The CSV (UTF-8, header row) has columns ``plate,make,model,genre,body`` and, for deltas, an optional
``op`` column (``upsert`` or ``delete``; a delete needs only the plate). Plates are normalised and
hashed with the deployment key; the clear plates never leave central. Errors never echo a plate.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from iaflash.agent.errors import IaflashError, PlateError, RegistryError
from iaflash.agent.registry.cache import records_from_plates, write_subset
from iaflash.agent.registry.plates import key_id, load_hmac_key, plate_key

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_REQUIRED = ("plate", "make", "model", "genre", "body")


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
      iaflash-central registry build --csv siv.csv --key-file hmac.key --dataset-id siv-2026-11 \\
          --seq 1 --out siv-0001.jsonl.gz
    """


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
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Deployment HMAC key (hex, >= 64 characters).",
)
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
    csv_path: Path, key_file: Path, dataset_id: str, seq: int, out: Path, kind: str, base_seq: int | None
) -> None:
    """Hash the plates of a CSV into a subset file for the edge boxes.

    \b
    Example:
      iaflash-central registry build --csv changes.csv --key-file hmac.key --dataset-id siv-2026-11 \\
          --seq 2 --kind delta --base-seq 1 --out siv-0002.jsonl.gz
    """
    if (kind == "delta") != (base_seq is not None):
        raise click.UsageError("--base-seq is required with --kind delta and refused with a snapshot")
    try:
        hmac_key = load_hmac_key(key_file.read_bytes())
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
