"""agent.evaluation.fit: the finite-sample rule (Clopper–Pearson) and the operating point fitted through decide."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import make_bundle

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.errors import CalibrationError
from iaflash.agent.evaluation.fit import (
    FitSample,
    clopper_pearson_upper,
    count_flags,
    fit_operating_point,
    genuine_needed,
    samples_sha256,
    with_readings,
    write_fitted_bundle,
)
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import Label, Manifest, load_bundle
from iaflash.engines.errors import BundleError

# ---------------------------------------------------------------- Clopper–Pearson against known values


@pytest.mark.parametrize(
    ("flags", "n", "sided", "expected"),
    [
        (0, 1200, "one", 1 - 0.05 ** (1 / 1200)),  # 0.2493 %: the "no flag in >= 1,200"
        (0, 1221, "one", 0.0024505),
        (0, 100, "two", 1 - 0.025 ** (1 / 100)),  # 3.62 %: the upper end of the two-sided 95 % interval
        (1, 1221, "one", 0.0038793),  # the "1 flag in 1,221 ... about 0.39 %"
        (1, 10, "two", 0.4450161),  # the textbook two-sided 95 % interval for 1/10 is [0.0025, 0.4450]
        (5, 100, "two", 0.1128347),  # 5/100: [0.0164, 0.1128]
        (10, 10, "one", 1.0),
        (0, 0, "one", 1.0),
    ],
)
def test_clopper_pearson_upper_bound_matches_known_values(flags: int, n: int, sided: str, expected: float) -> None:
    """The bound equals the Beta quantile: closed form for 0 flags, published interval ends otherwise."""
    assert clopper_pearson_upper(flags, n, 0.95, sided) == pytest.approx(expected, rel=2e-5)  # type: ignore[arg-type]  # a Sided literal


def test_one_flag_bound_solves_the_binomial_tail_in_closed_form() -> None:
    """For 1 flag, P(X <= 1) = (1-p)^n + n p (1-p)^(n-1) equals alpha exactly at the bound."""
    p = clopper_pearson_upper(1, 1221)
    assert (1 - p) ** 1221 + 1221 * p * (1 - p) ** 1220 == pytest.approx(0.05, abs=1e-9)


def test_upper_bound_grows_with_flags_and_falls_with_samples() -> None:
    """More flags in the same n raise the bound; more samples with the same flags lower it."""
    assert clopper_pearson_upper(0, 500) < clopper_pearson_upper(1, 500) < clopper_pearson_upper(2, 500)
    assert clopper_pearson_upper(2, 500) > clopper_pearson_upper(2, 1000) > clopper_pearson_upper(2, 5000)


@pytest.mark.parametrize(
    ("target", "sided", "flags", "needed"),
    [
        (0.0025, "one", 0, 1197),  # ln(0.05) / ln(0.9975)
        (0.001, "one", 0, 2995),
        (0.001, "two", 0, 3688),  # ln(0.025) / ln(0.999)
        (0.01, "one", 0, 299),
        (0.0025, "one", 1, 1896),
    ],
)
def test_genuine_needed_is_the_smallest_n_meeting_the_target(
    target: float, sided: str, flags: int, needed: int
) -> None:
    """``genuine_needed`` is the fewest samples whose bound (with that many flags) reaches the target."""
    n = genuine_needed(target, sided=sided, flags=flags)  # type: ignore[arg-type]  # a Sided literal
    assert n == needed
    assert clopper_pearson_upper(flags, n, 0.95, sided) <= target  # type: ignore[arg-type]  # a Sided literal
    assert clopper_pearson_upper(flags, n - 1, 0.95, sided) > target  # type: ignore[arg-type]  # a Sided literal


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="0 <= flags <= n"):
        clopper_pearson_upper(3, 2)
    with pytest.raises(ValueError, match="target must be within"):
        genuine_needed(0.0)


# ---------------------------------------------------------------- fitting on generated samples

LABELS = (
    Label(0, "RENAULT", "CLIO"),
    Label(1, "RENAULT", "MEGANE"),
    Label(2, "PEUGEOT", "208"),
    Label(3, "PEUGEOT", "3008"),
)
TAX = Taxonomy(LABELS)


def _record(i: int) -> RegistryRecord:
    return RegistryRecord(LABELS[i].make, LABELS[i].model, "VP", None)


def generated_samples(n: int, seed: int, confusion: float = 0.0) -> list[FitSample]:
    """n images with logits peaked on their label (a share ``confusion`` peaked elsewhere), plus two clones each."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        y = int(rng.integers(4))
        seen = int(rng.integers(4)) if rng.random() < confusion else y
        logits = rng.normal(0.0, 1.0, 4)
        logits[seen] += rng.uniform(2.0, 8.0)
        out.append(FitSample(logits, _record(y), True, y, sample_id=f"g{k}"))
        other_make = [i for i in range(4) if LABELS[i].make != LABELS[y].make]
        same_make = [i for i in range(4) if LABELS[i].make == LABELS[y].make and i != y]
        out.append(FitSample(logits, _record(int(rng.choice(other_make))), False, y, "make", sample_id=f"m{k}"))
        out.append(FitSample(logits, _record(int(rng.choice(same_make))), False, y, "model", sample_id=f"d{k}"))
    return out


