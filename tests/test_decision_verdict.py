"""agent.decision.verdict: the rule order, the evidence a verdict carries, softmax, and monotonicity properties."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from iaflash.agent.config import OUTCOMES, DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import Prediction, Verdict, decide, softmax, thresholds_of, top_k
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import Label

LABELS = (
    Label(0, "RENAULT", "CLIO", ("CLIO V",)),
    Label(1, "RENAULT", "MEGANE", ()),
    Label(2, "PEUGEOT", "208", ()),
)
TAX = Taxonomy(LABELS)
# Same vehicles plus an explicit "not a known vehicle" class at index 3.
TAX_OTHER = Taxonomy((*LABELS, Label(3, "OTHER", "UNKNOWN", ())))

CLIO = RegistryRecord("RENAULT", "CLIO", "VP", "CI")
MEGANE = RegistryRecord("RENAULT", "MEGANE", "VP", "CI")
PEUGEOT = RegistryRecord("PEUGEOT", "208", "VP", "CI")
G_CLASS = RegistryRecord("MERCEDES-BENZ", "CLASSE G", "VP", "TT")

# Explicit thresholds so that every row of the truth table is easy to read.
CFG = DecisionConfig(
    min_plate_confidence=0.5, min_top1=0.6, make_threshold=0.05, model_threshold=0.05, match_threshold=0.3, top_k=3
)
MODEL_INFO = {"name": "tiny", "version": "1.0.0", "backend": "onnxruntime", "device": "cpu"}


def _probs(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def _decide(
    probs: np.ndarray | None,
    record: RegistryRecord | None,
    *,
    taxonomy: Taxonomy = TAX,
    cfg: DecisionConfig = CFG,
    plate_problem: str | None = None,
    image_problem: str | None = None,
) -> Verdict:
    return decide(
        probs=probs,
        taxonomy=taxonomy,
        record=record,
        plate_problem=plate_problem,
        cfg=cfg,
        model_info=MODEL_INFO,
        image_problem=image_problem,
    )


# ---------------------------------------------------------------------------------------------------
# Truth table over the documented rule order (first rule that applies wins)
# ---------------------------------------------------------------------------------------------------

TRUTH_TABLE: list[Any] = [
    # id, kwargs for _decide, expected outcome, expected level, a piece of the reason
    pytest.param(
        dict(probs=_probs(0.02, 0.01, 0.97), record=CLIO, plate_problem="plate confidence 0.2"),
        "unreadable_plate",
        None,
        "plate confidence 0.2",
        id="1-unreadable-plate-beats-mismatch",
    ),
    pytest.param(
        dict(probs=_probs(0.02, 0.01, 0.97), record=None),
        "unknown_plate",
        None,
        "not in the registry",
        id="2-unknown-plate",
    ),
    pytest.param(
        dict(probs=_probs(0.02, 0.01, 0.97), record=G_CLASS),
        "unsupported",
        None,
        "outside the model's taxonomy",
        id="3-unsupported-never-flags",
    ),
    pytest.param(
        dict(probs=_probs(0.02, 0.01, 0.97), record=CLIO, image_problem="poor image: too dark"),
        "inconclusive",
        None,
        "too dark",
        id="4-image-problem",
    ),
    pytest.param(dict(probs=None, record=CLIO), "inconclusive", None, "no usable image", id="4-no-probabilities"),
    pytest.param(
        dict(probs=_probs(0.02, 0.40, 0.58), record=CLIO), "inconclusive", None, "min_top1", id="5-low-top1-abstains"
    ),
    pytest.param(
        dict(probs=_probs(0.02, 0.01, 0.27, 0.70), record=CLIO, taxonomy=TAX_OTHER),
        "inconclusive",
        None,
        "outside the taxonomy",
        id="5-other-class-is-top1",
    ),
    pytest.param(
        dict(probs=_probs(0.01, 0.01, 0.98), record=CLIO),
        "mismatch",
        "make",
        "P(registered make)",
        id="6-mismatch-make",
    ),
    pytest.param(
        dict(probs=_probs(0.02, 0.97, 0.01), record=CLIO),
        "mismatch",
        "model",
        "P(registered model)",
        id="7-mismatch-model",
    ),
    pytest.param(dict(probs=_probs(0.90, 0.05, 0.05), record=CLIO), "match", None, ">= 0.3", id="8-match"),
    pytest.param(
        dict(probs=_probs(0.30, 0.65, 0.05), record=CLIO),
        "match",
        None,
        ">= 0.3",
        id="8-match-at-exactly-match-threshold",
    ),
    pytest.param(
        dict(probs=_probs(0.20, 0.75, 0.05), record=CLIO),
        "inconclusive",
        None,
        "between thresholds",
        id="9-between-thresholds",
    ),
    pytest.param(
        dict(probs=_probs(0.05, 0.90, 0.05), record=CLIO),
        "inconclusive",
        None,
        "between thresholds",
        id="9-model-at-exactly-model-threshold",
    ),
    pytest.param(
        dict(probs=_probs(0.05, 0.0, 0.95), record=CLIO),
        "inconclusive",
        None,
        "between thresholds",
        id="6-make-at-exactly-make-threshold-no-flag",
    ),
]


@pytest.mark.parametrize(("kwargs", "outcome", "level", "reason_part"), TRUTH_TABLE)
def test_rule_order_truth_table(kwargs: dict[str, Any], outcome: str, level: str | None, reason_part: str) -> None:
    """Each row hits exactly one rule of decision.py's documented order; the first rule that applies wins."""
    verdict = _decide(**kwargs)
    assert (verdict.outcome, verdict.level) == (outcome, level)
    assert reason_part in verdict.reason
    assert verdict.is_flag == (outcome == "mismatch")
    assert verdict.outcome in OUTCOMES


