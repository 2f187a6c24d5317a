"""Out-of-fold figures: the operating point is never fitted on the items it is reported on.

The items are split into K folds by position (``index % K``, so a class spread through the set is
in every fold, and all pairs of one item stay in its fold). For each fold:

1. the temperature is fitted (:func:`~iaflash.agent.evaluation.calibrate.fit_temperature`) on the
   other folds' first-view logits;
2. the daemon's fused probabilities are computed at that temperature
   (:func:`~iaflash.agent.evaluation.evaluate.daemon_scores`: view fusion, OOD gate);
3. :func:`~iaflash.agent.evaluation.fit.fit_operating_point` fits the thresholds on the other
   folds' pairs (its logits are ``log p`` of those probabilities, at temperature 1, so it sees
   exactly the daemon's probabilities);
4. every pair of the fold is judged by the daemon's ``decide`` at the fitted thresholds; a fold whose
   point does not meet the fit's target never flags (the daemon's rule for an unmet point).

So every item is reported once per pair, each time out of fold.

``fit_only``: items that only ever fit (every fold's fit sees them, no fold reports them): more
genuine vehicles for the finite-sample rule, e.g. photos held out of the model's training but not
part of the reported set.

``readings``: other readings of the same items (:class:`Reading`: the tight photo, another crop
margin), used **only to fit**: each fold's fit also sees the genuine readings of its training items,
and an item counts once in the finite-sample rule, flagged if any of its readings flags
(``FitSample.unit``). The report is always on the main reading, one verdict per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import Verdict, decide
from iaflash.agent.evaluation.calibrate import fit_temperature
from iaflash.agent.evaluation.evaluate import Inference, classified, daemon_scores
from iaflash.agent.evaluation.fit import FitSample, choose_guard, fit_operating_point
from iaflash.agent.evaluation.simulate import Pair, Rates, rates
from iaflash.engines.bundle import Bundle
from iaflash.engines.manifest import Manifest

__all__ = ["CrossFit", "Reading", "cross_fit"]


@dataclass(frozen=True)
class Reading:
    """Another reading of the items: ``items[n]`` is the index in the main inference of ``inference``'s sample n."""

    inference: Inference
    items: np.ndarray
    name: str = "reading"

    @classmethod
    def matching(cls, main: Inference, other: Inference, name: str) -> Reading:
        """``other`` (the same dataset read another way) matched to ``main``'s items by ``Sample.where``."""
        at = {s.where: i for i, s in enumerate(main.samples)}
        return cls(other, np.array([at.get(s.where, -1) for s in other.samples], dtype=np.int64), name)


@dataclass(frozen=True)
class CrossFit:
    """Out-of-fold counts over the reported pairs, each fold's fitted point, and the verdicts (``reported`` order)."""

    rates: Rates
    folds: tuple[dict[str, Any], ...]
    verdicts: tuple[Verdict, ...]
    reported: tuple[Pair, ...] = ()

    def to_dict(self, target: float) -> dict[str, Any]:
        return {
            "folds": len(self.folds),
            **self.rates.to_dict(),
            "met": self.rates.met(target),
            "fitted": list(self.folds),
        }


def _config(thresholds: dict[str, float], base: DecisionConfig) -> DecisionConfig:
    known = {k: v for k, v in thresholds.items() if k in DecisionConfig.model_fields}
    data = {**base.model_dump(), **known}
    data["match_threshold"] = max(data["match_threshold"], data["model_threshold"])
    return DecisionConfig.model_validate(data)


def _log(probs: np.ndarray) -> np.ndarray:
    return np.asarray(np.log(np.clip(np.nan_to_num(probs, nan=1.0), 1e-12, 1.0)))


def _fit_samples(
    pairs: Sequence[Pair], probs: np.ndarray, inference: Inference, problems: Sequence[str | None], units: bool
) -> list[FitSample]:
    return [
        FitSample(
            logits=_log(probs[p.sample]),
            record=p.record,
            genuine=not p.clone,
            label=int(inference.labels[p.sample]),
            level=None if not p.clone else ("make" if p.kind == "make" else "model"),
            image_problem=problems[p.sample],
            sample_id=inference.samples[p.sample].where,
            unit=f"item{p.sample}" if units and not p.clone else "",
        )
        for p in pairs
    ]


