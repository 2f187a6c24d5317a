"""Real-world SIV make / commercial-name spellings and the taxonomy label each must resolve to.

The bundle below is a realistic slice of a French-fleet classifier: canonical spellings, a few aliases
and deliberately close neighbours (208/2008, C4/C4 PICASSO, CLIO/CLIO ESTATE, CLASSE A/CLASSE B) so
that every row also proves a distinction is kept. ``None`` means "unsupported": never a guess.
"""

from __future__ import annotations

import pytest

from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.engines.bundle import Label

_NAMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("RENAULT", "CLIO", ()),
    ("RENAULT", "CLIO ESTATE", ()),
    ("RENAULT", "MEGANE", ()),
    ("RENAULT", "SCENIC", ()),
    ("RENAULT", "GRAND SCENIC", ()),
    ("RENAULT", "ZOE", ()),
    ("PEUGEOT", "208", ()),
    ("PEUGEOT", "2008", ()),
    ("PEUGEOT", "308", ()),
    ("PEUGEOT", "3008", ()),
    ("CITROËN", "C3", ()),
    ("CITROËN", "C3 AIRCROSS", ()),
    ("CITROËN", "C4", ()),
    ("CITROËN", "C4 PICASSO", ("C4 SPACETOURER",)),
    ("DS", "DS 3", ()),
    ("VOLKSWAGEN", "GOLF", ()),
    ("VOLKSWAGEN", "POLO", ()),
    ("MERCEDES-BENZ", "CLASSE A", ()),
    ("MERCEDES-BENZ", "CLASSE B", ()),
    ("MERCEDES-BENZ", "GLA", ()),
    ("BMW", "SERIE 3", ()),
    ("BMW", "SERIE 2", ()),
    ("BMW", "SERIE 2 ACTIVE TOURER", ()),
    ("BMW", "X5", ()),
    ("DACIA", "SANDERO", ()),
    ("TOYOTA", "RAV4", ()),
    ("TOYOTA", "YARIS", ()),
    ("FIAT", "500", ()),
    ("FIAT", "500X", ()),
    ("MAZDA", "3", ()),
    ("KIA", "CEE'D", ()),
    ("MERCEDES-BENZ", "CLASSE GLC", ()),
    ("FORD", "FOCUS", ()),
    ("RENAULT", "KANGOO", ()),
    ("OTHER", "UNKNOWN", ()),
)
TAX = Taxonomy([Label(i, make, model, aliases) for i, (make, model, aliases) in enumerate(_NAMES)])
_INDEX = {f"{make} {model}": i for i, (make, model, _) in enumerate(_NAMES)}

