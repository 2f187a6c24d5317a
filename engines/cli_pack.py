"""``iaflash-engines pack``: an ONNX model and its labels into a model bundle.

Exit codes: 0 ok, 1 operational error, 2 usage error. With ``--json`` it prints one JSON
document on stdout; diagnostics go to stderr. Shares its helpers with :mod:`iaflash.engines.cli_bundle`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from iaflash.engines.bundle import (
    SIGNATURE_FILE,
    Bundle,
    DetectorSpec,
    Label,
    Preprocessing,
    parse_labels,
    write_bundle,
)
from iaflash.engines.cli_common import CONTEXT, EXIT_USAGE, emit, fail, json_option, public_key_id
from iaflash.engines.errors import BundleError, EngineError, SignatureError
from iaflash.engines.manifest import LEGACY_CROP_MARGIN, CropSpec, OodSpec, TtaSpec
from iaflash.engines.signing import sign_bundle

__all__ = ["commands", "pack"]

_DIM_NAMES = ("N", "C", "H", "W")


def _triple(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3:
        raise click.BadParameter(f"{value!r} is not three comma-separated numbers (e.g. 0.485,0.456,0.406)")
    return parts[0], parts[1], parts[2]


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    height, _, width = value.lower().partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise click.BadParameter(f"{value!r} is not HxW in pixels (e.g. 224x224)")
    return int(height), int(width)


def _inspect_onnx(model: Path, output_name: str | None) -> tuple[str, list[int | str], str, list[Any]]:
    """(input name, input shape, output name, output shape) of the model, read with onnxruntime."""
    import onnxruntime as ort  # noqa: PLC0415  # heavy; only pack needs it

    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  # onnxruntime raises its own untyped errors: map them here
        fail(f"{model}: onnxruntime cannot load it ({exc}); fix: export one self-contained ONNX file")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        fail(f"{model}: has {len(inputs)} inputs; the agent feeds one NCHW float32 tensor")
    if inputs[0].type != "tensor(float)":
        fail(f"{model}: input {inputs[0].name!r} is {inputs[0].type}; fix: export with a float32 input")
    names = [o.name for o in outputs]
    chosen = output_name or names[0]
    if chosen not in names:
        fail(f"{model}: has no output {chosen!r}; outputs: {', '.join(names)}", EXIT_USAGE)
    shape = [d if isinstance(d, (int, str)) and d != "" else None for d in inputs[0].shape]
    if len(shape) != 4:
        fail(f"{model}: input {inputs[0].name!r} has shape {inputs[0].shape}; the agent needs [batch, 3, H, W]")
    dims: list[int | str] = [d if d is not None else _DIM_NAMES[i] for i, d in enumerate(shape)]
    return inputs[0].name, dims, chosen, list(outputs[names.index(chosen)].shape)


def _input_size(dims: list[int | str], given: tuple[int, int] | None) -> tuple[int, int]:
    graph = (dims[2], dims[3])
    if isinstance(graph[0], int) and isinstance(graph[1], int):
        if given is not None and given != graph:
            raise click.UsageError(
                f"--input-size {given[0]}x{given[1]} but the model's input is "
                f"{graph[0]}x{graph[1]}; drop --input-size or give the model's size"
            )
        return graph[0], graph[1]
    if given is None:
        raise click.UsageError("the model's input size is dynamic; give --input-size HxW (e.g. 224x224)")
    return given


def _read_labels(path: Path) -> tuple[Label, ...]:
    try:
        return parse_labels(path.read_text(encoding="utf-8-sig"), str(path))
    except UnicodeDecodeError:
        fail(f"{path}: not UTF-8 text; fix: save it as UTF-8")
    except BundleError as exc:
        fail(str(exc))


def _detector_spec(task: str, path: Path | None) -> DetectorSpec | None:
    if task != "detector":
        if path is not None:
            raise click.UsageError("--detector-spec is only for --task detector")
        return None
    if path is None:
        raise click.UsageError("--task detector needs --detector-spec FILE.json (the manifest's detector object)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return DetectorSpec(**doc)  # validated with the whole manifest by write_bundle
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        fail(f"{path}: not a detector object ({exc}); fix: see docs/DETECTOR.md for its keys")


def _pack_doc(bundle: Bundle, sig: Path | None, kid: str | None) -> dict[str, Any]:
    m = bundle.manifest
    return {
        "bundle": str(bundle.path),
        "name": m.name,
        "version": m.version,
        "task": m.task,
        "input_name": m.input_name,
        "input_shape": list(m.input_shape),
        "output_name": m.output_name,
        "output_kind": m.output_kind,
        "classes": len(bundle.labels),
        "full_range_makes": list(m.full_range_makes),
        "preprocessing": m.preprocessing.to_dict(),
        "crop": m.crop_spec.to_dict() if m.task == "classifier" else None,
        "crop_declared": m.crop is not None,
        "tta": None if m.tta is None else m.tta.to_dict(),
        "ood": None if m.ood is None else m.ood.to_dict(),
        "files": dict(sorted(m.files.items())),
        "signature": str(sig) if sig else None,
        "key_id": kid,
    }


@dataclass(frozen=True)
class _PackRequest:
    """The options of ``pack``, as Click parses them (one field per parameter)."""

    model: Path
    labels_path: Path
    name: str
    version: str
    out: Path
    task: Literal["classifier", "detector"]
    input_size: tuple[int, int] | None
    color: Literal["RGB", "BGR"]
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    resize: Literal["stretch", "letterbox", "center_crop"]
    output_kind: Literal["logits", "probabilities"]
    output_name: str | None
    detector_spec: Path | None
    temperature: float
    full_range_makes: tuple[str, ...]
    sign_key: Path | None
    as_json: bool
    scale: float
    crop_margin: float | None
    interpolation: Literal["auto", "area", "linear", "cubic", "nearest"] | None
    accept_grey: bool
    hflip_tta: bool
    ood_energy_threshold: float | None
    ood_temperature: float


def _check_usage(req: _PackRequest) -> DetectorSpec | None:
    """The options that only go together, and an empty ``--out``; the detector spec when ``--task detector``."""
    if req.full_range_makes and req.task != "classifier":
        raise click.UsageError("--full-range-make is only for --task classifier")
    crop_options = {
        "--crop-margin": req.crop_margin is not None,
        "--interpolation": req.interpolation is not None,
        "--accept-grey": req.accept_grey,
        "--hflip-tta": req.hflip_tta,
        "--ood-energy-threshold": req.ood_energy_threshold is not None,
    }
    given = [name for name, on in crop_options.items() if on]
    if given and req.task != "classifier":
        raise click.UsageError(f"{', '.join(given)}: only for --task classifier (the crop contract, TTA and OOD)")
    if req.ood_energy_threshold is not None and req.output_kind != "logits":
        raise click.UsageError("--ood-energy-threshold needs --output-kind logits (energy is computed from logits)")
    detector = _detector_spec(req.task, req.detector_spec)
    if req.out.exists() and any(req.out.iterdir()):
        fail(f"{req.out} is not empty; fix: pack into a new directory (an old {SIGNATURE_FILE} would go stale)")
    return detector


def _signing_key_id(sign_key: Path | None) -> str | None:
    try:
        return public_key_id(sign_key) if sign_key else None
    except SignatureError as exc:
        fail(str(exc))


def _check_classes(req: _PackRequest, out_shape: list[Any], labels: int) -> None:
    if req.task == "classifier" and out_shape and isinstance(out_shape[-1], int) and out_shape[-1] != labels:
        fail(
            f"{req.model} outputs {out_shape[-1]} scores but {req.labels_path} has {labels} rows; "
            "fix: one label row per output class, in output order"
        )


def _preprocessing(req: _PackRequest, dims: list[int | str]) -> Preprocessing:
    """The manifest's preprocessing: the given options, ImageNet mean/std by default."""
    height, width = _input_size(dims, req.input_size)
    defaults = Preprocessing(height=height, width=width)
    return Preprocessing(
        height=height,
        width=width,
        color_order=req.color,
        mean=req.mean or defaults.mean,
        std=req.std or defaults.std,
        resize=req.resize,
        scale=req.scale,
    )


