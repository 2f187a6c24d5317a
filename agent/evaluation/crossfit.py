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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import Verdict, decide
from iaflash.agent.evaluation.calibrate import fit_temperature
from iaflash.agent.evaluation.evaluate import Inference, classified, daemon_scores
from iaflash.agent.evaluation.fit import FitSample, fit_operating_point
from iaflash.agent.evaluation.simulate import Pair, Rates, rates
from iaflash.engines.bundle import Bundle

__all__ = ["CrossFit", "cross_fit"]


@dataclass(frozen=True)
class CrossFit:
    """Out-of-fold counts over every pair, each fold's fitted point, and the verdicts (pair order)."""

    rates: Rates
    folds: tuple[dict[str, Any], ...]
    verdicts: tuple[Verdict, ...]

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


def _fit_samples(
    pairs: Sequence[Pair], probs: np.ndarray, inference: Inference, problems: Sequence[str | None]
) -> list[FitSample]:
    return [
        FitSample(
            logits=np.log(np.clip(np.nan_to_num(probs[p.sample], nan=1.0), 1e-12, 1.0)),
            record=p.record,
            genuine=not p.clone,
            label=int(inference.labels[p.sample]),
            level=None if not p.clone else ("make" if p.kind == "make" else "model"),
            image_problem=problems[p.sample],
            sample_id=inference.samples[p.sample].where,
        )
        for p in pairs
    ]


def cross_fit(
    inference: Inference,
    bundle: Bundle,
    pairs: Sequence[Pair],
    *,
    folds: int,
    target: float,
    base: DecisionConfig | None = None,
) -> CrossFit:
    """Fit on K-1 folds, judge the K-th, for every fold (module doc)."""
    base = base or DecisionConfig.model_validate({})
    taxonomy = Taxonomy(bundle.labels, full_range_makes=frozenset(bundle.manifest.full_range_makes))
    ok = classified(inference)
    out: list[Verdict | None] = [None] * len(pairs)
    fitted = []
    for k in range(folds):
        train_rows = np.array([i % folds != k and bool(ok[i]) for i in range(len(inference.samples))])
        temperature = fit_temperature(inference.logits[train_rows], inference.labels[train_rows])
        probs, problems = daemon_scores(inference, replace(bundle.manifest, temperature=temperature))
        train = [p for p in pairs if p.sample % folds != k]
        result = fit_operating_point(
            _fit_samples(train, probs, inference, problems),
            taxonomy=taxonomy,
            target=target,
            base=base,
            temperature=1.0,
        )
        op = result.operating_point
        fitted.append(
            {
                "fold": k,
                "temperature": temperature,
                **{key: v for key, v in op.to_dict().items() if key != "temperature"},
            }
        )
        cfg = _config(op.thresholds, base)
        held = None if op.met else "operating point fitted on the other folds does not meet its target: never flags"
        for n, p in enumerate(pairs):
            if p.sample % folds == k:
                out[n] = decide(
                    probs=probs[p.sample],
                    taxonomy=taxonomy,
                    record=p.record,
                    plate_problem=None,
                    cfg=cfg,
                    image_problem=problems[p.sample],
                    no_flag_reason=held,
                )
    verdicts = tuple(v for v in out if v is not None)
    return CrossFit(rates(verdicts, pairs), tuple(fitted), verdicts)