def test_make_mismatch_wins_over_model_mismatch() -> None:
    """When both the make and the model are unlikely, the verdict is the stronger, make-level mismatch."""
    verdict = _decide(_probs(0.0, 0.0, 1.0), CLIO)
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")
    assert verdict.p_make == 0.0
    assert verdict.p_model == 0.0


def test_low_top1_wins_over_a_make_mismatch() -> None:
    """Abstaining on an unsure classifier comes before any flag, even when P(make) is ~0."""
    verdict = _decide(_probs(0.0, 0.0, 0.55), CLIO)
    assert verdict.outcome == "inconclusive"
    assert "min_top1" in verdict.reason


def test_other_mass_summed_at_least_top1_abstains_even_when_other_is_not_top1() -> None:
    """Two 'other' labels whose summed mass reaches the top-1 make the verdict inconclusive."""
    tax = Taxonomy((*LABELS, Label(3, "OTHER", "UNKNOWN", ()), Label(4, "AUTRE", "INCONNU", ())))
    verdict = _decide(_probs(0.0, 0.0, 0.4, 0.3, 0.3), CLIO, taxonomy=tax, cfg=DecisionConfig(min_top1=0.3))
    assert verdict.outcome == "inconclusive"
    assert "p(other)=0.600" in verdict.reason


def test_other_mass_below_top1_lets_the_decision_through() -> None:
    """Some mass on the 'other' class below the top-1 does not block a mismatch."""
    verdict = _decide(_probs(0.01, 0.01, 0.78, 0.20), CLIO, taxonomy=TAX_OTHER)
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")


def test_p_make_sums_every_label_of_the_registered_make() -> None:
    """P(registered make) is the sum over every model of that make, so a sibling model is not a make mismatch."""
    verdict = _decide(_probs(0.01, 0.97, 0.02), CLIO)
    assert verdict.p_make == pytest.approx(0.98)
    assert verdict.p_model == pytest.approx(0.01)
    assert verdict.level == "model"


def test_registry_spelling_variants_resolve_before_deciding() -> None:
    """A registry alias ('CLIO V', lower case, accents) resolves to the label and is judged, not unsupported."""
    record = RegistryRecord("renault", "Clio V", None, None)
    verdict = _decide(_probs(0.90, 0.05, 0.05), record)
    assert verdict.outcome == "match"


def test_gates_after_unsupported_never_run_for_plate_problems() -> None:
    """A plate problem wins even with no record and no image."""
    verdict = _decide(None, None, plate_problem="no plate read")
    assert verdict.outcome == "unreadable_plate"
    assert verdict.reason == "no plate read"
    assert verdict.top_k == ()


# ---------------------------------------------------------------------------------------------------
# Evidence
# ---------------------------------------------------------------------------------------------------


