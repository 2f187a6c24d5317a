"""The vehicle localiser factory (iaflash-central train-detector): generated photos and frames, a tiny backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from click.testing import CliRunner  # noqa: E402 -- after the importorskip of torch

from iaflash.central.errors import DataError  # noqa: E402
from iaflash.central.train.detector import train_detector_command  # noqa: E402
from iaflash.central.train.detector_cache import FitConfig  # noqa: E402
from iaflash.central.train.detector_data import read_frames, read_photos  # noqa: E402
from iaflash.central.train.detector_fit import fit_head  # noqa: E402
from iaflash.central.train.detector_model import Trunk, assign, points, trunk_taps  # noqa: E402
from iaflash.central.train.detector_synth import SynthSpec, synthesise  # noqa: E402
from iaflash.central.train.lite0 import tiny  # noqa: E402

FRAME = (192, 160)


def draw_car(rng: np.random.Generator, width: int = 96) -> np.ndarray:
    """A tight side view of a car (BGR): body, cabin, window, wheels, on the photo's own light background."""
    h = int(width * rng.uniform(0.45, 0.7))
    img = np.full((h, width, 3), int(rng.integers(170, 230)), np.uint8)
    colour = tuple(int(c) for c in rng.integers(0, 255, 3))
    cv2.rectangle(img, (0, int(h * 0.35)), (width - 1, int(h * 0.85)), colour, -1)
    cv2.rectangle(img, (int(width * 0.2), 0), (int(width * 0.8), int(h * 0.4)), colour, -1)
    cv2.rectangle(img, (int(width * 0.27), int(h * 0.07)), (int(width * 0.73), int(h * 0.33)), (230, 200, 150), -1)
    for cx in (int(width * 0.22), int(width * 0.78)):
        cv2.circle(img, (cx, int(h * 0.85)), int(h * 0.14), (20, 20, 20), -1)
    return img


def write_photos(root: Path, n: int = 24, val: int = 6) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"images/{i:03d}.jpg"
        cv2.imwrite(str(root / name), draw_car(rng))
        rows.append([name, "RENAULT", "CLIO", "val" if i >= n - val else "train"])
    path = root / "labels.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "make", "model", "split"])
        w.writerows(rows)
    return path


def plain_frame(rng: np.random.Generator, with_car: bool = True) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """A grey noisy frame with (or without) one pasted car; its box as x1, y1, x2, y2."""
    frame = np.clip(rng.normal(110, 20, (FRAME[1], FRAME[0], 3)), 0, 255).astype(np.uint8)
    if not with_car:
        return frame, None
    car = draw_car(rng, int(rng.integers(70, 150)))
    h, w = car.shape[:2]
    x, y = int(rng.integers(0, FRAME[0] - w)), int(rng.integers(0, FRAME[1] - h))
    frame[y : y + h, x : x + w] = car
    return frame, (x, y, x + w, y + h)


