"""Fit a bundle's operating point: temperature and thresholds for a target false-flag rate.

The public API (used by ``iaflash-agent fit``, ``evaluate`` and the demo):

* :func:`clopper_pearson_upper` — the Clopper–Pearson upper confidence bound of a rate seen as
  ``flags`` out of ``n`` (one-sided by default: 0 flags in n gives ``1 - 0.05**(1/n)``; two-sided
  95 % gives ``1 - 0.025**(1/n)``). Pure Python: a bisection on the binomial CDF, summed in log space.
* :func:`genuine_needed` — how many genuine samples the target needs (with 0, 1, ... flags).
* :class:`FitSample` — one labelled capture: its raw logits, the registry record read for it,
  and whether that record is its own (*genuine*) or a simulated clone (of another make or model).
* :func:`fit_operating_point` — fits the temperature (NLL on the genuine samples, unless given),
  then the thresholds (``min_top1``, ``make_threshold``, ``model_threshold``, ``other_threshold``)
  on a grid, each point judged through the daemon's own :func:`~iaflash.agent.decision.verdict.decide`.
  "Met" means the upper bound of the genuine false-flag rate is at or below the target; among the
  points that meet it, the one catching most clones wins. The chosen point is re-run through
  ``decide`` sample by sample and must give the same counts. Returns a :class:`FitResult` whose
  ``operating_point`` (:class:`~iaflash.engines.bundle.OperatingPoint`) goes into the manifest.
* :func:`write_fitted_bundle` — a new bundle with that operating point and temperature.

The grid is scanned on features computed once per sample by ``decide`` itself (the probabilities it
compares with each threshold), so the scan is a vectorised reading of the same rule; the final
check through ``decide`` guards that reading. Thresholds chosen on a set are optimistic on that same
set: report figures out of fold (``evaluate`` cross-fits) and fit on data the model never trained on.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import Verdict, decide, softmax
from iaflash.agent.errors import CalibrationError
from iaflash.agent.evaluation.calibrate import derived_bundle, fit_temperature
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import Bundle, OperatingPoint
from iaflash.engines.scores import fuse

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_TARGET",
    "GUARD_GRID",
    "MAKE_GRID",
    "MIN_TOP1_GRID",
    "MODEL_GRID",
    "OTHER_GRID",
    "FitResult",
    "FitSample",
    "GridPoint",
    "GuardChoice",
    "choose_guard",
    "clopper_pearson_upper",
    "count_flags",
    "fit_operating_point",
    "genuine_needed",
    "parse_guard",
    "samples_from_inference",
    "samples_sha256",
    "sharpen",
    "with_readings",
    "write_fitted_bundle",
]

DEFAULT_TARGET = 0.001
DEFAULT_CONFIDENCE = 0.95
MIN_TOP1_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995)
MAKE_GRID: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
MODEL_GRID: tuple[float, ...] = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
OTHER_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
Sided = Literal["one", "two"]
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------- the finite-sample rule


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed term by term in log space."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1.0)
    terms = [
        log_n - math.lgamma(i + 1.0) - math.lgamma(n - i + 1.0) + i * log_p + (n - i) * log_q for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _alpha(confidence: float, sided: Sided) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    return (1.0 - confidence) / (2.0 if sided == "two" else 1.0)


@functools.lru_cache(maxsize=65536)
def clopper_pearson_upper(flags: int, n: int, confidence: float = DEFAULT_CONFIDENCE, sided: Sided = "one") -> float:
    """Upper Clopper–Pearson bound of a rate seen as ``flags`` out of ``n`` (1.0 when n = 0 or flags = n).

    It is the p at which P(Binomial(n, p) <= flags) = alpha, alpha = 1 - confidence (one-sided) or
    (1 - confidence) / 2 (the upper end of the two-sided interval): the Beta(flags + 1, n - flags)
    quantile 1 - alpha. Closed form for 0 flags: ``1 - alpha ** (1 / n)``.
    """
    if flags < 0 or n < 0 or flags > n:
        raise ValueError(f"need 0 <= flags <= n, got flags={flags}, n={n}")
    alpha = _alpha(confidence, sided)
    if n in (0, flags):
        return 1.0
    if flags == 0:
        return float(1.0 - alpha ** (1.0 / n))
    lo, hi = flags / n, 1.0
    for _ in range(100):  # the CDF falls as p grows
        mid = (lo + hi) / 2
        if _binom_cdf(flags, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def genuine_needed(target: float, confidence: float = DEFAULT_CONFIDENCE, sided: Sided = "one", flags: int = 0) -> int:
    """The fewest genuine samples for which ``flags`` flags keep the upper bound at or below ``target``."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be within (0, 1), got {target}")
    if flags == 0:
        n = math.ceil(math.log(_alpha(confidence, sided)) / math.log1p(-target))
        while n > 1 and clopper_pearson_upper(0, n - 1, confidence, sided) <= target:
            n -= 1
        while clopper_pearson_upper(0, n, confidence, sided) > target:
            n += 1
        return n
    lo, hi = flags + 1, max(flags + 2, 16)
    while clopper_pearson_upper(flags, hi, confidence, sided) > target:
        lo, hi = hi, hi * 2
    while lo < hi:  # the bound falls as n grows with flags fixed
        mid = (lo + hi) // 2
        if clopper_pearson_upper(flags, mid, confidence, sided) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---------------------------------------------------------------- samples