def test_fit_meets_the_target_on_the_upper_bound_and_counts_through_decide() -> None:
    """With clean data and enough genuine samples the fit meets a 2 % target and catches clones."""
    samples = generated_samples(400, seed=1)
    result = fit_operating_point(samples, taxonomy=TAX, target=0.02)
    op = result.operating_point
    assert op.met is True
    assert op.n_genuine == 400
    assert op.upper_bound == pytest.approx(clopper_pearson_upper(op.flags, 400))
    assert op.upper_bound <= 0.02
    assert op.clones_caught > 0.5 * op.n_clones
    assert set(op.thresholds) == {"min_top1", "make_threshold", "model_threshold", "other_threshold", "match_threshold"}
    assert op.thresholds["match_threshold"] >= op.thresholds["model_threshold"]
    assert op.id.startswith("op-") and len(op.id) == 15
    assert op.dataset_sha256 == samples_sha256(samples)
    assert result.genuine_needed == 149
    # The counts recorded are what the daemon's decide gives at those thresholds, sample by sample.
    cfg = DecisionConfig.model_validate({**DecisionConfig().model_dump(), **op.thresholds})
    probs = np.stack([np.exp(s.logits / op.temperature) / np.exp(s.logits / op.temperature).sum() for s in samples])
    checked, verdicts = count_flags(samples, probs, TAX, cfg)
    assert (checked.flags, checked.clones_caught) == (op.flags, op.clones_caught)
    assert sum(v.is_flag for v, s in zip(verdicts, samples, strict=True) if s.genuine) == op.flags


def test_fit_fits_the_temperature_on_the_genuine_samples() -> None:
    """Over-confident logits (x3) give a temperature near 3 (the fit is the NLL minimum)."""
    base = generated_samples(300, seed=2, confusion=0.2)
    scaled = [FitSample(s.logits * 3.0, s.record, s.genuine, s.label, s.level, sample_id=s.sample_id) for s in base]
    plain = fit_operating_point(base, taxonomy=TAX, target=0.05).operating_point.temperature
    hot = fit_operating_point(scaled, taxonomy=TAX, target=0.05).operating_point.temperature
    assert hot == pytest.approx(3.0 * plain, rel=1e-3)


def test_too_few_genuine_samples_never_meet_the_target_and_say_how_many_are_needed() -> None:
    """50 genuine samples cannot bound the rate at 0.1 %: met is False, and the warning gives 2,995."""
    result = fit_operating_point(generated_samples(50, seed=3, confusion=0.2), taxonomy=TAX, target=0.001)
    assert result.operating_point.met is False
    assert result.operating_point.upper_bound == pytest.approx(1 - 0.05 ** (1 / 50))
    assert result.genuine_needed == 2995
    assert "need at least 2995 genuine samples" in result.warnings[0]


def test_a_confused_model_gets_stricter_thresholds_than_a_clean_one() -> None:
    """Where genuine images are often misclassified, the fit must give up clones to keep the bound."""
    clean = fit_operating_point(generated_samples(400, seed=4), taxonomy=TAX, target=0.02).chosen
    noisy = fit_operating_point(generated_samples(400, seed=4, confusion=0.3), taxonomy=TAX, target=0.02).chosen
    assert noisy.upper_bound <= 0.02
    assert noisy.clones_caught < clean.clones_caught


def _peaked(label: int, height: float, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0.0, 0.3, 4)
    logits[label] += height
    return logits


def test_readings_of_one_vehicle_count_once_in_the_finite_sample_rule() -> None:
    """Two flagged readings of one car are one flagged car; n counts cars, not readings."""
    wrong = _peaked(2, 8.0, seed=0)  # a RENAULT CLIO registration seen as a PEUGEOT, twice
    samples = [
        FitSample(wrong, _record(0), True, 0, sample_id="car1", unit="car1"),
        FitSample(wrong, _record(0), True, 0, sample_id="car1@tight", unit="car1", reading="tight"),
        FitSample(_peaked(1, 8.0, seed=1), _record(1), True, 1, sample_id="car2"),
    ]
    probs = np.stack([np.exp(s.logits) / np.exp(s.logits).sum() for s in samples])
    point, verdicts = count_flags(samples, probs, TAX, DecisionConfig())
    assert [v.is_flag for v in verdicts] == [True, True, False]
    assert (point.flags, point.n_genuine, point.genuine_readings) == (1, 2, 3)
    assert point.upper_bound == pytest.approx(clopper_pearson_upper(1, 2))


