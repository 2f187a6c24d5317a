"""agent.evaluation.evaluate and .report, the ``evaluate`` command: datasets, figures, operating curve, report.

The figures are checked on hand-made scores; the command runs end to end on the trained demo
classifier and rendered demo-fleet images, and its --json document is compared with a direct
computation through the library.
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from iaflash.agent.cli.eval import commands
from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import softmax
from iaflash.agent.demo.fleet import CLASSES, encode_jpeg, render_scene
from iaflash.agent.demo.model import build_demo_bundle
from iaflash.agent.evaluation.calibrate import expected_calibration_error, nll
from iaflash.agent.evaluation.evaluate import (
    CurvePoint,
    DatasetError,
    Inference,
    Pair,
    accuracy,
    evaluate,
    flag_rates,
    load_dataset,
    operating_curve,
    outcome_rates,
    pair_outcomes,
    recommend,
    run_inference,
    simulate_pairs,
    sweep_config,
)
from iaflash.agent.evaluation.report import render_html
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import Bundle, Label, load_bundle

NOISY_ROWS = (2, 9, 17)  # rows labelled with the next class: annotation noise, so the model makes "mistakes"
UNSUPPORTED = ("TESLA", "MODEL 3")


def cli() -> click.Group:
    """The two commands on a local group, as iaflash.agent.cli.main.main will carry them."""
    group = click.Group("iaflash-agent", commands={c.name or "": c for c in commands})
    return group


def write_demo_dataset(root: Path, images: int = 24) -> Path:
    """Demo-fleet JPEGs and a CSV with boxes: 3 noisy labels, 1 night image, 2 unsupported rows."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    rows = []
    for n in range(images):
        style = CLASSES[n % len(CLASSES)]
        image, box = render_scene(style, rng, night=n == 5)
        (root / f"img{n:03d}.jpg").write_bytes(encode_jpeg(image))
        label = CLASSES[(n + 1) % len(CLASSES)] if n in NOISY_ROWS else style
        rows.append([f"img{n:03d}.jpg", label.make, label.model, *box])
    rows += [[rows[k][0], *UNSUPPORTED, "", "", "", ""] for k in (0, 1)]
    path = root / "data.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "make", "model", "x", "y", "w", "h"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Path]:
    """The demo classifier (trained on 8 images per class) and a 26-row labelled CSV dataset."""
    root = tmp_path_factory.mktemp("demo-eval")
    bundle, _ = build_demo_bundle(root / "bundle", per_class=8, seed=1)
    return bundle, write_demo_dataset(root / "data")


# ---------------------------------------------------------------- datasets


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _jpeg(path: Path) -> Path:
    image, _ = render_scene(CLASSES[0], np.random.default_rng(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(image))
    return path


def test_csv_dataset_reads_paths_relative_to_the_csv_and_optional_boxes(tmp_path: Path) -> None:
    _jpeg(tmp_path / "imgs" / "a.jpg")
    path = _csv(
        tmp_path / "d.csv", "image,make,model,x,y,w,h\nimgs/a.jpg,RENAULT,CLIO,1,2,30,40\nimgs/a.jpg,PEUGEOT,208,,,,\n"
    )
    samples = load_dataset(path)
    assert [(s.image, s.make, s.model, s.box) for s in samples] == [
        (tmp_path / "imgs" / "a.jpg", "RENAULT", "CLIO", (1, 2, 30, 40)),
        (tmp_path / "imgs" / "a.jpg", "PEUGEOT", "208", None),
    ]
    assert samples[1].where == f"{path}:3"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "image,make,model\na.jpg,RENAULT,CLIO\nmissing.jpg,RENAULT,CLIO\n",
            r"d\.csv:3: image 'missing\.jpg' not found",
        ),
        ("image,make\na.jpg,RENAULT\n", r"d\.csv:1: missing column\(s\) model"),
        ("image,make,model,x,y\na.jpg,RENAULT,CLIO,1,2\n", r"box columns must be all of x,y,w,h"),
        ("image,make,model,x,y,w,h\na.jpg,RENAULT,CLIO,1,2,0,5\n", r"d\.csv:2: box width and height must be > 0"),
        ("image,make,model,x,y,w,h\na.jpg,RENAULT,CLIO,1,2,a,5\n", r"d\.csv:2: box .* must be four integers"),
        ("image,make,model\na.jpg,,CLIO\n", r"d\.csv:2: image, make and model must all be filled"),
        ("image,make,model\n", r"holds no labelled image"),
    ],
)
def test_bad_csv_rows_are_refused_naming_the_row(tmp_path: Path, text: str, message: str) -> None:
    _jpeg(tmp_path / "a.jpg")
    with pytest.raises(DatasetError, match=message):
        load_dataset(_csv(tmp_path / "d.csv", text))


