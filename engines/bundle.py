"""Model bundles: a directory holding ``manifest.json``, ``model.onnx`` and ``labels.csv``.

The manifest says what the model expects (input tensor, preprocessing), what it returns
(logits or probabilities, calibration temperature) and the sha256 of every file of the
bundle. :func:`load_bundle` refuses a bundle whose files do not match their sha256, whose
manifest has a bad or unknown field, whose labels are not a contiguous 0..n-1 table, or whose
``full_range_makes`` names a make that no label has.

Signatures (Ed25519) plug in through ``load_bundle(..., verify=...)``: a callable given the
raw ``manifest.json`` bytes and the bundle directory, run before anything is parsed, which
raises :class:`BundleError` to refuse the bundle; the bytes it checked are the bytes parsed.
Because the manifest lists the sha256 of every other file, checked right after, a valid
signature over the manifest covers the whole bundle. The detached signature lives in
``manifest.sig`` (:data:`SIGNATURE_FILE`), which ``manifest.files`` may not list.
:mod:`iaflash.engines.signing` provides the verifier (``bundle_verifier``, ``load_trusted_bundle``).

The manifest's dataclasses and field validation live in :mod:`iaflash.engines.manifest` and are
re-exported here; this module owns the files of a bundle: sha256s, ``labels.csv``, reading, writing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from iaflash.engines.atomic import write_atomic
from iaflash.engines.errors import BundleError
from iaflash.engines.manifest import (
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    CropSpec,
    DetectorSpec,
    Manifest,
    OodSpec,
    OperatingPoint,
    Preprocessing,
    TtaSpec,
)

__all__ = [
    "LABELS_FILE",
    "LABEL_CATEGORIES",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "Bundle",
    "CropSpec",
    "DetectorSpec",
    "Label",
    "Manifest",
    "ManifestVerifier",
    "OodSpec",
    "OperatingPoint",
    "Preprocessing",
    "TtaSpec",
    "check_full_range_makes",
    "check_lookalike_groups",
    "check_unique_names",
    "labels_csv",
    "load_bundle",
    "parse_labels",
    "sha256_file",
    "write_bundle",
]

LABELS_HEADER = ("index", "make", "model", "aliases")
LABELS_HEADER_WITH_CATEGORY = (*LABELS_HEADER, "category")
LABELS_OPTIONAL_COLUMNS = ("category", "group")
"""Optional labels.csv columns, after the 4 base ones, in this order: ``category``, then ``group``."""
LABEL_CATEGORIES = ("car", "van", "truck", "bus", "motorcycle")
"""Values of labels.csv's optional ``category`` column (iaflash.agent.decision.verdict compares them with the genre)."""
_CHUNK = 1 << 20

ManifestVerifier = Callable[[bytes, Path], None]
"""Called with the raw manifest bytes and the bundle directory; raises BundleError to refuse."""


@dataclass(frozen=True)
class Label:
    """One class of the classifier: a (make, model) pair in canonical spelling, plus aliases.

    ``category`` is one of :data:`LABEL_CATEGORIES`, or "" when labels.csv does not say.
    ``group`` is the registry model this label is one variant of (model years, body or cab variants:
    ``GOLF`` for ``GOLF HATCHBACK 1991`` and ``GOLF HATCHBACK 2012``), or "" for a label of its own.
    """

    index: int
    make: str
    model: str
    aliases: tuple[str, ...] = ()
    category: str = ""
    group: str = ""

    @property
    def name(self) -> str:
        return f"{self.make} {self.model}"

    @property
    def group_name(self) -> str:
        """The registry make/model this label counts for: ``MAKE GROUP``, or its own name."""
        return f"{self.make} {self.group}" if self.group else self.name


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest
    labels: tuple[Label, ...]
    model_path: Path
    model_sha256: str


