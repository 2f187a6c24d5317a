"""agent.evaluation.calibrate and the ``calibrate`` command: NLL, ECE, temperature fitting, the calibrated bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_evaluation_evaluate import cli, write_demo_dataset

from iaflash.agent.decision.verdict import softmax
from iaflash.agent.demo.model import build_demo_bundle
from iaflash.agent.evaluation.calibrate import (
    CalibrationError,
    bumped_version,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
    write_calibrated_bundle,
)
from iaflash.agent.evaluation.evaluate import classified, load_dataset, run_inference
from iaflash.engines.bundle import MANIFEST_FILE, Bundle, load_bundle, sha256_file


@pytest.mark.parametrize("k", [0.5, 2.0, 4.0])
def test_fit_temperature_recovers_the_scale_of_overconfident_logits(k: float) -> None:
    """Labels drawn from softmax(true logits); the model reports true logits x k, so T = k calibrates it."""
    rng = np.random.default_rng(11)
    true_logits = rng.normal(scale=2.0, size=(6000, 10))
    p = softmax(true_logits)
    labels = (p.cumsum(axis=1) > rng.random((6000, 1))).argmax(axis=1)
    fitted = fit_temperature(true_logits * k, labels)
    assert fitted == pytest.approx(k, rel=0.05)
    assert nll(true_logits * k, labels, fitted) <= nll(true_logits * k, labels, k) + 1e-9


def test_fit_temperature_refuses_data_the_model_gets_all_right() -> None:
    """Perfect, confident predictions drive T to 0: writing that temperature would make every score 0 or 1."""
    logits = np.eye(4)[[0, 1, 2, 3, 0]] * 5.0
    with pytest.raises(CalibrationError, match="search bound"):
        fit_temperature(logits, np.array([0, 1, 2, 3, 0]))


def test_nll_of_a_uniform_prediction_is_log_of_the_class_count() -> None:
    assert nll(np.zeros((3, 4)), np.array([0, 1, 3])) == pytest.approx(math.log(4))
    assert nll(np.array([[2.0, 0.0]]), np.array([0]), temperature=2.0) == pytest.approx(math.log(1 + math.exp(-1)))


def test_ece_equals_the_hand_computed_value() -> None:
    """Confidences 0.95 (right), 0.95 (wrong), 0.70 (right), 0.45 (wrong) fall in bins 14, 14, 10, 6 of 15:
    ECE = 2/4·|0.5 − 0.95| + 1/4·|1 − 0.7| + 1/4·|0 − 0.45| = 0.225 + 0.075 + 0.1125 = 0.4125."""
    probs = np.array([[0.95, 0.05, 0.0], [0.95, 0.05, 0.0], [0.2, 0.7, 0.1], [0.45, 0.35, 0.2]])
    labels = np.array([0, 1, 1, 2])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4125)
    bins = {k: b for k, b in enumerate(reliability(probs, labels)) if b.count}
    assert {k: (b.count, b.confidence, b.accuracy) for k, b in bins.items()} == {
        14: (2, pytest.approx(0.95), 0.5),
        10: (1, pytest.approx(0.7), 1.0),
        6: (1, pytest.approx(0.45), 0.0),
    }
    assert (bins[14].lo, bins[14].hi) == (pytest.approx(14 / 15), 1.0)


def test_bad_inputs_are_refused_with_their_shapes() -> None:
    with pytest.raises(CalibrationError, match=r"got \[2, 3\] and \[3\]"):
        nll(np.zeros((2, 3)), np.zeros(3, dtype=int))
    with pytest.raises(CalibrationError, match=r"labels must lie in 0\.\.2"):
        nll(np.zeros((1, 3)), np.array([3]))


@pytest.mark.parametrize(
    ("version", "bumped"), [("1.0.0", "1.0.0+cal"), ("1.0.0+cal", "1.0.0+cal2"), ("2026.11+cal2", "2026.11+cal3")]
)
def test_calibrated_version_gets_a_cal_suffix(version: str, bumped: str) -> None:
    assert bumped_version(version) == bumped


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Path]:
    root = tmp_path_factory.mktemp("demo-cal")
    bundle, _ = build_demo_bundle(root / "bundle", per_class=8, seed=1)
    return bundle, write_demo_dataset(root / "data")


def test_calibrated_bundle_is_a_new_verified_bundle_with_the_same_model(
    tmp_path: Path, demo: tuple[Bundle, Path]
) -> None:
    source = demo[0]
    new = write_calibrated_bundle(source, 1.7, tmp_path / "cal")
    again = load_bundle(tmp_path / "cal")
    assert (again.manifest.temperature, again.manifest.version) == (1.7, "1.0.0+cal")
    assert again.model_sha256 == source.model_sha256 == sha256_file(new.model_path)
    assert again.labels == source.labels and again.manifest.preprocessing == source.manifest.preprocessing
    assert load_bundle(source.path).manifest.temperature == 1.0  # the source is untouched


def test_calibration_keeps_the_crop_contract_and_drops_a_stale_operating_point(
    tmp_path: Path, demo: tuple[Bundle, Path]
) -> None:
    """The crop contract, TTA and groups travel with the model; an operating point fitted at the
    old temperature does not (it would no longer hold), and the description says so."""
    source = demo[0]
    new = load_bundle(write_calibrated_bundle(source, 1.7, tmp_path / "cal").path)
    assert new.manifest.crop == source.manifest.crop and new.manifest.tta == source.manifest.tta
    assert new.manifest.lookalike_groups == source.manifest.lookalike_groups
    assert new.manifest.operating_point is None
    if source.manifest.operating_point is not None:
        assert "operating point was fitted at the old temperature" in new.manifest.description


def test_calibrated_bundle_is_never_written_over_the_source_or_a_used_directory(
    tmp_path: Path, demo: tuple[Bundle, Path]
) -> None:
    source = demo[0]
    before = (source.path / MANIFEST_FILE).read_bytes()
    with pytest.raises(CalibrationError, match="is the source bundle"):
        write_calibrated_bundle(source, 1.5, source.path)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    with pytest.raises(CalibrationError, match="exists and is not an empty directory"):
        write_calibrated_bundle(source, 1.5, tmp_path / "used")
    assert (source.path / MANIFEST_FILE).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["keep.txt"]


def test_calibrate_command_fits_writes_and_reports_before_and_after(tmp_path: Path, demo: tuple[Bundle, Path]) -> None:
    bundle, dataset = demo
    out = tmp_path / "calibrated"
    result = CliRunner().invoke(cli(), ["calibrate", str(bundle.path), str(dataset), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)

    inference = run_inference(bundle, load_dataset(dataset))
    ok = classified(inference)  # the night image is not classified by the daemon's intake (NaN logits)
    fitted = fit_temperature(inference.logits[ok], inference.labels[ok])
    new = load_bundle(out)
    assert new.manifest.temperature == pytest.approx(fitted) and new.manifest.temperature != 1.0
    assert (new.manifest.version, doc["version"]) == ("1.0.0+cal", "1.0.0+cal")
    assert doc["temperature"] == {"before": 1.0, "after": pytest.approx(fitted, abs=1e-6)}
    assert doc["nll"]["after"] < doc["nll"]["before"]
    assert doc["nll"]["before"] == pytest.approx(nll(inference.logits[ok], inference.labels[ok]), abs=1e-6)
    probs = softmax(inference.logits[ok], fitted)
    assert doc["ece"]["after"] == pytest.approx(expected_calibration_error(probs, inference.labels[ok]), abs=1e-6)
    assert (doc["samples"], doc["evaluated"], doc["unsupported"]) == (26, 24, 2)


def test_calibrate_command_refuses_a_used_out_directory(tmp_path: Path, demo: tuple[Bundle, Path]) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    result = CliRunner().invoke(cli(), ["calibrate", str(demo[0].path), str(demo[1]), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "exists and is not an empty directory" in result.stderr
    text = CliRunner().invoke(cli(), ["calibrate", str(demo[0].path), str(demo[1]), "--out", str(tmp_path / "y")])
    assert text.exit_code == 0 and text.stdout.startswith("temperature  1 → ")