def test_folder_dataset_takes_make_and_model_from_the_folders(tmp_path: Path) -> None:
    _jpeg(tmp_path / "RENAULT" / "CLIO" / "1.jpg")
    _jpeg(tmp_path / "PEUGEOT" / "208" / "2.JPEG")
    (tmp_path / "PEUGEOT" / "208" / "notes.txt").write_text("not an image")
    samples = load_dataset(tmp_path)
    assert [(s.make, s.model, s.image.name) for s in samples] == [
        ("PEUGEOT", "208", "2.JPEG"),
        ("RENAULT", "CLIO", "1.jpg"),
    ]


def test_folder_image_at_the_wrong_depth_is_refused(tmp_path: Path) -> None:
    _jpeg(tmp_path / "RENAULT" / "CLIO" / "1.jpg")
    stray = _jpeg(tmp_path / "RENAULT" / "stray.jpg")
    with pytest.raises(DatasetError, match=re.escape(f"{stray}: not at <make>/<model>/<image>.jpg")):
        load_dataset(tmp_path)


def test_missing_dataset_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file or directory"):
        load_dataset(tmp_path / "nope.csv")


def test_an_undecodable_image_is_refused_naming_its_row(tmp_path: Path, demo: tuple[Bundle, Path]) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    samples = load_dataset(_csv(tmp_path / "d.csv", "image,make,model\nbad.jpg,RENAULT,CLIO\n"))
    with pytest.raises(DatasetError, match=r"d\.csv:2: .*bad\.jpg: image does not start with the JPEG SOI"):
        run_inference(demo[0], samples)


# ---------------------------------------------------------------- figures on hand-made scores

LABELS = (
    Label(0, "RENAULT", "CLIO"),
    Label(1, "RENAULT", "MEGANE"),
    Label(2, "PEUGEOT", "208"),
    Label(3, "CITROEN", "C3"),
    Label(4, "DACIA", "SANDERO"),
    Label(5, "TOYOTA", "YARIS"),
    Label(6, "VOLKSWAGEN", "GOLF"),
)


def test_top1_top5_and_make_accuracy_on_hand_made_scores() -> None:
    scores = np.array(
        [
            [9, 1, 0, 0, 0, 0, 0],  # true CLIO, says CLIO: all right
            [5, 6, 0, 0, 0, 0, 0],  # true CLIO, says MEGANE: right make, CLIO in the top 5
            [9, 8, 0, 7, 6, 5, 4],  # true 208, says CLIO: wrong make, 208 ranked 7th of 7
            [0, 0, 9, 0, 0, 0, 0],  # true 208, says 208
        ],
        dtype=float,
    )
    labels = np.array([0, 0, 2, 2])
    assert accuracy(scores, labels, Taxonomy(LABELS)) == {"top1": 0.5, "top5": 0.75, "make": 0.75}


def _hand_case() -> tuple[np.ndarray, list[Pair], Taxonomy]:
    """3 images (CLIO, 208, an unsure MEGANE), each with its genuine record and hand-picked clones."""
    taxonomy = Taxonomy(LABELS[:3])
    probs = np.array([[0.90, 0.08, 0.02], [0.30, 0.04, 0.66], [0.40, 0.35, 0.25]])

    def rec(i: int) -> RegistryRecord:
        return RegistryRecord(LABELS[i].make, LABELS[i].model, None, None)

    pairs = [
        Pair(0, rec(0), False),
        Pair(0, rec(1), True),
        Pair(0, rec(2), True),
        Pair(1, rec(2), False),
        Pair(1, rec(0), True),
        Pair(1, rec(1), True),
        Pair(2, rec(1), False),
        Pair(2, rec(2), True),
    ]
    return probs, pairs, taxonomy


