"""agent.decision.operating + verdict: the bundle's operating point rules, config only stricter, no point → no flag."""

from __future__ import annotations

import numpy as np
import pytest

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.operating import NO_OPERATING_POINT, decision_policy
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import Verdict, decide
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import Label, OperatingPoint

TAX = Taxonomy((Label(0, "RENAULT", "CLIO"), Label(1, "RENAULT", "MEGANE"), Label(2, "PEUGEOT", "208")))
CLIO = RegistryRecord("RENAULT", "CLIO", "VP", None)
SEEN_208 = np.array([0.004, 0.004, 0.992])  # a confident 208 read against a Clio registration: a make-level flag


def _op(met: bool = True, **thresholds: float) -> OperatingPoint:
    values = {"min_top1": 0.7, "make_threshold": 0.02, "model_threshold": 0.01, "other_threshold": 0.2, **thresholds}
    return OperatingPoint(
        id="op-0123456789ab",
        target=0.001,
        thresholds=values,
        temperature=1.0,
        n_genuine=3000 if met else 100,
        flags=0,
        upper_bound=0.000998 if met else 0.0295,
        met=met,
        fitted_at="2026-12-01T00:00:00+00:00",
        dataset_sha256="0" * 64,
    )


def _verdict(cfg: DecisionConfig, op: OperatingPoint | None, probs: np.ndarray = SEEN_208) -> Verdict:
    policy = decision_policy(cfg, op)
    return decide(
        probs=probs,
        taxonomy=TAX,
        record=CLIO,
        plate_problem=None,
        cfg=policy.cfg,
        operating_point=policy.operating_point,
        no_flag_reason=policy.no_flag_reason,
    )


def test_a_bundle_without_operating_point_never_flags() -> None:
    """The same clear mismatch is inconclusive, reason no_operating_point, the held flag kept in the evidence."""
    verdict = _verdict(DecisionConfig(), None)
    assert verdict.outcome == "inconclusive"
    assert verdict.level is None
    assert verdict.reason.startswith(f"{NO_OPERATING_POINT}: the model bundle has no fitted operating point")
    assert "iaflash-agent fit" in verdict.reason
    assert verdict.evidence["held_flag"]["level"] == "make"
    assert verdict.evidence["operating_point"] == {"id": None, "override": False}


def test_an_operating_point_that_misses_its_target_never_flags() -> None:
    verdict = _verdict(DecisionConfig(), _op(met=False))
    assert verdict.outcome == "inconclusive"
    assert "does not meet its target (upper bound 0.02950 > 0.001)" in verdict.reason


def test_a_met_operating_point_flags_and_the_evidence_names_it() -> None:
    verdict = _verdict(DecisionConfig(), _op())
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")
    assert verdict.evidence["operating_point"] == {
        "id": "op-0123456789ab",
        "target": 0.001,
        "upper_bound": 0.000998,
        "met": True,
        "override": False,
    }
    assert verdict.thresholds["make_threshold"] == 0.02  # the bundle's, not the config default 0.05


def test_unset_config_thresholds_take_the_bundles_values() -> None:
    policy = decision_policy(DecisionConfig(), _op())
    assert (policy.cfg.min_top1, policy.cfg.make_threshold, policy.cfg.model_threshold) == (0.7, 0.02, 0.01)
    assert policy.cfg.other_threshold == 0.2
    assert policy.notes == ()


def test_config_may_make_the_operating_point_stricter() -> None:
    """A higher min_top1 and a lower make_threshold than the bundle's are used as set."""
    policy = decision_policy(DecisionConfig(min_top1=0.9, make_threshold=0.001), _op())
    assert (policy.cfg.min_top1, policy.cfg.make_threshold) == (0.9, 0.001)
    assert policy.notes == ()
    # stricter config: the 0.98 top-1 still flags, but a 0.85 top-1 no longer does
    assert _verdict(DecisionConfig(min_top1=0.9), _op(), np.array([0.05, 0.1, 0.85])).outcome == "inconclusive"


@pytest.mark.parametrize(
    ("key", "looser"),
    [("min_top1", 0.3), ("make_threshold", 0.2), ("model_threshold", 0.05), ("other_threshold", 0.9)],
)
def test_a_looser_config_value_is_ignored_and_said(key: str, looser: float) -> None:
    """Without the override, a looser threshold keeps the bundle's value, with a note naming the key and the fix."""
    cfg = DecisionConfig(**{key: looser, "match_threshold": 0.3})
    policy = decision_policy(cfg, _op())
    assert getattr(policy.cfg, key) == _op().thresholds[key]
    assert len(policy.notes) == 1
    assert f"decision.{key} = {looser} is looser than the bundle's operating point op-0123456789ab" in policy.notes[0]
    assert "override_operating_point = true" in policy.notes[0]


def test_the_explicit_override_uses_config_as_given_and_is_named() -> None:
    """override_operating_point: config thresholds as set (even looser, even with no point), logged and in evidence."""
    cfg = DecisionConfig(min_top1=0.3, make_threshold=0.2, override_operating_point=True)
    policy = decision_policy(cfg, _op())
    assert (policy.cfg.min_top1, policy.cfg.make_threshold) == (0.3, 0.2)
    assert "deciding with the config's thresholds as given" in policy.notes[0]
    verdict = _verdict(cfg, None)
    assert verdict.outcome == "mismatch"
    assert verdict.evidence["operating_point"] == {"id": None, "override": True}
