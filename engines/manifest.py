"""The ``manifest.json`` of a model bundle: its dataclasses and their validation (schema version 1).

:meth:`Manifest.from_dict` turns a decoded manifest into a :class:`Manifest`, or raises
:class:`~iaflash.engines.errors.BundleError` naming the bad field and the fix. Every name here is also
importable from :mod:`iaflash.engines.bundle`, which reads and writes whole bundles; checks that need the
labels too (``full_range_makes``) live there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from iaflash.engines.errors import BundleError

__all__ = [
    "LABELS_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "OPERATING_POINT_THRESHOLDS",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "CropSpec",
    "DetectorSpec",
    "Manifest",
    "OodSpec",
    "OperatingPoint",
    "Preprocessing",
    "TtaSpec",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.csv"
SIGNATURE_FILE = "manifest.sig"  # detached Ed25519 signature over manifest.json (iaflash.engines.signing)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


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
    "gfl": an anchor-free head with distribution-style box regression (NanoDet, GFL): per point of
    each stride, C class scores and 4 x (``reg_max`` + 1) distance-bin logits (left, top, right,
    bottom); one packed [1,N,C+4(reg_max+1)] output, or a class map [1,C,H,W] and a bin map
    [1,4(reg_max+1),H,W] per stride (``outputs`` in stride order: cls, reg, cls, reg...); points
    sit at ``(x + center_offset) * stride``; ``score_activation`` sigmoid when the graph outputs
    logits. ``normalized``: boxes are in 0..1 of the model input, else in input pixels.
    """

    format: Literal["nms", "yolo", "gfl"]
    box_format: Literal["xyxy", "cxcywh"]
    normalized: bool
    vehicle_classes: tuple[int, ...]
    outputs: tuple[str, ...]
    score_threshold: float = 0.35
    iou_threshold: float = 0.5
    strides: tuple[int, ...] = ()
    reg_max: int = 7
    center_offset: float = 0.0
    score_activation: Literal["none", "sigmoid"] = "none"

    def to_dict(self) -> dict[str, Any]:
        data = cast(dict[str, Any], _jsonable(asdict(self)))
        if self.format != "gfl":  # the fields of older formats stay what older agents wrote
            for key in _GFL_KEYS:
                del data[key]
        return data


_GFL_KEYS = ("strides", "reg_max", "center_offset", "score_activation")


OPERATING_POINT_THRESHOLDS = ("min_top1", "make_threshold", "model_threshold", "other_threshold", "match_threshold")
"""Threshold names an operating point may fix (the first three are required); see docs/DECISION.md."""
_OP_REQUIRED_THRESHOLDS = OPERATING_POINT_THRESHOLDS[:3]


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """The decision thresholds fitted for a target false-flag rate (classifier only), and what they reached.

    Written by ``iaflash-agent fit`` (iaflash.agent.evaluation.fit). ``upper_bound`` is the Clopper-Pearson
    upper confidence bound (``confidence``, ``sided``) of the false-flag rate, ``flags`` flags in
    ``n_genuine`` genuine samples; ``met`` is ``upper_bound <= target``. ``temperature`` is the one the
    thresholds were fitted at (it must equal the manifest's). ``dataset_sha256`` names the fitting set.
    ``guard`` (>= 1, 1 = none) is the margin the fit kept: each genuine sample was also judged at its
    probabilities raised to that power (docs/DECISION.md "The guard"); written only when not 1, so
    manifests without it read as before.
    """

    id: str
    target: float
    confidence: float = 0.95
    sided: Literal["one", "two"] = "one"
    thresholds: dict[str, float]
    temperature: float
    n_genuine: int
    flags: int
    upper_bound: float
    met: bool
    n_clones: int = 0
    clones_caught: int = 0
    fitted_at: str
    dataset_sha256: str
    guard: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        data = cast(dict[str, Any], _jsonable(asdict(self)))
        if self.guard == 1.0:
            del data["guard"]  # what agents before the guard read
        return data

    def summary(self) -> dict[str, Any]:
        """What a verdict's evidence names: id, target, bound, met."""
        return {"id": self.id, "target": self.target, "upper_bound": self.upper_bound, "met": self.met}