def _sections(req: _PackRequest) -> tuple[CropSpec | None, TtaSpec | None, OodSpec | None]:
    """The crop contract, TTA and OOD sections; none of them unless an option asks (old behaviour kept)."""
    crop = None
    if req.crop_margin is not None or req.interpolation is not None or req.accept_grey:
        crop = CropSpec(
            margin=LEGACY_CROP_MARGIN if req.crop_margin is None else req.crop_margin,
            aspect=req.resize,
            interpolation=req.interpolation or "auto",
            color_modes=("color", "grey") if req.accept_grey else ("color",),
        )
    tta = TtaSpec(hflip=True) if req.hflip_tta else None
    ood = None
    if req.ood_energy_threshold is not None:
        ood = OodSpec(threshold=req.ood_energy_threshold, temperature=req.ood_temperature)
    return crop, tta, ood


def _write(
    req: _PackRequest,
    labels: tuple[Label, ...],
    detector: DetectorSpec | None,
    model_io: tuple[str, list[int | str], str],
) -> tuple[Bundle, Path | None]:
    """Write (and, with ``--sign-key``, sign) the bundle; ``model_io`` is (input name, input shape, output name)."""
    input_name, dims, output_name = model_io
    preprocessing = _preprocessing(req, dims)
    crop, tta, ood = _sections(req)
    try:
        bundle = write_bundle(
            req.out,
            onnx_bytes=req.model.read_bytes(),
            labels=labels,
            name=req.name,
            version=req.version,
            task=req.task,
            input_name=input_name,
            input_shape=dims,
            preprocessing=preprocessing,
            output_name=output_name,
            output_kind=req.output_kind,
            temperature=req.temperature,
            detector=detector,
            full_range_makes=req.full_range_makes,
            crop=crop,
            tta=tta,
            ood=ood,
        )
        return bundle, sign_bundle(req.out, req.sign_key) if req.sign_key else None
    except EngineError as exc:
        fail(str(exc))


