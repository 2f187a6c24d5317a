"""agent.evaluation.fit's guard: a margin beyond the worst genuine sample, chosen inside the fitting set."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import make_bundle
from test_evaluation_fit import LABELS, TAX, generated_samples

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.verdict import softmax
from iaflash.agent.errors import CalibrationError
from iaflash.agent.evaluation.fit import (
    choose_guard,
    count_flags,
    fit_operating_point,
    sharpen,
    write_fitted_bundle,
)
from iaflash.engines.bundle import Manifest, load_bundle
from iaflash.engines.errors import BundleError

FIT = generated_samples(500, seed=11, confusion=0.15)
TARGET = 0.01  # 0 flags in 500 bound the rate at 0.6 %


def _fresh_flags(op_thresholds: dict[str, float], temperature: float, seed: int) -> tuple[int, int]:
    """Genuine flags and genuine count on a fresh set from the same distribution, at those thresholds."""
    fresh = generated_samples(3000, seed=seed, confusion=0.15)
    cfg = DecisionConfig.model_validate({**DecisionConfig().model_dump(), **op_thresholds})
    probs = softmax(np.stack([s.logits for s in fresh]), temperature)
    counts, _ = count_flags(fresh, probs, TAX, cfg)
    return counts.flags, counts.n_genuine


def test_sharpen_is_the_softmax_at_temperature_over_guard() -> None:
    """p ** g renormalised equals softmax(z * g / T): the guard is a colder temperature."""
    z = np.random.default_rng(0).normal(0, 3, (5, 7))
    for g in (1.0, 1.5, 3.0):
        assert np.allclose(sharpen(softmax(z, 2.0), g), softmax(z, 2.0 / g))
    assert np.allclose(sharpen(np.array([[1.0, 0.0, 0.0]]), 2.0), [[1.0, 0.0, 0.0]])  # a zero stays (nearly) zero


def test_guard_one_is_the_fit_without_a_guard_and_writes_no_guard_key() -> None:
    """guard=1 changes nothing: the same point, the same id, and no ``guard`` in the manifest's dict."""
    when = datetime(2026, 12, 3, tzinfo=timezone.utc)
    plain = fit_operating_point(FIT, taxonomy=TAX, target=TARGET, fitted_at=when).operating_point
    one = fit_operating_point(FIT, taxonomy=TAX, target=TARGET, guard=1.0, fitted_at=when).operating_point
    assert one == plain
    assert "guard" not in one.to_dict()


@pytest.mark.parametrize("bad", [0.5, 0.0, float("nan"), float("inf")])
def test_a_guard_below_one_or_not_finite_is_refused(bad: float) -> None:
    with pytest.raises(CalibrationError, match="guard must be a finite number >= 1"):
        fit_operating_point(FIT, taxonomy=TAX, target=TARGET, guard=bad)


def test_a_guarded_point_is_stricter_and_flags_fewer_new_genuine_vehicles() -> None:
    """Unguarded, the point sits at the edge of the fitting set and new vehicles flag; guarded, fewer do."""
    plain = fit_operating_point(FIT, taxonomy=TAX, target=TARGET)
    guarded = fit_operating_point(FIT, taxonomy=TAX, target=TARGET, guard=1.25)
    assert plain.operating_point.met and guarded.operating_point.met
    assert guarded.operating_point.guard == 1.25
    assert guarded.operating_point.n_genuine == plain.operating_point.n_genuine == 500  # a vehicle counts once
    assert guarded.chosen.genuine_readings == 2 * 500  # ... read twice: as is, and sharpened
    assert guarded.operating_point.id != plain.operating_point.id
    for seed in (21, 22):
        new_plain, n = _fresh_flags(plain.operating_point.thresholds, plain.operating_point.temperature, seed)
        new_guarded, _ = _fresh_flags(guarded.operating_point.thresholds, guarded.operating_point.temperature, seed)
        assert n == 3000
        assert new_plain > 0  # the edge: what the fit never saw gets through
        assert new_guarded < new_plain


def test_choose_guard_takes_the_smallest_guard_with_no_escape_inside_the_fitting_set() -> None:
    """Inner cross-validation: guard 1 lets vehicles through out of fold, the first guard that does not wins."""
    choice = choose_guard(FIT, taxonomy=TAX, target=TARGET)
    tried = list(choice.escapes)
    assert tried == sorted(tried) and tried[0] == 1.0
    assert choice.escapes[1.0] > 0
    assert choice.escapes[choice.guard] == 0
    assert all(choice.escapes[g] > 0 for g in tried if g < choice.guard)
    assert tried[-1] == choice.guard  # the search stops at the first guard with no escape
    assert choice.unmet_from is None
    assert choice.n_genuine == 500 and choice.folds == 5
    assert choice.to_dict()["escapes"]["1"] == choice.escapes[1.0]
    assert fit_operating_point(FIT, taxonomy=TAX, target=TARGET, guard=choice.guard).operating_point.met


