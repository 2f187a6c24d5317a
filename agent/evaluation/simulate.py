"""Clone simulation, the joint threshold sweep and the finite-sample bound on the false-flag rate.

Each image is read against its own registry record (a *genuine* pair) and against records of
other labels: a *make-level* clone (a label of another make) and a *model-level* clone (another
model of the same make, when the taxonomy has one). Every grid point of the joint sweep
(``min_top1`` × ``make_threshold`` × ``model_threshold``) runs
:func:`iaflash.agent.decision.verdict.decide` — the daemon's own decision — on every pair.

"Met" is judged on the one-sided 95 % Clopper–Pearson upper bound of the genuine false-flag
rate, never on the point estimate: 0 flags in 1,200 genuine pairs bounds the rate at 0.25 %,
1 flag in 1,221 only at 0.39 %. Pure numpy over probabilities; no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy, norm_make
from iaflash.agent.decision.verdict import Verdict, decide
from iaflash.agent.evaluation.fit import clopper_pearson_upper, genuine_needed
from iaflash.agent.registry.record import RegistryRecord

__all__ = [
    "CONFIDENCE",
    "KINDS",
    "MIN_TOP1_GRID",
    "THRESHOLD_GRID",
    "Pair",
    "Progress",
    "Rates",
    "SweepPoint",
    "genuine_needed",
    "joint_sweep",
    "outcome_rates",
    "pair_verdicts",
    "rates",
    "recommend",
    "simulate_pairs",
    "sweep_config",
    "upper_bound",
]

CONFIDENCE = 0.95
KINDS = ("genuine", "make", "model")
"""Pair kinds: the vehicle's own record, a record of another make, another model of the same make."""
THRESHOLD_GRID: tuple[float, ...] = (0.0005, 0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.2)
"""make_threshold and model_threshold values swept (each independently)."""
MIN_TOP1_GRID: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
Progress = Callable[[int, int], None]
"""``progress(done, total)``."""