def test_to_dict_carries_all_the_evidence() -> None:
    """to_dict has outcome, level, reason, probabilities, top-k descending, registry, thresholds, model."""
    verdict = decide(
        probs=_probs(0.01, 0.19, 0.80),
        taxonomy=TAX,
        record=CLIO,
        plate_problem=None,
        cfg=CFG,
        registry_stale=True,
        model_info=MODEL_INFO,
    )
    doc = verdict.to_dict()
    assert set(doc) == {
        "outcome",
        "level",
        "reason",
        "registry_stale",
        "p_make",
        "p_model",
        "top_k",
        "registry",
        "thresholds",
        "model",
    }
    assert doc["outcome"] == "mismatch"
    assert doc["level"] == "model"
    assert doc["registry_stale"] is True
    assert doc["p_make"] == pytest.approx(0.20)
    assert doc["p_model"] == pytest.approx(0.01)
    assert doc["top_k"] == [
        {"make": "PEUGEOT", "model": "208", "p": 0.8},
        {"make": "RENAULT", "model": "MEGANE", "p": 0.19},
        {"make": "RENAULT", "model": "CLIO", "p": 0.01},
    ]
    ps = [p["p"] for p in doc["top_k"]]
    assert ps == sorted(ps, reverse=True)
    assert doc["registry"] == {"make": "RENAULT", "model": "CLIO", "genre": "VP", "body": "CI"}
    # Changed deliberately: verdicts now also record other_threshold and the taxonomy's fuzzy_min_score.
    assert doc["thresholds"] == {
        "min_plate_confidence": 0.5,
        "min_top1": 0.6,
        "make_threshold": 0.05,
        "model_threshold": 0.05,
        "match_threshold": 0.3,
        "other_threshold": 0.3,
        "fuzzy_min_score": 88.0,
    }
    assert doc["model"] == MODEL_INFO


def test_to_dict_keeps_top_k_but_no_probabilities_for_early_outcomes() -> None:
    """Early outcomes still carry top-k and thresholds; p_make/p_model are None (never computed)."""
    doc = _decide(_probs(0.1, 0.2, 0.7), None).to_dict()
    assert doc["outcome"] == "unknown_plate"
    assert doc["p_make"] is None
    assert doc["p_model"] is None
    assert doc["registry"] is None
    assert [p["model"] for p in doc["top_k"]] == ["208", "MEGANE", "CLIO"]
    assert doc["thresholds"]["min_top1"] == 0.6


def test_top_k_is_limited_by_config_and_sorted_descending() -> None:
    """top_k keeps cfg.top_k predictions, most likely first."""
    cfg = DecisionConfig(top_k=2)
    verdict = _decide(_probs(0.1, 0.6, 0.3), CLIO, cfg=cfg)
    assert verdict.top_k == (Prediction("RENAULT", "MEGANE", 0.6), Prediction("PEUGEOT", "208", 0.3))


def test_top_k_helper_rounds_in_to_dict() -> None:
    """Prediction.to_dict rounds p to 6 decimals."""
    (pred,) = top_k(_probs(1 / 3, 1 / 3 - 1e-9, 1 / 3 + 1e-9), TAX, 1)
    assert pred.to_dict() == {"make": "PEUGEOT", "model": "208", "p": 0.333333}


def test_thresholds_of_lists_every_threshold() -> None:
    """thresholds_of exposes the five thresholds of the config, by name."""
    cfg = DecisionConfig(
        min_plate_confidence=0.4, min_top1=0.7, make_threshold=0.1, model_threshold=0.2, match_threshold=0.5
    )
    assert thresholds_of(cfg) == {
        "min_plate_confidence": 0.4,
        "min_top1": 0.7,
        "make_threshold": 0.1,
        "model_threshold": 0.2,
        "match_threshold": 0.5,
    }


# ---------------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------------


def test_softmax_known_values() -> None:
    """softmax([0, ln 2, ln 3]) = [1/6, 2/6, 3/6]."""
    out = softmax(np.log(np.array([1.0, 2.0, 3.0])))
    np.testing.assert_allclose(out, [1 / 6, 2 / 6, 3 / 6], rtol=1e-12)


def test_softmax_is_stable_for_huge_logits() -> None:
    """Huge logits give finite probabilities that sum to 1 (the max is subtracted first)."""
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        out = softmax(np.array([1000.0, 999.0, -1000.0]))
    assert np.all(np.isfinite(out))
    assert out.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(out[:2], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))], rtol=1e-12)
    assert out[2] == pytest.approx(0.0, abs=1e-300)


def test_softmax_works_on_the_last_axis_of_a_batch() -> None:
    """Each row of a batch is normalised on its own."""
    out = softmax(np.array([[0.0, 0.0], [0.0, 100.0]]))
    np.testing.assert_allclose(out.sum(axis=-1), [1.0, 1.0])
    np.testing.assert_allclose(out[0], [0.5, 0.5])
    assert out[1, 1] > 0.999


