"""Model bundles: a directory holding ``manifest.json``, ``model.onnx`` and ``labels.csv``.

The manifest says what the model expects (input tensor, preprocessing), what it returns
(logits or probabilities, calibration temperature) and the sha256 of every file of the
bundle. :func:`load_bundle` refuses a bundle whose files do not match their sha256, whose
manifest has a bad or unknown field, or whose labels are not a contiguous 0..n-1 table.

Signatures (Ed25519) plug in through ``load_bundle(..., verify=...)``: a callable given the
raw ``manifest.json`` bytes and the bundle directory, run before anything is parsed, which
raises :class:`BundleError` to refuse the bundle; the bytes it checked are the bytes parsed.
Because the manifest lists the sha256 of every other file, checked right after, a valid
signature over the manifest covers the whole bundle. The detached signature lives in
``manifest.sig`` (:data:`SIGNATURE_FILE`), which ``manifest.files`` may not list.
:mod:`engines.signing` provides the verifier (``bundle_verifier``, ``load_trusted_bundle``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from engines.errors import BundleError

__all__ = [
    "LABELS_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "Bundle",
    "DetectorSpec",
    "Label",
    "Manifest",
    "ManifestVerifier",
    "Preprocessing",
    "load_bundle",
    "sha256_file",
    "write_bundle",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.csv"
SIGNATURE_FILE = "manifest.sig"  # detached Ed25519 signature over manifest.json (engines.signing)
LABELS_HEADER = ("index", "make", "model", "aliases")
_CHUNK = 1 << 20


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


ManifestVerifier = Callable[[bytes, Path], None]
"""Called with the raw manifest bytes and the bundle directory; raises BundleError to refuse."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's NCHW float32 input: ``(pixel * scale - mean) / std``."""

    height: int
    width: int
    color_order: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1 / 255
    resize: Literal["stretch", "letterbox", "center_crop"] = "stretch"

    def to_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], _jsonable(asdict(self)))


@dataclass(frozen=True)
class DetectorSpec:
    """How to read a detector's outputs (task "detector" only); see engines/detect.py and docs/DETECTOR.md.

    ``format`` "nms": NMS is inside the graph; ``outputs`` names boxes [1,N,4], scores [1,N],
    classes [1,N] (and optionally num_detections [1]), or one packed [1,N,6] tensor of rows
    (box, score, class). "yolo": one raw [1,4+C,N] (or [1,N,4+C]) tensor, NMS on the host.
    ``normalized``: boxes are in 0..1 of the model input, else in input pixels.
    """

    format: Literal["nms", "yolo"]
    box_format: Literal["xyxy", "cxcywh"]
    normalized: bool
    vehicle_classes: tuple[int, ...]
    outputs: tuple[str, ...]
    score_threshold: float = 0.35
    iou_threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], _jsonable(asdict(self)))


@dataclass(frozen=True)
class Label:
    """One class of the classifier: a (make, model) pair in canonical spelling, plus aliases."""

    index: int
    make: str
    model: str
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.make} {self.model}"


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The parsed ``manifest.json`` of a bundle (schema version 1)."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    task: Literal["classifier", "detector"]
    input_name: str
    input_shape: tuple[int | str, ...]
    input_dtype: str = "float32"
    preprocessing: Preprocessing
    output_name: str
    output_kind: Literal["logits", "probabilities"] = "logits"
    temperature: float = 1.0
    files: dict[str, str] = field(default_factory=dict)
    demo: bool = False
    description: str = ""
    detector: DetectorSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the manifest (tuples become lists, files sorted by name)."""
        data = cast(dict[str, Any], _jsonable(asdict(self)))
        data["files"] = dict(sorted(self.files.items()))
        if self.detector is None:
            del data["detector"]  # classifier manifests stay exactly as before detectors existed
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Validate a decoded manifest; a :class:`BundleError` names the bad field and the fix."""
        return _parse_manifest(data)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest
    labels: tuple[Label, ...]
    model_path: Path
    model_sha256: str


# ---------------------------------------------------------------- manifest validation

_TOP_KEYS = frozenset(Manifest.__dataclass_fields__)
_PP_KEYS = frozenset(Preprocessing.__dataclass_fields__)
_REQUIRED_FILES = (MODEL_FILE, LABELS_FILE)


def _bad(key: str, problem: str, fix: str) -> BundleError:
    return BundleError(f"{MANIFEST_FILE}: field '{key}' {problem}; fix: {fix}")