@dataclass(frozen=True)
class FitSample:
    """One labelled capture run through the daemon's intake: its raw logits and the record read for it.

    ``logits`` are the model's raw output for the crop (``log p`` for a bundle that outputs
    probabilities), before the temperature. ``genuine`` is True when ``record`` is the vehicle's own
    registration, False for a simulated clone; ``level`` says at which level a clone differs
    ("make" or "model"). ``label`` is the true label index (used to fit the temperature).
    ``image_problem`` is what the daemon's intake said about the image (None when usable).
    ``outputs``/``views``: every view's raw outputs ``[V, C]`` (crop, mirror, second image) when the
    daemon fuses several (:func:`iaflash.engines.scores.fuse`); None: ``logits`` is the one view.
    ``unit``: the vehicle this sample reads ("": the sample alone). Genuine samples that share a
    unit are several *readings* of one vehicle (another crop margin, the tight photo): the
    finite-sample rule counts the unit once, flagged if any of its readings flags. ``reading``
    names an extra reading ("" for the daemon's own); only the daemon's own fit the temperature.
    """

    logits: np.ndarray
    record: RegistryRecord
    genuine: bool
    label: int | None = None
    level: Literal["make", "model"] | None = None
    image_problem: str | None = None
    sample_id: str = ""
    view: str | None = None
    outputs: np.ndarray | None = None
    views: tuple[str, ...] = ()
    unit: str = ""
    reading: str = ""


