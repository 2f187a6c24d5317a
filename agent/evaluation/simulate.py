"""Clone simulation and the operating curve: how often a threshold flags genuine and cloned plates.

The operating curve simulates clones: each image is paired with its genuine registry record
(a negative) and with K records of *other* labels of the taxonomy (positives). For every
threshold t of a grid, ``make_threshold = model_threshold = t`` (``match_threshold`` raised to t
where needed, ``min_top1`` kept), and :func:`iaflash.agent.decision.verdict.decide` gives each pair's verdict.
Pure numpy over the probabilities :mod:`iaflash.agent.evaluation.evaluate` computes; no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import decide
from iaflash.agent.registry.record import RegistryRecord

__all__ = [
    "THRESHOLD_GRID",
    "CurvePoint",
    "Pair",
    "Progress",
    "flag_rates",
    "operating_curve",
    "outcome_rates",
    "pair_outcomes",
    "recommend",
    "simulate_pairs",
    "sweep_config",
]

THRESHOLD_GRID: tuple[float, ...] = (
    *(round(m * 10.0**e, 6) for e in (-4, -3, -2) for m in (1, 1.5, 2, 3, 5, 7)),
    *(round(0.1 + 0.05 * i, 6) for i in range(17)),
)
"""make/model thresholds swept by default: 1e-4 to 0.07 in steps of 1-1.5-2-3-5-7, then 0.1 to 0.9 by 0.05."""
Progress = Callable[[int, int], None]
"""``progress(done, total)``."""


@dataclass(frozen=True)
class Pair:
    """A simulated capture: image ``sample`` read against registry ``record``; ``clone`` if it is not its own."""

    sample: int
    record: RegistryRecord
    clone: bool


def simulate_pairs(labels: np.ndarray, taxonomy: Taxonomy, clones_per_image: int, seed: int) -> list[Pair]:
    """Each image with its genuine record, then with K records of other labels (distinct when possible)."""
    rng = np.random.default_rng(seed)
    usable = [i for i in range(len(taxonomy.labels)) if i not in taxonomy.other_indices]
    pairs = []
    for n, y in enumerate(int(v) for v in labels):
        own = taxonomy.labels[y]
        pairs.append(Pair(n, RegistryRecord(own.make, own.model, None, None), clone=False))
        others = [i for i in usable if i != y]
        if not others or clones_per_image == 0:
            continue
        drawn = rng.choice(others, size=clones_per_image, replace=clones_per_image > len(others))
        pairs.extend(
            Pair(n, RegistryRecord(taxonomy.labels[i].make, taxonomy.labels[i].model, None, None), True) for i in drawn
        )
    return pairs


def sweep_config(base: DecisionConfig, threshold: float) -> DecisionConfig:
    """``base`` with make and model thresholds at ``threshold`` (match_threshold raised to it if below)."""
    data = base.model_dump()
    data.update(
        make_threshold=threshold, model_threshold=threshold, match_threshold=max(base.match_threshold, threshold)
    )
    return DecisionConfig.model_validate(data)


def pair_outcomes(
    probs: np.ndarray,
    pairs: Sequence[Pair],
    image_problems: Sequence[str | None],
    taxonomy: Taxonomy,
    cfg: DecisionConfig,
) -> list[str]:
    """The verdict of each pair: ``match``, ``mismatch/make``, ``mismatch/model``, ``inconclusive``..."""
    out = []
    for pair in pairs:
        verdict = decide(
            probs=probs[pair.sample],
            taxonomy=taxonomy,
            record=pair.record,
            plate_problem=None,
            cfg=cfg,
            image_problem=image_problems[pair.sample],
        )
        out.append(f"{verdict.outcome}/{verdict.level}" if verdict.level else verdict.outcome)
    return out


@dataclass(frozen=True)
class CurvePoint:
    threshold: float
    false_flag_rate: float
    detection_rate: float


def flag_rates(outcomes: Sequence[str], pairs: Sequence[Pair]) -> tuple[float, float]:
    """(share of genuine pairs flagged, share of clone pairs flagged)."""
    flags = Counter((p.clone, o.startswith("mismatch")) for p, o in zip(pairs, outcomes, strict=True))
    genuine, clones = flags[(False, True)] + flags[(False, False)], flags[(True, True)] + flags[(True, False)]
    return flags[(False, True)] / max(genuine, 1), flags[(True, True)] / max(clones, 1)


def operating_curve(
    probs: np.ndarray,
    pairs: Sequence[Pair],
    image_problems: Sequence[str | None],
    taxonomy: Taxonomy,
    base: DecisionConfig,
    thresholds: Sequence[float] = THRESHOLD_GRID,
    progress: Progress | None = None,
) -> list[CurvePoint]:
    """False-flag rate on genuine pairs and detection rate on clones at each threshold."""
    curve = []
    for n, t in enumerate(thresholds, start=1):
        outcomes = pair_outcomes(probs, pairs, image_problems, taxonomy, sweep_config(base, t))
        curve.append(CurvePoint(float(t), *flag_rates(outcomes, pairs)))
        if progress is not None:
            progress(n, len(thresholds))
    return curve


def outcome_rates(outcomes: Sequence[str], pairs: Sequence[Pair]) -> dict[str, dict[str, float]]:
    """Share of each outcome among genuine pairs and among clone pairs."""
    rates: dict[str, dict[str, float]] = {}
    for kind, clone in (("genuine", False), ("clone", True)):
        mine = [o for p, o in zip(pairs, outcomes, strict=True) if p.clone is clone]
        rates[kind] = {o: n / len(mine) for o, n in sorted(Counter(mine).items())} if mine else {}
    return rates


def recommend(curve: Sequence[CurvePoint], target: float) -> CurvePoint | None:
    """Highest detection with false-flag rate ≤ target; ties go to fewer false flags, then the lower threshold."""
    ok = [p for p in curve if p.false_flag_rate <= target]
    if not ok:
        return None
    return min(ok, key=lambda p: (-p.detection_rate, p.false_flag_rate, p.threshold))
