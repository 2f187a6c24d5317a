"""Figures of a classifier's logits: top-1, make top-1, expected calibration error."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["ece", "make_top1", "softmax", "top1"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def top1(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == targets)) if len(targets) else 0.0


def make_top1(logits: np.ndarray, targets: np.ndarray, makes: Sequence[str]) -> float:
    """Share of photos whose top class has the true class's make."""
    if not len(targets):
        return 0.0
    names = np.asarray(makes)
    return float(np.mean(names[logits.argmax(axis=1)] == names[targets]))


def ece(logits: np.ndarray, targets: np.ndarray, bins: int = 15, temperature: float = 1.0) -> float:
    """Expected calibration error of the top-1 confidence, ``bins`` equal-width bins."""
    if not len(targets):
        return 0.0
    p = softmax(logits, temperature)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    return float(total)
