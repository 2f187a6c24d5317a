"""agent.evaluation.evaluate/simulate/report and ``iaflash-agent evaluate``, on generated data only.

The demo classifier (trained on drawn vehicles) is run on demo-fleet frames written as labelled
captures (sidecar + frame + truth.csv) and as labelled photos; every figure comes through the
daemon's own intake (Preparer.prepare_capture) and decision (decide).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner

from iaflash.agent.cli.eval import commands
from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.demo.fleet import CLASSES, encode_jpeg, render_scene
from iaflash.agent.demo.model import build_demo_bundle
from iaflash.agent.errors import DatasetError
from iaflash.agent.evaluation.dataset import load_dataset
from iaflash.agent.evaluation.evaluate import daemon_scores, evaluate, run_inference
from iaflash.agent.evaluation.report import render_html
from iaflash.agent.evaluation.simulate import (
    Rates,
    joint_sweep,
    pair_verdicts,
    rates,
    simulate_pairs,
    sweep_config,
    upper_bound,
)
from iaflash.engines.bundle import Bundle

NOISY = (2, 9, 17)  # photos labelled with the next class: genuine items the model will flag
UNSUPPORTED = ("TESLA", "MODEL 3")


def cli() -> click.Group:
    return click.Group("iaflash-agent", commands={c.name or "": c for c in commands})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The demo classifier, trained on 8 drawn images per class."""
    return build_demo_bundle(tmp_path_factory.mktemp("bundle") / "b", per_class=8, seed=1)[0]


def _truth_row(n: int, style_index: int) -> tuple[str, str, str, str]:
    """Every third capture genuine, then a clone of another make, then of another model of the make."""
    style = CLASSES[style_index]
    kind = ("genuine", "clone_make", "clone_model")[n % 3]
    if kind == "genuine":
        return kind, "", "", ""
    if kind == "clone_make":
        other = next(c for c in CLASSES if c.make != style.make)
        return kind, other.make, other.model, ""
    sibling = [c for c in CLASSES if c.make == style.make and c.model != style.model]
    return ("clone_model", sibling[0].make, sibling[0].model, "") if sibling else ("genuine", "", "", "")