def test_higher_temperature_flattens_the_distribution() -> None:
    """T > 1 lowers the top-1 probability, T < 1 sharpens it, T = 1 is plain softmax."""
    logits = np.array([2.0, 1.0, 0.0])
    plain = softmax(logits)
    np.testing.assert_allclose(softmax(logits, temperature=1.0), plain)
    hot, cold = softmax(logits, temperature=3.0), softmax(logits, temperature=0.5)
    assert cold.max() > plain.max() > hot.max()
    np.testing.assert_allclose(hot, softmax(logits / 3.0))
    assert np.argmax(hot) == np.argmax(plain) == np.argmax(cold) == 0
    assert softmax(logits, temperature=1e6).max() == pytest.approx(1 / 3, abs=1e-5)


@given(st.lists(st.floats(-50, 50), min_size=2, max_size=8), st.floats(0.05, 20))
@settings(max_examples=60, deadline=None)
def test_softmax_is_a_distribution_and_keeps_the_order(logits: list[float], temperature: float) -> None:
    """Any logits give non-negative probabilities summing to 1, in the same order as the logits."""
    arr = np.array(logits)
    out = softmax(arr, temperature)
    assert out.sum() == pytest.approx(1.0)
    assert np.all(out >= 0)
    order = np.argsort(arr, kind="stable")
    assert np.all(np.diff(out[order]) >= -1e-12)


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------

_unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def prob_vectors(draw: st.DrawFn, n: int = 4) -> np.ndarray:
    """A probability vector over n labels (some entries may be exactly zero)."""
    raw = np.array(draw(st.lists(_unit, min_size=n, max_size=n)))
    if raw.sum() == 0:
        raw = np.ones(n)
    return raw / raw.sum()


@st.composite
def decision_configs(draw: st.DrawFn) -> DecisionConfig:
    """Any valid DecisionConfig (model_threshold <= match_threshold)."""
    a, b = sorted((draw(_unit), draw(_unit)))
    return DecisionConfig(
        min_top1=draw(_unit),
        make_threshold=draw(_unit),
        model_threshold=a,
        match_threshold=b,
        top_k=draw(st.integers(1, 5)),
    )


def _with(cfg: DecisionConfig, **changes: float) -> DecisionConfig:
    return DecisionConfig(**{**cfg.model_dump(), **changes})


@given(
    probs=prob_vectors(),
    cfg=decision_configs(),
    record=st.sampled_from(
        [
            G_CLASS,
            RegistryRecord("TESLA", "MODEL 3", None, None),
            RegistryRecord("RENAULT", "TWINGO", None, None),
            RegistryRecord("OTHER", "UNKNOWN", None, None),
        ]
    ),
)
@settings(max_examples=150, deadline=None)
def test_registered_vehicle_outside_taxonomy_never_flags(
    probs: np.ndarray, cfg: DecisionConfig, record: RegistryRecord
) -> None:
    """Whatever the probabilities and thresholds, a model the classifier does not know is 'unsupported'."""
    verdict = _decide(probs, record, taxonomy=TAX_OTHER, cfg=cfg)
    assert verdict.outcome == "unsupported"
    assert not verdict.is_flag


@given(n=st.integers(2, 4), cfg=decision_configs(), data=st.data())
@settings(max_examples=150, deadline=None)
def test_uniform_probabilities_never_flag_when_min_top1_exceeds_1_over_n(
    n: int, cfg: DecisionConfig, data: st.DataObject
) -> None:
    """A flat vector (the classifier knows nothing) abstains for any min_top1 above 1/n, default included."""
    labels = (*LABELS, Label(3, "PEUGEOT", "308", ()))
    tax = Taxonomy(labels[:n])
    min_top1 = data.draw(st.floats(1 / n, 1.0, exclude_min=True), label="min_top1")
    record = data.draw(st.sampled_from([CLIO, MEGANE, PEUGEOT][: min(n, 3)]), label="record")
    verdict = _decide(np.full(n, 1 / n), record, taxonomy=tax, cfg=_with(cfg, min_top1=min_top1))
    assert verdict.outcome == "inconclusive"
    assert not verdict.is_flag


def test_uniform_probabilities_abstain_with_the_default_config() -> None:
    """With the shipped defaults a flat vector over the labels is inconclusive for every registered model."""
    for record in (CLIO, MEGANE, PEUGEOT):
        verdict = _decide(np.full(3, 1 / 3), record, cfg=DecisionConfig())
        assert verdict.outcome == "inconclusive"


@given(probs=prob_vectors(), cfg=decision_configs(), record=st.sampled_from([CLIO, MEGANE, PEUGEOT]), higher=_unit)
@settings(max_examples=200, deadline=None)
def test_raising_min_top1_never_adds_a_flag(
    probs: np.ndarray, cfg: DecisionConfig, record: RegistryRecord, higher: float
) -> None:
    """For fixed probabilities, a stricter min_top1 can only turn flags into abstentions."""
    stricter = _with(cfg, min_top1=max(cfg.min_top1, higher))
    before = _decide(probs, record, taxonomy=TAX_OTHER, cfg=cfg)
    after = _decide(probs, record, taxonomy=TAX_OTHER, cfg=stricter)
    if after.is_flag:
        assert before.is_flag
        assert before.level == after.level
    assert after.outcome in (before.outcome, "inconclusive")


