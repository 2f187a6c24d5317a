"""agent.taxonomy: spelling normalisation and the registry -> label lookup."""

from __future__ import annotations

import pytest

from agent.taxonomy import Taxonomy, norm_make, norm_text
from engines.bundle import Label

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


@pytest.mark.parametrize("spelling", ["MERCEDES-BENZ", "MERCEDES BENZ", "Mercedes", "mercedes-benz",
                                      "MercedesBenz", "MB", "Mercedes  Benz"])
def test_mercedes_spellings_are_the_same_make(spelling: str) -> None:
    """Every registry spelling of Mercedes-Benz normalises to one make key and resolves to the same label."""
    assert norm_make(spelling) == "MERCEDES"
    assert TAX.resolve(spelling, "CLASSE G") == 3
    assert TAX.make_indices(spelling) == (3,)


@pytest.mark.parametrize(("make", "canonical"), [("VW", "VOLKSWAGEN"), ("Volkswagen VW", "VOLKSWAGEN"),
                                                 ("Land-Rover", "LAND ROVER"), ("LANDROVER", "LAND ROVER"),
                                                 ("DS Automobiles", "DS"), ("Alfa", "ALFA ROMEO"),
                                                 ("Renault", "RENAULT")])
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
