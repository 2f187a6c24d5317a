"""The vehicle localiser network: a frozen EfficientNet-Lite trunk, a small feature pyramid and a dense head.

* **Trunk**: the backbone's stem and blocks up to the last block of its deepest stride level; its
  outputs are the last block of each of the three deepest stride levels (Lite0 at 320 px: blocks
  4, 10 and 15, strides 8, 16 and 32). It is frozen (ImageNet weights), so the training recipe
  runs it once per frame and caches its outputs.
* **Head** (trained), at the middle tap's cells (stride 16 for Lite0, 20x20 points at 320 px):
  the middle tap through a 1x1 conv, plus the finest through a 2x2 stride-2 conv (its detail in
  channels, for tight edges), plus the coarsest upsampled (context); four 3x3 conv blocks dilated
  1, 2, 4, 8, so that every point sees every edge of a frame-wide vehicle at 16 px granularity
  (a vehicle's centre is far from its edges); then per point a vehicle logit and four
  log-distances. Points sit at cell centres
  ``((x + 0.5) * s, (y + 0.5) * s)``; the box is ``(px - l, py - t, px + r, py + b)`` with
  ``l = s * exp(.)`` (anchor-free, FCOS-like).
* **Export** (:class:`Localiser`): trunk + head + decoding, one output ``[N, 5, P]`` of rows
  ``(x1, y1, x2, y2, score)``: corners in 0..1 of the model input, the score a sigmoid. That is
  the ``yolo`` detector contract of ``iaflash.engines.detect`` with one class, box format ``xyxy``,
  ``normalized: true``; thresholding and NMS run on the host.

Losses (:func:`losses`): a point is positive for a box when it lies in the box's central region
(40 % of its width and height, at least 1.5 strides either side of the centre); its box is
trained with GIoU and a smooth-L1 on the log-distances, and its score towards the IoU its box
reaches (quality focal loss), so the best-scored box is the best-fitting one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .lite0 import LiteNet

__all__ = ["Head", "Localiser", "Trunk", "decode", "losses", "points", "trunk_taps"]

LOG_CLAMP = 7.0
CENTRE_RATIO = 0.4
CENTRE_MIN_STRIDES = 1.5
TOWER_DILATIONS = (1, 2, 4, 8)
"""The head's 3x3 convs: every point sees the whole 20x20 grid (measured on 1,000 cars-dev frames, 8 epochs:
held-out median IoU 0.92, against 0.86 with two plain 3x3 convs that see 5x5 cells)."""
HEAD_VERSION = 2
"""Bumped when the head's layers change, so that a checkpoint of another head is refused, not loaded."""