def samples_sha256(samples: Sequence[FitSample]) -> str:
    """A sha256 naming the fitting set: logits bytes, records and truth of every sample, in order."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(np.ascontiguousarray(s.logits, dtype=np.float32).tobytes())
        meta = [s.record.make, s.record.model, s.genuine, s.label, s.level, s.image_problem, s.sample_id]
        if s.unit:  # fitting sets without readings keep the digest they always had
            meta.append(s.unit)
        digest.update(json.dumps(meta).encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class GridPoint:
    """One point of the threshold grid, counted over the fitting set."""

    thresholds: dict[str, float]
    flags: int
    n_genuine: int
    upper_bound: float
    clones_caught: int
    n_clones: int
    make_caught: int = 0
    n_make_clones: int = 0
    model_caught: int = 0
    n_model_clones: int = 0
    genuine_readings: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": dict(self.thresholds),
            "flags": self.flags,
            "n_genuine": self.n_genuine,
            "genuine_readings": self.genuine_readings,
            "upper_bound": self.upper_bound,
            "clones_caught": self.clones_caught,
            "n_clones": self.n_clones,
            "make_caught": self.make_caught,
            "n_make_clones": self.n_make_clones,
            "model_caught": self.model_caught,
            "n_model_clones": self.n_model_clones,
        }


@dataclass(frozen=True)
class FitResult:
    """The fitted operating point, the grid it was chosen from, and what the target needs."""

    operating_point: OperatingPoint
    chosen: GridPoint
    grid: tuple[GridPoint, ...]
    genuine_needed: int
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operating_point": self.operating_point.to_dict(),
            "chosen": self.chosen.to_dict(),
            "genuine_needed": self.genuine_needed,
            "warnings": list(self.warnings),
            "grid_points": len(self.grid),
        }


_LEVELS: dict[str, Literal["make", "model"]] = {"make": "make", "model": "model"}


def _own(make: str, model: str) -> RegistryRecord:
    return RegistryRecord(make, model, None, None)


def samples_from_inference(
    inference: Any, taxonomy: Taxonomy, *, clones_per_image: int = 1, seed: int = 0
) -> list[FitSample]:
    """FitSamples from an :class:`iaflash.agent.evaluation.evaluate.Inference` (the daemon's intake and model).

    A labelled *photo* is read against its own registration (genuine) and ``clones_per_image``
    simulated clones of each level (another make's label; another model of its make, when the
    taxonomy has one). A labelled *capture* keeps its own truth (genuine / make / model clone) and
    the registry text it lists. Unclassified items keep their intake problem (they never flag).
    """
    rng = np.random.default_rng(seed)
    usable = [i for i in range(len(taxonomy.labels)) if i not in taxonomy.other_indices]
    out: list[FitSample] = []
    for n, sample in enumerate(inference.samples):
        outputs = inference.outputs[n] if len(inference.outputs) > n else None
        views = tuple(inference.views[n]) if len(inference.views) > n else ()
        y = int(inference.labels[n])
        genuine = FitSample(
            logits=np.nan_to_num(np.asarray(inference.logits[n], dtype=np.float64), nan=0.0),
            record=_own(sample.make, sample.model),
            genuine=True,
            label=y,
            image_problem=inference.image_problems[n] or (None if outputs is not None else "not classified"),
            sample_id=sample.where,
            outputs=None if outputs is None or len(views) < 2 else np.asarray(outputs),
            views=views,
        )
        if sample.capture is not None:
            record = _own(*(sample.registered or (sample.make, sample.model)))
            level = _LEVELS.get(sample.kind)
            out.append(replace(genuine, record=record, genuine=level is None, level=level))
            continue
        out.append(genuine)
        for kind in ("make", "model"):
            same = kind == "model"
            others = [
                i
                for i in usable
                if (taxonomy.make_of(i) == taxonomy.make_of(y)) == same and i not in taxonomy.group_indices(y)
            ]
            for i in rng.choice(others, size=min(clones_per_image, len(others)), replace=False) if others else ():
                label = taxonomy.labels[int(i)]
                clone = replace(genuine, record=_own(label.make, label.model), genuine=False, level=_LEVELS[kind])
                out.append(replace(clone, sample_id=f"{sample.where}#{kind}"))
    return out


def with_readings(samples: Sequence[FitSample], readings: Sequence[tuple[str, Any]]) -> list[FitSample]:
    """``samples`` plus other readings of their genuine items: the point must hold on every reading.

    ``readings`` are ``(name, Inference)`` pairs over the same dataset read another way (another crop
    margin, the tight photo). A reading's sample joins the genuine sample with the same
    ``Sample.where`` (read against that sample's own record); the two share a unit, so the item counts
    once in the finite-sample rule and is flagged if any reading flags. Clones stay on the main reading.
    """
    out = list(samples)
    own: dict[str, int] = {}
    for i, s in enumerate(out):
        if s.genuine and s.sample_id:
            own.setdefault(s.sample_id, i)
            out[i] = replace(s, unit=s.sample_id)
    for name, inference in readings:
        for n, sample in enumerate(inference.samples):
            at = own.get(sample.where)
            if at is None:
                continue
            outputs = inference.outputs[n] if len(inference.outputs) > n else None
            views = tuple(inference.views[n]) if len(inference.views) > n else ()
            problem = inference.image_problems[n] or (None if outputs is not None else "not classified")
            out.append(
                FitSample(
                    logits=np.nan_to_num(np.asarray(inference.logits[n], dtype=np.float64), nan=0.0),
                    record=out[at].record,
                    genuine=True,
                    label=int(inference.labels[n]),
                    image_problem=problem,
                    sample_id=f"{sample.where}@{name}",
                    outputs=None if outputs is None or len(views) < 2 else np.asarray(outputs),
                    views=views,
                    unit=sample.where,
                    reading=name,
                )
            )
    return out


# ---------------------------------------------------------------- the fit

_PERMISSIVE = {"min_top1": 0.0, "make_threshold": 0.0, "model_threshold": 0.0, "other_threshold": 1.0}


@dataclass(frozen=True)
class _Features:
    """What decide compares with each threshold, per sample (NaN where the rule never runs)."""

    judged: np.ndarray  # the sample reaches the probability rules (supported, usable image)
    top1: np.ndarray
    p_other: np.ndarray
    p_make: np.ndarray
    p_model: np.ndarray  # NaN: make-level check only
    genuine: np.ndarray
    level: np.ndarray  # "make", "model" or "" per sample
    unit: np.ndarray  # per sample, the index of the vehicle it reads (genuine samples sharing one count once)


def _units(samples: Sequence[FitSample]) -> np.ndarray:
    """Each sample's unit as an integer: samples with the same non-empty ``unit`` share one; others are alone."""
    index: dict[str, int] = {}
    out = np.empty(len(samples), dtype=np.int64)
    for i, s in enumerate(samples):
        out[i] = index.setdefault(f"u:{s.unit}" if s.unit else f"#{i}", len(index))
    return out


def _features(samples: Sequence[FitSample], probs: np.ndarray, taxonomy: Taxonomy, base: DecisionConfig) -> _Features:
    cfg = _config(base, _PERMISSIVE)
    n = len(samples)
    judged = np.zeros(n, dtype=bool)
    top1, p_other, p_make, p_model = (np.full(n, np.nan) for _ in range(4))
    for i, s in enumerate(samples):
        verdict = decide(
            probs=probs[i],
            taxonomy=taxonomy,
            record=s.record,
            plate_problem=None,
            cfg=cfg,
            image_problem=s.image_problem,
        )
        checked = verdict.evidence.get("checked")
        if checked is None:
            continue
        judged[i] = True
        top1[i] = checked["p_top1"]
        p_other[i] = verdict.p_other or 0.0
        p_make[i] = checked["p_make"]
        p_model[i] = np.nan if checked["p_model"] is None else checked["p_model"]
    return _Features(
        judged=judged,
        top1=top1,
        p_other=p_other,
        p_make=p_make,
        p_model=p_model,
        genuine=np.array([s.genuine for s in samples], dtype=bool),
        level=np.array([("" if s.genuine else (s.level or "")) for s in samples]),
        unit=_units(samples),
    )


def _config(base: DecisionConfig, thresholds: dict[str, float]) -> DecisionConfig:
    data = {**base.model_dump(), **thresholds}
    data["match_threshold"] = max(data["match_threshold"], data["model_threshold"])
    return DecisionConfig.model_validate(data)


def _flags(f: _Features, t: dict[str, float]) -> np.ndarray:
    """decide's rules 5-8 on the features: which samples flag at thresholds ``t``."""
    with np.errstate(invalid="ignore"):
        gate = f.judged & (f.top1 >= t["min_top1"]) & (f.p_other < f.top1) & (f.p_other < t["other_threshold"])
        make = gate & (f.p_make < t["make_threshold"])
        model = gate & ~make & ~np.isnan(f.p_model) & (f.p_model < t["model_threshold"])
    out: np.ndarray = make | model
    return out


def _count_units(units: np.ndarray) -> int:
    """How many distinct units (small integers >= 0) ``units`` holds; np.unique's answer, without its sort."""
    return int(np.count_nonzero(np.bincount(units))) if len(units) else 0


def _point(f: _Features, t: dict[str, float], flagged: np.ndarray, confidence: float, sided: Sided) -> GridPoint:
    """Counts at ``t``: genuine flags per unit (a vehicle flagged in any reading counts once), clones per sample."""
    genuine, clones = f.genuine, ~f.genuine
    k, n = _count_units(f.unit[flagged & genuine]), _count_units(f.unit[genuine])
    make, model = clones & (f.level == "make"), clones & (f.level == "model")
    return GridPoint(
        thresholds=dict(t),
        flags=k,
        n_genuine=n,
        upper_bound=clopper_pearson_upper(k, n, confidence, sided),
        clones_caught=int((flagged & clones).sum()),
        n_clones=int(clones.sum()),
        make_caught=int((flagged & make).sum()),
        n_make_clones=int(make.sum()),
        model_caught=int((flagged & model).sum()),
        n_model_clones=int(model.sum()),
        genuine_readings=int(genuine.sum()),
    )


def count_flags(
    samples: Sequence[FitSample],
    probs: np.ndarray,
    taxonomy: Taxonomy,
    cfg: DecisionConfig,
    confidence: float = DEFAULT_CONFIDENCE,
    sided: Sided = "one",
) -> tuple[GridPoint, list[Verdict]]:
    """Every sample through :func:`decide` at ``cfg``: the counts and the verdicts (for reports)."""
    verdicts = [
        decide(
            probs=probs[i],
            taxonomy=taxonomy,
            record=s.record,
            plate_problem=None,
            cfg=cfg,
            image_problem=s.image_problem,
        )
        for i, s in enumerate(samples)
    ]
    flagged = np.array([v.is_flag for v in verdicts], dtype=bool)
    f = _Features(
        judged=np.ones(len(samples), dtype=bool),
        top1=np.zeros(0),
        p_other=np.zeros(0),
        p_make=np.zeros(0),
        p_model=np.zeros(0),
        genuine=np.array([s.genuine for s in samples], dtype=bool),
        level=np.array([("" if s.genuine else (s.level or "")) for s in samples]),
        unit=_units(samples),
    )
    t = {k: float(getattr(cfg, k)) for k in ("min_top1", "make_threshold", "model_threshold", "other_threshold")}
    return _point(f, t, flagged, confidence, sided), verdicts


def _axes(base: DecisionConfig, other_grid: Sequence[float] | None) -> tuple[tuple[float, ...], ...]:
    """The grid's four axes: min_top1, make, model and other thresholds."""
    return MIN_TOP1_GRID, MAKE_GRID, MODEL_GRID, tuple(sorted({*(other_grid or OTHER_GRID), base.other_threshold}))


def _grid(base: DecisionConfig, other_grid: Sequence[float] | None) -> list[dict[str, float]]:
    return [
        {"min_top1": a, "make_threshold": b, "model_threshold": c, "other_threshold": d}
        for a, b, c, d in itertools.product(*_axes(base, other_grid))
    ]


def _scan(
    f: _Features, base: DecisionConfig, other_grid: Sequence[float] | None, confidence: float, sided: Sided
) -> list[GridPoint]:
    """:func:`_point` at every point of :func:`_grid` (same order), at once.

    A sample flags at (a, b, c, d) when it passes the gate (min_top1 a, other d) and the make rule
    (b) or the model rule (c): the clone counts are products of gate and rule matrices, and the
    genuine flags are ORed over each unit's readings (samples sorted by unit, ``reduceat``).
    """
    tops, makes, models, others = (np.asarray(x, dtype=np.float64) for x in _axes(base, other_grid))
    with np.errstate(invalid="ignore"):  # NaN: the rule never runs, never flags
        gate = (f.judged & (f.p_other < f.top1))[None, None, :] & (
            (f.top1[None, :] >= tops[:, None])[:, None, :] & (f.p_other[None, :] < others[:, None])[None, :, :]
        )  # A x D x N
        make_ok = f.p_make[None, :] < makes[:, None]  # B x N
        model_ok = ~np.isnan(f.p_model)[None, :] & (f.p_model[None, :] < models[:, None])  # C x N
    rule = (make_ok[:, None, :] | model_ok[None, :, :]).reshape(len(makes) * len(models), -1)  # (B*C) x N
    gate2 = gate.reshape(len(tops) * len(others), -1)  # (A*D) x N

    def caught(cols: np.ndarray) -> np.ndarray:  # (A*D) x (B*C) samples flagged among cols
        product = gate2[:, cols].astype(np.float32) @ rule[:, cols].T.astype(np.float32)  # exact below 2**24
        out: np.ndarray = np.rint(product).astype(np.int64)
        return out

    clones = ~f.genuine
    make_cols, model_cols = np.flatnonzero(clones & (f.level == "make")), np.flatnonzero(clones & (f.level == "model"))
    make_caught, model_caught = caught(make_cols), caught(model_cols)
    all_caught = caught(np.flatnonzero(clones))
    g_rows = np.flatnonzero(f.genuine)
    order = g_rows[np.argsort(f.unit[g_rows], kind="stable")]
    units = f.unit[order]
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]]) if len(units) else np.zeros(0, dtype=int)
    n = len(starts)
    genuine_flags = np.zeros((gate2.shape[0], rule.shape[0]), dtype=int)
    if n:
        g_rule = rule[:, order]
        for ad in range(gate2.shape[0]):
            hit = gate2[ad, order][None, :] & g_rule  # (B*C) x Ng
            genuine_flags[ad] = np.logical_or.reduceat(hit, starts, axis=1).sum(axis=1)
    shape = (len(tops), len(others), len(makes), len(models))
    counts = [x.reshape(shape) for x in (genuine_flags, all_caught, make_caught, model_caught)]
    n_clones, n_make, n_model, readings = int(clones.sum()), len(make_cols), len(model_cols), len(g_rows)
    points = []
    for (ia, a), (ib, b), (ic, c), (id_, d) in itertools.product(
        *(list(enumerate(x)) for x in (tops, makes, models, others))
    ):
        k, cc, mc, dc = (int(x[ia, id_, ib, ic]) for x in counts)
        points.append(
            GridPoint(
                thresholds={
                    "min_top1": float(a),
                    "make_threshold": float(b),
                    "model_threshold": float(c),
                    "other_threshold": float(d),
                },
                flags=k,
                n_genuine=n,
                upper_bound=clopper_pearson_upper(k, n, confidence, sided),
                clones_caught=cc,
                n_clones=n_clones,
                make_caught=mc,
                n_make_clones=n_make,
                model_caught=dc,
                n_model_clones=n_model,
                genuine_readings=readings,
            )
        )
    return points