ColorMode = Literal["color", "grey"]
INTERPOLATIONS = ("auto", "area", "linear", "cubic", "nearest")
LEGACY_CROP_MARGIN = 0.1  # what agents before the crop contract always added around the box


@dataclass(frozen=True)
class CropSpec:
    """How the classifier's input is cut from the frame (the crop contract; docs/BUNDLES.md).

    ``margin``: added around the vehicle box on each side, as a fraction of its width/height (0 =
    tight). ``aspect``: how the crop fits the input (stretch, letterbox, center_crop; the same value
    as ``preprocessing.resize``). ``interpolation``: auto (area when shrinking, linear when
    enlarging), area, linear, cubic or nearest. ``color_modes``: "color" only, or also "grey"
    (greyscale / infrared frames); a frame in a mode the model does not accept is inconclusive.
    A manifest without a ``crop`` section gets :meth:`legacy`: what agents always did.
    """

    margin: float = LEGACY_CROP_MARGIN
    aspect: Literal["stretch", "letterbox", "center_crop"] = "stretch"
    interpolation: Literal["auto", "area", "linear", "cubic", "nearest"] = "auto"
    color_modes: tuple[ColorMode, ...] = ("color",)

    @classmethod
    def legacy(cls, pp: Preprocessing) -> CropSpec:
        """The crop of a manifest without a ``crop`` section: 10 % margin, the preprocessing's resize."""
        return cls(aspect=pp.resize)

    def to_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], _jsonable(asdict(self)))