def trunk_taps(backbone: LiteNet, size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(block indices, channels, strides) of the last block of each of the three deepest stride levels."""
    last: dict[int, tuple[int, int]] = {}
    with torch.no_grad():
        x = backbone.eval().features(torch.zeros(1, 3, size, size), 0, 0)
        for i, block in enumerate(backbone._blocks):
            x = block(x)
            last[size // x.shape[-1]] = (i, int(x.shape[1]))
    strides = sorted(last)[-3:]
    if len(strides) < 3:
        raise ValueError(f"the backbone has {len(strides)} stride level(s) at input {size}, the head needs 3")
    return tuple(last[s][0] for s in strides), tuple(last[s][1] for s in strides), tuple(strides)


class Trunk(nn.Module):
    """The frozen part: stem and blocks up to ``taps[-1]``; returns the tapped blocks' outputs."""

    def __init__(self, backbone: LiteNet, taps: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(backbone._conv_stem, backbone._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(backbone._blocks[: taps[-1] + 1])
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return tuple(out)


def _conv_bn(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Head(nn.Module):
    """From the trunk's three taps to per-point vehicle logits ``[B, P]`` and log-distances ``[B, P, 4]``.

    Points are the cells of the middle tap (stride 16 for Lite0): the finest tap comes in through a
    2x2 stride-2 conv (its fine detail lands in channels, for tight edges), the coarsest one through
    nearest upsampling (context over the whole frame).
    """

    def __init__(self, channels: Sequence[int], width: int = 64, prior_distance: float = 4.0) -> None:
        super().__init__()
        fine, mid, coarse = channels
        self.fine = nn.Sequential(nn.Conv2d(fine, width, 2, stride=2, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.mid = _conv_bn(mid, width)
        self.coarse = _conv_bn(coarse, width)
        self.tower = nn.Sequential(*(_conv_bn(width, width, 3, dilation=d) for d in TOWER_DILATIONS))
        self.score = nn.Conv2d(width, 1, 1)
        self.box = nn.Conv2d(width, 4, 1)
        nn.init.constant_(self.score.bias, -math.log(99.0))  # a prior of 1 % vehicle per point
        nn.init.normal_(self.box.weight, std=0.01)
        nn.init.constant_(self.box.bias, math.log(prior_distance))

    def forward(self, taps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.mid(taps[1])
        p = mid + self.fine(taps[0]) + F.interpolate(self.coarse(taps[2]), size=mid.shape[-2:], mode="nearest")
        p = self.tower(p)
        logits = self.score(p).flatten(1)
        dist = self.box(p).flatten(2).transpose(1, 2)
        return logits, dist.clamp(-LOG_CLAMP, LOG_CLAMP)


def points(size: int, stride: int) -> torch.Tensor:
    """``[P, 2]`` cell centres (x, y) in input pixels, row-major, of the finest level."""
    n = size // stride
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    return torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], dim=1)


def decode(dist: torch.Tensor, pts: torch.Tensor, stride: int) -> torch.Tensor:
    """Log-distances ``[B, P, 4]`` → xyxy boxes ``[B, P, 4]`` in input pixels."""
    d = torch.exp(dist) * stride
    return torch.cat([pts - d[..., :2], pts + d[..., 2:]], dim=-1)


class Localiser(nn.Module):
    """Trunk + head + decoding, for export: ``[N, 3, S, S]`` → ``[N, 5, P]`` (module doc)."""

    def __init__(self, trunk: Trunk, head: Head, size: int, stride: int) -> None:
        super().__init__()
        self.trunk, self.head, self.size, self.stride = trunk, head, size, stride
        self.register_buffer("pts", points(size, stride), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, dist = self.head(self.trunk(x))
        boxes = decode(dist, self.pts, self.stride) / float(self.size)
        return torch.cat([boxes, torch.sigmoid(logits).unsqueeze(-1)], dim=-1).transpose(1, 2)


def box_iou(a: torch.Tensor, b: torch.Tensor, generalised: bool = False) -> torch.Tensor:
    """Element-wise IoU (or GIoU) of xyxy boxes ``[..., 4]``."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-6)
    if not generalised:
        return iou
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-6)


def assign(gt: torch.Tensor, pts: torch.Tensor, stride: int) -> torch.Tensor:
    """For one image's ``[G, 4]`` boxes: each point's box index (-1: background), smallest box first."""
    if len(gt) == 0:
        return torch.full((len(pts),), -1, dtype=torch.long)
    centre = (gt[:, :2] + gt[:, 2:]) / 2
    half = torch.maximum((gt[:, 2:] - gt[:, :2]) * CENTRE_RATIO / 2, torch.tensor(CENTRE_MIN_STRIDES * stride))
    offset = (pts[:, None, :] - centre[None]).abs()
    inside = (pts[:, None, :] > gt[None, :, :2]).all(-1) & (pts[:, None, :] < gt[None, :, 2:]).all(-1)
    ok = (offset <= half[None]).all(-1) & inside
    area = (gt[:, 2:] - gt[:, :2]).prod(-1)
    cost = torch.where(ok, area[None].expand_as(ok), torch.full_like(ok, float("inf"), dtype=area.dtype))
    best = cost.argmin(1)
    return torch.where(torch.isfinite(cost.min(1).values), best, torch.full_like(best, -1))


def losses(
    logits: torch.Tensor, dist: torch.Tensor, gts: Sequence[torch.Tensor], pts: torch.Tensor, stride: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Quality focal loss on the scores + GIoU and smooth-L1 on the boxes of positive points (module doc)."""
    boxes = decode(dist, pts, stride)
    targets = torch.zeros_like(logits)
    box_terms: list[torch.Tensor] = []
    ious: list[torch.Tensor] = []
    for i, gt in enumerate(gts):
        owner = assign(gt, pts, stride)
        pos = owner >= 0
        if not bool(pos.any()):
            continue
        match, pred = gt[owner[pos]], boxes[i, pos]
        giou = box_iou(pred, match, generalised=True)
        with torch.no_grad():
            iou = box_iou(pred, match)
        targets[i, pos] = iou.clamp(min=0.01)
        want = torch.cat([pts[pos] - match[:, :2], match[:, 2:] - pts[pos]], dim=1).clamp(min=1e-3) / stride
        l1 = F.smooth_l1_loss(dist[i, pos], torch.log(want), reduction="none", beta=0.1).sum(1)
        box_terms.append((1 - giou) + 0.25 * l1)
        ious.append(iou)
    n_pos = sum(len(t) for t in box_terms)
    prob = torch.sigmoid(logits)
    qfl = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (prob - targets).abs().pow(2)
    score_loss = qfl.sum() / max(1, n_pos)
    box_loss = torch.cat(box_terms).mean() if box_terms else logits.sum() * 0
    total = score_loss + 2.0 * box_loss
    mean_iou = float(torch.cat(ious).mean()) if ious else 0.0
    return total, {"score": float(score_loss.detach()), "box": float(box_loss.detach()), "train_iou": mean_iou}
