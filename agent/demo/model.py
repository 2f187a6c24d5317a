"""The DEMO model: a tiny classifier trained at demo time on the synthetic fleet.

It is a real ONNX model (average pooling to an 8×8 colour grid, then a linear layer)
whose weights are fitted by softmax regression on rendered crops. It recognises the
demo fleet's drawings and nothing else. It is labelled ``demo: true`` in its manifest.

Like any bundle that may flag, it ships a fitted operating point: after training, the demo
renders a held-out set (another seed), reads each crop against its own registration (genuine)
and against another make's and another model's (simulated clones), and fits the temperature and
thresholds with :func:`iaflash.agent.evaluation.fit.fit_operating_point` for a 2 % target (the
held-out set is too small to bound a lower rate: 0 flags in n bound it at ``1 - 0.05 ** (1 / n)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iaflash.agent.capture.preprocess import crop, preprocess
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.demo.fleet import CLASSES, render_scene
from iaflash.agent.evaluation.calibrate import CalibrationError
from iaflash.agent.evaluation.fit import FitResult, FitSample, fit_operating_point
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import Bundle, Label, Preprocessing, write_bundle

INPUT = 64
POOL = 8
PREPROCESSING = Preprocessing(
    height=INPUT,
    width=INPUT,
    color_order="RGB",
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    scale=1 / 255,
    resize="stretch",
)
CROP_MARGIN = 0.1
FIT_TARGET = 0.02
FIT_PER_CLASS = 25


def features(batch: np.ndarray) -> np.ndarray:
    """What the ONNX graph computes before its linear layer: 8×8 average pooling, flattened."""
    n, c, h, w = batch.shape
    pooled = batch.reshape(n, c, h // POOL, POOL, w // POOL, POOL).mean(axis=(3, 5))
    out: np.ndarray = pooled.reshape(n, -1)
    return out


def training_set(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered, cropped and preprocessed samples for every class."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, style in enumerate(CLASSES):
        for _ in range(per_class):
            img, box = render_scene(style, rng)
            xs.append(preprocess(crop(img, box, margin=CROP_MARGIN), PREPROCESSING)[0])
            ys.append(label)
    return np.stack(xs), np.array(ys)


def fit_softmax(
    x: np.ndarray, y: np.ndarray, classes: int, steps: int = 400, lr: float = 0.5, l2: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent."""
    n, d = x.shape
    weights = np.zeros((d, classes))
    bias = np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        logits = x @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / n
        weights -= lr * (x.T @ grad + l2 * weights)
        bias -= lr * grad.sum(axis=0)
    return weights.astype(np.float32), bias.astype(np.float32)


def onnx_bytes(weights: np.ndarray, bias: np.ndarray) -> bytes:
    """The classifier graph: AveragePool(8) → Flatten → Gemm, dynamic batch."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415  # demo-only dependency

    classes = weights.shape[1]
    nodes = [
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "iaflash_demo_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, INPUT, INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="iaflash-demo")
    model.ir_version = 8
    return bytes(model.SerializeToString())


def fit_samples(weights: np.ndarray, bias: np.ndarray, per_class: int, seed: int) -> list[FitSample]:
    """Held-out renders, each read against its own registration and against two simulated clones."""
    x, y = training_set(per_class, seed)
    logits = features(x) @ weights + bias
    rng = np.random.default_rng(seed)
    samples = []
    for n, (row, label) in enumerate(zip(logits, y, strict=True)):
        own = CLASSES[label]
        samples.append(
            FitSample(row, RegistryRecord(own.make, own.model, "VP", None), True, int(label), sample_id=f"r{n}")
        )
        for level in ("make", "model"):
            others = [c for i, c in enumerate(CLASSES) if i != label and (c.make == own.make) == (level == "model")]
            if others:
                clone = others[int(rng.integers(len(others)))]
                record = RegistryRecord(clone.make, clone.model, "VP", None)
                samples.append(FitSample(row, record, False, int(label), level=level, sample_id=f"r{n}-{level}"))
    return samples


def fit_demo_operating_point(
    weights: np.ndarray, bias: np.ndarray, labels: list[Label], *, per_class: int = FIT_PER_CLASS, seed: int = 4321
) -> FitResult:
    """The demo bundle's operating point, fitted on held-out renders (seed differs from training).

    The temperature is fitted too, unless the model makes no mistake on the held-out drawings (no
    temperature fits such data, see ``fit_temperature``): then it stays 1.0 and only the thresholds are fitted.
    """
    samples, taxonomy = fit_samples(weights, bias, per_class, seed), Taxonomy(labels)
    try:
        return fit_operating_point(samples, taxonomy=taxonomy, target=FIT_TARGET)
    except CalibrationError:
        return fit_operating_point(samples, taxonomy=taxonomy, target=FIT_TARGET, temperature=1.0)


def build_demo_bundle(
    path: Path, *, per_class: int = 40, seed: int = 1234, fit_per_class: int = FIT_PER_CLASS
) -> tuple[Bundle, float]:
    """Train the demo classifier, fit its operating point, write the bundle; returns (bundle, training accuracy)."""
    x, y = training_set(per_class, seed)
    feats = features(x)
    weights, bias = fit_softmax(feats, y, len(CLASSES))
    accuracy = float(((feats @ weights + bias).argmax(axis=1) == y).mean())
    labels = [Label(i, s.make, s.model) for i, s in enumerate(CLASSES)]
    op = fit_demo_operating_point(weights, bias, labels, per_class=fit_per_class).operating_point
    bundle = write_bundle(
        path,
        onnx_bytes=onnx_bytes(weights, bias),
        labels=labels,
        name="iaflash-demo-classifier",
        version="1.0.0",
        task="classifier",
        input_name="input",
        input_shape=("N", 3, INPUT, INPUT),
        preprocessing=PREPROCESSING,
        output_name="logits",
        output_kind="logits",
        temperature=op.temperature,
        operating_point=op,
        demo=True,
        description="DEMO MODEL: recognises the synthetic demo fleet drawings only, not real vehicles.",
    )
    return bundle, accuracy
