"""The decision: is the vehicle in the photo compatible with the registry record?

A pure function of (probabilities, registry record, thresholds). No I/O. Probabilities are
calibrated: the caller applies the bundle's temperature (see :func:`softmax`).

Order of the rules (the first that applies wins; docs/DECISION.md has worked examples):

1. plate missing / unreadable / low radar confidence  → ``unreadable_plate``
2. plate not in the registry subset                     → ``unknown_plate``
3. registered make/model outside the model's taxonomy   → ``unsupported`` (never a flag), unless the
   bundle declares the make in ``full_range_makes``: then only a make-level check runs (rules 4–7),
   and anything but a make-level mismatch is ``unsupported``
4. no usable image (no vehicle, poor quality)           → ``inconclusive``
5. top-1 probability below ``min_top1``                 → ``inconclusive`` (abstain)
6. mass on the explicit "other" classes ≥ the top-1,
   or ≥ ``other_threshold``                              → ``inconclusive`` (abstain)
7. p_make = P(any model of the registered make)
   < ``make_threshold``                                  → ``mismatch`` level ``make``
8. p_model = P(registered model) < ``model_threshold``  → ``mismatch`` level ``model``
9. p_model ≥ ``match_threshold``                        → ``match``, unless the registered genre (J.1)
   is incompatible with the top-1 label's category      → ``inconclusive`` (the genre never flags)
10. otherwise                                            → ``inconclusive`` (between thresholds)

Every verdict records the thresholds, p_make, p_model, p_other, how the registry text resolved
(method and score), the genre/body evidence and whether the registry cache is stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Resolution, Taxonomy
from iaflash.agent.registry.record import RegistryRecord

__all__ = [
    "GENRE_CATEGORIES",
    "KNOWN_CATEGORIES",
    "Prediction",
    "Verdict",
    "decide",
    "genre_evidence",
    "softmax",
    "thresholds_of",
    "top_k",
]

# Registry genre (J.1) → label categories a vehicle of that genre may plausibly be shown as.
# Car and van overlap (a VP Kangoo, a CTTE "Clio Société"); a large van may look like a truck.
GENRE_CATEGORIES: dict[str, frozenset[str]] = {
    "VP": frozenset({"car", "van"}),
    "CTTE": frozenset({"car", "van", "truck"}),
    "VASP": frozenset({"car", "van", "truck", "bus"}),
    "CAM": frozenset({"van", "truck"}),
    "TRR": frozenset({"truck"}),
    "TCP": frozenset({"van", "bus"}),
    "QM": frozenset({"car"}),
    "QL": frozenset({"car"}),
    **{g: frozenset({"motorcycle"}) for g in ("MTL", "MTT1", "MTT2", "MTTE", "MOTO", "CL", "CYCL")},
}
KNOWN_CATEGORIES = frozenset().union(*GENRE_CATEGORIES.values())


@dataclass(frozen=True)
class Prediction:
    make: str
    model: str
    p: float

    def to_dict(self) -> dict[str, Any]:
        return {"make": self.make, "model": self.model, "p": round(self.p, 6)}


def _round(p: float | None) -> float | None:
    return None if p is None else round(p, 6)


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
    p_other: float | None = None
    resolution: Resolution | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def is_flag(self) -> bool:
        return self.outcome == "mismatch"

    def to_dict(self, *, extended: bool = False) -> dict[str, Any]:
        """The verdict document. ``extended`` adds p_other, resolution and evidence (not in event schema v1)."""
        doc: dict[str, Any] = {
            "outcome": self.outcome,
            "level": self.level,
            "reason": self.reason,
            "registry_stale": self.registry_stale,
            "p_make": _round(self.p_make),
            "p_model": _round(self.p_model),
            "top_k": [p.to_dict() for p in self.top_k],
            "registry": None if self.registry is None else self.registry.to_dict(),
            "thresholds": dict(self.thresholds),
            "model": dict(self.model),
        }
        if extended:
            doc["p_other"] = _round(self.p_other)
            doc["resolution"] = None if self.resolution is None else self.resolution.to_dict()
            doc["evidence"] = dict(self.evidence)
        return doc


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


def thresholds_of(cfg: DecisionConfig, **extra: float) -> dict[str, float]:
    """The config's thresholds by name, plus any ``extra`` ones (other_threshold, fuzzy_min_score)."""
    return {
        "min_plate_confidence": cfg.min_plate_confidence,
        "min_top1": cfg.min_top1,
        "make_threshold": cfg.make_threshold,
        "model_threshold": cfg.model_threshold,
        "match_threshold": cfg.match_threshold,
        **extra,
    }