def test_a_point_fitted_with_readings_holds_on_every_reading() -> None:
    """Readings where the box fell badly (confidently wrong makes) move the point; the plain fit flags them."""
    plain_samples = generated_samples(400, seed=1)
    genuine = [s for s in plain_samples if s.genuine]
    stressed = [
        FitSample(
            _peaked(2 if s.record.make == "RENAULT" else 0, 3.0, seed=k),
            s.record,
            True,
            s.label,
            sample_id=f"{s.sample_id}@margin",
            unit=s.sample_id,
            reading="margin",
        )
        for k, s in enumerate(genuine[:12])
    ]
    robust_samples = [replace(s, unit=s.sample_id) if s.genuine else s for s in plain_samples] + stressed
    plain = fit_operating_point(plain_samples, taxonomy=TAX, target=0.02, temperature=1.0)
    robust = fit_operating_point(robust_samples, taxonomy=TAX, target=0.02, temperature=1.0)
    assert plain.operating_point.met and robust.operating_point.met
    assert robust.operating_point.n_genuine == 400  # cars, not readings
    assert robust.chosen.genuine_readings == 412
    probs = np.stack([np.exp(s.logits) / np.exp(s.logits).sum() for s in stressed])

    def flags_on_stressed(op_thresholds: dict[str, float]) -> int:
        cfg = DecisionConfig.model_validate({**DecisionConfig().model_dump(), **op_thresholds})
        return sum(v.is_flag for v in count_flags(stressed, probs, TAX, cfg)[1])

    assert flags_on_stressed(plain.operating_point.thresholds) > 0
    assert flags_on_stressed(robust.operating_point.thresholds) <= robust.operating_point.flags
    assert robust.chosen.clones_caught <= plain.chosen.clones_caught


def test_with_readings_joins_each_reading_to_its_genuine_item(tmp_path: Path) -> None:
    """with_readings matches readings to genuine items by the sample's place; clones stay on the main reading."""
    from iaflash.agent.demo.dataset import write_dataset
    from iaflash.agent.demo.model import build_demo_bundle
    from iaflash.agent.evaluation.dataset import load_dataset
    from iaflash.agent.evaluation.evaluate import run_inference
    from iaflash.agent.evaluation.fit import samples_from_inference

    bundle, _ = build_demo_bundle(tmp_path / "bundle", per_class=4, seed=1)
    data = load_dataset(write_dataset(tmp_path / "data", per_class=3, seed=5, level=0.2))
    main = run_inference(bundle, data)
    m = bundle.manifest
    tight = run_inference(replace(bundle, manifest=replace(m, crop=replace(m.crop_spec, margin=0.0))), data)
    taxonomy = Taxonomy.from_bundle(bundle)
    samples = samples_from_inference(main, taxonomy)
    joined = with_readings(samples, [("margin=0", tight)])
    extra = joined[len(samples) :]
    assert len(extra) == sum(s.genuine for s in samples) == len(main.samples)
    assert all(s.genuine and s.reading == "margin=0" for s in extra)
    by_unit = {s.unit: s for s in joined[: len(samples)] if s.genuine}
    assert all(by_unit[s.unit].record == s.record for s in extra)
    assert all(s.unit == "" for s in joined if not s.genuine)
    assert not np.allclose(np.stack([s.logits for s in extra]), np.stack([by_unit[s.unit].logits for s in extra]))


def test_unusable_samples_are_refused_clearly() -> None:
    with pytest.raises(CalibrationError, match="no samples"):
        fit_operating_point([], taxonomy=TAX)
    clone = FitSample(np.zeros(4), _record(0), False, 1, "model")
    with pytest.raises(CalibrationError, match="no genuine sample"):
        fit_operating_point([clone], taxonomy=TAX)
    wrong = FitSample(np.zeros(3), _record(0), True, 0, sample_id="x1")
    with pytest.raises(CalibrationError, match=r"sample 0 \(x1\) has logits of shape \(3,\), the taxonomy has 4"):
        fit_operating_point([wrong], taxonomy=TAX, temperature=1.0)


# ---------------------------------------------------------------- into the signed manifest