def test_operating_curve_matches_hand_computed_rates() -> None:
    """t=0.05: only the 208-vs-RENAULT make clone and the 4% MEGANE model clone flag (2 of 5); the unsure
    image (top-1 0.40 < min_top1) never flags. t=0.4 flags every clone of the sure images (4 of 5)
    and no genuine pair; t=0.7 also flags the genuine 208 (P(make)=0.66): 1 of 3."""
    probs, pairs, taxonomy = _hand_case()
    curve = operating_curve(probs, pairs, [None] * 3, taxonomy, DecisionConfig(), thresholds=(0.05, 0.4, 0.7))
    assert [(p.threshold, p.false_flag_rate, p.detection_rate) for p in curve] == [
        (0.05, 0.0, pytest.approx(2 / 5)),
        (0.4, 0.0, pytest.approx(4 / 5)),
        (0.7, pytest.approx(1 / 3), pytest.approx(4 / 5)),
    ]
    assert recommend(curve, 0.001) == curve[1]


def test_outcome_rates_at_a_threshold_split_genuine_and_clone_pairs() -> None:
    probs, pairs, taxonomy = _hand_case()
    outcomes = pair_outcomes(probs, pairs, [None] * 3, taxonomy, sweep_config(DecisionConfig(), 0.05))
    assert outcome_rates(outcomes, pairs) == {
        "genuine": {"inconclusive": pytest.approx(1 / 3), "match": pytest.approx(2 / 3)},
        "clone": {"inconclusive": 0.4, "match": 0.2, "mismatch/make": 0.2, "mismatch/model": 0.2},
    }
    assert flag_rates(outcomes, pairs) == (0.0, pytest.approx(0.4))


def test_a_poor_image_is_inconclusive_and_never_flags() -> None:
    probs, pairs, taxonomy = _hand_case()
    outcomes = pair_outcomes(probs, pairs[:3], ["poor image: too dark", None, None], taxonomy, DecisionConfig())
    assert outcomes == ["inconclusive"] * 3


def test_recommend_takes_best_detection_within_target_and_says_none_when_nothing_meets_it() -> None:
    curve = [
        CurvePoint(0.01, 0.0, 0.5),
        CurvePoint(0.02, 0.0, 0.7),
        CurvePoint(0.05, 0.0, 0.7),
        CurvePoint(0.1, 0.002, 0.9),
    ]
    assert recommend(curve, 0.001) == CurvePoint(0.02, 0.0, 0.7)
    assert recommend(curve, 0.005) == CurvePoint(0.1, 0.002, 0.9)
    assert recommend([CurvePoint(0.01, 0.01, 0.5)], 0.001) is None


def test_sweep_config_keeps_min_top1_and_raises_match_threshold_when_needed() -> None:
    base = DecisionConfig(min_top1=0.42, match_threshold=0.3)
    low, high = sweep_config(base, 0.01), sweep_config(base, 0.6)
    assert (low.make_threshold, low.model_threshold, low.match_threshold, low.min_top1) == (0.01, 0.01, 0.3, 0.42)
    assert (high.model_threshold, high.match_threshold, high.min_top1) == (0.6, 0.6, 0.42)


def test_simulated_clones_are_other_labels_drawn_reproducibly() -> None:
    taxonomy = Taxonomy((*LABELS[:4], Label(4, "OTHER", "VEHICLE")))
    labels = np.array([0, 1, 2, 3, 0])
    pairs = simulate_pairs(labels, taxonomy, 3, seed=7)
    assert len(pairs) == 5 * 4
    for n, y in enumerate(labels):
        mine = [p for p in pairs if p.sample == n]
        assert [(p.record.make, p.record.model) for p in mine if not p.clone] == [(LABELS[y].make, LABELS[y].model)]
        clones = {(p.record.make, p.record.model) for p in mine if p.clone}
        assert len(clones) == 3 and (LABELS[y].make, LABELS[y].model) not in clones
        assert ("OTHER", "VEHICLE") not in clones
    assert simulate_pairs(labels, taxonomy, 3, seed=7) == pairs


# ---------------------------------------------------------------- the command, end to end


