"""Label groups, look-alike groups, refused duplicate aliases, and the misread check (decision level)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx_builders import make_bundle

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy, TaxonomyError
from iaflash.agent.decision.verdict import Verdict, decide
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import Label, load_bundle, parse_labels
from iaflash.engines.errors import BundleError

CFG = DecisionConfig(min_top1=0.5, make_threshold=0.05, model_threshold=0.05, match_threshold=0.3)

# Model years (cars-dev style), body variants grouped by the group column, and badge twins.
LABELS = (
    Label(0, "VOLKSWAGEN", "GOLF HATCHBACK 1991"),
    Label(1, "VOLKSWAGEN", "GOLF HATCHBACK 2012"),
    Label(2, "AUDI", "S5 COUPE 2012", group="S5"),
    Label(3, "AUDI", "S5 CONVERTIBLE 2012", group="S5"),
    Label(4, "CHEVROLET", "EXPRESS CARGO VAN 2007"),
    Label(5, "GMC", "SAVANA VAN 2012"),
    Label(6, "CHEVROLET", "SILVERADO 1500 REGULAR CAB 2012"),
    Label(7, "CHEVROLET", "SILVERADO 2500HD REGULAR CAB 2012"),
)
TWINS = (("CHEVROLET EXPRESS CARGO VAN 2007", "GMC SAVANA VAN 2012"),)
TAX = Taxonomy(LABELS, lookalike_groups=TWINS)


def _p(**mass: float) -> np.ndarray:
    p = np.full(len(LABELS), 0.0)
    for key, value in mass.items():
        p[int(key[1:])] = value
    return p


def _decide(probs: np.ndarray, make: str, model: str, **kw: object) -> Verdict:
    record = RegistryRecord(make, model, "VP", None)
    return decide(probs=probs, taxonomy=TAX, record=record, plate_problem=None, cfg=CFG, **kw)  # type: ignore[arg-type]  # test keywords


@pytest.mark.parametrize(
    ("make", "model", "indices", "group"),
    [
        ("VW", "GOLF", (0, 1), "VOLKSWAGEN GOLF HATCHBACK"),  # model years resolve from plain registry text
        ("VOLKSWAGEN", "GOLF VII", (0, 1), "VOLKSWAGEN GOLF HATCHBACK"),
        ("VOLKSWAGEN", "GOLF HATCHBACK 2012", (0, 1), "VOLKSWAGEN GOLF HATCHBACK"),
        ("AUDI", "S5", (2, 3), "AUDI S5"),
        ("AUDI", "S5 CABRIOLET", (2, 3), "AUDI S5"),
        ("CHEVROLET", "EXPRESS", (4,), "CHEVROLET EXPRESS CARGO VAN"),
    ],
)
def test_registry_text_resolves_to_the_whole_label_group(
    make: str, model: str, indices: tuple[int, ...], group: str
) -> None:
    res = TAX.resolve_detail(make, model)
    assert res.indices == indices
    assert res.group == group
    assert res.index in indices


def test_silverado_trims_stay_apart_rather_than_guessed() -> None:
    """1500 and 2500HD are different models: plain "SILVERADO" names neither (unsupported, never a flag)."""
    assert TAX.resolve("CHEVROLET", "SILVERADO") is None
    assert TAX.resolve_detail("CHEVROLET", "SILVERADO 1500").indices == (6,)


def test_p_model_is_the_mass_of_the_group() -> None:
    """A 2012 Golf registered as GOLF: p_model sums both model years, so it matches."""
    verdict = _decide(_p(p0=0.45, p1=0.45, p2=0.1), "VW", "GOLF")
    assert verdict.outcome == "match"
    assert verdict.p_model == pytest.approx(0.9)
    assert verdict.resolution is not None and verdict.resolution.to_dict()["labels"] == [0, 1]
    assert verdict.evidence["checked"]["group"] == "VOLKSWAGEN GOLF HATCHBACK"


def test_a_badge_twin_is_never_a_make_level_flag() -> None:
    """A Chevrolet Express seen as a GMC Savana (p=0.97): no flag; the evidence names the look-alike."""
    verdict = _decide(_p(p4=0.02, p5=0.97, p6=0.01), "CHEVROLET", "EXPRESS")
    assert verdict.outcome != "mismatch"
    assert verdict.evidence["checked"]["lookalikes"] == ["GMC SAVANA VAN 2012"]
    assert verdict.evidence["checked"]["p_make"] == pytest.approx(1.0)
    without = Taxonomy(LABELS)  # the same bundle without the look-alike group flags at make level
    record = RegistryRecord("CHEVROLET", "EXPRESS", "VP", None)
    plain = decide(probs=_p(p4=0.02, p5=0.97, p6=0.01), taxonomy=without, record=record, plate_problem=None, cfg=CFG)
    assert (plain.outcome, plain.level) == ("mismatch", "make")  # P(Chevrolet) = 0.03 < 0.05


def test_a_different_make_outside_the_lookalike_group_still_flags() -> None:
    verdict = _decide(_p(p0=0.98, p4=0.01, p5=0.01), "CHEVROLET", "EXPRESS")
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")


# ---------------------------------------------------------------- duplicate aliases are refused


def test_an_alias_given_to_two_groups_is_refused_with_where_which_and_fix() -> None:
    text = "index,make,model,aliases\n0,RENAULT,CLIO,CLIO V\n1,RENAULT,MEGANE,CLIO V\n"
    with pytest.raises(BundleError) as info:
        parse_labels(text, "bundle/labels.csv")
    message = str(info.value)
    assert message.startswith("bundle/labels.csv: alias 'CLIO V' of label 1 ('RENAULT MEGANE') also names label 0")
    assert "fix: keep it on one label only, or give both labels the same value in the group column" in message


def test_an_alias_equal_to_another_labels_model_is_refused() -> None:
    with pytest.raises(BundleError, match=r"alias 'clio' of label 1 .* also names label 0"):
        parse_labels("index,make,model,aliases\n0,RENAULT,CLIO,\n1,RENAULT,CLIO ESTATE,clio\n")


def test_labels_of_one_group_may_share_an_alias_and_round_trip(tmp_path: Path) -> None:
    """The group column is written and read back; one alias on two labels of one group is fine."""
    labels = (
        Label(0, "AUDI", "S5 COUPE", ("S5 SPORTBACK",), group="S5"),
        Label(1, "AUDI", "S5 CABRIOLET", ("S5 SPORTBACK",), group="S5"),
        Label(2, "RENAULT", "CLIO"),
    )
    bundle = make_bundle(tmp_path / "b", labels=labels)
    assert load_bundle(bundle.path).labels == labels
    assert (bundle.path / "labels.csv").read_text().splitlines()[0] == "index,make,model,aliases,group"


def test_spellings_that_collide_after_normalisation_are_refused_by_the_taxonomy() -> None:
    """A-KLASSE and CLASSE A are one model for the decision: on two labels they are refused, not first-wins."""
    labels = (Label(0, "MERCEDES", "CLASSE A"), Label(1, "MERCEDES", "A-KLASSE"))
    with pytest.raises(TaxonomyError, match=r"'A-KLASSE' \(label 1.*already names label 0"):
        Taxonomy(labels)


def test_lookalike_groups_are_checked_against_the_labels(tmp_path: Path) -> None:
    labels = (Label(0, "CHEVROLET", "EXPRESS"), Label(1, "GMC", "SAVANA"), Label(2, "GMC", "SIERRA"))
    with pytest.raises(BundleError, match=r"'lookalike_groups\[0\]' names 'GMC SAVANNA', which is no label"):
        make_bundle(tmp_path / "a", labels=labels, lookalike_groups=[["CHEVROLET EXPRESS", "GMC SAVANNA"]])
    with pytest.raises(BundleError, match="holds labels of one make only"):
        make_bundle(tmp_path / "b", labels=labels, lookalike_groups=[["GMC SAVANA", "GMC SIERRA"]])
    ok = make_bundle(tmp_path / "c", labels=labels, lookalike_groups=[["CHEVROLET EXPRESS", "GMC SAVANA"]])
    assert Taxonomy.from_bundle(load_bundle(ok.path)).lookalikes((0,)) == (1,)


# ---------------------------------------------------------------- the misread check (decide's half)


def test_a_flag_whose_plate_is_one_confusable_character_from_a_fitting_record_is_held() -> None:
    """The read plate's record says Express, the photo is a Golf; a neighbour plate holds a Golf: not a flag."""
    probs = _p(p0=0.05, p1=0.9, p2=0.05)
    flagged = _decide(probs, "CHEVROLET", "EXPRESS")
    assert (flagged.outcome, flagged.level) == ("mismatch", "make")
    held = _decide(probs, "CHEVROLET", "EXPRESS", misread=[RegistryRecord("VW", "GOLF", "VP", None)])
    assert held.outcome == "inconclusive"
    assert held.reason.startswith("plate probably misread: 1 registered plate(s) one confusable character away")
    assert held.evidence["misread_check"] == {"registered_neighbours": 1, "fitting": 1}
    assert held.evidence["held_flag"]["level"] == "make"