def test_fitted_operating_point_is_written_into_a_new_bundle_and_read_back(tmp_path: Path) -> None:
    """write_fitted_bundle: the manifest carries the operating point and its temperature; it loads back equal."""
    source = make_bundle(tmp_path / "src", labels=LABELS)
    op = fit_operating_point(generated_samples(300, seed=5), taxonomy=TAX, target=0.02).operating_point
    new = write_fitted_bundle(source, op, tmp_path / "fitted")
    again = load_bundle(new.path)
    assert again.manifest.operating_point == op
    assert again.manifest.temperature == op.temperature
    assert again.manifest.version == "1.0.0+cal"
    assert load_bundle(source.path).manifest.operating_point is None  # old manifests still parse, without one


def test_an_edited_operating_point_is_refused(tmp_path: Path) -> None:
    """A manifest whose bound and 'met' disagree, or fitted at another temperature, is refused with a fix."""
    source = make_bundle(tmp_path / "src", labels=LABELS)
    op = fit_operating_point(generated_samples(300, seed=6), taxonomy=TAX, target=0.02).operating_point
    doc = json.loads((write_fitted_bundle(source, op, tmp_path / "f").path / "manifest.json").read_text())
    lie = {**doc, "operating_point": {**doc["operating_point"], "upper_bound": 0.5}}
    with pytest.raises(BundleError, match=r"operating_point\.met.*re-fit it"):
        Manifest.from_dict(lie)
    other_t = {**doc, "temperature": doc["temperature"] * 2}
    with pytest.raises(BundleError, match="fitted at another temperature"):
        Manifest.from_dict(other_t)
    unknown = {**doc, "operating_point": {**doc["operating_point"], "gate": 1}}
    with pytest.raises(BundleError, match=r"operating_point\.gate' is not a known key"):
        Manifest.from_dict(unknown)
    assert math.isclose(Manifest.from_dict(doc).operating_point.upper_bound, op.upper_bound)  # type: ignore[union-attr]  # present


# ---------------------------------------------------------------- iaflash-agent fit, end to end on drawn photos


def test_fit_command_writes_a_bundle_whose_operating_point_the_daemon_reads(tmp_path: Path) -> None:
    """fit runs the demo dataset through the daemon's intake and model and writes the point into a new manifest."""
    from click.testing import CliRunner  # only this test drives the CLI

    from iaflash.agent.cli.main import main
    from iaflash.agent.decision.operating import decision_policy
    from iaflash.agent.demo.dataset import write_dataset
    from iaflash.agent.demo.model import build_demo_bundle

    bundle, _ = build_demo_bundle(tmp_path / "bundle", per_class=8, seed=1, fit_per_class=10)
    data = write_dataset(tmp_path / "data", per_class=12, seed=5, level=0.2)
    out = tmp_path / "fitted"
    result = CliRunner().invoke(
        main, ["fit", str(bundle.path), str(data), "--out", str(out), "--target", "0.05", "--json"]
    )
    doc = json.loads(result.stdout)
    op = load_bundle(out).manifest.operating_point
    assert op is not None
    assert doc["operating_point"] == op.to_dict()
    assert op.n_genuine == 96  # 12 drawn photos of each of the 8 classes (the 'outside' ones are unsupported)
    assert op.n_clones > 0
    assert result.exit_code == (0 if op.met else 3)
    assert doc["genuine_needed"] == genuine_needed(0.05)
    policy = decision_policy(DecisionConfig(), op)
    assert policy.cfg.min_top1 == op.thresholds["min_top1"]
    assert (policy.no_flag_reason is None) == op.met


def test_fit_command_with_robust_margins_counts_each_photo_once_over_its_readings(tmp_path: Path) -> None:
    """--robust-margin reads every genuine photo again; the point's n is still the photos."""
    from click.testing import CliRunner

    from iaflash.agent.cli.main import main
    from iaflash.agent.demo.dataset import write_dataset
    from iaflash.agent.demo.model import build_demo_bundle

    bundle, _ = build_demo_bundle(tmp_path / "bundle", per_class=8, seed=1, fit_per_class=10)
    data = write_dataset(tmp_path / "data", per_class=6, seed=5, level=0.2)
    args = ["fit", str(bundle.path), str(data), "--target", "0.05"]
    robust = CliRunner().invoke(
        main, [*args, "--out", str(tmp_path / "r"), "--json", "--robust-margin", "0", "--robust-margin", "0.25"]
    )
    doc = json.loads(robust.stdout)
    assert doc["operating_point"]["n_genuine"] == 48
    assert doc["chosen"]["genuine_readings"] == 3 * 48
    assert (
        load_bundle(tmp_path / "r").manifest.operating_point
        == Manifest.from_dict(json.loads((tmp_path / "r" / "manifest.json").read_text())).operating_point
    )
    text = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "t"), "--robust-margin", "0"])
    assert "96 genuine readings (crop margins 0 too)" in text.stdout