def _distance(t: dict[str, float], base: DecisionConfig) -> float:
    """How far thresholds ``t`` move from ``base`` (probabilities linear, the two small thresholds in log10)."""

    def log(v: float) -> float:
        return math.log10(max(v, 1e-4))

    return (
        abs(t["min_top1"] - base.min_top1)
        + abs(t["other_threshold"] - base.other_threshold)
        + abs(log(t["make_threshold"]) - log(base.make_threshold))
        + abs(log(t["model_threshold"]) - log(base.model_threshold))
    )


def _best(points: Sequence[GridPoint], target: float, base: DecisionConfig) -> tuple[GridPoint, bool]:
    """Most clones caught among the points that meet the target, else the lowest bound (then most caught).

    Ties go to fewer genuine flags, then to the point nearest ``base`` (the documented defaults): the
    data moves a threshold only as far as it has to.
    """
    met = [p for p in points if p.upper_bound <= target]
    if met:
        return min(met, key=lambda p: (-p.clones_caught, p.flags, _distance(p.thresholds, base))), True
    return min(points, key=lambda p: (p.upper_bound, -p.clones_caught, _distance(p.thresholds, base))), False


def _probs(samples: Sequence[FitSample], temperature: float, output_kind: str) -> np.ndarray:
    """What the daemon decides on: softmax(z / T), or the mean of the views' probabilities (engines.scores.fuse)."""
    z = np.stack([np.asarray(s.logits, dtype=np.float64) for s in samples])
    probs = softmax(z, temperature)
    for n, s in enumerate(samples):
        if s.outputs is not None:
            probs[n] = fuse(s.outputs, s.views, output_kind=output_kind, temperature=temperature).probs
    return probs