@given(
    probs=prob_vectors(),
    cfg=decision_configs(),
    record=st.sampled_from([CLIO, MEGANE, PEUGEOT]),
    make_factor=_unit,
    model_factor=_unit,
)
@settings(max_examples=200, deadline=None)
def test_lowering_make_or_model_threshold_never_adds_a_flag(
    probs: np.ndarray, cfg: DecisionConfig, record: RegistryRecord, make_factor: float, model_factor: float
) -> None:
    """Lower make/model thresholds (each scaled by a factor in [0, 1]) only ever remove flags."""
    lower = _with(
        cfg, make_threshold=cfg.make_threshold * make_factor, model_threshold=cfg.model_threshold * model_factor
    )
    before = _decide(probs, record, taxonomy=TAX_OTHER, cfg=cfg)
    after = _decide(probs, record, taxonomy=TAX_OTHER, cfg=lower)
    if after.is_flag:
        assert before.is_flag


@given(probs=prob_vectors(), cfg=decision_configs(), record=st.sampled_from([CLIO, MEGANE, PEUGEOT]))
@settings(max_examples=200, deadline=None)
def test_verdict_on_probabilities_is_consistent_with_its_own_evidence(
    probs: np.ndarray, cfg: DecisionConfig, record: RegistryRecord
) -> None:
    """Flags and matches happen only with a confident classifier; p_model <= p_make; the outcome is known."""
    verdict = _decide(probs, record, taxonomy=TAX_OTHER, cfg=cfg)
    assert verdict.outcome in ("match", "mismatch", "inconclusive")
    assert verdict.p_make is not None
    assert verdict.p_model is not None
    assert verdict.p_model <= verdict.p_make + 1e-12
    if verdict.outcome in ("match", "mismatch"):
        assert probs.max() >= cfg.min_top1
        assert probs[3] < probs.max()
    if verdict.level == "make":
        assert verdict.p_make < cfg.make_threshold
    if verdict.level == "model":
        assert verdict.p_make >= cfg.make_threshold
        assert verdict.p_model < cfg.model_threshold
    if verdict.outcome == "match":
        assert verdict.p_model >= cfg.match_threshold
    assert len(verdict.top_k) == min(cfg.top_k, len(probs))


# ---------------------------------------------------------------------------------------------------
# Abstention on the explicit "other" class: other_threshold
# ---------------------------------------------------------------------------------------------------


class _CfgWithOther(DecisionConfig):
    """What DecisionConfig looks like once the lead adds the ``other_threshold`` key."""

    other_threshold: float = 0.5


def test_other_mass_at_other_threshold_abstains_even_below_top1() -> None:
    """p(other) = 0.33 is below the top-1 (0.65) but reaches the default other_threshold 0.3: abstain."""
    verdict = _decide(_probs(0.01, 0.01, 0.65, 0.33), CLIO, taxonomy=TAX_OTHER)
    assert verdict.outcome == "inconclusive"
    assert "p(other)=0.330" in verdict.reason
    assert verdict.p_other == pytest.approx(0.33)
    assert verdict.thresholds["other_threshold"] == 0.3


def test_other_threshold_keyword_overrides_the_default() -> None:
    """With other_threshold=0.5 the same vector is judged: a make-level mismatch."""
    verdict = decide(
        probs=_probs(0.01, 0.01, 0.65, 0.33),
        taxonomy=TAX_OTHER,
        record=CLIO,
        plate_problem=None,
        cfg=CFG,
        other_threshold=0.5,
    )
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")
    assert verdict.thresholds["other_threshold"] == 0.5


def test_other_threshold_is_read_from_the_config_when_it_has_the_key() -> None:
    """A config with an other_threshold field is used when no keyword is given."""
    cfg = DecisionConfig(**{**CFG.model_dump(), "other_threshold": 0.5})
    verdict = _decide(_probs(0.01, 0.01, 0.65, 0.33), CLIO, taxonomy=TAX_OTHER, cfg=cfg)
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")
    assert verdict.thresholds["other_threshold"] == 0.5


# ---------------------------------------------------------------------------------------------------
# Resolution evidence
# ---------------------------------------------------------------------------------------------------