def _get(
    data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], fix: str, default: Any = ...
) -> Any:
    if key not in data:
        if default is ...:
            raise _bad(key, "is missing", fix)
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass: never accept true/false where a number is expected.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _bad(key, f"must be {names}, got {value!r}", fix)
    return value


def _text(data: Mapping[str, Any], key: str, fix: str, default: Any = ...) -> str:
    value = cast(str, _get(data, key, str, fix, default))
    if not value.strip() and default is ...:
        raise _bad(key, "is empty", fix)
    return value


def _choice(data: Mapping[str, Any], key: str, choices: tuple[str, ...], default: Any = ...) -> str:
    fix = f"use one of {', '.join(choices)}"
    value = cast(str, _get(data, key, str, fix, default))
    if value not in choices:
        raise _bad(key, f"is {value!r}, not a known value", fix)
    return value


def _number(data: Mapping[str, Any], key: str, fix: str, default: Any = ...) -> float:
    value = float(_get(data, key, (int, float), fix, default))
    if not math.isfinite(value):
        raise _bad(key, f"must be a finite number, got {value!r}", fix)
    return value


def _triple(
    pp: Mapping[str, Any], key: str, default: tuple[float, float, float]
) -> tuple[float, float, float]:
    fix = "give three numbers, one per channel in the model's color_order"
    value = _get(pp, key, list, fix, list(default))
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _bad(f"preprocessing.{key}", f"must be a list of 3 numbers, got {value!r}", fix)
    return (float(value[0]), float(value[1]), float(value[2]))


def _parse_preprocessing(data: Mapping[str, Any]) -> Preprocessing:
    pp = _get(data, "preprocessing", dict, "add an object with height, width, color_order, mean, std, resize")
    unknown = sorted(set(pp) - _PP_KEYS)
    if unknown:
        raise _bad(
            f"preprocessing.{unknown[0]}",
            "is not a known key",
            f"remove it or correct its spelling; allowed: {', '.join(sorted(_PP_KEYS))}",
        )
    sizes = {}
    for key in ("height", "width"):
        sizes[key] = _get(pp, key, int, "give the model's input size in pixels")
        if sizes[key] <= 0:
            raise _bad(
                f"preprocessing.{key}", f"must be > 0, got {sizes[key]}", "give the input size in pixels"
            )
    std = _triple(pp, "std", Preprocessing.std)
    if any(s <= 0 for s in std):
        raise _bad(
            "preprocessing.std", f"must be > 0 for every channel, got {list(std)}", "use positive values"
        )
    scale = _number(pp, "scale", "usually 1/255 = 0.00392156862745098", Preprocessing.scale)
    if scale <= 0:
        raise _bad("preprocessing.scale", f"must be > 0, got {scale}", "usually 1/255")
    return Preprocessing(
        height=sizes["height"],
        width=sizes["width"],
        color_order=cast(Literal["RGB", "BGR"], _choice(pp, "color_order", ("RGB", "BGR"), "RGB")),
        mean=_triple(pp, "mean", Preprocessing.mean),
        std=std,
        scale=scale,
        resize=cast(
            Literal["stretch", "letterbox", "center_crop"],
            _choice(pp, "resize", ("stretch", "letterbox", "center_crop"), "stretch"),
        ),
    )


def _parse_shape(data: Mapping[str, Any], pp: Preprocessing) -> tuple[int | str, ...]:
    fix = f'give [batch, 3, {pp.height}, {pp.width}] (NCHW); a dynamic batch is a name such as "N"'
    raw = _get(data, "input_shape", list, fix)
    ok = all(
        (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and d) for d in raw
    )
    if len(raw) != 4 or not ok:
        raise _bad("input_shape", f"must be 4 positive ints or dimension names, got {raw!r}", fix)
    for axis, want in ((1, 3), (2, pp.height), (3, pp.width)):
        if isinstance(raw[axis], int) and raw[axis] != want:
            raise _bad("input_shape", f"is {raw!r} but preprocessing gives {want} at axis {axis}", fix)
    return tuple(raw)


def _parse_files(data: Mapping[str, Any]) -> dict[str, str]:
    fix = "re-pack the bundle (write_bundle) so every file is listed with its sha256"
    files = _get(data, "files", dict, fix)
    for name, digest in files.items():
        if not name or Path(name).name != name or name in (".", "..", MANIFEST_FILE, SIGNATURE_FILE):
            raise _bad("files", f"lists {name!r}, which is not a plain file name of the bundle", fix)
        if (
            not isinstance(digest, str)
            or len(digest) != 64
            or not all(c in "0123456789abcdef" for c in digest)
        ):
            raise _bad(f"files.{name}", f"must be a lowercase sha256 hex digest, got {digest!r}", fix)
    for name in _REQUIRED_FILES:
        if name not in files:
            raise _bad("files", f"does not list {name}", fix)
    return dict(files)