def _temperature(samples: Sequence[FitSample], temperature: float | None) -> float:
    if temperature is not None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise CalibrationError(f"temperature must be a positive finite number, got {temperature!r}")
        return float(temperature)
    labelled = [s for s in samples if s.genuine and s.label is not None and s.image_problem is None and not s.reading]
    if not labelled:
        raise CalibrationError(
            "no genuine sample with a label to fit the temperature on; fix: give label= or temperature="
        )
    return fit_temperature(np.stack([s.logits for s in labelled]), np.array([s.label for s in labelled]))


def _check_samples(samples: Sequence[FitSample], taxonomy: Taxonomy) -> None:
    if not samples:
        raise CalibrationError("no samples to fit on; fix: give labelled genuine captures (and simulated clones)")
    if not any(s.genuine for s in samples):
        raise CalibrationError("no genuine sample: the false-flag rate cannot be measured; fix: add genuine captures")
    width = len(taxonomy.labels)
    bad = next((i for i, s in enumerate(samples) if np.shape(s.logits) != (width,)), None)
    if bad is not None:
        raise CalibrationError(
            f"sample {bad} ({samples[bad].sample_id or 'no id'}) has logits of shape {np.shape(samples[bad].logits)}, "
            f"the taxonomy has {width} labels; fix: give the model's output for one crop per sample"
        )