def genre_evidence(
    record: RegistryRecord, probs: np.ndarray | None, label_categories: Sequence[str] | None
) -> dict[str, Any]:
    """Genre (J.1) and body (J.3) of the record, and whether the genre fits the top-1 label's category.

    ``genre_compatible`` is None when it cannot be judged (no categories, no image, an unknown genre
    or category).
    """
    evidence: dict[str, Any] = {
        "genre": record.genre,
        "body": record.body,
        "top1_category": None,
        "expected_categories": None,
        "genre_compatible": None,
    }
    if label_categories is None or probs is None:
        return evidence
    if len(label_categories) != len(probs):
        raise ValueError(
            f"label_categories has {len(label_categories)} entries for {len(probs)} labels; "
            "fix: give one category per label, in label order"
        )
    category = label_categories[int(np.argmax(probs))].strip().lower()
    expected = GENRE_CATEGORIES.get((record.genre or "").strip().upper())
    evidence["top1_category"] = category or None
    if expected is not None:
        evidence["expected_categories"] = sorted(expected)
        evidence["genre_compatible"] = (category in expected) if category in KNOWN_CATEGORIES else None
    return evidence


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
    other_threshold: float | None = None,
    label_categories: Sequence[str] | None = None,
) -> Verdict:
    """Return the verdict for one capture. ``plate_problem``/``image_problem`` say why an input is unusable.

    ``other_threshold`` defaults to ``cfg.other_threshold``.
    ``label_categories`` (one per label: car, van, truck, bus, motorcycle) enables genre evidence.
    """
    if other_threshold is None:
        other_threshold = cfg.other_threshold
    base: dict[str, Any] = {
        "registry_stale": registry_stale,
        "registry": record,
        "thresholds": thresholds_of(cfg, other_threshold=other_threshold, fuzzy_min_score=taxonomy.min_score),
        "model": dict(model_info or {}),
        "top_k": () if probs is None else top_k(probs, taxonomy, cfg.top_k),
    }
    if plate_problem is not None:
        return Verdict("unreadable_plate", plate_problem, **base)
    if record is None:
        return Verdict("unknown_plate", "plate not in the registry subset", **base)
    resolution = taxonomy.resolve_detail(record.make, record.model)
    base["resolution"] = resolution
    base["evidence"] = genre_evidence(record, probs, label_categories)
    make_only = resolution.index is None and taxonomy.is_full_range(resolution.make)
    if resolution.index is None and not make_only:
        return Verdict(
            "unsupported",
            "registered make/model is outside the model's taxonomy "
            f"({resolution.method}, score {resolution.score:.0f}); never flagged",
            **base,
        )
    gate = _Gate(taxonomy, resolution, cfg, other_threshold, make_only)
    if probs is None or image_problem is not None:
        return gate.abstain(image_problem or "no usable image", base)
    return gate.judge(probs, base)


@dataclass(frozen=True)
class _Gate:
    """Rules 4–10 for one resolved record."""

    taxonomy: Taxonomy
    resolution: Resolution
    cfg: DecisionConfig
    other_threshold: float
    make_only: bool

    def abstain(self, reason: str, base: dict[str, Any]) -> Verdict:
        if self.make_only:
            return Verdict(
                "unsupported",
                f"registered model is outside the taxonomy and the make-level check could not run: {reason}",
                **base,
            )
        return Verdict("inconclusive", reason, **base)

    def judge(self, probs: np.ndarray, base: dict[str, Any]) -> Verdict:
        tax, cfg, res = self.taxonomy, self.cfg, self.resolution
        p_make = float(probs[list(tax.make_indices(res.make))].sum())
        p_model = None if res.index is None else float(probs[res.index])
        p_top1 = float(probs.max())
        p_other = float(probs[list(tax.other_indices)].sum()) if tax.other_indices else 0.0
        base = {**base, "p_make": p_make, "p_model": p_model, "p_other": p_other}
        if p_top1 < cfg.min_top1:
            return self.abstain(f"classifier unsure: top-1 p={p_top1:.3f} < min_top1 {cfg.min_top1}", base)
        if p_other >= p_top1 or p_other >= self.other_threshold:
            return self.abstain(
                f"vehicle looks outside the taxonomy: p(other)={p_other:.3f} (other_threshold {self.other_threshold})",
                base,
            )
        if p_make < cfg.make_threshold:
            return Verdict("mismatch", f"P(registered make)={p_make:.4f} < {cfg.make_threshold}", level="make", **base)
        if p_model is None:
            return Verdict(
                "unsupported",
                f"P(registered make)={p_make:.3f} fits; the registered model is outside "
                "the taxonomy, so it is checked at make level only",
                **base,
            )
        return self._model_level(p_model, base)

    def _model_level(self, p_model: float, base: dict[str, Any]) -> Verdict:
        cfg = self.cfg
        if p_model < cfg.model_threshold:
            return Verdict(
                "mismatch", f"P(registered model)={p_model:.4f} < {cfg.model_threshold}", level="model", **base
            )
        if p_model >= cfg.match_threshold:
            if base["evidence"].get("genre_compatible") is False:
                return Verdict(
                    "inconclusive",
                    f"P(registered model)={p_model:.3f} >= {cfg.match_threshold} but "
                    "the registered genre does not fit the vehicle category seen",
                    **base,
                )
            return Verdict("match", f"P(registered model)={p_model:.3f} >= {cfg.match_threshold}", **base)
        return Verdict("inconclusive", f"P(registered model)={p_model:.3f} between thresholds", **base)