def test_choose_guard_never_picks_a_guard_whose_point_misses_the_target() -> None:
    """On too few genuine vehicles for the target no guard meets it: the answer is 1 and nothing is tried."""
    few = generated_samples(40, seed=3, confusion=0.15)
    choice = choose_guard(few, taxonomy=TAX, target=TARGET)
    assert choice.guard == 1.0 and choice.escapes == {}
    assert choice.unmet_from == 1.0  # why nothing was tried: already guard 1 misses the target
    assert choice.to_dict()["unmet_from"] == 1.0
    with pytest.raises(CalibrationError, match="at least 2 folds"):
        choose_guard(few, taxonomy=TAX, target=TARGET, folds=1)
    with pytest.raises(CalibrationError, match="guards must be finite numbers >= 1"):
        choose_guard(few, taxonomy=TAX, target=TARGET, guards=(0.5,))


def test_a_guarded_point_is_signed_into_the_manifest_and_a_bad_one_refused(tmp_path: Path) -> None:
    """The guard travels in the manifest (read back equal); a guard < 1 written by hand is refused."""
    bundle = make_bundle(tmp_path / "b", labels=LABELS)
    op = fit_operating_point(FIT, taxonomy=TAX, target=TARGET, guard=1.25).operating_point
    new = write_fitted_bundle(bundle, op, tmp_path / "fitted")
    doc = json.loads((tmp_path / "fitted" / "manifest.json").read_text())
    assert doc["operating_point"]["guard"] == 1.25
    assert load_bundle(new.path).manifest.operating_point == op
    doc["operating_point"]["guard"] = 0.5
    with pytest.raises(BundleError, match=r"operating_point\.guard"):
        Manifest.from_dict(doc)


def test_the_grid_scan_counts_exactly_what_the_per_point_rule_counts() -> None:
    """fit's vectorised scan (all 4,320 points at once) equals the rule applied point by point, readings included."""
    from dataclasses import replace

    from iaflash.agent.evaluation import fit as fit_module

    base = DecisionConfig.model_validate({})
    samples = [replace(s, unit=s.sample_id) if s.genuine else s for s in generated_samples(300, seed=3, confusion=0.3)]
    probs = fit_module._probs(samples, 1.0, "logits")
    for judged, p in ((samples, probs), fit_module._guarded(samples, probs, 1.5)):
        feats = fit_module._features(judged, p, TAX, base)
        one_by_one = [
            fit_module._point(feats, t, fit_module._flags(feats, t), 0.95, "one") for t in fit_module._grid(base, None)
        ]
        assert fit_module._scan(feats, base, None, 0.95, "one") == one_by_one
        assert any(q.flags for q in one_by_one) and any(q.clones_caught for q in one_by_one)  # not all zeros


def test_fit_command_guard_auto_writes_the_chosen_guard_into_the_bundle(tmp_path: Path) -> None:
    """``iaflash-agent fit --guard auto``: the guard chosen inside the dataset is the one the bundle carries."""
    from click.testing import CliRunner

    from iaflash.agent.cli.main import main
    from iaflash.agent.demo.dataset import write_dataset
    from iaflash.agent.demo.model import build_demo_bundle

    bundle, _ = build_demo_bundle(tmp_path / "bundle", per_class=8, seed=1, fit_per_class=10)
    data = write_dataset(tmp_path / "data", per_class=6, seed=5, level=0.2)
    args = ["fit", str(bundle.path), str(data), "--target", "0.2", "--json"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "auto"), "--guard", "auto"])
    doc = json.loads(result.stdout)
    choice = doc["guard_choice"]
    op = load_bundle(tmp_path / "auto").manifest.operating_point
    assert op is not None
    assert op.guard == choice["guard"] == doc["operating_point"].get("guard", 1.0)
    assert choice["n_genuine"] == op.n_genuine == 48
    refused = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "bad"), "--guard", "0.5"])
    assert refused.exit_code == 2
    assert "the guard must be a finite number >= 1" in refused.output
    assert not (tmp_path / "bad").exists()


def test_parse_guard_reads_auto_or_a_number_at_least_one_and_says_the_fix() -> None:
    """The one parser behind ``fit --guard``, ``evaluate --guard`` and the decision bench."""
    from iaflash.agent.evaluation.fit import parse_guard

    assert parse_guard("auto") == "auto"
    assert parse_guard("1") == 1.0
    assert parse_guard("1.5") == 1.5
    with pytest.raises(ValueError, match=r"neither a number >= 1 nor 'auto'; fix: e\.g\. --guard 1\.5"):
        parse_guard("lots")
    for bad in ("0.5", "nan", "inf"):
        with pytest.raises(ValueError, match="the guard must be a finite number >= 1"):
            parse_guard(bad)