_DET_KEYS = frozenset(DetectorSpec.__dataclass_fields__)


def _int_list(det: Mapping[str, Any], key: str, fix: str) -> tuple[int, ...]:
    value = _get(det, key, list, fix)
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise _bad(f"detector.{key}", f"must be a non-empty list of class indices >= 0, got {value!r}", fix)
    return tuple(sorted(set(value)))


def _det_outputs(det: Mapping[str, Any], fmt: str, output_name: str) -> tuple[str, ...]:
    fix = 'nms: ["boxes", "scores", "classes"(, "num_detections")] or one packed [1,N,6]; yolo: one raw output'
    value = _get(det, "outputs", list, fix)
    counts = (1, 3, 4) if fmt == "nms" else (1,)
    if len(value) not in counts or not all(isinstance(v, str) and v for v in value) or len(set(value)) != len(value):
        raise _bad("detector.outputs", f"must be {' or '.join(map(str, counts))} distinct names, got {value!r}", fix)
    if output_name not in value:
        raise _bad("output_name", f"is {output_name!r}, not one of detector.outputs {value!r}", "name one of them")
    return tuple(value)


def _threshold(det: Mapping[str, Any], key: str, default: float) -> float:
    value = _number(det, key, "give a number between 0 and 1", default)
    if not 0.0 <= value <= 1.0:
        raise _bad(f"detector.{key}", f"must be between 0 and 1, got {value}", "give a number between 0 and 1")
    return value


def _parse_detector(data: Mapping[str, Any]) -> DetectorSpec | None:
    """The ``detector`` object: required for task "detector", refused for a classifier."""
    det = data.get("detector")
    is_detector = data.get("task") == "detector"
    if det is None:
        if is_detector:
            raise _bad("detector", "is missing for task detector", "describe the outputs (docs/DETECTOR.md)")
        return None
    if not is_detector:
        raise _bad("detector", "is only allowed for task detector", "remove it from a classifier manifest")
    det = _get(data, "detector", dict, "give an object (docs/DETECTOR.md)")
    unknown = sorted(set(det) - _DET_KEYS)
    if unknown:
        raise _bad(f"detector.{unknown[0]}", "is not a known key", f"allowed: {', '.join(sorted(_DET_KEYS))}")
    fmt = _choice(det, "format", ("nms", "yolo"))
    return DetectorSpec(
        format=cast(Literal["nms", "yolo"], fmt),
        box_format=cast(Literal["xyxy", "cxcywh"], _choice(det, "box_format", ("xyxy", "cxcywh"))),
        normalized=bool(_get(det, "normalized", bool, "true if boxes are in 0..1 of the model input")),
        vehicle_classes=_int_list(det, "vehicle_classes", "list the label indices that are vehicles"),
        outputs=_det_outputs(det, fmt, str(data.get("output_name"))),
        score_threshold=_threshold(det, "score_threshold", DetectorSpec.score_threshold),
        iou_threshold=_threshold(det, "iou_threshold", DetectorSpec.iou_threshold),
    )


def _check_envelope(data: Mapping[str, Any]) -> int:
    """The manifest is an object with known keys only, in the schema version this agent reads."""
    if not isinstance(data, Mapping):
        raise BundleError(
            f"{MANIFEST_FILE}: must hold a JSON object, got {type(data).__name__}; fix: re-pack it"
        )
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _bad(
            unknown[0],
            "is not a known key",
            f"remove it or correct its spelling; allowed: {', '.join(sorted(_TOP_KEYS))}",
        )
    version = _get(data, "schema_version", int, f"set it to {SCHEMA_VERSION}")
    if version != SCHEMA_VERSION:
        raise _bad(
            "schema_version",
            f"is {version}, this agent reads {SCHEMA_VERSION}",
            "upgrade the agent or re-pack the bundle for this schema version",
        )
    return cast(int, version)