def write_frames(root: Path, n: int = 30, val: int = 8) -> Path:
    """A LABELS CSV of frames (one car each, every fifth frame empty), the last ``val`` in split val."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        frame, box = plain_frame(rng, with_car=i % 5 != 4)
        cv2.imwrite(str(root / f"f{i:03d}.jpg"), frame)
        cells = ["", "", "", ""] if box is None else list(box)
        rows.append([f"f{i:03d}.jpg", *cells, "val" if i >= n - val else "train"])
    path = root / "frames.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "x1", "y1", "x2", "y2", "split"])
        w.writerows(rows)
    return path


TINY = ["--backbone", "tiny", "--size", "64", "--width", "16", "--batch-size", "16", "--lr", "0.01", "--threads", "1"]


def test_the_command_writes_a_signed_detector_the_daemon_path_runs_and_finds_cars(tmp_path: Path) -> None:
    """Photos + LABELS in: a signed yolo-contract bundle, judged on both held-out sets, that finds a pasted car."""
    from iaflash.agent.capture.vehicle import detect_vehicles, select_vehicle
    from iaflash.engines.detect import iou_matrix
    from iaflash.engines.factory import create_backend
    from iaflash.engines.signing import generate_keypair, load_trusted_bundle

    photos, labels = write_photos(tmp_path / "photos"), write_frames(tmp_path / "frames")
    trust = tmp_path / "trusted"
    trust.mkdir()
    key, _pub = generate_keypair(trust / "publisher")
    out = tmp_path / "bundle"
    args = [str(labels), "--synthesise-from", str(photos), "--frames", "60", "--val-frames", "12"]
    args += ["--frame-size", f"{FRAME[0]}x{FRAME[1]}", "--epochs", "40", "--out", str(out)]
    args += ["--workdir", str(tmp_path / "work"), "--key", str(key), "--trust-dir", str(trust), "--json", *TINY]
    result = CliRunner().invoke(train_detector_command, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["signed"] is True and report["train_frames"] == 60 + 22
    assert report["onnx_max_abs_diff"] <= 1e-4
    assert set(report["heldout"]) == {"labels", "synthetic"}
    held = report["heldout"]["labels"]
    assert held["frames"] == 8 and held["empty_frames"] == 2 and held["vehicles"] == 6
    for figures in report["heldout"].values():
        assert 0.0 <= figures["recall_iou90"] <= figures["recall_iou50"] <= 1.0
        assert figures["latency_ms_p50"] > 0 and figures["score_threshold"] == 0.35
    assert held["median_iou"] >= 0.5  # plain frames; a frozen random tiny trunk, 40 epochs
    assert "median IoU" in result.stderr and (tmp_path / "bundle.train-report.json").is_file()

    bundle = load_trusted_bundle(out, trust, allow_unsigned=False)
    assert bundle.manifest.task == "detector" and [(lb.make, lb.model) for lb in bundle.labels] == [("car", "car")]
    spec = bundle.manifest.detector
    assert spec is not None and (spec.format, spec.box_format, spec.normalized) == ("yolo", "xyxy", True)
    pp = bundle.manifest.preprocessing
    assert (pp.width, pp.height, pp.resize, pp.color_order) == (64, 64, "stretch", "RGB")
    backend = create_backend("onnxruntime", threads=1)
    backend.load(bundle)
    best: list[float] = []
    try:
        for seed in (7, 8, 9, 10):  # new frames like the LABELS ones, through the daemon's detector path
            frame, box = plain_frame(np.random.default_rng(seed))
            detections = detect_vehicles(frame, backend, bundle)
            assert detections, f"no vehicle found in frame {seed}"
            found = np.array([[d.x1, d.y1, d.x2, d.y2] for d in detections])
            best.append(float(iou_matrix(np.array([box]), found).max()))
            chosen = select_vehicle(
                detections, image_size=FRAME, sidecar_box=None, lane=None, direction=None, vehicle_classes=(0,)
            )
            assert chosen.source in ("detector", "none") and chosen.candidates == len(detections)
    finally:
        backend.close()
    assert float(np.median(best)) >= 0.5, best


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("f000.jpg,50,20,40,60,train", "is empty; fix: x2 > x1"),
        ("f000.jpg,a,20,40,60,train", "must be four numbers"),
        ("missing.jpg,1,2,30,40,train", "does not exist; fix: image paths are relative"),
        ("f000.jpg,1,2,30,40,test", "split 'test' is neither train nor val"),
    ],
)
def test_bad_labels_are_refused_with_the_line_and_the_fix_and_nothing_is_written(
    tmp_path: Path, row: str, message: str
) -> None:
    cv2.imwrite(str(tmp_path / "f000.jpg"), np.zeros((40, 60, 3), np.uint8))
    labels = tmp_path / "frames.csv"
    labels.write_text(f"image,x1,y1,x2,y2,split\nf000.jpg,1,2,30,30,train\n{row}\n")
    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        train_detector_command, [str(labels), "--out", str(out), "--workdir", str(tmp_path / "w")]
    )
    assert result.exit_code == 1
    assert f"{labels}:3:" in result.output and message in result.output and "fix:" in result.output
    assert not out.exists()


def test_a_box_outside_its_frame_is_refused_with_its_line(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "f000.jpg"), np.zeros((40, 60, 3), np.uint8))
    labels = tmp_path / "frames.csv"
    labels.write_text("image,x1,y1,x2,y2\nf000.jpg,1,2,300,30\n")
    args = [str(labels), "--out", str(tmp_path / "b"), "--workdir", str(tmp_path / "w"), *TINY]
    result = CliRunner().invoke(train_detector_command, args)
    assert result.exit_code == 1
    assert f"{labels}:2 " in result.output and "reaches outside the 60x40 frame" in result.output
    assert "fix:" in result.output
    assert not (tmp_path / "b").exists()


def test_an_empty_row_and_a_box_for_one_frame_are_refused_with_both_lines(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "f.jpg"), np.zeros((40, 60, 3), np.uint8))
    labels = tmp_path / "frames.csv"
    labels.write_text("image,x1,y1,x2,y2\nf.jpg,,,,\nf.jpg,1,2,30,30\n")
    with pytest.raises(DataError, match=r"frames.csv:3: .* listed again \(first on line 2\).*fix:"):
        read_frames(labels)
    labels.write_text("image,x1,y1,x2,y2\nf.jpg,1,2,30,30\nf.jpg,5,6,50,35\n")
    (frame,) = read_frames(labels)
    assert frame.boxes == ((1, 2, 30, 30), (5, 6, 50, 35)) and frame.split == "train"


def test_without_labels_or_photos_the_command_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(train_detector_command, ["--out", str(tmp_path / "b"), "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "--synthesise-from" in result.output


def test_synthesis_is_seeded_resumable_and_its_boxes_lie_in_the_frame(tmp_path: Path) -> None:
    photos = [p for p in read_photos(write_photos(tmp_path / "photos")) if p.split == "train"]
    spec = SynthSpec(width=FRAME[0], height=FRAME[1])
    a = synthesise(photos, 60, tmp_path / "a", split="train", seed=3, spec=spec)
    b = synthesise(photos, 60, tmp_path / "b", split="train", seed=3, spec=spec)
    assert [f.boxes for f in a] == [f.boxes for f in b]
    assert all(fa.path.read_bytes() == fb.path.read_bytes() for fa, fb in zip(a, b, strict=True))
    boxes = [box for f in a for box in f.boxes]
    assert any(not f.boxes for f in a) and len(boxes) > 40
    assert all(0 <= x1 < x2 <= FRAME[0] and 0 <= y1 < y2 <= FRAME[1] for x1, y1, x2, y2 in boxes)
    assert all(x2 - x1 >= 0.12 * FRAME[0] * 0.9 for x1, _, x2, _ in boxes)
    rows = (tmp_path / "a" / "rows.jsonl").read_text().splitlines()
    (tmp_path / "a" / "rows.jsonl").write_text("\n".join(rows[:50]) + "\n")  # interrupted after one chunk
    (tmp_path / "a" / a[-1].path.name).unlink()
    resumed = synthesise(photos, 60, tmp_path / "a", split="train", seed=3, spec=spec)
    assert [f.boxes for f in resumed] == [f.boxes for f in b]
    assert resumed[-1].path.read_bytes() == b[-1].path.read_bytes()
    back = read_frames(tmp_path / "a" / "labels.csv")
    assert [f.boxes for f in back] == [tuple(tuple(x) for x in f.boxes) for f in a]


def test_a_point_near_a_box_centre_is_its_positive_and_far_points_are_background() -> None:
    pts = points(64, 4)
    owner = assign(torch.tensor([[8.0, 8.0, 40.0, 32.0], [0.0, 0.0, 64.0, 64.0]]), pts, 4)
    centre = ((20 // 4) * 16) + (24 // 4)  # the cell around (24, 20), the small box's centre
    assert int(owner[centre]) == 0  # the smaller box wins where both claim the point
    assert int(owner[0]) == -1  # a corner cell is outside both central regions
    assert (owner == -1).sum() > (owner >= 0).sum()


def test_a_resumed_head_training_ends_where_an_uninterrupted_one_ends(tmp_path: Path) -> None:
    """Seeded per epoch and checkpointed: 1 epoch + a resumed run of 3 gives the weights of 3 straight epochs."""
    trunk_net = tiny(2)
    taps, channels, strides = trunk_taps(trunk_net, 64)
    trunk = Trunk(trunk_net, taps).eval()
    rng = np.random.default_rng(0)
    feats = [
        rng.standard_normal((20, 1, c, 64 // s, 64 // s)).astype(np.float16)
        for c, s in zip(channels, strides, strict=True)
    ]
    boxes = [[[[8.0, 10.0, 40.0, 50.0]]] if i % 4 else [[]] for i in range(20)]
    cfg = FitConfig(backbone="tiny", size=64, epochs=3, batch_size=8, width=8)
    kw = {"data_key": "k", "threshold": 0.35, "report": lambda _: None}
    val = ([f[:0] for f in feats], [])
    straight = fit_head(trunk, channels, strides, (feats, boxes), val, cfg, tmp_path / "a", **kw)
    fit_head(trunk, channels, strides, (feats, boxes), val, cfg, tmp_path / "b", stop_after=1, **kw)
    resumed = fit_head(trunk, channels, strides, (feats, boxes), val, cfg, tmp_path / "b", **kw)
    for (name, a), (_, b) in zip(
        straight.model.head.state_dict().items(), resumed.model.head.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="other options or other frames"):
        fit_head(trunk, channels, strides, (feats, boxes), val, cfg, tmp_path / "b", **{**kw, "data_key": "x"})


def test_train_detector_is_a_central_command_with_help_and_an_example() -> None:
    from iaflash.central.cli import main

    result = CliRunner().invoke(main, ["train-detector", "-h"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "iaflash-central train-detector " in result.output
