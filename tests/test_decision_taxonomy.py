"""iaflash.agent.decision.taxonomy: spelling normalisation and the registry -> label lookup."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iaflash.agent.decision.taxonomy import (
    DEFAULT_MIN_SCORE,
    Resolution,
    Taxonomy,
    canonical_model,
    fuzzy_score,
    norm_make,
    norm_text,
    split_make,
    strip_candidates,
)
from iaflash.engines.bundle import Label

LABELS = (
    Label(0, "RENAULT", "CLIO", ("CLIO V", "CLIO IV")),
    Label(1, "RENAULT", "MEGANE", ()),
    Label(2, "PEUGEOT", "208", ()),
    Label(3, "MERCEDES-BENZ", "CLASSE G", ("G-CLASS",)),
    Label(4, "VOLKSWAGEN", "GOLF", ("GOLF VII",)),
    Label(5, "CITROËN", "C3", ()),
    Label(6, "OTHER", "UNKNOWN", ()),
)
TAX = Taxonomy(LABELS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Mégane", "MEGANE"),
        ("citroën", "CITROEN"),
        ("  Clio   V ", "CLIO V"),
        ("MERCEDES-BENZ", "MERCEDES BENZ"),
        ("Classe-G (W463)", "CLASSE G W463"),
        ("208/GT_Line", "208 GT LINE"),
        ("ŠKODA Octavia", "SKODA OCTAVIA"),
        ("", ""),
        ("---", ""),
    ],
)
def test_norm_text_removes_accents_case_and_punctuation(raw: str, expected: str) -> None:
    """Upper case, accents stripped, every run of non-alphanumerics becomes one space, trimmed."""
    assert norm_text(raw) == expected


@pytest.mark.parametrize(
    "spelling", ["MERCEDES-BENZ", "MERCEDES BENZ", "Mercedes", "mercedes-benz", "MercedesBenz", "MB", "Mercedes  Benz"]
)
def test_mercedes_spellings_are_the_same_make(spelling: str) -> None:
    """Every registry spelling of Mercedes-Benz normalises to one make key and resolves to the same label."""
    assert norm_make(spelling) == "MERCEDES"
    assert TAX.resolve(spelling, "CLASSE G") == 3
    assert TAX.make_indices(spelling) == (3,)


@pytest.mark.parametrize(
    ("make", "canonical"),
    [
        ("VW", "VOLKSWAGEN"),
        ("Volkswagen VW", "VOLKSWAGEN"),
        ("Land-Rover", "LAND ROVER"),
        ("LANDROVER", "LAND ROVER"),
        ("DS Automobiles", "DS"),
        ("Alfa", "ALFA ROMEO"),
        ("Renault", "RENAULT"),
    ],
)
def test_norm_make_applies_make_aliases(make: str, canonical: str) -> None:
    """Known registry make aliases map to the canonical make key; others are just normalised."""
    assert norm_make(make) == canonical


@pytest.mark.parametrize(
    ("make", "model", "index"),
    [
        ("RENAULT", "CLIO", 0),
        ("renault", "clio v", 0),
        ("Renault", "Clio-IV", 0),
        ("RENAULT", "Mégane", 1),
        ("PEUGEOT", "208", 2),
        ("Mercedes", "G-Class", 3),
        ("MERCEDES BENZ", "g class", 3),
        ("VW", "Golf VII", 4),
        ("Citroen", "C3", 5),
        ("CITROËN", "c3", 5),
    ],
)
def test_resolve_matches_canonical_names_and_aliases(make: str, model: str, index: int) -> None:
    """resolve() finds a label by its canonical model name or any alias, whatever the spelling."""
    assert TAX.resolve(make, model) == index


@pytest.mark.parametrize(
    ("make", "model"),
    [
        ("RENAULT", "TWINGO"),  # known make, unknown model
        ("TESLA", "MODEL 3"),  # unknown make
        ("PEUGEOT", "CLIO"),  # model of another make
        ("RENAULT", "CLIO V6 RS"),  # not an alias
        ("OTHER", "UNKNOWN"),  # the 'other' class is never a registered vehicle
    ],
)
def test_resolve_returns_none_outside_the_taxonomy(make: str, model: str) -> None:
    """A registered make/model the classifier does not know resolves to None (unsupported)."""
    assert TAX.resolve(make, model) is None


def test_make_indices_lists_every_label_of_a_make() -> None:
    """make_indices gives every label of the make, in label order; an unknown make gives ()."""
    assert TAX.make_indices("renault") == (0, 1)
    assert TAX.make_indices("Peugeot") == (2,)
    assert TAX.make_indices("Volkswagen VW") == (4,)
    assert TAX.make_indices("Citroën") == (5,)
    assert TAX.make_indices("TESLA") == ()
    assert TAX.make_indices("OTHER") == ()


def test_other_indices_are_the_explicit_other_classes() -> None:
    """Labels whose make is OTHER/UNKNOWN/AUTRE are the 'other' classes and belong to no make."""
    tax = Taxonomy((*LABELS, Label(7, "autre", "inconnu", ()), Label(8, "Unknown", "vehicle", ())))
    assert tax.other_indices == (6, 7, 8)
    assert TAX.other_indices == (6,)
    assert Taxonomy(LABELS[:3]).other_indices == ()
    assert tax.labels == (*LABELS, Label(7, "autre", "inconnu", ()), Label(8, "Unknown", "vehicle", ()))


# ---------------------------------------------------------------------------------------------------
# resolve_detail: method, score, normalised text, make key
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "model", "expected"),
    [
        ("RENAULT", "CLIO", Resolution(0, "exact", 100.0, "RENAULT CLIO", "RENAULT")),
        ("Renault", "Clio-IV", Resolution(0, "alias", 100.0, "RENAULT CLIO IV", "RENAULT")),
        ("RENAULT", "CLIO III", Resolution(0, "rule", 100.0, "RENAULT CLIO", "RENAULT")),
        ("MERCEDES", "G 350 D", Resolution(3, "rule", 100.0, "MERCEDES CLASSE G", "MERCEDES")),
        ("VW", "GOLF VII", Resolution(4, "alias", 100.0, "VOLKSWAGEN GOLF VII", "VOLKSWAGEN")),
        ("RENAULT", "CLIO V6 RS", Resolution(None, "none", 0.0, "RENAULT CLIO V6", "RENAULT")),
    ],
)
def test_resolve_detail_reports_method_score_and_normalised_text(make: str, model: str, expected: Resolution) -> None:
    """resolve_detail says how the registry text mapped, with the text that matched and the make key."""
    assert TAX.resolve_detail(make, model) == expected


def test_unknown_make_is_unsupported_with_its_best_rejected_make_score() -> None:
    """A make the bundle does not know is unsupported; the score is the best (rejected) make similarity."""
    res = TAX.resolve_detail("TESLA", "MODEL 3")
    assert (res.index, res.method, res.make, res.normalised) == (None, "none", "TESLA", "TESLA MODEL 3")
    assert res.score < TAX.min_score


def test_fuzzy_resolution_carries_its_score() -> None:
    """A typo resolves fuzzily with token_sort_ratio's score (MEGANNE vs MEGANE = 92.3)."""
    res = TAX.resolve_detail("RENAULT", "MEGANNE")
    assert (res.index, res.method) == (1, "fuzzy")
    assert res.score == pytest.approx(92.307, abs=1e-3)
    assert res.to_dict() == {
        "index": 1,
        "method": "fuzzy",
        "score": 92.31,
        "normalised": "RENAULT MEGANNE",
        "group": "RENAULT MEGANE",
        "labels": [1],
    }