def _reading_samples(
    reading: Reading, manifest: Manifest, genuine: dict[int, Pair], fits: np.ndarray
) -> list[FitSample]:
    """The genuine readings of the items this fold fits on (``fits[item]``), each in the unit of its item."""
    probs, problems = daemon_scores(reading.inference, manifest)
    out = []
    for n, item in enumerate(int(i) for i in reading.items):
        pair = genuine.get(item)
        if pair is None or not fits[item]:
            continue
        out.append(
            FitSample(
                logits=_log(probs[n]),
                record=pair.record,
                genuine=True,
                label=int(reading.inference.labels[n]),
                image_problem=problems[n],
                sample_id=reading.inference.samples[n].where,
                unit=f"item{item}",
                reading=reading.name,
            )
        )
    return out


def cross_fit(
    inference: Inference,
    bundle: Bundle,
    pairs: Sequence[Pair],
    *,
    folds: int,
    target: float,
    base: DecisionConfig | None = None,
    readings: Sequence[Reading] = (),
    fit_only: Sequence[bool] | None = None,
    guard: float | Literal["auto"] = 1.0,
) -> CrossFit:
    """Fit on K-1 folds, judge the K-th, for every fold (module doc).

    ``guard``: the fit's guard (:func:`~iaflash.agent.evaluation.fit.fit_operating_point`), or
    ``"auto"``: each fold's own, chosen by :func:`~iaflash.agent.evaluation.fit.choose_guard` inside
    that fold's fitting set only (recorded in the fold's ``guard`` and ``guard_choice``).
    """
    base = base or DecisionConfig.model_validate({})
    taxonomy = Taxonomy.from_bundle(bundle)  # its full-range makes and look-alike groups, as the daemon reads it
    ok = classified(inference)
    out: list[Verdict | None] = [None] * len(pairs)
    fitted = []
    genuine = {p.sample: p for p in pairs if not p.clone}
    for r in readings:
        if len(r.items) != len(r.inference.samples):
            raise ValueError(f"a reading maps {len(r.items)} items for {len(r.inference.samples)} samples")
    only = np.zeros(len(inference.samples), dtype=bool) if fit_only is None else np.asarray(fit_only, dtype=bool)
    if len(only) != len(inference.samples):
        raise ValueError(f"fit_only has {len(only)} entries for {len(inference.samples)} items")
    fold_of = np.where(only, -1, np.arange(len(inference.samples)) % folds)  # -1: fits in every fold
    for k in range(folds):
        fits = fold_of != k
        train_rows = fits & ok
        temperature = fit_temperature(inference.logits[train_rows], inference.labels[train_rows])
        fold_manifest = replace(bundle.manifest, temperature=temperature)
        probs, problems = daemon_scores(inference, fold_manifest)
        train = [p for p in pairs if fits[p.sample]]
        extra = [s for r in readings for s in _reading_samples(r, fold_manifest, genuine, fits)]
        samples = _fit_samples(train, probs, inference, problems, units=bool(readings)) + extra
        choice = None
        if guard == "auto":
            choice = choose_guard(samples, taxonomy=taxonomy, target=target, base=base, temperature=1.0, folds=folds)
        fold_guard = choice.guard if choice is not None else float(guard)
        result = fit_operating_point(
            samples, taxonomy=taxonomy, target=target, base=base, temperature=1.0, guard=fold_guard
        )
        op = result.operating_point
        fitted.append(
            {
                "fold": k,
                "temperature": temperature,
                **{key: v for key, v in op.to_dict().items() if key != "temperature"},
                "guard": fold_guard,
                **({"guard_choice": choice.to_dict()} if choice is not None else {}),
            }
        )
        cfg = _config(op.thresholds, base)
        held = None if op.met else "operating point fitted on the other folds does not meet its target: never flags"
        for n, p in enumerate(pairs):
            if fold_of[p.sample] == k:
                out[n] = decide(
                    probs=probs[p.sample],
                    taxonomy=taxonomy,
                    record=p.record,
                    plate_problem=None,
                    cfg=cfg,
                    image_problem=problems[p.sample],
                    no_flag_reason=held,
                )
    reported = tuple(p for p, v in zip(pairs, out, strict=True) if v is not None)
    verdicts = tuple(v for v in out if v is not None)
    return CrossFit(rates(verdicts, reported), tuple(fitted), verdicts, reported)