def test_evaluate_command_writes_the_report_and_json_matching_a_direct_computation(
    tmp_path: Path, demo: tuple[Bundle, Path]
) -> None:
    bundle, dataset = demo
    report = tmp_path / "report.html"
    result = CliRunner().invoke(
        cli(),
        [
            "evaluate",
            str(bundle.path),
            str(dataset),
            "--out",
            str(report),
            "--json",
            "--clones-per-image",
            "3",
            "--seed",
            "5",
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)

    inference = run_inference(load_bundle(bundle.path), load_dataset(dataset))
    taxonomy, probs = Taxonomy(bundle.labels), softmax(inference.logits, 1.0)
    pairs = simulate_pairs(inference.labels, taxonomy, 3, seed=5)
    curve = operating_curve(probs, pairs, inference.image_problems, taxonomy, DecisionConfig())
    best = recommend(curve, 0.001)
    assert doc["dataset"] | {"path": None} == {
        "samples": 26,
        "evaluated": 24,
        "unsupported": 2,
        "poor_image": 1,
        "unsupported_labels": {"TESLA MODEL 3": 2},
        "path": None,
    }
    assert doc["accuracy"] == pytest.approx(accuracy(probs, inference.labels, taxonomy), abs=1e-6)
    assert doc["accuracy"]["top1"] <= 21 / 24  # the three noisy labels can't be right
    assert doc["calibration"]["ece"] == pytest.approx(expected_calibration_error(probs, inference.labels), abs=1e-6)
    assert doc["calibration"]["nll"] == pytest.approx(nll(inference.logits, inference.labels), abs=1e-6)
    assert [(p["threshold"], p["false_flag_rate"], p["detection_rate"]) for p in doc["operating_curve"]] == [
        pytest.approx((p.threshold, p.false_flag_rate, p.detection_rate), abs=1e-6) for p in curve
    ]
    assert doc["simulation"] == {"clones_per_image": 3, "seed": 5, "genuine_pairs": 24, "clone_pairs": 72}
    rec = doc["recommended"]
    assert rec["met"] is (best is not None)
    if best is not None:
        assert rec["threshold"] == pytest.approx(best.threshold)
        assert rec["sentence"].startswith("Recommended operating point: make_threshold = model_threshold = ")
    html = report.read_text()
    assert "<svg" in html and rec["sentence"] in html.replace("&lt;", "<").replace("&gt;", ">")
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(svgs) == 3 and all(ET.fromstring(s).tag.endswith("svg") for s in svgs)
    assert "http" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_report_says_so_when_no_threshold_meets_the_target(demo: tuple[Bundle, Path]) -> None:
    """A genuine image the model is sure shows another make is flagged at every threshold of the grid."""
    bundle = demo[0]
    logits = np.zeros((2, len(bundle.labels)))
    logits[0, 2], logits[1, 1] = 30.0, 30.0  # image 0 (a RENAULT CLIO) looks like a PEUGEOT 208
    samples = load_dataset(demo[1])[:2]
    inference = Inference(tuple(samples), logits, np.array([0, 1]), (None, None), ())
    doc = evaluate(bundle, inference, DecisionConfig(), target=0.001, clones_per_image=2, seed=0)
    rec = doc["recommended"]
    assert (rec["met"], rec["threshold"], rec["detection_rate"]) == (False, None, None)
    assert rec["sentence"] == (
        "No recommended operating point: no threshold in the sweep keeps the genuine "
        "false-flag rate at or below the target 0.10%; the lowest reached is 50.00% "
        "at threshold 0.0001."
    )
    assert min(p["false_flag_rate"] for p in doc["operating_curve"]) == 0.5
    html = render_html(doc)
    assert f'<p class="rec warn">{rec["sentence"]}</p>' in html
    assert "With 2 genuine pairs" in rec["notes"][0] and "at least 3000 genuine images" in rec["notes"][0]


def test_evaluate_text_output_and_exit_codes(tmp_path: Path, demo: tuple[Bundle, Path]) -> None:
    bundle, dataset = demo
    ok = CliRunner().invoke(cli(), ["evaluate", str(bundle.path), str(dataset)])
    assert ok.exit_code == 0 and "accuracy     top-1" in ok.stdout and "classifying images: 24/24" in ok.stderr
    usage = CliRunner().invoke(cli(), ["evaluate", str(bundle.path), str(dataset), "--clones-per-image", "0"])
    assert usage.exit_code == 2
    bad = _csv(tmp_path / "bad.csv", "image,make,model\nnope.jpg,RENAULT,CLIO\n")
    error = CliRunner().invoke(cli(), ["evaluate", str(bundle.path), str(bad)])
    assert error.exit_code == 1 and f"error: {bad}:2: image 'nope.jpg' not found" in error.stderr
    no_bundle = CliRunner().invoke(cli(), ["evaluate", str(tmp_path), str(dataset)])
    assert no_bundle.exit_code == 1 and "manifest.json: missing" in no_bundle.stderr


@pytest.mark.parametrize("name", ["calibrate", "evaluate"])
def test_every_command_has_help_with_an_example(name: str) -> None:
    result = CliRunner().invoke(cli(), [name, "-h"])
    assert result.exit_code == 0 and "Example:" in result.stdout and f"iaflash-agent {name}" in result.stdout