@dataclass(frozen=True)
class TtaSpec:
    """Test-time augmentation the model was checked with: ``hflip`` averages the mirrored crop in."""

    hflip: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OodSpec:
    """Out-of-distribution gate: energy ``E = -T * logsumexp(logits / T)``; ``E > threshold`` abstains.

    In-distribution inputs have low (very negative) energy; fit ``threshold`` on held-in data
    (e.g. the 95th or 99th percentile of the energies of genuine crops).
    """

    threshold: float
    method: Literal["energy"] = "energy"
    temperature: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The parsed ``manifest.json`` of a bundle (schema version 1).

    ``full_range_makes`` (classifier only): makes whose whole model range the labels cover, so an
    unseen model of such a make can still be checked at make level; each is the make of a label.
    """

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
    full_range_makes: tuple[str, ...] = ()
    crop: CropSpec | None = None
    tta: TtaSpec | None = None
    ood: OodSpec | None = None
    lookalike_groups: tuple[tuple[str, ...], ...] = ()
    operating_point: OperatingPoint | None = None
    allow_rollback_from: str | None = None  # a signed rollback: the newest version it may replace (engines/rollback.py)

    @property
    def crop_spec(self) -> CropSpec:
        """The crop contract in force: the ``crop`` section, else :meth:`CropSpec.legacy`."""
        return self.crop if self.crop is not None else CropSpec.legacy(self.preprocessing)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the manifest (tuples become lists, files sorted by name).

        Optional fields left at their default (``detector``, ``full_range_makes``) are omitted, so a
        manifest that does not use them stays byte for byte what older agents wrote and signed.
        """
        data = cast(dict[str, Any], _jsonable(asdict(self)))
        data["files"] = dict(sorted(self.files.items()))
        if self.detector is None:
            del data["detector"]
        else:  # the detector's own rule (GFL-only fields dropped for yolo/nms), not asdict's every field
            data["detector"] = self.detector.to_dict()
        if not self.full_range_makes:
            del data["full_range_makes"]
        for key in ("crop", "tta", "ood"):
            if data[key] is None:
                del data[key]
        if not self.lookalike_groups:
            del data["lookalike_groups"]
        if self.operating_point is None:
            del data["operating_point"]
        else:
            data["operating_point"] = self.operating_point.to_dict()
        if self.allow_rollback_from is None:
            del data["allow_rollback_from"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Validate a decoded manifest; a :class:`BundleError` names the bad field and the fix."""
        return _parse_manifest(data)


# ---------------------------------------------------------------- field helpers

_TOP_KEYS = frozenset(Manifest.__dataclass_fields__)
_PP_KEYS = frozenset(Preprocessing.__dataclass_fields__)
_DET_KEYS = frozenset(DetectorSpec.__dataclass_fields__)
_REQUIRED_FILES = (MODEL_FILE, LABELS_FILE)


def _bad(key: str, problem: str, fix: str) -> BundleError:
    return BundleError(f"{MANIFEST_FILE}: field '{key}' {problem}; fix: {fix}")


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], fix: str, default: Any = ...) -> Any:
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


def _triple(pp: Mapping[str, Any], key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    fix = "give three numbers, one per channel in the model's color_order"
    value = _get(pp, key, list, fix, list(default))
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _bad(f"preprocessing.{key}", f"must be a list of 3 numbers, got {value!r}", fix)
    return (float(value[0]), float(value[1]), float(value[2]))


def _refuse_unknown(obj: Mapping[str, Any], allowed: frozenset[str], prefix: str = "") -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _bad(
            f"{prefix}{unknown[0]}",
            "is not a known key",
            f"remove it or correct its spelling; allowed: {', '.join(sorted(allowed))}",
        )


# ---------------------------------------------------------------- sections


def _parse_preprocessing(data: Mapping[str, Any]) -> Preprocessing:
    pp = _get(data, "preprocessing", dict, "add an object with height, width, color_order, mean, std, resize")
    _refuse_unknown(pp, _PP_KEYS, "preprocessing.")
    sizes = {}
    for key in ("height", "width"):
        sizes[key] = _get(pp, key, int, "give the model's input size in pixels")
        if sizes[key] <= 0:
            raise _bad(f"preprocessing.{key}", f"must be > 0, got {sizes[key]}", "give the input size in pixels")
    std = _triple(pp, "std", Preprocessing.std)
    if any(s <= 0 for s in std):
        raise _bad("preprocessing.std", f"must be > 0 for every channel, got {list(std)}", "use positive values")
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
    ok = all((isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and d) for d in raw)
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
        if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise _bad(f"files.{name}", f"must be a lowercase sha256 hex digest, got {digest!r}", fix)
    for name in _REQUIRED_FILES:
        if name not in files:
            raise _bad("files", f"does not list {name}", fix)
    return dict(files)


def _parse_full_range_makes(data: Mapping[str, Any]) -> tuple[str, ...]:
    """Distinct non-empty make names (checked against the labels by iaflash.engines.bundle); classifier only."""
    fix = 'list makes spelt as in labels.csv\'s make column, e.g. ["RENAULT", "PEUGEOT"]'
    value = _get(data, "full_range_makes", list, fix, [])
    if value and data.get("task") != "classifier":
        raise _bad("full_range_makes", "is only allowed for task classifier", "remove it from this manifest")
    for make in value:
        if not isinstance(make, str) or not make.strip():
            raise _bad("full_range_makes", f"must hold non-empty strings, got {make!r}", fix)
    if len(set(value)) != len(value):
        twice = next(m for m in value if value.count(m) > 1)
        raise _bad("full_range_makes", f"lists {twice!r} twice", "list each make once")
    return tuple(value)


def _parse_lookalike_groups(data: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Lists of >= 2 label names ("MAKE MODEL" as in labels.csv) that look alike across makes; classifier only."""
    fix = 'list label names spelt "MAKE MODEL" as in labels.csv, e.g. [["CHEVROLET EXPRESS", "GMC SAVANA"]]'
    value = _get(data, "lookalike_groups", list, fix, [])
    if value and data.get("task") != "classifier":
        raise _bad("lookalike_groups", "is only allowed for task classifier", "remove it from this manifest")
    seen: set[str] = set()
    groups = []
    for n, group in enumerate(value):
        ok = isinstance(group, list) and len(group) >= 2 and all(isinstance(g, str) and g.strip() for g in group)
        if not ok:
            raise _bad(f"lookalike_groups[{n}]", f"must be a list of at least 2 label names, got {group!r}", fix)
        twice = next((g for g in group if g in seen or group.count(g) > 1), None)
        if twice is not None:
            raise _bad(f"lookalike_groups[{n}]", f"lists {twice!r} a second time", "put each label in one group once")
        seen.update(group)
        groups.append(tuple(group))
    return tuple(groups)


def _unit(op: Mapping[str, Any], key: str, fix: str, default: Any = ..., *, open_low: bool = False) -> float:
    value = _number(op, key, fix, default)
    if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
        raise _bad(f"operating_point.{key}", f"must be within {'(0' if open_low else '[0'}, 1], got {value}", fix)
    return value


def _count(op: Mapping[str, Any], key: str, default: Any = ...) -> int:
    value = cast(int, _get(op, key, int, "give a whole number >= 0", default))
    if value < 0:
        raise _bad(f"operating_point.{key}", f"must be >= 0, got {value}", "give a whole number >= 0")
    return value


def _op_thresholds(op: Mapping[str, Any]) -> dict[str, float]:
    fix = f"give {', '.join(_OP_REQUIRED_THRESHOLDS)} (and optionally other_threshold, match_threshold), each 0..1"
    raw = _get(op, "thresholds", dict, fix)
    _refuse_unknown(raw, frozenset(OPERATING_POINT_THRESHOLDS), "operating_point.thresholds.")
    out = {}
    for key in OPERATING_POINT_THRESHOLDS:
        if key in raw or key in _OP_REQUIRED_THRESHOLDS:
            value = _number(raw, key, fix)
            if not 0.0 <= value <= 1.0:
                raise _bad(f"operating_point.thresholds.{key}", f"must be within 0..1, got {value}", fix)
            out[key] = value
    return out


def _parse_operating_point(data: Mapping[str, Any], temperature: float) -> OperatingPoint | None:
    """The fitted ``operating_point`` (classifier only), consistent with itself and the manifest's temperature."""
    if "operating_point" not in data:
        return None
    refit = "re-fit it with `iaflash-agent fit` rather than editing it by hand"
    op = _get(data, "operating_point", dict, refit)
    if data.get("task") != "classifier":
        raise _bad("operating_point", "is only allowed for task classifier", "remove it from this manifest")
    _refuse_unknown(op, frozenset(OperatingPoint.__dataclass_fields__), "operating_point.")
    point = OperatingPoint(
        id=_text(op, "id", refit),
        target=_unit(op, "target", "give the target false-flag rate, e.g. 0.001", open_low=True),
        confidence=_unit(op, "confidence", "usually 0.95", 0.95, open_low=True),
        sided=cast(Literal["one", "two"], _choice(op, "sided", ("one", "two"), "one")),
        thresholds=_op_thresholds(op),
        temperature=_number(op, "temperature", refit),
        n_genuine=_count(op, "n_genuine"),
        flags=_count(op, "flags"),
        upper_bound=_unit(op, "upper_bound", refit),
        met=bool(_get(op, "met", bool, refit)),
        n_clones=_count(op, "n_clones", 0),
        clones_caught=_count(op, "clones_caught", 0),
        fitted_at=_text(op, "fitted_at", refit),
        dataset_sha256=_text(op, "dataset_sha256", refit),
        guard=_number(op, "guard", refit, 1.0),
    )
    if point.guard < 1.0:
        raise _bad("operating_point.guard", f"must be >= 1 (1 = no guard), got {point.guard}", refit)
    if point.flags > point.n_genuine or point.clones_caught > point.n_clones:
        raise _bad("operating_point", "counts more flags (or caught clones) than samples", refit)
    if point.met != (point.upper_bound <= point.target):
        raise _bad("operating_point.met", f"is {point.met} but upper_bound {point.upper_bound} vs target", refit)
    if not math.isclose(point.temperature, temperature, rel_tol=1e-9):
        raise _bad(
            "operating_point.temperature",
            f"is {point.temperature}, the manifest's temperature is {temperature}: the thresholds were fitted "
            "at another temperature",
            refit,
        )
    return point


def _int_list(det: Mapping[str, Any], key: str, fix: str) -> tuple[int, ...]:
    value = _get(det, key, list, fix)
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise _bad(f"detector.{key}", f"must be a non-empty list of class indices >= 0, got {value!r}", fix)
    return tuple(sorted(set(value)))


def _det_outputs(det: Mapping[str, Any], fmt: str, output_name: str) -> tuple[str, ...]:
    fix = (
        'nms: ["boxes", "scores", "classes"(, "num_detections")] or one packed [1,N,6]; yolo: one raw output; '
        "gfl: one packed output or a cls and a reg map per stride"
    )
    value = _get(det, "outputs", list, fix)
    counts = {"nms": (1, 3, 4), "yolo": (1,), "gfl": (1, 2 * len(det.get("strides") or ()))}[fmt]
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
    fmt = _choice(det, "format", ("nms", "yolo", "gfl"))
    gfl = fmt == "gfl"  # distances decode to xyxy input pixels: box_format and normalized are implied
    return DetectorSpec(
        format=cast(Literal["nms", "yolo", "gfl"], fmt),
        box_format=cast(
            Literal["xyxy", "cxcywh"], _choice(det, "box_format", ("xyxy", "cxcywh"), "xyxy" if gfl else ...)
        ),
        normalized=bool(
            _get(det, "normalized", bool, "true if boxes are in 0..1 of the model input", False if gfl else ...)
        ),
        vehicle_classes=_int_list(det, "vehicle_classes", "list the label indices that are vehicles"),
        outputs=_det_outputs(det, fmt, str(data.get("output_name"))),
        score_threshold=_threshold(det, "score_threshold", DetectorSpec.score_threshold),
        iou_threshold=_threshold(det, "iou_threshold", DetectorSpec.iou_threshold),
        **(_parse_gfl(det) if gfl else {}),
    )


def _parse_gfl(det: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a "gfl" head: strides (required), reg_max, center_offset, score_activation."""
    fix = "list the head's strides in output order, e.g. [8, 16, 32, 64] (NanoDet-Plus)"
    strides = _get(det, "strides", list, fix)
    if not strides or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in strides):
        raise _bad("detector.strides", f"must be a non-empty list of positive ints, got {strides!r}", fix)
    reg_max = _get(det, "reg_max", int, "the last distance bin index, 7 for NanoDet-Plus", 7)
    if reg_max < 1:
        raise _bad("detector.reg_max", f"must be >= 1, got {reg_max}", "7 for NanoDet-Plus (8 bins per side)")
    offset = _number(det, "center_offset", "0 (NanoDet-Plus) or 0.5 (points at cell centres)", 0.0)
    activation = _choice(det, "score_activation", ("none", "sigmoid"), "none")
    return {"strides": tuple(strides), "reg_max": reg_max, "center_offset": offset, "score_activation": activation}


# ---------------------------------------------------------------- crop contract, TTA, OOD (classifier only)


def _classifier_section(data: Mapping[str, Any], key: str, fix: str) -> dict[str, Any] | None:
    """The ``key`` object of a classifier manifest, its keys prefixed (``crop.margin``) for the messages."""
    if key not in data:
        return None
    if data.get("task") != "classifier":
        raise _bad(key, "is only allowed for task classifier", "remove it from this manifest")
    section = cast(Mapping[str, Any], _get(data, key, dict, fix))
    fields = {"crop": _CROP_KEYS, "tta": _TTA_KEYS, "ood": _OOD_KEYS}[key]
    _refuse_unknown(section, fields, f"{key}.")
    return {f"{key}.{name}": value for name, value in section.items()}


def _parse_crop(data: Mapping[str, Any], pp: Preprocessing) -> CropSpec | None:
    """The ``crop`` section; ``aspect`` defaults to ``preprocessing.resize`` and may not contradict it."""
    crop = _classifier_section(data, "crop", "give margin, aspect, interpolation, color_modes (docs/BUNDLES.md)")
    if crop is None:
        return None
    margin = _number(crop, "crop.margin", "a fraction of the box size, 0 = tight, e.g. 0.1", LEGACY_CROP_MARGIN)
    if not 0.0 <= margin <= 1.0:
        raise _bad("crop.margin", f"must be between 0 and 1, got {margin}", "use 0 for a tight crop, 0.1 for 10 %")
    aspect = _choice(crop, "crop.aspect", ("stretch", "letterbox", "center_crop"), pp.resize)
    raw_pp = data.get("preprocessing") or {}
    if "resize" in raw_pp and raw_pp["resize"] != aspect:
        raise _bad(
            "crop.aspect",
            f"is {aspect!r} but preprocessing.resize is {raw_pp['resize']!r}",
            "give one value (crop.aspect), or the same in both",
        )
    modes = _get(crop, "crop.color_modes", list, 'use ["color"] or ["color", "grey"]', ["color"])
    if not modes or any(m not in ("color", "grey") for m in modes) or len(set(modes)) != len(modes):
        raise _bad("crop.color_modes", f"must list distinct 'color'/'grey', got {modes!r}", 'use ["color"]')
    interpolation = _choice(crop, "crop.interpolation", INTERPOLATIONS, "auto")
    return CropSpec(
        margin=margin,
        aspect=cast(Literal["stretch", "letterbox", "center_crop"], aspect),
        interpolation=cast(Literal["auto", "area", "linear", "cubic", "nearest"], interpolation),
        color_modes=cast(tuple[ColorMode, ...], tuple(modes)),
    )


def _parse_tta(data: Mapping[str, Any]) -> TtaSpec | None:
    tta = _classifier_section(data, "tta", 'give {"hflip": true} or remove it')
    if tta is None:
        return None
    return TtaSpec(hflip=bool(_get(tta, "tta.hflip", bool, "use true or false", False)))


def _parse_ood(data: Mapping[str, Any]) -> OodSpec | None:
    ood = _classifier_section(data, "ood", 'give {"method": "energy", "threshold": -5.0}')
    if ood is None:
        return None
    if data.get("output_kind", "logits") != "logits":
        raise _bad("ood", "needs output_kind logits (energy is computed from logits)", "remove ood or export logits")
    _choice(ood, "ood.method", ("energy",), "energy")
    temperature = _number(ood, "ood.temperature", "usually 1.0", 1.0)
    if temperature <= 0:
        raise _bad("ood.temperature", f"must be > 0, got {temperature}", "usually 1.0")
    threshold = _number(ood, "ood.threshold", "fit it on genuine crops (docs/BUNDLES.md)")
    return OodSpec(threshold=threshold, temperature=temperature)


_CROP_KEYS = frozenset(CropSpec.__dataclass_fields__)
_TTA_KEYS = frozenset(TtaSpec.__dataclass_fields__)
_OOD_KEYS = frozenset(OodSpec.__dataclass_fields__)


# ---------------------------------------------------------------- the whole manifest


def _check_envelope(data: Mapping[str, Any]) -> int:
    """The manifest is an object with known keys only, in the schema version this agent reads."""
    if not isinstance(data, Mapping):
        raise BundleError(f"{MANIFEST_FILE}: must hold a JSON object, got {type(data).__name__}; fix: re-pack it")
    _refuse_unknown(data, _TOP_KEYS)
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
    crop = _parse_crop(data, pp)
    if crop is not None:  # one value in force: crop.aspect is the preprocessing's resize
        pp = replace(pp, resize=crop.aspect)
    temperature = _number(data, "temperature", "use 1.0 when uncalibrated", 1.0)
    if temperature <= 0:
        raise _bad("temperature", f"must be > 0, got {temperature}", "use 1.0 when uncalibrated")
    return Manifest(
        schema_version=version,
        name=_text(data, "name", "give the model's name"),
        version=_text(data, "version", 'give the model\'s version, e.g. "2026.11.0"'),
        task=cast(Literal["classifier", "detector"], _choice(data, "task", ("classifier", "detector"))),
        input_name=_text(data, "input_name", "give the ONNX graph's input tensor name"),
        input_shape=_parse_shape(data, pp),
        input_dtype=_choice(data, "input_dtype", ("float32", "float16"), "float32"),
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
        full_range_makes=_parse_full_range_makes(data),
        crop=crop,
        tta=_parse_tta(data),
        ood=_parse_ood(data),
        lookalike_groups=_parse_lookalike_groups(data),
        operating_point=_parse_operating_point(data, temperature),
        allow_rollback_from=_parse_rollback(data),
    )


def _parse_rollback(data: Mapping[str, Any]) -> str | None:
    if "allow_rollback_from" not in data:
        return None
    return _text(data, "allow_rollback_from", "give the newest version this rollback may replace, or remove it")