def upper_bound(flags: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper–Pearson upper bound of a rate seen as ``flags`` of ``n`` (fit's own rule)."""
    return clopper_pearson_upper(flags, n, confidence) if n > 0 else 1.0


# ---------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """A capture read against registry ``record``; ``kind`` is genuine, make (clone) or model (clone)."""

    sample: int
    record: RegistryRecord
    kind: str

    @property
    def clone(self) -> bool:
        return self.kind != "genuine"


def _record(taxonomy: Taxonomy, index: int) -> RegistryRecord:
    label = taxonomy.labels[index]
    return RegistryRecord(label.make, label.model, None, None)


def simulate_pairs(labels: np.ndarray, taxonomy: Taxonomy, clones_per_image: int, seed: int) -> list[Pair]:
    """Each image with its genuine record, K make-level clones and K model-level clones (when any exist)."""
    rng = np.random.default_rng(seed)
    usable = [i for i in range(len(taxonomy.labels)) if i not in taxonomy.other_indices]
    makes = [norm_make(lb.make) for lb in taxonomy.labels]
    pairs = []
    for n, y in enumerate(int(v) for v in labels):
        pairs.append(Pair(n, _record(taxonomy, y), "genuine"))
        for kind, others in (
            ("make", [i for i in usable if makes[i] != makes[y]]),
            ("model", [i for i in usable if makes[i] == makes[y] and i != y]),
        ):
            if not others or clones_per_image == 0:
                continue
            drawn = rng.choice(others, size=clones_per_image, replace=clones_per_image > len(others))
            pairs.extend(Pair(n, _record(taxonomy, int(i)), kind) for i in drawn)
    return pairs


# ---------------------------------------------------------------- verdicts and rates


def sweep_config(
    base: DecisionConfig, *, min_top1: float | None = None, make: float | None = None, model: float | None = None
) -> DecisionConfig:
    """``base`` with the given thresholds (match_threshold raised to the model threshold if below)."""
    data = base.model_dump()
    if min_top1 is not None:
        data["min_top1"] = min_top1
    if make is not None:
        data["make_threshold"] = make
    if model is not None:
        data["model_threshold"] = model
        data["match_threshold"] = max(base.match_threshold, model)
    return DecisionConfig.model_validate(data)


def pair_verdicts(
    probs: np.ndarray,
    pairs: Sequence[Pair],
    image_problems: Sequence[str | None],
    taxonomy: Taxonomy,
    cfg: DecisionConfig,
    label_categories: Sequence[str] | None = None,
    no_flag_reason: str | None = None,
) -> list[Verdict]:
    """The daemon's verdict for each pair (:func:`decide`, nothing re-derived; ``no_flag_reason`` as there)."""
    return [
        decide(
            probs=probs[p.sample],
            taxonomy=taxonomy,
            record=p.record,
            plate_problem=None,
            cfg=cfg,
            image_problem=image_problems[p.sample],
            label_categories=label_categories,
            no_flag_reason=no_flag_reason,
        )
        for p in pairs
    ]


def outcome_name(verdict: Verdict) -> str:
    return f"{verdict.outcome}/{verdict.level}" if verdict.level else verdict.outcome


@dataclass(frozen=True)
class Rates:
    """Counts at one operating point; rates and the false-flag upper bound derive from them."""

    genuine: int
    genuine_flagged: int
    genuine_abstained: int
    make_clones: int
    make_detected: int
    model_clones: int
    model_detected: int

    @property
    def false_flag_rate(self) -> float:
        return self.genuine_flagged / self.genuine if self.genuine else 0.0

    @property
    def false_flag_upper(self) -> float:
        return upper_bound(self.genuine_flagged, self.genuine)

    @property
    def make_detection(self) -> float:
        return self.make_detected / self.make_clones if self.make_clones else 0.0

    @property
    def model_detection(self) -> float:
        return self.model_detected / self.model_clones if self.model_clones else 0.0

    @property
    def detection(self) -> float:
        clones = self.make_clones + self.model_clones
        return (self.make_detected + self.model_detected) / clones if clones else 0.0

    def met(self, target: float) -> bool:
        """The target is met when the 95 % upper bound, not the point estimate, is at or below it."""
        return self.genuine > 0 and self.false_flag_upper <= target

    def to_dict(self) -> dict[str, float | int]:
        return {
            **vars(self),
            "false_flag_rate": self.false_flag_rate,
            "false_flag_upper": self.false_flag_upper,
            "make_detection": self.make_detection,
            "model_detection": self.model_detection,
            "detection": self.detection,
        }


def rates(verdicts: Sequence[Verdict], pairs: Sequence[Pair]) -> Rates:
    """Flag counts per pair kind (any mismatch level counts as a flag)."""
    counts = Counter((p.kind, v.outcome) for p, v in zip(pairs, verdicts, strict=True))
    totals = Counter(p.kind for p in pairs)
    return Rates(
        genuine=totals["genuine"],
        genuine_flagged=counts[("genuine", "mismatch")],
        genuine_abstained=counts[("genuine", "inconclusive")],
        make_clones=totals["make"],
        make_detected=counts[("make", "mismatch")],
        model_clones=totals["model"],
        model_detected=counts[("model", "mismatch")],
    )


def outcome_rates(verdicts: Sequence[Verdict], pairs: Sequence[Pair]) -> dict[str, dict[str, float]]:
    """Share of each outcome among the pairs of each kind."""
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        mine = [outcome_name(v) for p, v in zip(pairs, verdicts, strict=True) if p.kind == kind]
        out[kind] = {o: n / len(mine) for o, n in sorted(Counter(mine).items())} if mine else {}
    return out


@dataclass(frozen=True)
class SweepPoint:
    min_top1: float
    make_threshold: float
    model_threshold: float
    rates: Rates

    def to_dict(self) -> dict[str, float | int]:
        return {
            "min_top1": self.min_top1,
            "make_threshold": self.make_threshold,
            "model_threshold": self.model_threshold,
            **self.rates.to_dict(),
        }


def joint_sweep(
    probs: np.ndarray,
    pairs: Sequence[Pair],
    image_problems: Sequence[str | None],
    taxonomy: Taxonomy,
    base: DecisionConfig,
    *,
    min_top1_grid: Sequence[float] = MIN_TOP1_GRID,
    threshold_grid: Sequence[float] = THRESHOLD_GRID,
    label_categories: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[SweepPoint]:
    """Every (min_top1, make_threshold, model_threshold) of the grids, through the daemon's decide."""
    grid = [(m, a, b) for m in min_top1_grid for a in threshold_grid for b in threshold_grid]
    points = []
    for n, (m, a, b) in enumerate(grid, start=1):
        cfg = sweep_config(base, min_top1=m, make=a, model=b)
        verdicts = pair_verdicts(probs, pairs, image_problems, taxonomy, cfg, label_categories)
        points.append(SweepPoint(m, a, b, rates(verdicts, pairs)))
        if progress is not None:
            progress(n, len(grid))
    return points


def recommend(points: Sequence[SweepPoint], target: float) -> SweepPoint | None:
    """Best make-level detection, then model-level, among points whose upper bound meets the target."""
    ok = [p for p in points if p.rates.met(target)]
    if not ok:
        return None
    return min(
        ok,
        key=lambda p: (
            -p.rates.make_detection,
            -p.rates.model_detection,
            p.rates.genuine_flagged,
            p.min_top1,
            -p.make_threshold,
            -p.model_threshold,
        ),
    )
