"""ONNX models with the SHAPE of real ones (random weights: architecture sets cost).

Built with onnx.helper, so the benchmarks need no torch:
- ``resnet50``: ResNet-50 v1.5 at 224×224 (BN folded into conv biases), ~4.1 GMAC;
- ``efficientnet_b0``: EfficientNet-B0 at 224×224 (MBConv + squeeze-excitation, SiLU), ~0.39 GMAC;
- ``tiny_yolo``: a small YOLO-style detector at 320×320 with a raw ``[1, 4+C, N]`` output.
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper


class Graph:
    """A tiny builder: each method appends nodes and returns the output name."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def _const(self, arr: np.ndarray) -> str:
        name = self._name("w")
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> str:
        fan_in = cin // groups * k * k
        w = self.rng.normal(0, (2.0 / fan_in) ** 0.5, size=(cout, cin // groups, k, k))
        out = self._name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self._const(w), self._const(np.zeros(cout))],
                [out],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
                group=groups,
            )
        )
        return out

    def op(self, kind: str, *inputs: str, **attrs: object) -> str:
        out = self._name(kind.lower())
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = self.rng.normal(0, (1.0 / cin) ** 0.5, size=(cin, cout))
        return self.op("Gemm", x, self._const(w), self._const(np.zeros(cout)))

    def model(self, x_shape: list[int | str], out: str, out_shape: list[int | str], name: str) -> ModelProto:
        self.nodes[-1].output[0] = "output"
        del out
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
            initializer=self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="iaflash-bench")
        m.ir_version = 8
        return m


def resnet50(classes: int = 1000) -> ModelProto:
    g = Graph(1)
    x = g.op("Relu", g.conv("input", 3, 64, 7, 2))
    x = g.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            y = g.op("Relu", g.conv(x, cin, width, 1))
            y = g.op("Relu", g.conv(y, width, width, 3, s))
            y = g.conv(y, width, width * 4, 1)
            short = g.conv(x, cin, width * 4, 1, s) if b == 0 else x
            x = g.op("Relu", g.op("Add", y, short))
            cin = width * 4
    x = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    out = g.gemm(x, cin, classes)
    return g.model(["N", 3, 224, 224], out, ["N", classes], "resnet50_shaped")


def _mbconv(g: Graph, x: str, cin: int, cout: int, expand: int, k: int, stride: int) -> str:
    mid = cin * expand
    y = g.silu(g.conv(x, cin, mid, 1)) if expand != 1 else x
    y = g.silu(g.conv(y, mid, mid, k, stride, groups=mid))
    se = max(1, cin // 4)
    s = g.op("GlobalAveragePool", y)
    s = g.op("Sigmoid", g.conv(g.silu(g.conv(s, mid, se, 1)), se, mid, 1))
    y = g.conv(g.op("Mul", y, s), mid, cout, 1)
    return g.op("Add", y, x) if stride == 1 and cin == cout else y


def efficientnet_b0(classes: int = 1000) -> ModelProto:
    g = Graph(2)
    x = g.silu(g.conv("input", 3, 32, 3, 2))
    cin = 32
    for expand, k, stride, cout, repeats in (
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    ):
        for r in range(repeats):
            x = _mbconv(g, x, cin, cout, expand, k, stride if r == 0 else 1)
            cin = cout
    x = g.silu(g.conv(x, cin, 1280, 1))
    x = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    out = g.gemm(x, 1280, classes)
    return g.model(["N", 3, 224, 224], out, ["N", classes], "efficientnet_b0_shaped")


def tiny_yolo(classes: int = 8, size: int = 320, fixed_box: bool = True) -> ModelProto:
    """Stride-8 grid of (4 box + C class) channels, reshaped to [1, 4+C, N].

    With ``fixed_box`` the head's weights are zero and its biases say "one car, centred, 40 % of
    the frame" (normalised cxcywh), so the benchmark's pipeline always finds one vehicle while
    paying the full cost of the network.
    """
    g = Graph(3)
    x = "input"
    cin = 3
    for cout in (16, 32, 64):
        x = g.silu(g.conv(x, cin, cout, 3, 2))
        cin = cout
    x = g.silu(g.conv(x, cin, 128, 3))
    head = g.conv(x, 128, 4 + classes, 1)
    if fixed_box:
        node = g.nodes[-1]
        weights = next(i for i in g.inits if i.name == node.input[1])
        bias = next(i for i in g.inits if i.name == node.input[2])
        weights.CopyFrom(numpy_helper.from_array(np.zeros((4 + classes, 128, 1, 1), np.float32), weights.name))
        logits = np.array([0.0, 0.0, -0.405, -0.405, 4.0] + [-4.0] * (classes - 1), np.float32)
        bias.CopyFrom(numpy_helper.from_array(logits, bias.name))
    x = g.op("Sigmoid", head)
    n = (size // 8) ** 2
    shape = g._const(np.array([1, 4 + classes, n], dtype=np.float32))
    shape_i = g.op("Cast", shape, to=TensorProto.INT64)
    out = g.op("Reshape", x, shape_i)
    return g.model([1, 3, size, size], out, [1, 4 + classes, n], "tiny_yolo_shaped")
