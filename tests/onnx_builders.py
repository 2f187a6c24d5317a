"""Tiny ONNX models built with onnx.helper, their numpy references, and bundles made from them.

The classifier is ``GlobalAveragePool -> Flatten -> Gemm (-> Softmax)``: per-channel means times
a known weight matrix plus a bias, so its output can be computed exactly in numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from iaflash.engines.bundle import Bundle, Label, Preprocessing, write_bundle

OPSET = 17
IR_VERSION = 8  # opset 17 needs IR >= 8; every onnxruntime >= 1.17 reads it

LABELS = (
    Label(0, "RENAULT", "CLIO", ("CLIO V",)),
    Label(1, "PEUGEOT", "208", ()),
    Label(2, "VOLKSWAGEN", "GOLF", ("GOLF VII", "GOLF VIII")),
    Label(3, "MERCEDES-BENZ", "CLASSE G", ("G-CLASS",)),
)


def classifier_weights(num_classes: int = 4, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (3, K) weight matrix and (K,) bias."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(3, num_classes)).astype(np.float32)
    bias = rng.normal(size=(num_classes,)).astype(np.float32)
    return weights, bias


def classifier_onnx(
    *,
    num_classes: int = 4,
    height: int = 8,
    width: int = 8,
    batch: int | str = "N",
    softmax: bool = False,
    input_name: str = "input",
    output_name: str = "logits",
    spatial_dynamic: bool = False,
) -> bytes:
    """The serialised classifier; ``batch`` is a dim name (dynamic) or a fixed int such as 1."""
    weights, bias = classifier_weights(num_classes)
    spatial: list[int | str] = ["H", "W"] if spatial_dynamic else [height, width]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, *spatial])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, num_classes])
    gemm_out = "gemm_out" if softmax else output_name
    nodes = [
        helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], [gemm_out]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", [gemm_out], [output_name], axis=1))
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [x],
        [y],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="iaflash-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def classifier_reference(batch: np.ndarray, *, num_classes: int = 4, softmax: bool = False) -> np.ndarray:
    """What :func:`classifier_onnx` computes, in float64 numpy."""
    weights, bias = classifier_weights(num_classes)
    logits: np.ndarray = batch.astype(np.float64).mean(axis=(2, 3)) @ weights.astype(np.float64) + bias
    if not softmax:
        return logits
    exp: np.ndarray = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def make_bundle(
    path: Path,
    *,
    height: int = 8,
    width: int = 8,
    batch: int | str = "N",
    onnx_bytes: bytes | None = None,
    labels: tuple[Label, ...] = LABELS,
    **manifest: object,
) -> Bundle:
    """A real classifier bundle on disk, written by write_bundle."""
    data = (
        onnx_bytes
        if onnx_bytes is not None
        else classifier_onnx(num_classes=len(labels), height=height, width=width, batch=batch)
    )
    return write_bundle(
        path,
        onnx_bytes=data,
        labels=labels,
        name="tiny-classifier",
        version="1.0.0",
        input_name="input",
        input_shape=[batch, 3, height, width],
        preprocessing=Preprocessing(height=height, width=width),
        output_name="logits",
        **manifest,  # type: ignore[arg-type]  # tests pass manifest keywords through
    )