def sharpen(probs: np.ndarray, guard: float) -> np.ndarray:
    """Probabilities raised to the power ``guard`` and renormalised: softmax at temperature T / guard."""
    log_p = np.log(np.clip(np.nan_to_num(probs, nan=0.0), 1e-300, 1.0)) * guard
    log_p -= log_p.max(axis=-1, keepdims=True)
    out = np.exp(log_p)
    return np.asarray(out / out.sum(axis=-1, keepdims=True))


def _guarded(samples: Sequence[FitSample], probs: np.ndarray, guard: float) -> tuple[list[FitSample], np.ndarray]:
    """``samples`` plus, for ``guard`` > 1, a sharpened reading of every genuine sample (same unit)."""
    if guard == 1.0:
        return list(samples), probs
    own = [replace(s, unit=s.unit or f"#guard{i}") if s.genuine else s for i, s in enumerate(samples)]
    rows = [i for i, s in enumerate(own) if s.genuine]
    extra = [replace(own[i], reading=f"guard={guard:g}", sample_id=f"{own[i].sample_id}@guard") for i in rows]
    return own + extra, np.concatenate([probs, sharpen(probs[rows], guard)])


def fit_operating_point(
    samples: Sequence[FitSample],
    *,
    taxonomy: Taxonomy,
    target: float = DEFAULT_TARGET,
    confidence: float = DEFAULT_CONFIDENCE,
    sided: Sided = "one",
    base: DecisionConfig | None = None,
    temperature: float | None = None,
    other_grid: Sequence[float] | None = None,
    dataset_sha256: str | None = None,
    fitted_at: datetime | None = None,
    progress: Progress | None = None,
    output_kind: str = "logits",
    guard: float = 1.0,
) -> FitResult:
    """Fit the temperature (unless given) and the thresholds for ``target`` on labelled samples.

    ``guard`` > 1 stresses the genuine samples: each is also judged at probabilities sharpened to
    the power ``guard`` (temperature T / guard, so a confident error is more confident still), as a
    reading of the same vehicle, so the point keeps a margin beyond the worst genuine sample seen
    (:func:`choose_guard` picks it by cross-validation inside the fitting set).

    ``base`` supplies the thresholds that are not fitted (``match_threshold``, ``top_k``, ...).
    Raises :class:`CalibrationError` for unusable input. The result's ``operating_point.met`` is
    False when no grid point bounds the false-flag rate at ``target`` (too few genuine samples:
    see ``genuine_needed``, or a model too weak); the daemon never flags with an unmet point.
    """
    _check_samples(samples, taxonomy)
    if not 0.0 < target < 1.0:
        raise CalibrationError(f"target must be within (0, 1), got {target}; fix: e.g. --target 0.001")
    if not (math.isfinite(guard) and guard >= 1.0):
        raise CalibrationError(
            f"guard must be a finite number >= 1 (1 = no guard), got {guard!r}; fix: e.g. --guard 1.5"
        )
    base = base or DecisionConfig.model_validate({})
    t_fit = _temperature(samples, temperature)
    probs = _probs(samples, t_fit, output_kind)
    judged, probs = _guarded(samples, probs, guard)
    feats = _features(judged, probs, taxonomy, base)
    points = _scan(feats, base, other_grid, confidence, sided)
    if progress is not None:
        progress(len(points), len(points))
    chosen, met = _best(points, target, base)
    checked, _ = count_flags(judged, probs, taxonomy, _config(base, chosen.thresholds), confidence, sided)
    if (checked.flags, checked.clones_caught) != (chosen.flags, chosen.clones_caught):
        raise AssertionError(  # a bug: the vectorised scan must read decide's rule exactly
            f"grid scan counted {chosen.flags} flags/{chosen.clones_caught} caught, decide counted "
            f"{checked.flags}/{checked.clones_caught} at {chosen.thresholds}"
        )
    needed = genuine_needed(target, confidence, sided)
    warnings = []
    if not met:
        warnings.append(
            f"target {target} not met: the best point has {chosen.flags} flag(s) in {chosen.n_genuine} genuine "
            f"items, upper bound {chosen.upper_bound:.5f}; 0 flags need at least {needed} genuine samples"
        )
    op = _operating_point(
        chosen, met, target, confidence, sided, t_fit, base, dataset_sha256 or samples_sha256(samples), fitted_at, guard
    )
    return FitResult(
        operating_point=op, chosen=chosen, grid=tuple(points), genuine_needed=needed, warnings=tuple(warnings)
    )