# ---------------------------------------------------------------- files and labels


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_files(root: Path, files: Mapping[str, str]) -> None:
    for name, expected in sorted(files.items()):
        path = root / name
        try:
            actual = sha256_file(path)
        except FileNotFoundError as exc:
            raise BundleError(
                f"{path}: listed in {MANIFEST_FILE} but missing; fix: re-install the bundle "
                "(copy every file of it) or re-pack it"
            ) from exc
        except OSError as exc:
            raise BundleError(f"{path}: cannot be read ({exc.strerror}); fix: check its permissions") from exc
        if actual != expected:
            raise BundleError(
                f"{name} sha256 {actual[:12]}… does not match {MANIFEST_FILE} (expected "
                f"{expected[:12]}…) in {root}: the file was altered or the manifest is stale; "
                "re-pack the bundle"
            )


_LABELS_HEADERS = (
    LABELS_HEADER,
    LABELS_HEADER_WITH_CATEGORY,
    (*LABELS_HEADER, "group"),
    (*LABELS_HEADER, *LABELS_OPTIONAL_COLUMNS),
)


def _labels_header(rows: Sequence[list[str]], where: str) -> tuple[str, ...]:
    """The header of labels.csv: the 4 base columns, optionally followed by ``category`` and/or ``group``."""
    header = tuple(c.strip() for c in rows[0]) if rows else ()
    if header not in _LABELS_HEADERS:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise BundleError(
            f"{where}:1: header must be '{','.join(LABELS_HEADER)}' optionally followed by "
            f"',{','.join(LABELS_OPTIONAL_COLUMNS)}' (either or both, in that order), got {got!r}; "
            "fix: add that header line"
        )
    return header


def _parse_category(value: str, line: int, where: str) -> str:
    category = value.strip()
    if category and category not in LABEL_CATEGORIES:
        raise BundleError(
            f"{where}:{line}: category {category!r} is not a known value; fix: use one of "
            f"{', '.join(LABEL_CATEGORIES)} (lower case), or leave it empty"
        )
    return category


def _parse_label_row(row: list[str], line: int, where: str, header: tuple[str, ...]) -> Label:
    if len(row) != len(header):
        fix = (
            "add ',category' to the header line"
            if len(row) == len(LABELS_HEADER_WITH_CATEGORY) and header == LABELS_HEADER
            else "quote fields that contain commas"
        )
        raise BundleError(
            f"{where}:{line}: expected {len(header)} columns ({','.join(header)}), got {len(row)}; fix: {fix}"
        )
    try:
        index = int(row[0])
    except ValueError as exc:
        raise BundleError(f"{where}:{line}: index {row[0]!r} is not an integer; fix: number rows 0..n-1") from exc
    make, model = row[1].strip(), row[2].strip()
    if not make or not model:
        raise BundleError(f"{where}:{line}: make and model must not be empty; fix: fill both columns")
    aliases = tuple(a.strip() for a in row[3].split("|") if a.strip())
    category = _parse_category(row[header.index("category")], line, where) if "category" in header else ""
    group = " ".join(row[header.index("group")].split()) if "group" in header else ""
    return Label(index=index, make=make, model=model, aliases=aliases, category=category, group=group)


def _by_index(labels: Sequence[Label], where: str) -> tuple[Label, ...]:
    """The labels in index order; indices must be exactly 0..n-1 and (make, model) pairs unique."""
    by_index: dict[int, Label] = {}
    names: set[str] = set()
    for label in labels:
        if label.index in by_index:
            raise BundleError(f"{where}: index {label.index} appears twice; fix: number rows 0..n-1 once each")
        if label.name in names:
            raise BundleError(f"{where}: label {label.name!r} appears twice; fix: merge the rows")
        by_index[label.index] = label
        names.add(label.name)
    missing = sorted(set(range(len(labels))) - set(by_index))
    if missing:
        raise BundleError(
            f"{where}: indices must be 0..{len(labels) - 1} with no gap, index {missing[0]} is "
            "missing; fix: renumber the rows to match the model's output order"
        )
    return tuple(by_index[i] for i in range(len(labels)))


def _name_key(make: str, text: str) -> tuple[str, str]:
    """A spelling-insensitive key (upper case, letters and digits, one space) for duplicate checks."""

    def clean(t: str) -> str:
        return " ".join("".join(c if c.isalnum() else " " for c in t.upper()).split())

    return clean(make), clean(text)