# (registry make, registry commercial name, expected "MAKE MODEL" label or None, expected method)
TABLE: list[tuple[str, str, str | None, str]] = [
    # Mercedes spellings of the make and of the class
    ("MERCEDES", "CLASSE A", "MERCEDES-BENZ CLASSE A", "exact"),
    ("MERCEDES-BENZ", "A-KLASSE", "MERCEDES-BENZ CLASSE A", "rule"),
    ("MERCEDES BENZ", "A CLASS", "MERCEDES-BENZ CLASSE A", "rule"),
    ("MERCEDES", "CLASS A", "MERCEDES-BENZ CLASSE A", "rule"),
    ("MERCEDES", "A 180 D", "MERCEDES-BENZ CLASSE A", "rule"),
    ("MERCEDES", "A180", "MERCEDES-BENZ CLASSE A", "rule"),
    ("MERCEDES-AMG", "A 45 AMG", "MERCEDES-BENZ CLASSE A", "rule"),
    ("MERCEDES", "CLASSE B 200", "MERCEDES-BENZ CLASSE B", "rule"),
    ("MERCEDES", "GLA 200", "MERCEDES-BENZ GLA", "rule"),
    ("MERCEDES", "CLASSE GLA", "MERCEDES-BENZ GLA", "rule"),
    ("MERCEDES", "CLASSE C", None, "none"),  # not in the bundle, and never CLASSE A/B by fuzz
    # Peugeot: trims, "NOUVELLE", electric and hybrid names; 208 is not 2008
    ("PEUGEOT", "208", "PEUGEOT 208", "exact"),
    ("PEUGEOT", "NOUVELLE 208", "PEUGEOT 208", "rule"),
    ("PEUGEOT", "208 ACTIVE", "PEUGEOT 208", "rule"),
    ("PEUGEOT", "208 GT LINE", "PEUGEOT 208", "rule"),
    ("PEUGEOT", "E-208", "PEUGEOT 208", "rule"),
    ("PEUGEOT", "2008", "PEUGEOT 2008", "exact"),
    ("PEUGEOT", "NOUVEAU 2008 ALLURE", "PEUGEOT 2008", "rule"),
    ("PEUGEOT", "3008 HYBRID4", "PEUGEOT 3008", "rule"),
    ("PEUGEOT", "308 SW", "PEUGEOT 308", "rule"),
    ("PEUGEOT", "308 II BUSINESS", "PEUGEOT 308", "rule"),
    ("PEUGOT", "208", "PEUGEOT 208", "fuzzy"),  # typo in the make
    ("PEUGEOT", "20008", None, "none"),  # digits differ: never fuzzy-matched to 2008
    # Renault: generations, phases, estate, van version, accents
    ("RENAULT", "CLIO III", "RENAULT CLIO", "rule"),
    ("RENAULT", "CLIO 4", "RENAULT CLIO", "rule"),
    ("RENAULT", "CLIO V E-TECH", "RENAULT CLIO", "rule"),
    ("RENAULT", "CLIO IV ESTATE", "RENAULT CLIO ESTATE", "rule"),  # the bundle has the estate: kept
    ("RENAULT", "CLIO SOCIETE", "RENAULT CLIO", "rule"),
    ("RENAULT", "MÉGANE III PHASE 2", "RENAULT MEGANE", "rule"),
    ("RENAULT", "MEGANNE", "RENAULT MEGANE", "fuzzy"),  # typo in the model
    ("RENAULT", "MEGANE ESTATE", "RENAULT MEGANE", "rule"),  # no estate label: body is separate evidence
    ("RENAULT", "GRAND SCENIC IV", "RENAULT GRAND SCENIC", "rule"),  # GRAND is never stripped
    ("RENAULT", "ZOE INTENS", "RENAULT ZOE", "rule"),
    ("RENAULT", "TWINGO", None, "none"),
    # Citroën / DS
    ("CITROËN", "C4 PICASSO", "CITROËN C4 PICASSO", "exact"),
    ("CITROEN", "C4 PICASSO II", "CITROËN C4 PICASSO", "rule"),
    ("CITROEN", "C4 SPACETOURER", "CITROËN C4 PICASSO", "alias"),
    ("CITROEN", "GRAND C4 PICASSO", None, "none"),  # neither C4 PICASSO nor C4: a longer vehicle
    ("CITROEN", "C3 AIRCROSS", "CITROËN C3 AIRCROSS", "exact"),
    ("CITROEN", "C3 SHINE", "CITROËN C3", "rule"),
    ("CITROEN", "DS3", "DS DS 3", "rule"),  # DS split from Citroën
    ("DS AUTOMOBILES", "DS 3", "DS DS 3", "exact"),
    ("DS", "DS3", "DS DS 3", "rule"),
    # Volkswagen
    ("VW", "GOLF VII", "VOLKSWAGEN GOLF", "rule"),
    ("VOLKSWAGEN", "GOLF MK7", "VOLKSWAGEN GOLF", "rule"),
    ("VOLKSWAGEN", "GOLF SW", "VOLKSWAGEN GOLF", "rule"),
    ("VOLKSWAGEN", "GOLF VARIANT", "VOLKSWAGEN GOLF", "rule"),
    ("VOLKSWAGEN", "GOLF SPORTSVAN", None, "none"),  # a different (MPV) body
    ("VOLKSWAGEN", "POLO V", "VOLKSWAGEN POLO", "rule"),
    ("VOLKSWAGEN VW", "POLO", "VOLKSWAGEN POLO", "exact"),
    # BMW series and engine designations
    ("BMW", "SERIE 3", "BMW SERIE 3", "exact"),
    ("BMW", "320D", "BMW SERIE 3", "rule"),
    ("BMW", "3ER", "BMW SERIE 3", "rule"),
    ("BMW", "3 SERIES TOURING", "BMW SERIE 3", "rule"),
    ("BMW", "218 ACTIVE TOURER", "BMW SERIE 2 ACTIVE TOURER", "rule"),  # never the SERIE 2 coupé
    ("BMW", "SERIE 2 GRAN TOURER", None, "none"),
    ("BMW", "X5 XDRIVE", "BMW X5", "rule"),
    ("BMW", "X 5", "BMW X5", "rule"),
    # Others
    ("DACIA", "SANDERO STEPWAY", "DACIA SANDERO", "rule"),
    ("TOYOTA", "RAV 4 HYBRID", "TOYOTA RAV4", "rule"),
    ("TOYOTA", "YARIS HYBRIDE", "TOYOTA YARIS", "rule"),
    ("FIAT", "500X", "FIAT 500X", "exact"),
    ("FIAT", "500", "FIAT 500", "exact"),
    ("MAZDA", "MAZDA 3", "MAZDA 3", "rule"),
    ("MAZDA", "MAZDA3", "MAZDA 3", "rule"),
    # Issue 15 item 7: spellings that used to abstain although a safe answer exists
    ("V.W.", "GOLF", "VOLKSWAGEN GOLF", "exact"),  # dotted make abbreviation
    ("V-W", "POLO", "VOLKSWAGEN POLO", "exact"),  # dashed
    ("B.M.W.", "X5", "BMW X5", "exact"),
    ("KIA", "CEED", "KIA CEE'D", "exact"),  # apostrophe inside the model name
    ("KIA", "CEE D", None, "none"),  # but a space is another token: never guessed
    ("KIA", "PRO CEE'D", None, "none"),  # a different body, no label
    ("RENAULT", "MEGANE3", "RENAULT MEGANE", "rule"),  # generation glued to the model
    ("RENAULT", "CLIO4 ESTATE", "RENAULT CLIO ESTATE", "rule"),
    ("CITROEN", "DS3", "DS DS 3", "rule"),  # two letters + digit is a model, never split
    ("TOYOTA", "RAV4", "TOYOTA RAV4", "exact"),  # three letters + digit too
    ("PEUGEOT", "208 1.2 PURETECH 110", None, "none"),  # a power figure is no safe word: unsupported
    ("PEUGEOT", "308 SW 1.6 BLUEHDI", "PEUGEOT 308", "rule"),  # displacement and engine words
    ("PEUGEOT", "3008 HDI FAP", "PEUGEOT 3008", "rule"),
    ("VOLKSWAGEN", "GOLF 2.0 TDI", "VOLKSWAGEN GOLF", "rule"),
    ("RENAULT", "ZOE 52KWH", "RENAULT ZOE", "exact"),  # a battery capacity is dropped with the spelling
    ("RENAULT", "ZOE Z.E. 41 KWH", "RENAULT ZOE", "rule"),
    ("RENAULT", "CLIO E-TECH HYBRIDE", "RENAULT CLIO", "rule"),
    ("FORD", "FOCUS 1.0 ECOBOOST", "FORD FOCUS", "rule"),
    ("FORD", "FOCUS ST", None, "none"),  # ST is a performance model, not a trim: unsupported
    ("RENAULT", "KANGOO FOURGON", "RENAULT KANGOO", "rule"),  # body words and abbreviations
    ("RENAULT", "MEGANE BRK", "RENAULT MEGANE", "rule"),
    ("RENAULT", "SCENIC SW 3", "RENAULT SCENIC", "rule"),  # body before generation: 3 follows SW
    ("MERCEDES", "GLC COUPE", "MERCEDES-BENZ CLASSE GLC", "rule"),  # class letters after stripping
    ("MERCEDES", "GLC 220 D COUPE", "MERCEDES-BENZ CLASSE GLC", "rule"),
    ("MERCEDES", "GLE COUPE", None, "none"),  # another class: never GLC
    ("TESLA", "MODEL 3", None, "none"),  # unknown make
    ("OTHER", "UNKNOWN", None, "none"),  # the 'other' class is never a registered vehicle
    ("", "", None, "none"),
]


@pytest.mark.parametrize(
    ("make", "model", "expected", "method"), TABLE, ids=[f"{mk or '-'}|{md or '-'}" for mk, md, _, _ in TABLE]
)
def test_registry_spelling_resolves_to_the_expected_label(
    make: str, model: str, expected: str | None, method: str
) -> None:
    """Each real-world spelling maps to exactly the listed label (or is unsupported), by the listed method."""
    resolution = TAX.resolve_detail(make, model)
    assert resolution.index == (None if expected is None else _INDEX[expected])
    assert resolution.method == method
    assert TAX.resolve(make, model) == resolution.index
    if method in ("exact", "alias", "rule"):
        assert resolution.score == 100.0
    elif method == "fuzzy":
        assert TAX.min_score <= resolution.score < 100.0
    else:
        assert resolution.score < TAX.min_score


def test_the_table_has_at_least_forty_rows_and_covers_every_method() -> None:
    """The table is the regression suite for normalisation: big enough, and every method appears."""
    assert len(TABLE) >= 40
    assert {row[3] for row in TABLE} == {"exact", "alias", "rule", "fuzzy", "none"}