def test_fuzzy_below_min_score_is_unsupported() -> None:
    """The same typo is unsupported when min_score is above its score; the best score is still reported."""
    strict = Taxonomy(LABELS, min_score=95)
    res = strict.resolve_detail("RENAULT", "MEGANNE")
    assert (res.index, res.method) == (None, "none")
    assert res.score == pytest.approx(92.307, abs=1e-3)


def test_fuzzy_never_crosses_identity_tokens() -> None:
    """Tokens with digits or of <= 3 letters must be equal: 208 is never 2008, CLASSE A never CLASSE B."""
    assert fuzzy_score("208", "2008") == 0.0
    assert fuzzy_score("CLASSE A", "CLASSE B") == 0.0
    assert fuzzy_score("C4 PICASSO", "C4") == pytest.approx(33.333, abs=1e-3)
    assert fuzzy_score("C4 PICASO", "C4 PICASSO") == pytest.approx(94.737, abs=1e-3)
    lenient = Taxonomy((*LABELS, Label(7, "PEUGEOT", "2008", ())), min_score=0)
    assert lenient.resolve("PEUGEOT", "20008") is None


def test_two_labels_tied_for_the_best_fuzzy_score_resolve_to_neither() -> None:
    """An ambiguous fuzzy match is unsupported, never a coin toss between two labels."""
    tax = Taxonomy((Label(0, "RENAULT", "KADJAR", ()), Label(1, "RENAULT", "KADJAS", ())), min_score=50)
    res = tax.resolve_detail("RENAULT", "KADJAX")
    assert res.index is None
    assert res.method == "none"
    assert res.score == pytest.approx(83.333, abs=1e-3)