def check_unique_names(labels: Sequence[Label], where: str = LABELS_FILE) -> None:
    """A model name, group name or alias may name one group only (labels of one group may share it).

    An alias given to labels of two different groups used to let the first label win silently: refused.
    """
    owner: dict[tuple[str, str], Label] = {}
    for label in labels:
        names = [("model", label.model), *(("alias", a) for a in label.aliases)]
        if label.group:
            names.append(("group", label.group))
        for kind, text in names:
            other = owner.setdefault(_name_key(label.make, text), label)
            if other is label or _name_key(other.make, other.group_name) == _name_key(label.make, label.group_name):
                continue
            raise BundleError(
                f"{where}: {kind} {text!r} of label {label.index} ({label.name!r}) also names label {other.index} "
                f"({other.name!r}) of another group; fix: keep it on one label only, or give both labels the "
                "same value in the group column so that they count as one registry model"
            )


def parse_labels(text: str, where: str = LABELS_FILE) -> tuple[Label, ...]:
    """Parse ``labels.csv`` text; rows may come in any order but indices must be exactly 0..n-1.

    The header is ``index,make,model,aliases``, optionally followed by ``category``.
    """
    rows = list(csv.reader(io.StringIO(text)))
    header = _labels_header(rows, where)
    labels = [_parse_label_row(row, n, where, header) for n, row in enumerate(rows[1:], start=2) if row]
    if not labels:
        raise BundleError(f"{where}: has no label rows; fix: one row per class of the model")
    ordered = _by_index(labels, where)
    check_unique_names(ordered, where)
    return ordered


def check_full_range_makes(makes: Sequence[str], labels: Sequence[Label], where: str = MANIFEST_FILE) -> None:
    """Each full-range make must be the make of at least one label (spelt exactly as in labels.csv)."""
    known = {label.make for label in labels}
    for make in makes:
        if make in known:
            continue
        close = sorted(m for m in known if m.casefold() == make.strip().casefold())
        fix = (
            f"spell it {close[0]!r} as in {LABELS_FILE}"
            if close
            else f"remove it, or add the {LABELS_FILE} rows of its models"
        )
        raise BundleError(
            f"{where}: field 'full_range_makes' lists {make!r}, the make of no label in {LABELS_FILE}; fix: {fix}"
        )


def _read_manifest(root: Path, verify: ManifestVerifier | None) -> Manifest:
    path = root / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(
            f"{path}: missing; fix: point at a bundle directory (manifest.json, model.onnx, labels.csv) or re-pack it"
        ) from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror}); fix: check its permissions") from exc
    if verify is not None:
        verify(raw, root)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); fix: re-pack the bundle") from exc
    try:
        return Manifest.from_dict(data)
    except BundleError as exc:
        raise BundleError(f"{root}/{exc}") from exc


def check_lookalike_groups(
    groups: Sequence[Sequence[str]], labels: Sequence[Label], where: str = MANIFEST_FILE
) -> None:
    """Each look-alike group names labels of the bundle (``MAKE MODEL``), of at least two makes."""
    known = {label.name: label for label in labels}
    for n, group in enumerate(groups):
        missing = [name for name in group if name not in known]
        if missing:
            raise BundleError(
                f"{where}: field 'lookalike_groups[{n}]' names {missing[0]!r}, which is no label of {LABELS_FILE}; "
                "fix: spell it 'MAKE MODEL' exactly as the label's make and model columns"
            )
        if len({known[name].make for name in group}) < 2:
            raise BundleError(
                f"{where}: field 'lookalike_groups[{n}]' holds labels of one make only; fix: look-alike groups are "
                "across makes (badge twins); labels of one make that count as one model go in one label group"
            )