def test_verdict_records_how_the_registry_text_resolved() -> None:
    """A registry 'CLIO IV' resolves by rule; the verdict keeps method, score and normalised text."""
    verdict = _decide(_probs(0.90, 0.05, 0.05), RegistryRecord("RENAULT", "CLIO IV", "VP", "CI"))
    assert verdict.outcome == "match"
    assert verdict.resolution is not None
    assert (verdict.resolution.method, verdict.resolution.score) == ("rule", 100.0)
    assert verdict.resolution.normalised == "RENAULT CLIO"


def test_unsupported_verdict_records_the_rejected_resolution() -> None:
    """The unsupported reason and evidence say how close the best guess came (and that it was refused)."""
    verdict = _decide(
        _probs(0.02, 0.01, 0.97),
        RegistryRecord("RENAULT", "MEGANNE RS", None, None),
        taxonomy=Taxonomy(LABELS, min_score=99),
    )
    assert verdict.outcome == "unsupported"
    assert verdict.resolution is not None
    assert verdict.resolution.method == "none"
    assert verdict.resolution.score < 99
    assert verdict.thresholds["fuzzy_min_score"] == 99.0


def test_extended_to_dict_adds_p_other_resolution_and_evidence() -> None:
    """to_dict(extended=True) adds the fields event schema v1 does not know yet; the default omits them."""
    verdict = _decide(_probs(0.01, 0.01, 0.78, 0.20), CLIO, taxonomy=TAX_OTHER)
    doc = verdict.to_dict(extended=True)
    assert doc["p_other"] == pytest.approx(0.2)
    assert doc["resolution"] == {
        "index": 0,
        "method": "exact",
        "score": 100.0,
        "normalised": "RENAULT CLIO",
        "group": "RENAULT CLIO",
        "labels": [0],
    }
    assert doc["evidence"] == {
        "genre": "VP",
        "body": "CI",
        "top1_category": None,
        "expected_categories": None,
        "genre_compatible": None,
        "operating_point": {"id": None, "override": False},
        "checked": {
            "p_top1": pytest.approx(0.78),
            "p_make": pytest.approx(0.02),
            "p_model": pytest.approx(0.01),
            "group": "RENAULT CLIO",
            "lookalikes": [],
            "p_lookalike": 0.0,
        },
    }
    assert set(doc) - set(verdict.to_dict()) == {"p_other", "resolution", "evidence"}


# ---------------------------------------------------------------------------------------------------
# Full-range makes: an unseen model of a declared make is checked at make level only
# ---------------------------------------------------------------------------------------------------

TAX_FULL = Taxonomy(TAX_OTHER.labels, full_range_makes=frozenset({"Renault"}))
TWINGO = RegistryRecord("RENAULT", "TWINGO", "VP", "CI")

FULL_RANGE_TABLE: list[Any] = [
    pytest.param(
        _probs(0.01, 0.01, 0.97, 0.01),
        TAX_FULL,
        "mismatch",
        "make",
        "P(registered make)",
        id="declared-make-clearly-absent-flags-at-make-level",
    ),
    pytest.param(
        _probs(0.05, 0.90, 0.04, 0.01),
        TAX_FULL,
        "unsupported",
        None,
        "make level only",
        id="declared-make-present-is-unsupported-never-model-level",
    ),
    pytest.param(
        _probs(0.01, 0.01, 0.55, 0.43),
        TAX_FULL,
        "unsupported",
        None,
        "min_top1",
        id="declared-make-unsure-classifier-is-unsupported",
    ),
    pytest.param(
        _probs(0.01, 0.01, 0.97, 0.01),
        TAX_OTHER,
        "unsupported",
        None,
        "never flagged",
        id="undeclared-make-never-checked",
    ),
]


@pytest.mark.parametrize(("probs", "taxonomy", "outcome", "level", "reason_part"), FULL_RANGE_TABLE)
def test_full_range_make_truth_table(
    probs: np.ndarray, taxonomy: Taxonomy, outcome: str, level: str | None, reason_part: str
) -> None:
    """An unseen Renault model flags only when P(Renault) is below make_threshold and the gates pass."""
    verdict = _decide(probs, TWINGO, taxonomy=taxonomy)
    assert (verdict.outcome, verdict.level) == (outcome, level)
    assert reason_part in verdict.reason
    if taxonomy is TAX_FULL:
        assert verdict.p_model is None


def test_full_range_make_with_a_poor_image_is_unsupported() -> None:
    """No usable image: the make-level check cannot run, so the unseen model stays unsupported."""
    verdict = _decide(_probs(0.01, 0.01, 0.97, 0.01), TWINGO, taxonomy=TAX_FULL, image_problem="too dark")
    assert verdict.outcome == "unsupported"
    assert "too dark" in verdict.reason