@click.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="labels.csv: index,make,model,aliases[,category] (one row per output class).",
)
@click.option("--name", required=True, help="The model's name (shown in every verdict).")
@click.option("--version", "version", required=True, help="The model's version, e.g. 2026.11.0.")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New (or empty) bundle directory to write.",
)
@click.option("--task", type=click.Choice(["classifier", "detector"]), default="classifier", show_default=True)
@click.option("--input-size", callback=_size, help="HxW in pixels; required when the model's H/W are dynamic.")
@click.option(
    "--color",
    type=click.Choice(["RGB", "BGR"]),
    default="RGB",
    show_default=True,
    help="Channel order the model expects.",
)
@click.option("--mean", callback=_triple, help="Per-channel mean after scaling to 0..1 (default ImageNet).")
@click.option("--std", callback=_triple, help="Per-channel std (default ImageNet).")
@click.option(
    "--resize", type=click.Choice(["stretch", "letterbox", "center_crop"]), default="stretch", show_default=True
)
@click.option("--output-kind", type=click.Choice(["logits", "probabilities"]), default="logits", show_default=True)
@click.option("--output-name", help="Which graph output to use (default: the first).")
@click.option(
    "--detector-spec",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file: the manifest's detector object (docs/DETECTOR.md); required with --task detector.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Calibration temperature (1.0 = uncalibrated).",
)
@click.option(
    "--full-range-make",
    "full_range_makes",
    multiple=True,
    metavar="MAKE",
    help="A make whose whole model range the labels cover, spelt as in labels.csv (repeatable; classifier only).",
)
@click.option(
    "--sign-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sign the bundle with this private key once packed.",
)
@click.option(
    "--scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1 / 255,
    show_default="1/255",
    help="Pixel scale before mean/std: (pixel * scale - mean) / std; 1 for a model fed 0..255.",
)
@click.option(
    "--crop-margin",
    type=click.FloatRange(0, 1),
    help="Margin around the vehicle box, a fraction of its size (0 = tight, as many models are trained); "
    "writes the crop contract (default without it: the old 10 %).",
)
@click.option(
    "--interpolation",
    type=click.Choice(["auto", "area", "linear", "cubic", "nearest"]),
    help="Resize interpolation of the crop (auto: area when shrinking, linear when enlarging).",
)
@click.option("--accept-grey", is_flag=True, help="The model also judges greyscale/infrared frames.")
@click.option(
    "--hflip-tta", is_flag=True, help="Average the mirrored crop in (horizontal-flip test-time augmentation)."
)
@click.option(
    "--ood-energy-threshold",
    type=float,
    help="Abstain (out_of_distribution) when the energy -T*logsumexp(logits/T) is above this; logits only.",
)
@click.option(
    "--ood-temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="T of the energy score.",
)
@json_option
def pack(**options: Any) -> None:
    """Pack an ONNX model and its labels into a bundle (manifest.json with every sha256).

    Input/output names and shapes are read from the model with onnxruntime. Label categories
    (car, van, truck, bus, motorcycle) come from labels.csv's optional 5th column.

    \b
    Example:
      iaflash-engines pack model.onnx --labels labels.csv --name vmmr-effnet-b0 \\
          --version 2026.11.0 --out bundle/ --temperature 1.35 --sign-key keys/acme-models.key \\
          --full-range-make RENAULT --full-range-make PEUGEOT --crop-margin 0 --resize letterbox --hflip-tta
    """
    req = _PackRequest(**options)
    detector = _check_usage(req)
    labels = _read_labels(req.labels_path)
    kid = _signing_key_id(req.sign_key)  # a bad key fails before anything is written
    input_name, dims, out_name, out_shape = _inspect_onnx(req.model, req.output_name)
    _check_classes(req, out_shape, len(labels))
    bundle, sig = _write(req, labels, detector, (input_name, dims, out_name))
    emit(
        req.as_json,
        _pack_doc(bundle, sig, kid),
        [
            f"packed {req.out}: {req.name} {req.version}, {len(labels)} classes, input {input_name} {dims}",
            f"signed: {sig} (key id {kid})" if sig else "not signed: run iaflash-engines sign",
        ],
    )


commands = [pack]