def _parse_manifest(data: Mapping[str, Any]) -> Manifest:
    version = _check_envelope(data)
    pp = _parse_preprocessing(data)
    temperature = _number(data, "temperature", "use 1.0 when uncalibrated", 1.0)
    if temperature <= 0:
        raise _bad("temperature", f"must be > 0, got {temperature}", "use 1.0 when uncalibrated")
    dtype = _choice(data, "input_dtype", ("float32", "float16"), "float32")
    return Manifest(
        schema_version=version,
        name=_text(data, "name", "give the model's name"),
        version=_text(data, "version", 'give the model\'s version, e.g. "2026.11.0"'),
        task=cast(Literal["classifier", "detector"], _choice(data, "task", ("classifier", "detector"))),
        input_name=_text(data, "input_name", "give the ONNX graph's input tensor name"),
        input_shape=_parse_shape(data, pp),
        input_dtype=dtype,
        preprocessing=pp,
        output_name=_text(data, "output_name", "give the ONNX graph's output tensor name"),
        output_kind=cast(
            Literal["logits", "probabilities"],
            _choice(data, "output_kind", ("logits", "probabilities"), "logits"),
        ),
        temperature=temperature,
        files=_parse_files(data),
        demo=bool(_get(data, "demo", bool, "use true or false", False)),
        description=_text(data, "description", "give a short text", ""),
        detector=_parse_detector(data),
    )


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


def _parse_label_row(row: list[str], line: int, where: str) -> Label:
    if len(row) != 4:
        raise BundleError(
            f"{where}:{line}: expected 4 columns (index,make,model,aliases), got {len(row)}; "
            "fix: quote fields that contain commas"
        )
    try:
        index = int(row[0])
    except ValueError as exc:
        raise BundleError(
            f"{where}:{line}: index {row[0]!r} is not an integer; fix: number rows 0..n-1"
        ) from exc
    make, model = row[1].strip(), row[2].strip()
    if not make or not model:
        raise BundleError(f"{where}:{line}: make and model must not be empty; fix: fill both columns")
    aliases = tuple(a.strip() for a in row[3].split("|") if a.strip())
    return Label(index=index, make=make, model=model, aliases=aliases)


def parse_labels(text: str, where: str = LABELS_FILE) -> tuple[Label, ...]:
    """Parse ``labels.csv`` text; rows may come in any order but indices must be exactly 0..n-1."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(c.strip() for c in rows[0]) != LABELS_HEADER:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise BundleError(
            f"{where}:1: header must be '{','.join(LABELS_HEADER)}', got {got!r}; fix: add that header line"
        )
    labels = [_parse_label_row(row, n, where) for n, row in enumerate(rows[1:], start=2) if row]
    if not labels:
        raise BundleError(f"{where}: has no label rows; fix: one row per class of the model")
    by_index: dict[int, Label] = {}
    names: set[str] = set()
    for label in labels:
        if label.index in by_index:
            raise BundleError(
                f"{where}: index {label.index} appears twice; fix: number rows 0..n-1 once each"
            )
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


def _read_manifest(root: Path, verify: ManifestVerifier | None) -> Manifest:
    path = root / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(
            f"{path}: missing; fix: point at a bundle directory (manifest.json, model.onnx, "
            "labels.csv) or re-pack it"
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


def load_bundle(path: Path, *, verify: ManifestVerifier | None = None) -> Bundle:
    """Read and verify the bundle in directory ``path``; any problem raises :class:`BundleError`."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(
            f"{root}: is not a directory; fix: set the model bundle path to the directory "
            "holding manifest.json"
        )
    manifest = _read_manifest(root, verify)
    _verify_files(root, manifest.files)
    labels_path = root / LABELS_FILE
    try:
        text = labels_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{labels_path}: not UTF-8 text; fix: save it as UTF-8") from exc
    labels = parse_labels(text, str(labels_path))
    return Bundle(
        path=root,
        manifest=manifest,
        labels=labels,
        model_path=root / MODEL_FILE,
        model_sha256=manifest.files[MODEL_FILE],
    )


# ---------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def labels_csv(labels: Sequence[Label]) -> bytes:
    """The ``labels.csv`` bytes for ``labels`` (header included)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LABELS_HEADER)
    for label in sorted(labels, key=lambda lb: lb.index):
        writer.writerow([label.index, label.make, label.model, "|".join(label.aliases)])
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
) -> Bundle:
    """Write a bundle into directory ``path`` (created if needed) and return it, loaded and verified.

    Everything is validated before any file is written; the manifest is written last, atomically.
    """
    root = Path(path)
    label_bytes = labels_csv(labels)
    parse_labels(label_bytes.decode("utf-8"), LABELS_FILE)
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
            "files": {n: hashlib.sha256(b).hexdigest() for n, b in payloads.items()},
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    for file_name, payload in payloads.items():
        _atomic_write(root / file_name, payload)
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    _atomic_write(root / MANIFEST_FILE, text.encode("utf-8"))
    return load_bundle(root)
