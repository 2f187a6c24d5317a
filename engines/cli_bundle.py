"""``iaflash-engines keygen | pack | sign | verify``: the model publisher's bundle tools.

Exit codes: 0 ok, 1 operational error, 2 usage error, 3 check found problems (``verify``).
With ``--json`` each command prints one JSON document on stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

import click

from engines.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Bundle,
    DetectorSpec,
    Label,
    Preprocessing,
    parse_labels,
    write_bundle,
)
from engines.errors import BundleError, EngineError, SignatureError
from engines.signing import (
    TrustStore,
    generate_keypair,
    key_id,
    load_private_key,
    public_key_bytes,
    read_verified_file,
    sign_bundle,
    sign_file,
    signature_path,
    verify_bundle,
)

__all__ = ["commands"]

CONTEXT = {"help_option_names": ["-h", "--help"]}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PROBLEMS = 0, 1, 2, 3
_DIM_NAMES = ("N", "C", "H", "W")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout.")


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _emit(as_json: bool, doc: dict[str, Any], lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for line in lines:
            click.echo(line)


def _public_id(private_key_path: Path) -> str:
    return key_id(public_key_bytes(load_private_key(private_key_path).public_key()))


# ---------------------------------------------------------------- keygen


@click.command(context_settings=CONTEXT)
@click.option(
    "--out",
    "prefix",
    type=click.Path(path_type=Path),
    required=True,
    help="Path prefix: writes PREFIX.key (private, 0600) and PREFIX.pub (public).",
)
@_json_option
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
        kid = _public_id(key_path)
    except SignatureError as exc:
        _fail(str(exc))
    click.echo(f"keep {key_path} secret; distribute {pub_path}", err=True)
    _emit(
        as_json,
        {"private_key": str(key_path), "public_key": str(pub_path), "key_id": kid, "name": prefix.name},
        [f"private key: {key_path}", f"public key:  {pub_path}", f"key id:      {kid}"],
    )


# ---------------------------------------------------------------- pack


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
        _fail(f"{model}: onnxruntime cannot load it ({exc}); fix: export one self-contained ONNX file")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        _fail(f"{model}: has {len(inputs)} inputs; the agent feeds one NCHW float32 tensor")
    if inputs[0].type != "tensor(float)":
        _fail(f"{model}: input {inputs[0].name!r} is {inputs[0].type}; fix: export with a float32 input")
    names = [o.name for o in outputs]
    chosen = output_name or names[0]
    if chosen not in names:
        _fail(f"{model}: has no output {chosen!r}; outputs: {', '.join(names)}", EXIT_USAGE)
    shape = [d if isinstance(d, (int, str)) and d != "" else None for d in inputs[0].shape]
    if len(shape) != 4:
        _fail(f"{model}: input {inputs[0].name!r} has shape {inputs[0].shape}; the agent needs [batch, 3, H, W]")
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
        _fail(f"{path}: not UTF-8 text; fix: save it as UTF-8")
    except BundleError as exc:
        _fail(str(exc))


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
        _fail(f"{path}: not a detector object ({exc}); fix: see docs/DETECTOR.md for its keys")


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
        "files": dict(sorted(m.files.items())),
        "signature": str(sig) if sig else None,
        "key_id": kid,
    }


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
@_json_option
def pack(
    model: Path,
    labels_path: Path,
    name: str,
    version: str,
    out: Path,
    task: str,
    input_size: tuple[int, int] | None,
    color: str,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
    resize: str,
    output_kind: str,
    output_name: str | None,
    detector_spec: Path | None,
    temperature: float,
    full_range_makes: tuple[str, ...],
    sign_key: Path | None,
    as_json: bool,
) -> None:
    """Pack an ONNX model and its labels into a bundle (manifest.json with every sha256).

    Input/output names and shapes are read from the model with onnxruntime. Label categories
    (car, van, truck, bus, motorcycle) come from labels.csv's optional 5th column.

    \b
    Example:
      iaflash-engines pack model.onnx --labels labels.csv --name vmmr-effnet-b0 \\
          --version 2026.11.0 --out bundle/ --temperature 1.35 --sign-key keys/acme-models.key \\
          --full-range-make RENAULT --full-range-make PEUGEOT
    """
    detector = _detector_spec(task, detector_spec)
    if full_range_makes and task != "classifier":
        raise click.UsageError("--full-range-make is only for --task classifier")
    if out.exists() and any(out.iterdir()):
        _fail(f"{out} is not empty; fix: pack into a new directory (an old {SIGNATURE_FILE} would go stale)")
    labels = _read_labels(labels_path)
    try:
        kid = _public_id(sign_key) if sign_key else None  # a bad key fails before anything is written
    except SignatureError as exc:
        _fail(str(exc))
    input_name, dims, out_name, out_shape = _inspect_onnx(model, output_name)
    if task == "classifier" and out_shape and isinstance(out_shape[-1], int) and out_shape[-1] != len(labels):
        _fail(
            f"{model} outputs {out_shape[-1]} scores but {labels_path} has {len(labels)} rows; "
            "fix: one label row per output class, in output order"
        )
    height, width = _input_size(dims, input_size)
    defaults = Preprocessing(height=height, width=width)
    preprocessing = Preprocessing(
        height=height,
        width=width,
        color_order=cast(Literal["RGB", "BGR"], color),
        mean=mean or defaults.mean,
        std=std or defaults.std,
        resize=cast(Literal["stretch", "letterbox", "center_crop"], resize),
    )
    try:
        bundle = write_bundle(
            out,
            onnx_bytes=model.read_bytes(),
            labels=labels,
            name=name,
            version=version,
            task=cast(Literal["classifier", "detector"], task),
            input_name=input_name,
            input_shape=dims,
            preprocessing=preprocessing,
            output_name=out_name,
            output_kind=cast(Literal["logits", "probabilities"], output_kind),
            temperature=temperature,
            detector=detector,
            full_range_makes=full_range_makes,
        )
        sig = sign_bundle(out, sign_key) if sign_key else None
    except EngineError as exc:
        _fail(str(exc))
    doc = _pack_doc(bundle, sig, kid)
    _emit(
        as_json,
        doc,
        [
            f"packed {out}: {name} {version}, {len(labels)} classes, input {input_name} {dims}",
            f"signed: {sig} (key id {kid})" if sig else "not signed: run iaflash-engines sign",
        ],
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
@_json_option
def sign(target: Path, key_path: Path, signer: str | None, as_json: bool) -> None:
    """Sign a bundle directory (writes manifest.sig) or any file such as a registry subset (writes FILE.sig).

    A bundle is checked (every sha256) before it is signed.

    \b
    Example:
      iaflash-engines sign bundle/ --key keys/acme-models.key
      iaflash-engines sign subset-000042.jsonl.gz --key keys/acme-registry.key
    """
    try:
        sig = sign_bundle(target, key_path, signer) if target.is_dir() else sign_file(target, key_path, signer)
        kid = _public_id(key_path)
    except EngineError as exc:
        _fail(str(exc))
    kind = "bundle" if target.is_dir() else "file"
    doc = {"target": str(target), "kind": kind, "signature": str(sig), "key_id": kid, "signer": signer or key_path.stem}
    _emit(as_json, doc, [f"signed {kind} {target}: {sig} (key id {kid}, signer {doc['signer']})"])


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
@_json_option
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
        _fail(str(exc))
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
        _fail(str(exc), EXIT_PROBLEMS)
    _emit(
        as_json,
        doc,
        [
            f"ok: {target} ({doc['kind']}) signed by {doc['name']} (key id {doc['key_id']}) at {doc['signed_at']}",
            *(f"  checked {f}" for f in doc["files"]),
        ],
    )


commands = [keygen, pack, sign, verify]