# ---------------------------------------------------------------------------------------------------
# Genre (J.1) / body (J.3) evidence
# ---------------------------------------------------------------------------------------------------

CATS = ("car", "car", "car", "other")
CLIO_MOTO = RegistryRecord("RENAULT", "CLIO", "MTT2", "SOLO")


def _decide_cats(probs: np.ndarray, record: RegistryRecord, cats: tuple[str, ...] | None = CATS) -> Verdict:
    return decide(probs=probs, taxonomy=TAX_OTHER, record=record, plate_problem=None, cfg=CFG, label_categories=cats)


def test_motorcycle_genre_vetoes_a_match_on_a_car() -> None:
    """A confident match with a motorcycle registration is inconclusive; the evidence says why."""
    verdict = _decide_cats(_probs(0.90, 0.05, 0.04, 0.01), CLIO_MOTO)
    assert verdict.outcome == "inconclusive"
    assert "genre" in verdict.reason
    genre = {
        k: verdict.evidence[k] for k in ("genre", "body", "top1_category", "expected_categories", "genre_compatible")
    }
    assert genre == {
        "genre": "MTT2",
        "body": "SOLO",
        "top1_category": "car",
        "expected_categories": ["motorcycle"],
        "genre_compatible": False,
    }


def test_genre_alone_never_flags() -> None:
    """P(Renault) is high: an incompatible genre records evidence but does not make a mismatch."""
    verdict = _decide_cats(_probs(0.20, 0.75, 0.04, 0.01), CLIO_MOTO)
    assert verdict.outcome == "inconclusive"
    assert verdict.evidence["genre_compatible"] is False
    assert not verdict.is_flag


def test_make_mismatch_with_incompatible_genre_goes_through_the_probability_rule() -> None:
    """The flag comes from P(make) < make_threshold; the genre is attached as evidence."""
    verdict = _decide_cats(_probs(0.01, 0.01, 0.97, 0.01), CLIO_MOTO)
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")
    assert verdict.evidence["genre_compatible"] is False


def test_compatible_genre_matches_and_unknown_genre_is_not_judged() -> None:
    """VP + a car is compatible; an unknown genre or category leaves genre_compatible None."""
    assert _decide_cats(_probs(0.90, 0.05, 0.04, 0.01), CLIO).evidence["genre_compatible"] is True
    odd = RegistryRecord("RENAULT", "CLIO", "XYZ", None)
    verdict = _decide_cats(_probs(0.90, 0.05, 0.04, 0.01), odd)
    assert verdict.outcome == "match"
    assert verdict.evidence["genre_compatible"] is None
    tractor = ("tractor", "car", "car", "other")
    assert _decide_cats(_probs(0.90, 0.05, 0.04, 0.01), CLIO, tractor).evidence["genre_compatible"] is None


def test_unsupported_verdict_still_carries_genre_evidence() -> None:
    """A motorcycle plate on a car is never flagged when unsupported, but the reviewer sees the genre clash."""
    yamaha = RegistryRecord("YAMAHA", "MT-07", "MTL", "SOLO")
    verdict = _decide_cats(_probs(0.90, 0.05, 0.04, 0.01), yamaha)
    assert verdict.outcome == "unsupported"
    assert verdict.evidence["genre_compatible"] is False


def test_label_categories_of_the_wrong_length_are_refused() -> None:
    """One category per label is required; a short list is a caller error, named with its fix."""
    with pytest.raises(ValueError, match="one category per label"):
        _decide_cats(_probs(0.90, 0.05, 0.04, 0.01), CLIO, ("car", "car"))


# ---------------------------------------------------------------------------------------------------
# More properties: full-range makes, uncertain vectors, genre evidence, other_threshold
# ---------------------------------------------------------------------------------------------------

_ALL_RECORDS = [CLIO, MEGANE, PEUGEOT, TWINGO]


@given(probs=prob_vectors(), cfg=decision_configs())
@settings(max_examples=200, deadline=None)
def test_unseen_model_of_full_range_make_flags_only_at_make_level(probs: np.ndarray, cfg: DecisionConfig) -> None:
    """A declared make's unseen model is unsupported or a make-level mismatch with all gates passed."""
    verdict = _decide(probs, TWINGO, taxonomy=TAX_FULL, cfg=cfg)
    assert verdict.outcome in ("unsupported", "mismatch")
    if verdict.is_flag:
        assert verdict.level == "make"
        assert verdict.p_make is not None
        assert verdict.p_make < cfg.make_threshold
        assert probs.max() >= cfg.min_top1
        assert probs[3] < min(probs.max(), 0.3)