def write_captures(root: Path, count: int = 24) -> list[dict[str, Any]]:
    """Demo frames with sidecars (half with a vehicle box) and truth.csv; returns what was written."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    written, rows = [], []
    for n in range(count):
        style_index = n % len(CLASSES)
        image, box = render_scene(CLASSES[style_index], rng)
        cid = f"cap{n:03d}"
        (root / f"{cid}.jpg").write_bytes(encode_jpeg(image))
        with_box = n % 2 == 0
        sidecar = {
            "schema_version": 1,
            "capture_id": cid,
            "site_id": "site-1",
            "captured_at": "2026-12-01T10:00:00Z",
            "plate": "AB-123-CD",
            "vehicle_box": list(box) if with_box else None,
            "images": [f"{cid}.jpg"],
        }
        (root / f"{cid}.json").write_text(json.dumps(sidecar))
        truth, reg_make, reg_model, _ = _truth_row(n, style_index)
        style = CLASSES[style_index]
        rows.append([cid, style.make, style.model, truth, reg_make, reg_model])
        written.append({"id": cid, "box": list(box) if with_box else None, "truth": truth})
    with (root / "truth.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["capture", "make", "model", "truth", "registered_make", "registered_model"])
        w.writerows(rows)
    return written


def write_demo_dataset(root: Path, images: int = 24) -> Path:
    """Demo-fleet JPEGs and a CSV with boxes: 3 noisy labels, 1 night image, 2 unsupported rows (calibrate's tests)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    rows = []
    for n in range(images):
        style = CLASSES[n % len(CLASSES)]
        image, box = render_scene(style, rng, night=n == 5)
        (root / f"img{n:03d}.jpg").write_bytes(encode_jpeg(image))
        label = CLASSES[(n + 1) % len(CLASSES)] if n in NOISY else style
        rows.append([f"img{n:03d}.jpg", label.make, label.model, *box])
    rows += [[rows[k][0], *UNSUPPORTED, "", "", "", ""] for k in (0, 1)]
    path = root / "data.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "make", "model", "x", "y", "w", "h"])
        writer.writerows(rows)
    return path


def write_photos(root: Path, count: int = 24) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(2026)
    rows = []
    for n in range(count):
        image, box = render_scene(CLASSES[n % len(CLASSES)], rng)
        (root / f"img{n:03d}.jpg").write_bytes(encode_jpeg(image))
        label = CLASSES[(n + 1) % len(CLASSES)] if n in NOISY else CLASSES[n % len(CLASSES)]
        rows.append([f"img{n:03d}.jpg", label.make, label.model, *box])
    path = root / "data.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "make", "model", "x", "y", "w", "h"])
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- the finite-sample rule


def test_met_is_judged_on_the_upper_bound_not_the_point_estimate() -> None:
    """1 flag in 1,221 genuine is a 0.08 % point estimate but a 0.39 % bound: NOT met for 0.1 %."""
    one = Rates(
        genuine=1221,
        genuine_flagged=1,
        genuine_abstained=0,
        make_clones=0,
        make_detected=0,
        model_clones=0,
        model_detected=0,
    )
    assert one.false_flag_rate < 0.001
    assert one.false_flag_upper == pytest.approx(0.00388, abs=2e-5)
    assert not one.met(0.001)
    none = Rates(1221, 0, 0, 0, 0, 0, 0)
    assert none.false_flag_upper == pytest.approx(1 - 0.05 ** (1 / 1221))
    assert none.met(0.0025) and not none.met(0.001)
    assert upper_bound(0, 0) == 1.0


def test_simulated_pairs_have_make_and_model_level_clones(bundle: Bundle) -> None:
    taxonomy = Taxonomy(bundle.labels)
    labels = np.arange(len(CLASSES))
    pairs = simulate_pairs(labels, taxonomy, clones_per_image=1, seed=0)
    for p in pairs:
        own = CLASSES[p.sample]
        if p.kind == "make":
            assert p.record.make != own.make
        elif p.kind == "model":
            assert (p.record.make, p.record.model != own.model) == (own.make, True)
    # RENAULT and PEUGEOT have two models each: 4 images get a model-level clone, all 8 a make-level one
    assert sum(p.kind == "model" for p in pairs) == 4
    assert sum(p.kind == "make" for p in pairs) == len(CLASSES)


# ---------------------------------------------------------------- captures through the daemon's path


def test_evaluate_on_labelled_captures_runs_the_daemons_intake(bundle: Bundle, tmp_path: Path) -> None:
    written = write_captures(tmp_path / "caps")
    result = CliRunner().invoke(cli(), ["evaluate", str(bundle.path), str(tmp_path / "caps"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "iaflash.evaluation/2"
    assert doc["dataset"]["kind"] == "captures"
    assert doc["dataset"]["evaluated"] == len(written)
    rows = {r["capture_id"]: r for r in doc["rows"]}
    for w in written:
        row = rows[w["id"]]
        assert row["truth"]["kind"] == {"genuine": "genuine", "clone_make": "make", "clone_model": "model"}[w["truth"]]
        if w["box"] is not None:  # the sidecar's box is the one the intake classified
            assert row["vehicle_source"] == "sidecar"
            # in frame pixels, after the reduced decode's rounding (within one reduction step)
            step = row["intake"]["decode_reduction"]
            assert all(abs(a - b) <= step for a, b in zip(row["box"], w["box"], strict=True))
        else:  # no box and no detector: the daemon classifies the whole frame
            assert row["vehicle_source"] == "none"
            assert row["box"] == [0, 0, *row["frame_size"]]
        configured = [p for p in row["pairs"] if p["point"] == "configured"]
        assert [p["kind"] for p in configured] == [row["truth"]["kind"]]
    sim = doc["simulation"]
    kinds = [r["truth"]["kind"] for r in doc["rows"]]
    assert (sim["genuine_pairs"], sim["make_pairs"], sim["model_pairs"]) == (
        kinds.count("genuine"),
        kinds.count("make"),
        kinds.count("model"),
    )


def test_json_rows_carry_image_sha256_top1_and_verdicts(bundle: Bundle, tmp_path: Path) -> None:
    data = write_photos(tmp_path / "photos")
    result = CliRunner().invoke(cli(), ["evaluate", str(bundle.path), str(data), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["rows"]) == 24
    for row in doc["rows"]:
        assert row["sha256"] == hashlib.sha256(Path(row["image"]).read_bytes()).hexdigest()
        assert row["top1"]["p"] > 0
        assert {p["kind"] for p in row["pairs"] if p["point"] == "configured"} >= {"genuine", "make"}
    assert doc["dataset"]["listing_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert doc["bundle"]["model_sha256"] == hashlib.sha256(bundle.model_path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the sweep


def test_the_joint_sweep_moves_min_top1_and_abstains_more_as_it_rises(bundle: Bundle, tmp_path: Path) -> None:
    samples = load_dataset(write_photos(tmp_path / "photos"))
    inference = run_inference(bundle, samples)
    grid = (0.0, 0.99, 0.995, 0.998)  # the demo classifier is sure of itself: top-1 p from 0.986 to 0.999
    doc = evaluate(bundle, inference, DecisionConfig(), target=0.05, min_top1_grid=grid)
    assert {p["min_top1"] for p in doc["sweep"]} == set(grid)
    at = {(p["min_top1"]): p for p in doc["sweep"] if p["make_threshold"] == 0.01 and p["model_threshold"] == 0.01}
    abstained = [at[m]["genuine_abstained"] for m in sorted(at)]
    assert abstained == sorted(abstained) and abstained[-1] > abstained[0]
    flagged = [at[m]["genuine_flagged"] for m in sorted(at)]
    assert flagged == sorted(flagged, reverse=True)


def test_sweep_counts_equal_decide_at_every_point(bundle: Bundle, tmp_path: Path) -> None:
    """The sweep is decide() itself: every point re-run alone through pair_verdicts gives the same counts."""
    samples = load_dataset(write_photos(tmp_path / "photos", count=16))
    inference = run_inference(bundle, samples)
    taxonomy = Taxonomy(bundle.labels)
    probs, problems = daemon_scores(inference, bundle.manifest)
    pairs = simulate_pairs(inference.labels, taxonomy, 1, 0)
    base = DecisionConfig.model_validate({})
    sweep = joint_sweep(probs, pairs, problems, taxonomy, base, min_top1_grid=(0.0, 0.995), threshold_grid=(0.01, 0.2))
    assert len(sweep) == 2 * 2 * 2
    for point in sweep:
        cfg = sweep_config(base, min_top1=point.min_top1, make=point.make_threshold, model=point.model_threshold)
        assert rates(pair_verdicts(probs, pairs, problems, taxonomy, cfg), pairs) == point.rates
    assert len({p.rates for p in sweep}) > 1  # the grid points differ


# ---------------------------------------------------------------- flagged genuine items, warnings, report


def test_flagged_genuine_items_are_listed_with_their_box_and_a_thumbnail(bundle: Bundle, tmp_path: Path) -> None:
    data = write_photos(tmp_path / "photos")
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli(), ["evaluate", str(bundle.path), str(data), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    flagged = doc["flagged_genuine"]["configured"]
    configured = next(p for p in doc["operating_points"] if p["name"] == "configured")
    assert len(flagged) == configured["genuine_flagged"] > 0
    noisy = {f"{data}:{n + 2}" for n in NOISY}
    assert {f["where"] for f in flagged} <= noisy | {r["where"] for r in doc["rows"] if not r["correct"]}
    for item in flagged:
        row = doc["rows"][item["index"]]
        assert item["box"] == row["box"] and item["box"] is not None
    html = out.read_text()
    assert html.count('<image href="data:image/png;base64,') >= len(flagged)
    for item in flagged:
        assert item["where"] in html


def test_a_warning_says_loudly_when_configured_thresholds_miss_the_target(bundle: Bundle, tmp_path: Path) -> None:
    data = write_photos(tmp_path / "photos")
    result = CliRunner().invoke(cli(), ["evaluate", str(bundle.path), str(data)])
    assert result.exit_code == 0, result.output
    assert "WARNING: The configured thresholds MISS the target" in result.stderr
    assert "genuine samples with no flag" in result.stderr  # 24 images cannot show 0.1 %
    assert "configured   false flags" in result.stdout


def test_report_has_a_log_false_flag_axis_and_the_target_line(bundle: Bundle, tmp_path: Path) -> None:
    samples = load_dataset(write_photos(tmp_path / "photos"))
    doc = evaluate(bundle, run_inference(bundle, samples), DecisionConfig(), target=0.01)
    html = render_html(doc)
    assert "false-flag rate on genuine (log scale)" in html
    assert "target 1%" in html
    assert "95% upper bound" in html
    assert "Most confused label pairs" in html


# ---------------------------------------------------------------- refused datasets


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "cap000,RENAULT,CLIO,stolen,,",
            r"truth\.csv:2: truth 'stolen' is not one of genuine, clone_make, clone_model",
        ),
        (
            "cap000,RENAULT,CLIO,clone_make,RENAULT,MEGANE",
            r"clone_make but the registered make 'RENAULT' is the vehicle's own",
        ),
        ("cap000,RENAULT,CLIO,clone_model,PEUGEOT,208", r"clone_model but the registered make 'PEUGEOT' differs"),
        ("cap999,RENAULT,CLIO,genuine,,", r"capture 'cap999': cannot read .*cap999\.json"),
    ],
)
def test_bad_truth_rows_are_refused_with_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    write_captures(tmp_path / "caps", count=1)
    (tmp_path / "caps" / "truth.csv").write_text(
        "capture,make,model,truth,registered_make,registered_model\n" + row + "\n"
    )
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path / "caps")


# ---------------------------------------------------------------- cross-fit


def test_cross_fit_reports_every_item_out_of_fold_and_an_unmet_fit_never_flags(bundle: Bundle, tmp_path: Path) -> None:
    data = write_photos(tmp_path / "photos")
    args = ["evaluate", str(bundle.path), str(data), "--json", "--cross-fit", "3"]
    strict = json.loads(CliRunner().invoke(cli(), args).stdout)["cross_fit"]
    assert (strict["folds"], strict["genuine"], strict["make_clones"]) == (3, 24, 24)
    assert [f["met"] for f in strict["fitted"]] == [False, False, False]  # 16 genuine cannot show 0.1 %
    assert strict["genuine_flagged"] == strict["make_detected"] == strict["model_detected"] == 0
    loose = json.loads(CliRunner().invoke(cli(), [*args, "--target-false-flag-rate", "0.5"]).stdout)
    cf = loose["cross_fit"]
    assert all(f["met"] for f in cf["fitted"])
    assert cf["make_detected"] > 0  # met points flag, out of fold
    assert {f["fold"] for f in cf["fitted"]} == {0, 1, 2}


def test_cross_fit_on_readings_counts_items_not_readings_and_needs_cross_fit(bundle: Bundle, tmp_path: Path) -> None:
    """--robust-margin reads every item again for the fits; the fits count items, the report stays one per item."""
    data = write_photos(tmp_path / "photos")
    args = ["evaluate", str(bundle.path), str(data), "--json", "--cross-fit", "3", "--target-false-flag-rate", "0.5"]
    robust = CliRunner().invoke(cli(), [*args, "--robust-margin", "0", "--robust-margin", "0.3"])
    cf = json.loads(robust.stdout)["cross_fit"]
    assert cf["readings"] == ["margin=0", "margin=0.3"]
    assert cf["genuine"] == 24  # the report: the daemon's own reading, once per item
    assert [f["n_genuine"] for f in cf["fitted"]] == [16, 16, 16]  # each fit: its 16 items, read 3 times each
    plain = json.loads(CliRunner().invoke(cli(), args).stdout)["cross_fit"]
    assert plain["readings"] == []
    bad = CliRunner().invoke(cli(), ["evaluate", str(bundle.path), str(data), "--robust-margin", "0"])
    assert bad.exit_code == 2
    assert "add --cross-fit" in bad.output


def test_cross_fit_judges_with_the_bundle_s_look_alike_groups_as_the_daemon_does(
    bundle: Bundle, tmp_path: Path
) -> None:
    """A MEGANE shown, a PEUGEOT 208 registered: a make-level flag, unless the bundle declares them look-alikes."""
    from dataclasses import replace

    from iaflash.agent.evaluation.crossfit import cross_fit
    from iaflash.agent.evaluation.evaluate import make_pairs

    inference = run_inference(bundle, load_dataset(write_photos(tmp_path / "photos")))
    twins = replace(bundle, manifest=replace(bundle.manifest, lookalike_groups=(("RENAULT MEGANE", "PEUGEOT 208"),)))
    pairs = make_pairs(inference, Taxonomy(bundle.labels), 1, 0)
    noisy = {n for n, s in enumerate(inference.samples) if s.image.name in ("img009.jpg", "img017.jpg")}

    def flagged(b: Bundle) -> set[int]:
        cf = cross_fit(inference, b, pairs, folds=3, target=0.5)
        return {p.sample for p, v in zip(cf.reported, cf.verdicts, strict=True) if not p.clone and v.is_flag}

    assert noisy & flagged(bundle)  # the daemon would flag them without the declaration
    assert not noisy & flagged(twins)


def test_fit_only_items_join_every_fold_s_fit_and_are_never_reported(bundle: Bundle, tmp_path: Path) -> None:
    """cross_fit(fit_only=...): more genuine vehicles for each fit, the report stays on the other items."""
    from iaflash.agent.evaluation.crossfit import cross_fit
    from iaflash.agent.evaluation.evaluate import make_pairs

    inference = run_inference(bundle, load_dataset(write_photos(tmp_path / "photos")))
    pairs = make_pairs(inference, Taxonomy(bundle.labels), 1, 0)
    only = [n >= 18 for n in range(len(inference.samples))]  # the last 6 of 24 only ever fit
    cf = cross_fit(inference, bundle, pairs, folds=3, target=0.5, fit_only=only)
    assert {p.sample for p in cf.reported} == set(range(18))
    assert cf.rates.genuine == 18
    assert [f["n_genuine"] for f in cf.folds] == [12 + 6, 12 + 6, 12 + 6]
    with pytest.raises(ValueError, match="fit_only has 2 entries for 24 items"):
        cross_fit(inference, bundle, pairs, folds=3, target=0.5, fit_only=[True, False])


def test_cross_fit_guard_is_each_fold_s_own_and_needs_cross_fit(bundle: Bundle, tmp_path: Path) -> None:
    """--guard G fits every fold with G; --guard auto lets each fold choose inside its own fitting set."""
    from iaflash.agent.evaluation.crossfit import cross_fit
    from iaflash.agent.evaluation.evaluate import make_pairs

    inference = run_inference(bundle, load_dataset(write_photos(tmp_path / "photos")))
    pairs = make_pairs(inference, Taxonomy(bundle.labels), 1, 0)
    fixed = cross_fit(inference, bundle, pairs, folds=3, target=0.5, guard=1.5)
    assert [f["guard"] for f in fixed.folds] == [1.5, 1.5, 1.5]
    assert not any("guard_choice" in f for f in fixed.folds)
    auto = cross_fit(inference, bundle, pairs, folds=3, target=0.5, guard="auto")
    for f in auto.folds:
        choice = f["guard_choice"]
        assert f["guard"] == choice["guard"]
        assert choice["n_genuine"] == 16  # the fold's own fitting set, never the items it reports
        assert choice["escapes"] == {} or choice["escapes"][f"{f['guard']:g}"] == min(choice["escapes"].values())
    data = write_photos(tmp_path / "cli")
    args = ["evaluate", str(bundle.path), str(data), "--json"]
    bad = CliRunner().invoke(cli(), [*args, "--guard", "2"])
    assert bad.exit_code == 2
    assert "--guard applies to the cross-fit" in bad.output
    wrong = CliRunner().invoke(cli(), [*args, "--cross-fit", "3", "--guard", "lots"])
    assert wrong.exit_code == 2
    assert "neither a number >= 1 nor 'auto'" in wrong.output
    ok = CliRunner().invoke(cli(), [*args, "--cross-fit", "3", "--target-false-flag-rate", "0.5", "--guard", "auto"])
    assert ok.exit_code in (0, 3), ok.output
    assert all("guard_choice" in f for f in json.loads(ok.stdout)["cross_fit"]["fitted"])