def test_neighbours_that_do_not_fit_the_photo_leave_the_flag() -> None:
    probs = _p(p0=0.08, p1=0.92)
    neighbours = [RegistryRecord("AUDI", "S5", "VP", None), RegistryRecord("TESLA", "MODEL 3", "VP", None)]
    verdict = _decide(probs, "CHEVROLET", "EXPRESS", misread=neighbours)
    assert (verdict.outcome, verdict.level) == ("mismatch", "make")
    assert verdict.evidence["misread_check"] == {"registered_neighbours": 2, "fitting": 0}


def test_generated_captures_never_flag_when_a_fitting_neighbour_exists() -> None:
    """On 300 generated confident reads of random records, any flag with a fitting neighbour is inconclusive."""
    rng = np.random.default_rng(7)
    registered = [(lb.make, lb.model) for lb in LABELS]
    held = 0
    for _ in range(300):
        seen = int(rng.integers(len(LABELS)))
        probs = np.full(len(LABELS), 0.01 / (len(LABELS) - 1))
        probs[seen] = 0.99
        make, model = registered[int(rng.integers(len(LABELS)))]
        neighbour = RegistryRecord(*registered[seen], "VP", None)
        plain = _decide(probs, make, model)
        checked = _decide(probs, make, model, misread=[neighbour])
        assert not checked.is_flag
        held += plain.is_flag
    assert held > 100  # the check really turned flags into inconclusive verdicts