@given(
    probs=prob_vectors(),
    cfg=decision_configs(),
    record=st.sampled_from(
        [G_CLASS, RegistryRecord("TESLA", "MODEL 3", None, None), RegistryRecord("PEUGEOT", "5008", None, None)]
    ),
)
@settings(max_examples=150, deadline=None)
def test_outside_taxonomy_never_flags_even_next_to_a_full_range_make(
    probs: np.ndarray, cfg: DecisionConfig, record: RegistryRecord
) -> None:
    """Only the declared make gets a make-level check; every other unseen vehicle stays unsupported."""
    verdict = _decide(probs, record, taxonomy=TAX_FULL, cfg=cfg)
    assert verdict.outcome == "unsupported"


@given(probs=prob_vectors(), cfg=decision_configs(), record=st.sampled_from(_ALL_RECORDS), data=st.data())
@settings(max_examples=200, deadline=None)
def test_uncertain_probabilities_never_flag(
    probs: np.ndarray, cfg: DecisionConfig, record: RegistryRecord, data: st.DataObject
) -> None:
    """Whenever the top-1 is below min_top1, no verdict is a flag (any record, full-range or not)."""
    assume(probs.max() < 1.0)
    min_top1 = data.draw(st.floats(float(probs.max()), 1.0, exclude_min=True), label="min_top1")
    verdict = _decide(probs, record, taxonomy=TAX_FULL, cfg=_with(cfg, min_top1=min_top1))
    assert not verdict.is_flag
    assert verdict.outcome in ("inconclusive", "unsupported")


@given(
    probs=prob_vectors(),
    cfg=decision_configs(),
    record=st.sampled_from(_ALL_RECORDS),
    higher=_unit,
    make_factor=_unit,
    model_factor=_unit,
)
@settings(max_examples=200, deadline=None)
def test_stricter_settings_never_add_a_flag_with_a_full_range_make(
    probs: np.ndarray,
    cfg: DecisionConfig,
    record: RegistryRecord,
    higher: float,
    make_factor: float,
    model_factor: float,
) -> None:
    """Raising min_top1 or lowering make/model thresholds never creates a flag, declared makes included."""
    stricter = _with(
        cfg,
        min_top1=max(cfg.min_top1, higher),
        make_threshold=cfg.make_threshold * make_factor,
        model_threshold=cfg.model_threshold * model_factor,
    )
    before = _decide(probs, record, taxonomy=TAX_FULL, cfg=cfg)
    after = _decide(probs, record, taxonomy=TAX_FULL, cfg=stricter)
    if after.is_flag:
        assert before.is_flag


@given(
    probs=prob_vectors(),
    cfg=decision_configs(),
    record=st.sampled_from(_ALL_RECORDS),
    genre=st.sampled_from(["VP", "CTTE", "MTL", "CAM", "TCP", None]),
    cats=st.lists(st.sampled_from(["car", "van", "truck", "bus", "motorcycle", "other"]), min_size=4, max_size=4),
)
@settings(max_examples=200, deadline=None)
def test_genre_evidence_never_adds_a_flag(
    probs: np.ndarray, cfg: DecisionConfig, record: RegistryRecord, genre: str | None, cats: list[str]
) -> None:
    """Giving label categories never turns a non-flag into a flag, nor changes a flag's level."""
    rec = RegistryRecord(record.make, record.model, genre, None)
    plain = decide(probs=probs, taxonomy=TAX_FULL, record=rec, plate_problem=None, cfg=cfg)
    with_genre = decide(probs=probs, taxonomy=TAX_FULL, record=rec, plate_problem=None, cfg=cfg, label_categories=cats)
    assert with_genre.is_flag == plain.is_flag
    assert with_genre.level == plain.level
    assert with_genre.outcome in (plain.outcome, "inconclusive")


@given(probs=prob_vectors(), cfg=decision_configs(), record=st.sampled_from(_ALL_RECORDS), low=_unit, high=_unit)
@settings(max_examples=150, deadline=None)
def test_lowering_other_threshold_never_adds_a_flag(
    probs: np.ndarray, cfg: DecisionConfig, record: RegistryRecord, low: float, high: float
) -> None:
    """A lower other_threshold abstains more often; it can only remove flags."""
    low, high = min(low, high), max(low, high)
    kwargs: dict[str, Any] = dict(probs=probs, taxonomy=TAX_FULL, record=record, plate_problem=None, cfg=cfg)
    if decide(**kwargs, other_threshold=low).is_flag:
        assert decide(**kwargs, other_threshold=high).is_flag
