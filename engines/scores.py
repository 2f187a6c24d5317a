"""A classifier's raw outputs → calibrated probabilities, over one or several views. Pure numpy, a leaf.

A capture may be classified through several *views*: the crop, its mirror image (horizontal-flip
test-time augmentation, when the bundle's ``tta.hflip`` allows it) and the crop of the capture's
second image. :func:`fuse` turns the ``[V, C]`` outputs of one capture into one probability
vector:

* each view's output becomes calibrated probabilities ``softmax(z / T)`` (probability outputs
  are read as ``z = log p``);
* the views are fused by **averaging their probabilities** (the arithmetic mean, a mixture).
  A flag needs P(registered make/model) to be low, and with the mean it is low only when *every*
  view finds it unlikely: one view that sees the registered vehicle keeps it at half its
  probability or more. That is the cautious reading when views disagree (averaging
  log-probabilities, the geometric mean, would let one view that rules the registered vehicle out
  pull it down and raise a flag the other view contradicts).

:func:`energy` is the out-of-distribution score of Liu et al. (2020), ``E = -T logsumexp(z / T)``
on the raw logits: low (very negative) for inputs like the training data, higher for others. A
bundle's ``ood.threshold`` abstains when the mean energy of the views is above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from iaflash.engines.manifest import Manifest

__all__ = ["OOD_REASON", "Fused", "energy", "fuse", "log_softmax", "raw_logits", "score_views"]

OOD_REASON = "out_of_distribution"


def raw_logits(outputs: np.ndarray, output_kind: str) -> np.ndarray:
    """The model's outputs as logits: as is for ``logits``, ``log p`` for ``probabilities``."""
    arr = np.asarray(outputs, dtype=np.float64)
    if output_kind == "probabilities":
        return np.log(np.clip(arr, 1e-12, 1.0))
    return arr


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled log-softmax over the last axis, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-T * logsumexp(logits / T)`` over the last axis (higher = less like the training data)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]
    out: np.ndarray = -temperature * lse
    return out


@dataclass(frozen=True)
class Fused:
    """One capture's fused probabilities and what went into them (for the verdict's evidence)."""

    probs: np.ndarray
    views: tuple[str, ...]
    view_top1: tuple[int, ...]
    energy: float | None

    def evidence(self) -> dict[str, Any]:
        return {
            "views": list(self.views),
            "fusion": "mean_probability" if len(self.views) > 1 else "none",
            "view_top1": list(self.view_top1),
            "views_agree": len(set(self.view_top1)) <= 1,
            "energy": None if self.energy is None else round(self.energy, 4),
        }


def fuse(
    outputs: np.ndarray,
    views: tuple[str, ...],
    *,
    output_kind: str = "logits",
    temperature: float = 1.0,
    energy_temperature: float | None = None,
) -> Fused:
    """Fuse the ``[V, C]`` outputs of one capture's ``views`` (module doc).

    ``energy_temperature``: compute the mean energy of the views at that temperature (logits only).
    """
    arr = np.asarray(outputs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != len(views) or arr.shape[0] == 0:
        raise ValueError(f"expected [V, C] outputs for {len(views)} view(s), got shape {list(arr.shape)}")
    logits = raw_logits(arr, output_kind)
    probs = np.exp(log_softmax(logits, temperature)).mean(axis=0)
    probs /= probs.sum()
    score = None
    if energy_temperature is not None and output_kind == "logits":
        score = float(energy(logits, energy_temperature).mean())
    top1 = tuple(int(i) for i in logits.argmax(axis=1))
    return Fused(probs=probs, views=tuple(views), view_top1=top1, energy=score)


def score_views(outputs: np.ndarray, views: tuple[str, ...], manifest: Manifest) -> tuple[Fused, str | None]:
    """One capture's ``[V, C]`` outputs fused as the bundle says, and the OOD gate's problem (or None).

    The daemon's classify step and ``evaluate`` / ``calibrate`` call this, so offline figures fuse
    and abstain exactly as the daemon does. The problem starts with :data:`OOD_REASON`.
    """
    ood = manifest.ood
    fused = fuse(
        outputs,
        views,
        output_kind=manifest.output_kind,
        temperature=manifest.temperature,
        energy_temperature=None if ood is None else ood.temperature,
    )
    if ood is not None and fused.energy is not None and fused.energy > ood.threshold:
        return fused, (
            f"{OOD_REASON}: energy {fused.energy:.3f} > ood.threshold {ood.threshold} "
            "(the crop does not look like the model's training data); not judged"
        )
    return fused, None