def load_bundle(path: Path, *, verify: ManifestVerifier | None = None) -> Bundle:
    """Read and verify the bundle in directory ``path``; any problem raises :class:`BundleError`."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(
            f"{root}: is not a directory; fix: set the model bundle path to the directory holding manifest.json"
        )
    manifest = _read_manifest(root, verify)
    _verify_files(root, manifest.files)
    labels_path = root / LABELS_FILE
    try:
        text = labels_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{labels_path}: not UTF-8 text; fix: save it as UTF-8") from exc
    labels = parse_labels(text, str(labels_path))
    check_full_range_makes(manifest.full_range_makes, labels, str(root / MANIFEST_FILE))
    check_lookalike_groups(manifest.lookalike_groups, labels, str(root / MANIFEST_FILE))
    return Bundle(
        path=root,
        manifest=manifest,
        labels=labels,
        model_path=root / MODEL_FILE,
        model_sha256=manifest.files[MODEL_FILE],
    )


# ---------------------------------------------------------------- writing


def labels_csv(labels: Sequence[Label]) -> bytes:
    """The ``labels.csv`` bytes for ``labels`` (header included).

    The ``category`` and ``group`` columns are written only when some label has one, so a table
    without them keeps exactly the 4-column bytes (and sha256) it always had.
    """
    optional = [c for c in LABELS_OPTIONAL_COLUMNS if any(getattr(label, c) for label in labels)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*LABELS_HEADER, *optional])
    for label in sorted(labels, key=lambda lb: lb.index):
        row: list[object] = [label.index, label.make, label.model, "|".join(label.aliases)]
        writer.writerow([*row, *(getattr(label, c) for c in optional)])
    return out.getvalue().encode("utf-8")


def write_bundle(
    path: Path,
    *,
    onnx_bytes: bytes,
    labels: Sequence[Label],
    name: str,
    version: str,
    task: Literal["classifier", "detector"] = "classifier",
    input_name: str,
    input_shape: Sequence[int | str],
    preprocessing: Preprocessing,
    output_name: str,
    output_kind: Literal["logits", "probabilities"] = "logits",
    temperature: float = 1.0,
    demo: bool = False,
    description: str = "",
    detector: DetectorSpec | None = None,
    full_range_makes: Sequence[str] = (),
    crop: CropSpec | None = None,
    tta: TtaSpec | None = None,
    ood: OodSpec | None = None,
    lookalike_groups: Sequence[Sequence[str]] = (),
    operating_point: OperatingPoint | None = None,
) -> Bundle:
    """Write a bundle into directory ``path`` (created if needed) and return it, loaded and verified.

    Everything is validated before any file is written; the manifest is written last, atomically.
    ``full_range_makes`` (classifier only) must each be the make of one of ``labels``.
    """
    root = Path(path)
    label_bytes = labels_csv(labels)
    parsed = parse_labels(label_bytes.decode("utf-8"), LABELS_FILE)
    payloads = {MODEL_FILE: onnx_bytes, LABELS_FILE: label_bytes}
    manifest = Manifest.from_dict(
        {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": version,
            "task": task,
            "input_name": input_name,
            "input_shape": list(input_shape),
            "input_dtype": "float32",
            "preprocessing": preprocessing.to_dict(),
            "output_name": output_name,
            "output_kind": output_kind,
            "temperature": temperature,
            "demo": demo,
            "description": description,
            **({} if detector is None else {"detector": detector.to_dict()}),
            **({"full_range_makes": list(full_range_makes)} if full_range_makes else {}),
            **({} if crop is None else {"crop": crop.to_dict()}),
            **({} if tta is None else {"tta": tta.to_dict()}),
            **({} if ood is None else {"ood": ood.to_dict()}),
            **({"lookalike_groups": [list(g) for g in lookalike_groups]} if lookalike_groups else {}),
            **({} if operating_point is None else {"operating_point": operating_point.to_dict()}),
            "files": {n: hashlib.sha256(b).hexdigest() for n, b in payloads.items()},
        }
    )
    check_full_range_makes(manifest.full_range_makes, parsed)
    check_lookalike_groups(manifest.lookalike_groups, parsed)
    root.mkdir(parents=True, exist_ok=True)
    for file_name, payload in payloads.items():
        write_atomic(root / file_name, payload)
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    write_atomic(root / MANIFEST_FILE, text.encode("utf-8"))
    return load_bundle(root)