def test_make_typo_resolves_fuzzily_and_caps_the_score() -> None:
    """A misspelt make is matched fuzzily among the bundle's makes; the result's score is the make's."""
    res = TAX.resolve_detail("RENAUL", "CLIO")
    assert (res.index, res.method, res.make) == (0, "fuzzy", "RENAULT")
    assert res.score == pytest.approx(92.307, abs=1e-3)
    assert TAX.resolve_detail("BMV", "X5").index is None  # three-letter makes must be exact


def test_resolutions_are_cached() -> None:
    """The second lookup of the same strings is an LRU cache hit returning the same object."""
    tax = Taxonomy(LABELS)
    first = tax.resolve_detail("renault", "clio iii")
    hits_before = tax.cache_info()[0]
    assert tax.resolve_detail("renault", "clio iii") is first
    assert tax.cache_info()[0] == hits_before + 1


def test_min_score_outside_0_100_is_refused() -> None:
    """A min_score outside 0..100 raises, naming the config key to fix."""
    with pytest.raises(ValueError, match=r"registry\.fuzzy_min_score"):
        Taxonomy(LABELS, min_score=101)
    assert Taxonomy(LABELS).min_score == DEFAULT_MIN_SCORE == 88.0


def test_full_range_makes_are_normalised_and_need_labels() -> None:
    """full_range_makes accept any spelling; a declared make with no labels is not full-range."""
    tax = Taxonomy(LABELS, full_range_makes=frozenset({"Mercedes-Benz", "Tesla"}))
    assert tax.is_full_range("MERCEDES") is True
    assert tax.is_full_range("TESLA") is False
    assert tax.is_full_range("RENAULT") is False
    assert TAX.is_full_range("MERCEDES") is False


def test_ds_is_split_from_citroen() -> None:
    """A Citroën 'DS3' belongs to make DS, in the registry and in the bundle alike."""
    assert split_make("CITROEN", "DS3") == ("DS", "DS3")
    assert split_make("CITROEN", "C3") == ("CITROEN", "C3")
    tax = Taxonomy((Label(0, "CITROEN", "DS3", ()), Label(1, "CITROEN", "C3", ())))
    assert tax.make_of(0) == "DS"
    assert tax.make_indices("DS") == (0,)
    assert tax.make_indices("CITROEN") == (1,)
    assert tax.resolve_detail("DS AUTOMOBILES", "DS 3") == Resolution(0, "rule", 100.0, "DS DS3", "DS")


