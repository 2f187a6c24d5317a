"""``iaflash-central export-dataset``: reviewed captures as an anonymised, labelled dataset (docs/EVIDENCE.md).

Two sources:

* the review store of ``iaflash-central serve`` (``--store URL``): every flag whose evidence was
  fetched and whose reviewer's decision names the make and model seen in the photo;
* a folder of captures (``<capture_id>.json`` sidecars beside their JPEGs) with a decisions CSV
  ``capture_id,make,model`` (``--captures DIR --decisions FILE``), for captures kept elsewhere.

Every image goes through the box's own anonymiser (:func:`iaflash.agent.evidence.anonymise.anonymise_jpeg`)
again, whatever it was before, with the ``[evidence]`` defaults: only the reviewed vehicle is left
(its windscreen masked), no metadata. The output folder holds ``images/<capture_id>.jpg``,
``labels.csv`` (``image,make,model,x1,y1,x2,y2``: what ``iaflash-central train`` reads, the box being
the vehicle's) and ``manifest.json`` (counts, per-file sha256, the anonymiser's name, version and
policy). No plate, plate key, site or time is written. A capture that cannot be exported (no vehicle
box, no label, unreadable image) is skipped, counted by reason in the manifest and listed by id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from iaflash.agent.config import EvidenceConfig
from iaflash.agent.errors import AnonymiseError, ExportError
from iaflash.agent.evidence.anonymise import ANONYMISER, ANONYMISER_VERSION, anonymise_jpeg
from iaflash.engines.cli_common import CONTEXT, EXIT_USAGE, emit, fail, json_option

__all__ = [
    "DATASET_SCHEMA",
    "ExportError",
    "Reviewed",
    "export_command",
    "export_dataset",
    "from_folder",
    "from_store",
]

DATASET_SCHEMA = "iaflash.dataset/1"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Reviewed:
    """One reviewed capture: its id, label, image bytes and vehicle box (None when unknown)."""

    capture_id: str
    make: str
    model: str
    jpeg: bytes | None
    vehicle_box: list[float] | None
    problem: str = ""


def _box(sidecar: dict[str, Any]) -> list[float] | None:
    box = sidecar.get("vehicle_box")
    ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    return [float(v) for v in box] if ok else None


def from_folder(captures: Path, decisions: Path) -> Iterator[Reviewed]:
    """Captures of ``captures/`` labelled by the ``capture_id,make,model`` CSV ``decisions``."""
    try:
        rows = list(csv.DictReader(io.StringIO(decisions.read_text(encoding="utf-8-sig"))))
    except OSError as exc:
        raise ExportError(f"{decisions}: cannot read the decisions CSV ({exc}); fix: give an existing file") from exc
    if rows and not {"capture_id", "make", "model"} <= set(rows[0]):
        raise ExportError(f"{decisions}: the header must have capture_id,make,model; got {sorted(rows[0])}")
    for row in rows:
        cid = (row.get("capture_id") or "").strip()
        make, model = (row.get("make") or "").strip().upper(), (row.get("model") or "").strip().upper()
        if not _SAFE_ID.fullmatch(cid):
            yield Reviewed(cid[:80] or "(empty)", make, model, None, None, "bad_capture_id")
            continue
        try:
            sidecar = json.loads((captures / f"{cid}.json").read_text(encoding="utf-8"))
            images = sidecar.get("images") or [f"{cid}.jpg"]
            jpeg = (captures / Path(str(images[0])).name).read_bytes()
        except (OSError, ValueError, AttributeError) as exc:
            yield Reviewed(cid, make, model, None, None, f"unreadable: {type(exc).__name__}")
            continue
        yield Reviewed(cid, make, model, jpeg, _box(sidecar))


def from_store(url: str) -> Iterator[Reviewed]:
    """Flags of the ``serve`` review store with evidence and a reviewer's make/model (their latest decision)."""
    from iaflash.central.serve.store import ACTIONS, Store  # noqa: PLC0415  # the [central] extra, only for --store

    with Store(url) as store:
        labelled: dict[str, tuple[str, str]] = {}
        for row in store.audit_log():
            if row["action"] in ACTIONS and row.get("make") and row.get("model"):
                labelled[row["event_id"]] = (str(row["make"]), str(row["model"]))
        for event_id, (make, model) in sorted(labelled.items()):
            flag = store.flag(event_id)
            cid = str(flag["capture_id"]) if flag else event_id
            found = store.evidence(event_id)
            if found is None:
                yield Reviewed(cid, make, model, None, None, "no_evidence")
                continue
            sidecar, jpeg = found
            yield Reviewed(cid, make, model, jpeg, _box(sidecar))


