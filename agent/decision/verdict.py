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
7. p_make = P(any model of the registered make, or a
   look-alike twin of the registered model)
   < ``make_threshold``                                  → ``mismatch`` level ``make``
8. p_model = P(registered model's label group, or a
   look-alike twin) < ``model_threshold``              → ``mismatch`` level ``model``
   A mismatch of rule 7 or 8 becomes ``inconclusive`` when
   - the plate read is one confusable character away from another registered plate whose record
     fits the photo (``misread``: the records of those plates)  → "plate probably misread";
   - the caller says flags are not allowed (``no_flag_reason``, e.g. the bundle has no fitted
     operating point: reason ``no_operating_point``).
9. p_model ≥ ``match_threshold``                        → ``match``, unless the registered genre (J.1)
   is incompatible with the top-1 label's category      → ``inconclusive`` (the genre never flags)
10. otherwise                                            → ``inconclusive`` (between thresholds)

Every verdict records the thresholds, p_make, p_model, p_other, how the registry text resolved
(method, score, label group), the genre/body evidence, the probabilities actually compared with
the thresholds (``evidence.checked``, look-alike mass included), the operating point the thresholds
come from (``evidence.operating_point``), the misread check, and whether the registry cache is stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Resolution, Taxonomy
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import OperatingPoint

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
    operating_point: OperatingPoint | None = None,
    no_flag_reason: str | None = None,
    misread: Sequence[RegistryRecord] | None = None,
) -> Verdict:
    """Return the verdict for one capture. ``plate_problem``/``image_problem`` say why an input is unusable.

    ``other_threshold`` defaults to ``cfg.other_threshold``.
    ``label_categories`` (one per label: car, van, truck, bus, motorcycle) enables genre evidence.
    ``operating_point`` is the fitted point ``cfg``'s thresholds come from (named in the evidence).
    ``no_flag_reason``: when set, a would-be mismatch is ``inconclusive`` with this reason.
    ``misread``: registry records of the plates one confusable character away from the plate read
    (:func:`iaflash.agent.registry.plates.confusable_neighbours`); None when the check did not run.
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
    base["evidence"] = {
        **genre_evidence(record, probs, label_categories),
        "operating_point": {
            **({"id": None} if operating_point is None else operating_point.summary()),
            "override": cfg.override_operating_point,
        },
    }
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
    verdict = gate.judge(probs, base)
    if not verdict.is_flag:
        return verdict
    if misread is not None:
        verdict = _misread_check(verdict, probs, taxonomy, cfg, other_threshold, misread)
    if verdict.is_flag and no_flag_reason is not None:
        verdict = _held(verdict, no_flag_reason)
    return verdict


def _held(verdict: Verdict, reason: str) -> Verdict:
    """The would-be flag as ``inconclusive``; the evidence keeps what it would have been."""
    evidence = {**verdict.evidence, "held_flag": {"level": verdict.level, "reason": verdict.reason}}
    return replace(verdict, outcome="inconclusive", level=None, reason=reason, evidence=evidence)


def _misread_check(
    verdict: Verdict,
    probs: np.ndarray,
    taxonomy: Taxonomy,
    cfg: DecisionConfig,
    other_threshold: float,
    neighbours: Sequence[RegistryRecord],
) -> Verdict:
    """A flag whose plate is one confusable character from a registered plate that fits the photo is held."""
    fitting = 0
    for record in neighbours:
        other = decide(
            probs=probs, taxonomy=taxonomy, record=record, plate_problem=None, cfg=cfg, other_threshold=other_threshold
        )
        supported = other.resolution is not None and other.resolution.index is not None
        fitting += supported and other.outcome in ("match", "inconclusive")
    evidence = {**verdict.evidence, "misread_check": {"registered_neighbours": len(neighbours), "fitting": fitting}}
    verdict = replace(verdict, evidence=evidence)
    if not fitting:
        return verdict
    return _held(
        verdict,
        f"plate probably misread: {fitting} registered plate(s) one confusable character away "
        "(O/0, I/1, B/8, ...) fit the photo; never flagged",
    )


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
        make_labels = tax.make_indices(res.make)
        group = res.indices or (() if res.index is None else (res.index,))
        twins = tax.lookalikes(group)
        p_make = float(probs[list(make_labels)].sum())
        p_model = float(probs[list(group)].sum()) if group else None
        p_twins_other_make = float(probs[[i for i in twins if i not in set(make_labels)]].sum()) if twins else 0.0
        p_twins = float(probs[list(twins)].sum()) if twins else 0.0
        p_top1 = tax.top1_mass(probs)
        p_other = float(probs[list(tax.other_indices)].sum()) if tax.other_indices else 0.0
        make_checked = p_make + p_twins_other_make
        model_checked = None if p_model is None else p_model + p_twins
        twin_names = [tax.labels[i].name for i in twins]
        checked = {
            "p_top1": p_top1,
            "p_make": make_checked,
            "p_model": model_checked,
            "group": res.group or None,
            "lookalikes": twin_names,
            "p_lookalike": round(p_twins, 6),
        }
        evidence = {**base["evidence"], "checked": checked}
        base = {**base, "p_make": p_make, "p_model": p_model, "p_other": p_other, "evidence": evidence}
        if p_top1 < cfg.min_top1:
            return self.abstain(f"classifier unsure: top-1 p={p_top1:.3f} < min_top1 {cfg.min_top1}", base)
        if p_other >= p_top1 or p_other >= self.other_threshold:
            return self.abstain(
                f"vehicle looks outside the taxonomy: p(other)={p_other:.3f} (other_threshold {self.other_threshold})",
                base,
            )
        if make_checked < cfg.make_threshold:
            twin = f" (look-alikes included: {', '.join(twin_names)})" if twins else ""
            return Verdict(
                "mismatch",
                f"P(registered make)={make_checked:.4f} < {cfg.make_threshold}{twin}",
                level="make",
                **base,
            )
        if p_model is None or model_checked is None:
            return Verdict(
                "unsupported",
                f"P(registered make)={p_make:.3f} fits; the registered model is outside "
                "the taxonomy, so it is checked at make level only",
                **base,
            )
        return self._model_level(p_model, model_checked, base)

    def _model_level(self, p_model: float, p_checked: float, base: dict[str, Any]) -> Verdict:
        cfg = self.cfg
        if p_checked < cfg.model_threshold:
            return Verdict(
                "mismatch", f"P(registered model)={p_checked:.4f} < {cfg.model_threshold}", level="model", **base
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