def _operating_point(
    chosen: GridPoint,
    met: bool,
    target: float,
    confidence: float,
    sided: Sided,
    temperature: float,
    base: DecisionConfig,
    dataset_sha256: str,
    fitted_at: datetime | None,
    guard: float = 1.0,
) -> OperatingPoint:
    thresholds = {
        **chosen.thresholds,
        "match_threshold": max(base.match_threshold, chosen.thresholds["model_threshold"]),
    }
    when = (fitted_at or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    body = {
        "target": target,
        "confidence": confidence,
        "sided": sided,
        "thresholds": thresholds,
        "temperature": temperature,
        "n_genuine": chosen.n_genuine,
        "flags": chosen.flags,
        "upper_bound": chosen.upper_bound,
        "met": met,
        "n_clones": chosen.n_clones,
        "clones_caught": chosen.clones_caught,
        "fitted_at": when,
        "dataset_sha256": dataset_sha256,
        **({"guard": guard} if guard != 1.0 else {}),  # absent at 1: the same id as before the guard
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return OperatingPoint(id=f"op-{digest}", **body)  # type: ignore[arg-type]  # keys are OperatingPoint's fields


# ---------------------------------------------------------------- the guard, chosen inside the fitting set

GUARD_GRID: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0)
"""Guards :func:`choose_guard` tries, smallest first (1 = no guard)."""


def parse_guard(text: str) -> float | Literal["auto"]:
    """A guard as people type it (``--guard``): "auto", or a finite number >= 1; ValueError says the fix."""
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a number >= 1 nor 'auto'; fix: e.g. --guard 1.5 or --guard auto"
        ) from None
    if not (math.isfinite(value) and value >= 1.0):
        raise ValueError(f"{text!r}: the guard must be a finite number >= 1 (1 = no guard)")
    return value


@dataclass(frozen=True)
class GuardChoice:
    """The guard chosen, and per guard tried the genuine vehicles flagged out of fold inside the fitting set.

    ``unmet_from``: the first guard whose fit on the whole set missed the target (the search stopped
    there; None when it did not stop for that reason).
    """

    guard: float
    escapes: dict[float, int]
    n_genuine: int
    folds: int
    unmet_from: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "guard": self.guard,
            "escapes": {f"{g:g}": k for g, k in self.escapes.items()},
            "n_genuine": self.n_genuine,
            "folds": self.folds,
            "unmet_from": self.unmet_from,
        }


def _subset(f: _Features, mask: np.ndarray) -> _Features:
    return _Features(**{name: getattr(f, name)[mask] for name in _Features.__dataclass_fields__})