def _prepare(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; fix: give a new or empty folder (an export is never merged)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    return out / "images"


def export_dataset(
    reviewed: Iterable[Reviewed], out: Path, *, source: str, policy: EvidenceConfig | None = None
) -> dict[str, Any]:
    """Anonymise and write every exportable capture; return (and write) the manifest."""
    policy = policy or EvidenceConfig()
    images = _prepare(out)
    rows: list[list[str]] = []
    files: dict[str, str] = {}
    skipped: Counter[str] = Counter()
    skipped_ids: dict[str, list[str]] = {}
    labels: Counter[str] = Counter()
    seen: set[str] = set()
    for r in reviewed:
        problem = r.problem or _problem(r, seen)
        if not problem:
            assert r.jpeg is not None and r.vehicle_box is not None  # checked by _problem
            try:
                done = anonymise_jpeg(r.jpeg, vehicle_box=r.vehicle_box, policy=policy, name=r.capture_id)
            except AnonymiseError as exc:
                problem = f"anonymise_failed: {exc}"[:200]
        if problem:
            reason = problem.split(":")[0]
            skipped[reason] += 1
            skipped_ids.setdefault(reason, []).append(r.capture_id)
            continue
        name = f"images/{r.capture_id}.jpg"
        (images / f"{r.capture_id}.jpg").write_bytes(done.jpeg)
        files[name] = hashlib.sha256(done.jpeg).hexdigest()
        x, y, w, h = done.record["vehicle_box"]
        rows.append([name, r.make, r.model, str(x), str(y), str(x + w), str(y + h)])
        labels[f"{r.make}|{r.model}"] += 1
        seen.add(r.capture_id)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image", "make", "model", "x1", "y1", "x2", "y2"])
    writer.writerows(rows)
    (out / "labels.csv").write_text(text.getvalue(), encoding="utf-8")
    files["labels.csv"] = hashlib.sha256(text.getvalue().encode("utf-8")).hexdigest()
    manifest = {
        "schema": DATASET_SCHEMA,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "anonymiser": {"name": ANONYMISER, "version": ANONYMISER_VERSION, "policy": policy.model_dump(mode="json")},
        "counts": {
            "images": len(rows),
            "skipped": dict(sorted(skipped.items())),
            "labels": dict(sorted(labels.items())),
        },
        "skipped_capture_ids": skipped_ids,
        "files": dict(sorted(files.items())),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _problem(r: Reviewed, seen: set[str]) -> str:
    if r.capture_id in seen:
        return "duplicate"
    if not (r.make and r.model):
        return "no_label"
    if r.jpeg is None:
        return "no_image"
    if r.vehicle_box is None:
        return "no_vehicle_box"
    return ""


def _summary(manifest: dict[str, Any], out: Path) -> list[str]:
    counts = manifest["counts"]
    lines = [f"exported {counts['images']} anonymised image(s) to {out} ({manifest['anonymiser']['version']})"]
    lines += [f"skipped {n}: {reason}" for reason, n in counts["skipped"].items()]
    return lines


@click.command("export-dataset", context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New (or empty) folder to write.")
@click.option("--store", "store_url", default=None, help="The serve review store (sqlite:///… or postgresql://…).")
@click.option(
    "--captures",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A folder of captures (<capture_id>.json sidecars and their JPEGs), with --decisions.",
)
@click.option(
    "--decisions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV capture_id,make,model of the reviewed captures in --captures.",
)
@click.option(
    "--method",
    type=click.Choice(["fill", "pixelate"]),
    default="fill",
    show_default=True,
    help="How masked regions are destroyed.",
)
@json_option
def export_command(
    out: Path,
    store_url: str | None,
    captures: Path | None,
    decisions: Path | None,
    method: str,
    as_json: bool,
) -> None:
    """Export reviewed captures as an anonymised, labelled dataset (images/, labels.csv, manifest.json).

    Each image is anonymised again (only the reviewed vehicle is kept, its windscreen masked, no
    metadata). Captures without a label, image or vehicle box are skipped and counted.

    \b
    Example:
      iaflash-central export-dataset --store sqlite:///central.db --out datasets/2026-12
      iaflash-central export-dataset --captures done/ --decisions decisions.csv --out datasets/x
    """
    if (store_url is None) == (captures is None) or (captures is None) != (decisions is None):
        fail("give either --store URL, or --captures DIR with --decisions FILE", EXIT_USAGE)
    policy = EvidenceConfig(method=method)  # type: ignore[arg-type]  # click.Choice checked it
    try:
        if store_url is not None:
            manifest = export_dataset(from_store(store_url), out, source="store", policy=policy)
        else:
            assert captures is not None and decisions is not None
            manifest = export_dataset(from_folder(captures, decisions), out, source="folder", policy=policy)
    except ExportError as exc:
        fail(str(exc))
    emit(as_json, manifest, _summary(manifest, out))
    if manifest["counts"]["images"] == 0:
        fail("no capture could be exported (see the skipped counts)")
