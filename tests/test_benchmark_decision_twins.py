"""benchmarks/decision_bench.py: the platform-twin table becomes look-alike groups the bundle loader accepts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.engines.bundle import Label

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
decision_bench = pytest.importorskip("decision_bench")

LABELS = (
    Label(0, "CHEVROLET", "EXPRESS VAN 2007"),
    Label(1, "CHEVROLET", "EXPRESS CARGO VAN 2007"),
    Label(2, "GMC", "SAVANA VAN 2012"),
    Label(3, "JEEP", "GRAND CHEROKEE SUV 2012"),  # its twin (DODGE DURANGO 2012) is not in this taxonomy
    Label(4, "DODGE", "DURANGO SUV 2007"),
    Label(5, "FORD", "FIESTA SEDAN 2012"),
)


def test_twin_groups_name_the_labels_of_at_least_two_makes_and_nothing_else() -> None:
    groups = decision_bench.twin_groups(LABELS)
    assert groups == (("CHEVROLET EXPRESS VAN 2007", "CHEVROLET EXPRESS CARGO VAN 2007", "GMC SAVANA VAN 2012"),)


def test_the_twin_groups_are_read_by_the_daemon_s_taxonomy() -> None:
    """Declared through the manifest field the daemon reads; a Savana seen for an Express registration is a twin."""
    taxonomy = Taxonomy(LABELS, lookalike_groups=decision_bench.twin_groups(LABELS))
    assert taxonomy.lookalike_groups == (frozenset({0, 1, 2}),)
    assert 2 in taxonomy.lookalikes([0])
    assert taxonomy.lookalikes([3]) == ()
