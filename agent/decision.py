"""The decision: is the vehicle in the photo compatible with the registry record?

A pure function of (probabilities, registry record, thresholds). No I/O.

Order of the rules (the first that applies wins):

1. plate missing / unreadable / low radar confidence  → ``unreadable_plate``
2. plate not in the registry subset                     → ``unknown_plate``
3. registered make/model outside the model's taxonomy   → ``unsupported`` (never a flag)
4. no usable image (no vehicle, poor quality)           → ``inconclusive``
5. top-1 probability below ``min_top1``, or the mass on
   an explicit "other" class is at least the top-1      → ``inconclusive`` (abstain)
6. P(registered make) < ``make_threshold``              → ``mismatch`` level ``make``
7. P(registered model) < ``model_threshold``            → ``mismatch`` level ``model``
8. P(registered model) ≥ ``match_threshold``            → ``match``
9. otherwise                                            → ``inconclusive`` (between thresholds)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config import DecisionConfig
from agent.registry import RegistryRecord
from agent.taxonomy import Taxonomy


@dataclass(frozen=True)
class Prediction:
    make: str
    model: str
    p: float

    def to_dict(self) -> dict[str, Any]:
        return {"make": self.make, "model": self.model, "p": round(self.p, 6)}


@dataclass(frozen=True)
class Verdict:
    outcome: str
    reason: str
    level: str | None = None
    registry_stale: bool = False
    p_make: float | None = None
    p_model: float | None = None
    top_k: tuple[Prediction, ...] = ()
    registry: RegistryRecord | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)

    @property
    def is_flag(self) -> bool:
        return self.outcome == "mismatch"

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "level": self.level,
            "reason": self.reason,
            "registry_stale": self.registry_stale,
            "p_make": None if self.p_make is None else round(self.p_make, 6),
            "p_model": None if self.p_model is None else round(self.p_model, 6),
            "top_k": [p.to_dict() for p in self.top_k],
            "registry": None if self.registry is None else self.registry.to_dict(),
            "thresholds": dict(self.thresholds),
            "model": dict(self.model),
        }


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled softmax over the last axis, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def top_k(probs: np.ndarray, taxonomy: Taxonomy, k: int) -> tuple[Prediction, ...]:
    order = np.argsort(-probs)[:k]
    return tuple(Prediction(taxonomy.labels[i].make, taxonomy.labels[i].model, float(probs[i])) for i in order)


def thresholds_of(cfg: DecisionConfig) -> dict[str, float]:
    return {
        "min_plate_confidence": cfg.min_plate_confidence,
        "min_top1": cfg.min_top1,
        "make_threshold": cfg.make_threshold,
        "model_threshold": cfg.model_threshold,
        "match_threshold": cfg.match_threshold,
    }


def decide(
    *,
    probs: np.ndarray | None,
    taxonomy: Taxonomy,
    record: RegistryRecord | None,
    plate_problem: str | None,
    cfg: DecisionConfig,
    registry_stale: bool = False,
    model_info: dict[str, str] | None = None,
    image_problem: str | None = None,
) -> Verdict:
    """Return the verdict for one capture. ``plate_problem``/``image_problem`` say why an input is unusable."""
    base: dict[str, Any] = {
        "registry_stale": registry_stale,
        "registry": record,
        "thresholds": thresholds_of(cfg),
        "model": dict(model_info or {}),
        "top_k": () if probs is None else top_k(probs, taxonomy, cfg.top_k),
    }
    if plate_problem is not None:
        return Verdict("unreadable_plate", plate_problem, **base)
    if record is None:
        return Verdict("unknown_plate", "plate not in the registry subset", **base)
    index = taxonomy.resolve(record.make, record.model)
    if index is None:
        return Verdict("unsupported", "registered make/model is outside the model's taxonomy; never flagged",
                       **base)
    if probs is None or image_problem is not None:
        return Verdict("inconclusive", image_problem or "no usable image", **base)
    return _decide_on_probs(probs, taxonomy, index, record, cfg, base)


def _decide_on_probs(
    probs: np.ndarray, taxonomy: Taxonomy, index: int, record: RegistryRecord,
    cfg: DecisionConfig, base: dict[str, Any],
) -> Verdict:
    p_model = float(probs[index])
    p_make = float(probs[list(taxonomy.make_indices(record.make))].sum())
    p_top1 = float(probs.max())
    p_other = float(probs[list(taxonomy.other_indices)].sum()) if taxonomy.other_indices else 0.0
    base = {**base, "p_make": p_make, "p_model": p_model}
    if p_top1 < cfg.min_top1:
        return Verdict("inconclusive", f"classifier unsure: top-1 p={p_top1:.3f} < min_top1 {cfg.min_top1}",
                       **base)
    if p_other >= p_top1:
        return Verdict("inconclusive", f"vehicle looks outside the taxonomy: p(other)={p_other:.3f}", **base)
    if p_make < cfg.make_threshold:
        return Verdict("mismatch", f"P(registered make)={p_make:.4f} < {cfg.make_threshold}",
                       level="make", **base)
    if p_model < cfg.model_threshold:
        return Verdict("mismatch", f"P(registered model)={p_model:.4f} < {cfg.model_threshold}",
                       level="model", **base)
    if p_model >= cfg.match_threshold:
        return Verdict("match", f"P(registered model)={p_model:.3f} >= {cfg.match_threshold}", **base)
    return Verdict("inconclusive", f"P(registered model)={p_model:.3f} between thresholds", **base)