@pytest.mark.parametrize(
    ("make", "model", "canonical"),
    [
        ("MERCEDES", "A KLASSE", "CLASSE A"),
        ("MERCEDES", "C 220 CDI", "CLASSE C CDI"),
        ("MERCEDES", "SPRINTER", "SPRINTER"),
        ("BMW", "320D", "SERIE 3"),
        ("BMW", "218 ACTIVE TOURER", "SERIE 2 ACTIVE TOURER"),
        ("DS", "DS 3", "DS3"),
        ("MAZDA", "MAZDA 3", "3"),
        ("RENAULT", "MEGANE PHASE 2", "MEGANE"),
        ("VOLKSWAGEN", "GOLF MK 7", "GOLF"),
    ],
)
def test_canonical_model_applies_make_rules_but_strips_nothing(make: str, model: str, canonical: str) -> None:
    """canonical_model rewrites make-specific spellings; trims and generations are left to strip_candidates."""
    assert canonical_model(make, model) == canonical


@pytest.mark.parametrize(
    ("canonical", "candidates"),
    [
        ("CLIO IV ESTATE", ["CLIO IV ESTATE", "CLIO ESTATE", "CLIO", "CLIO IV"]),  # then body first
        ("SCENIC SW 3", ["SCENIC SW 3", "SCENIC 3", "SCENIC"]),  # 3 after SW is a generation once SW is gone
        ("NOUVELLE 208 GT LINE", ["NOUVELLE 208 GT LINE", "208 GT LINE", "208"]),
        ("3008 HYBRID4", ["3008 HYBRID4", "3008"]),
        ("C4 PICASSO", ["C4 PICASSO"]),
        ("CLASSE E", ["CLASSE E"]),  # E after CLASSE is the class, not the electric badge
        ("MODEL X", ["MODEL X"]),  # X after MODEL is not a roman numeral
        ("500 X", ["500 X"]),  # X after a number is a model letter
        ("SERIE 2 ACTIVE TOURER", ["SERIE 2 ACTIVE TOURER"]),
        ("ESTATE", ["ESTATE"]),  # never stripped to nothing
    ],
)
def test_strip_candidates_go_from_least_to_most_stripped(canonical: str, candidates: list[str]) -> None:
    """Generation, then trim/powertrain, then body words are removed (then body first); protected words stay."""
    assert strip_candidates(canonical) == candidates


_FUZZ_LABELS = (
    Label(0, "RENAULT", "MEGANE", ()),
    Label(1, "RENAULT", "SCENIC", ()),
    Label(2, "RENAULT", "KADJAR", ()),
    Label(3, "PEUGEOT", "PARTNER", ()),
    Label(4, "PEUGEOT", "RIFTER", ()),
)


@st.composite
def typos(draw: st.DrawFn) -> tuple[str, str]:
    """A label's make and model with up to three random edits (insert, delete, replace)."""
    label = draw(st.sampled_from(_FUZZ_LABELS))
    text = list(label.model)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from("AEIOURSTNKX"))
        if op == "insert":
            text.insert(pos, char)
        elif text and pos < len(text):
            if op == "delete":
                del text[pos]
            else:
                text[pos] = char
    return label.make, "".join(text)


@given(typo=typos(), low=st.floats(0, 100), high=st.floats(0, 100))
@settings(max_examples=300, deadline=None)
def test_fuzzy_scores_below_min_score_never_resolve(typo: tuple[str, str], low: float, high: float) -> None:
    """A fuzzy resolution always scores >= min_score; a stricter min_score only removes fuzzy matches."""
    low, high = min(low, high), max(low, high)
    lenient, strict = Taxonomy(_FUZZ_LABELS, min_score=low), Taxonomy(_FUZZ_LABELS, min_score=high)
    res_low, res_high = lenient.resolve_detail(*typo), strict.resolve_detail(*typo)
    for tax, res in ((lenient, res_low), (strict, res_high)):
        if res.method == "fuzzy":
            assert res.score >= tax.min_score
            assert res.index is not None
        if res.method == "none":
            assert res.index is None
    if res_high.index is not None:
        assert res_low.index == res_high.index
    if res_low.method == "fuzzy" and res_low.score < high:
        assert res_high.index is None