def _fold_keys(samples: Sequence[FitSample]) -> np.ndarray:
    """Each sample's inner fold key: its vehicle (``unit``, else the item its ``sample_id`` names)."""
    index: dict[str, int] = {}
    return np.array(
        [index.setdefault(s.unit or s.sample_id.split("#", 1)[0] or f"#{i}", len(index)) for i, s in enumerate(samples)]
    )


def choose_guard(
    samples: Sequence[FitSample],
    *,
    taxonomy: Taxonomy,
    target: float = DEFAULT_TARGET,
    confidence: float = DEFAULT_CONFIDENCE,
    sided: Sided = "one",
    base: DecisionConfig | None = None,
    temperature: float | None = None,
    other_grid: Sequence[float] | None = None,
    output_kind: str = "logits",
    guards: Sequence[float] = GUARD_GRID,
    folds: int = 5,
) -> GuardChoice:
    """The smallest guard under which no genuine vehicle flags out of fold *inside* ``samples``.

    A point fitted at the edge of n genuine samples lets about one new vehicle in n through (the one
    more confidently wrong than any it saw); the guard is the margin that, measured here, covers that
    step. The fitting set is split into ``folds`` by vehicle; for each guard, smallest first, every
    fold is judged (on the daemon's own reading, unsharpened) at the point fitted with that guard on
    the other folds. The inner fits aim at ``target``, or at what 0 flags can show on their smaller
    set when that is looser, so they sit at the edge as the outer fit does.

    A guard is only a candidate when the fit on all of ``samples`` still meets ``target`` with it (a
    larger guard that cannot is never chosen: that point would never flag). The search stops at the
    first candidate with 0 escapes; with none, the candidate with fewest (the smaller on ties), and
    1 (no guard) when no guard meets the target. ``escapes`` lists the candidates tried.
    """
    _check_samples(samples, taxonomy)
    if folds < 2:
        raise CalibrationError(f"choose_guard needs at least 2 folds, got {folds}")
    if not guards or any(not (math.isfinite(g) and g >= 1.0) for g in guards):
        raise CalibrationError(f"guards must be finite numbers >= 1, got {list(guards)!r}")
    base = base or DecisionConfig.model_validate({})
    t_fit = _temperature(samples, temperature)
    probs = _probs(samples, t_fit, output_kind)
    keys = _fold_keys(samples)
    fold = (np.arange(int(keys.max()) + 1) % folds)[keys]
    main = np.array([s.genuine and not s.reading for s in samples], dtype=bool)
    genuine_rows = [i for i, s in enumerate(samples) if s.genuine]
    plain = _features(samples, probs, taxonomy, base)

    def fitted(f: _Features, aim: float) -> dict[str, float] | None:
        chosen, met = _best(_scan(f, base, other_grid, confidence, sided), aim, base)
        return chosen.thresholds if met else None

    escapes: dict[float, int] = {}
    unmet_from = None
    for g in sorted(set(guards)):
        judged, g_probs = _guarded(samples, probs, g)
        feats = _features(judged, g_probs, taxonomy, base) if g != 1.0 else plain
        if fitted(feats, target) is None:
            unmet_from = g  # this guard's point would never flag, nor would a larger one's
            break
        g_fold = np.concatenate([fold, fold[genuine_rows]]) if g != 1.0 else fold
        flagged_units: set[int] = set()
        for k in range(folds):
            inner = _subset(feats, g_fold != k)
            n_inner = _count_units(inner.unit[inner.genuine])
            aim = max(target, clopper_pearson_upper(0, n_inner, confidence, sided)) if n_inner else target
            thresholds = fitted(inner, aim)
            if thresholds is None:
                continue  # that fold's point would never flag
            out = _subset(plain, (fold == k) & main)
            flagged_units.update(int(u) for u in out.unit[_flags(out, thresholds)])
        escapes[g] = len(flagged_units)
        if escapes[g] == 0:
            break
    best = min(escapes, key=lambda g: (escapes[g], g)) if escapes else 1.0
    return GuardChoice(best, escapes, _count_units(keys[main]), folds, unmet_from)


def write_fitted_bundle(bundle: Bundle, op: OperatingPoint, out: Path) -> Bundle:
    """A NEW bundle in ``out``: same ONNX and labels, ``op`` and its temperature, version ``+cal``.

    The source's signature is not copied: the manifest changed, so it must be re-signed.
    """
    note = (
        f"Operating point {op.id} (target {op.target}, bound {op.upper_bound:.5f}) fitted on {bundle.manifest.version}."
    )
    return derived_bundle(bundle, Path(out), note=note, temperature=op.temperature, operating_point=op)
