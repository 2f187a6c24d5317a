"""iaflash-engines keygen | pack | sign | verify, through iaflash.engines.cli.main and once as the installed script.

Exit codes: 0 ok, 1 operational error, 2 usage error, 3 check found problems.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from onnx_builders import LABELS, classifier_onnx

from iaflash.engines.bundle import MODEL_FILE, SIGNATURE_FILE, labels_csv, load_bundle
from iaflash.engines.cli import main

BUNDLE_COMMANDS = ["keygen", "pack", "sign", "verify"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A tiny classifier (dynamic batch, 8x8 input, 4 classes) and its labels.csv beside it."""
    path = tmp_path / "model.onnx"
    path.write_bytes(classifier_onnx(num_classes=len(LABELS)))
    (tmp_path / "labels.csv").write_bytes(labels_csv(LABELS))
    return path


def _ok(runner: CliRunner, args: list[str]) -> str:
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


def _keys(runner: CliRunner, tmp_path: Path) -> tuple[Path, Path]:
    """publisher.key/.pub and a trust/ store holding publisher.pub."""
    _ok(runner, ["keygen", "--out", str(tmp_path / "publisher")])
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "publisher.pub").write_bytes((tmp_path / "publisher.pub").read_bytes())
    return tmp_path / "publisher.key", trust


def _pack(runner: CliRunner, model: Path, out: Path, *extra: str) -> dict[str, object]:
    args = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "tiny",
        "--version",
        "1.0.0",
        "--out",
        str(out),
        "--json",
        *extra,
    ]
    return dict(json.loads(_ok(runner, args)))


@pytest.mark.parametrize("command", BUNDLE_COMMANDS)
def test_every_command_has_short_help_with_an_example(runner: CliRunner, command: str) -> None:
    result = runner.invoke(main, [command, "-h"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout and "iaflash-engines " + command in result.stdout


def test_group_lists_every_bundle_command(runner: CliRunner) -> None:
    out = _ok(runner, ["-h"])
    assert all(f"  {c} " in out for c in BUNDLE_COMMANDS)


def test_keygen_json_names_both_files_and_the_key_id(runner: CliRunner, tmp_path: Path) -> None:
    doc = json.loads(_ok(runner, ["keygen", "--out", str(tmp_path / "acme"), "--json"]))
    assert doc["private_key"] == str(tmp_path / "acme.key") and doc["public_key"] == str(tmp_path / "acme.pub")
    assert doc["name"] == "acme" and len(doc["key_id"]) == 16 and doc["key_id"] in (tmp_path / "acme.pub").read_text()
    assert stat.S_IMODE((tmp_path / "acme.key").stat().st_mode) == 0o600
    assert "PRIVATE" not in json.dumps(doc)


def test_keygen_refuses_to_overwrite_a_key_with_exit_1(runner: CliRunner, tmp_path: Path) -> None:
    _ok(runner, ["keygen", "--out", str(tmp_path / "acme")])
    result = runner.invoke(main, ["keygen", "--out", str(tmp_path / "acme")])
    assert result.exit_code == 1 and "acme.key already exists" in result.stderr and result.stdout == ""


def test_pack_reads_names_and_shapes_from_the_model(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    doc = _pack(
        runner,
        model,
        tmp_path / "bundle",
        "--temperature",
        "1.5",
        "--color",
        "BGR",
        "--mean",
        "0,0,0",
        "--std",
        "1,1,1",
        "--resize",
        "letterbox",
    )
    assert (doc["input_name"], doc["input_shape"], doc["output_name"]) == ("input", ["N", 3, 8, 8], "logits")
    assert doc["classes"] == len(LABELS) and doc["signature"] is None
    manifest = load_bundle(tmp_path / "bundle").manifest
    assert manifest.temperature == 1.5 and manifest.preprocessing.color_order == "BGR"
    assert manifest.preprocessing.mean == (0.0, 0.0, 0.0) and manifest.preprocessing.resize == "letterbox"


def test_pack_of_a_dynamic_size_model_needs_input_size(runner: CliRunner, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(classifier_onnx(num_classes=len(LABELS), spatial_dynamic=True))
    (tmp_path / "labels.csv").write_bytes(labels_csv(LABELS))
    args = [
        "pack",
        str(model),
        "--labels",
        str(tmp_path / "labels.csv"),
        "--name",
        "t",
        "--version",
        "1",
        "--out",
        str(tmp_path / "b"),
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "give --input-size HxW" in result.stderr
    doc = _pack(runner, model, tmp_path / "b", "--input-size", "16x24")
    assert doc["input_shape"] == ["N", 3, "H", "W"]
    assert load_bundle(tmp_path / "b").manifest.preprocessing.height == 16


@pytest.mark.parametrize(("option", "value"), [("--mean", "1,2"), ("--input-size", "224"), ("--std", "a,b,c")])
def test_pack_bad_option_values_are_usage_errors(
    runner: CliRunner, tmp_path: Path, model: Path, option: str, value: str
) -> None:
    args = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "t",
        "--version",
        "1",
        "--out",
        str(tmp_path / "b"),
        option,
        value,
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and option in result.stderr
    assert not (tmp_path / "b").exists()


def test_pack_refuses_labels_that_do_not_match_the_output(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    (model.parent / "labels.csv").write_bytes(labels_csv(LABELS[:3]))
    args = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "t",
        "--version",
        "1",
        "--out",
        str(tmp_path / "b"),
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "outputs 4 scores but" in result.stderr and "has 3 rows" in result.stderr
    assert not (tmp_path / "b").exists()


def test_pack_refuses_a_non_empty_output_directory(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.txt").write_text("x")
    args = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "t",
        "--version",
        "1",
        "--out",
        str(tmp_path / "b"),
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "is not empty" in result.stderr


def test_pack_sign_verify_flow(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    key, trust = _keys(runner, tmp_path)
    bundle = tmp_path / "bundle"
    _pack(runner, model, bundle)
    signed = json.loads(_ok(runner, ["sign", str(bundle), "--key", str(key), "--signer", "Acme Models", "--json"]))
    assert signed["kind"] == "bundle" and signed["signature"] == str(bundle / SIGNATURE_FILE)
    doc = json.loads(_ok(runner, ["verify", str(bundle), "--trust", str(trust), "--json"]))
    assert doc["ok"] is True and doc["error"] is None
    assert (doc["name"], doc["signer"], doc["key_id"]) == ("publisher", "Acme Models", signed["key_id"])
    assert doc["files"] == ["manifest.json", "labels.csv", "model.onnx"]
    text = _ok(runner, ["verify", str(bundle), "--trust", str(trust)])
    assert text.startswith(f"ok: {bundle} (bundle) signed by publisher") and "checked model.onnx" in text


def test_pack_with_sign_key_signs_the_bundle(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    key, trust = _keys(runner, tmp_path)
    doc = _pack(runner, model, tmp_path / "bundle", "--sign-key", str(key))
    assert doc["signature"] == str(tmp_path / "bundle" / SIGNATURE_FILE) and doc["key_id"]
    _ok(runner, ["verify", str(tmp_path / "bundle"), "--trust", str(trust)])


def test_verify_of_a_tampered_bundle_exits_3_with_what_and_fix(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    key, trust = _keys(runner, tmp_path)
    bundle = tmp_path / "bundle"
    _pack(runner, model, bundle, "--sign-key", str(key))
    (bundle / MODEL_FILE).write_bytes((bundle / MODEL_FILE).read_bytes() + b"\x00")
    result = runner.invoke(main, ["verify", str(bundle), "--trust", str(trust), "--json"])
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and "model.onnx sha256" in doc["error"] and "re-pack the bundle" in doc["error"]
    assert "error: model.onnx sha256" in result.stderr


def test_verify_of_an_unsigned_bundle_exits_3(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    _, trust = _keys(runner, tmp_path)
    _pack(runner, model, tmp_path / "bundle")
    result = runner.invoke(main, ["verify", str(tmp_path / "bundle"), "--trust", str(trust)])
    assert result.exit_code == 3 and "is not signed" in result.stderr and "iaflash-engines sign" in result.stderr


def test_verify_of_a_bundle_signed_by_an_untrusted_key_exits_3(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    _, trust = _keys(runner, tmp_path)
    stranger = json.loads(_ok(runner, ["keygen", "--out", str(tmp_path / "stranger"), "--json"]))
    _pack(runner, model, tmp_path / "bundle", "--sign-key", stranger["private_key"])
    result = runner.invoke(main, ["verify", str(tmp_path / "bundle"), "--trust", str(trust), "--json"])
    assert result.exit_code == 3
    assert f"key id {stranger['key_id']} which is not in the trust store" in json.loads(result.stdout)["error"]


def test_verify_with_a_broken_trust_store_is_an_operational_error(
    runner: CliRunner, tmp_path: Path, model: Path
) -> None:
    _pack(runner, model, tmp_path / "bundle")
    result = runner.invoke(main, ["verify", str(tmp_path / "bundle"), "--trust", str(tmp_path / "none")])
    assert result.exit_code == 1 and "trust store" in result.stderr


def test_sign_and_verify_a_registry_file(runner: CliRunner, tmp_path: Path) -> None:
    key, trust = _keys(runner, tmp_path)
    subset = tmp_path / "subset-000001.jsonl.gz"
    subset.write_bytes(b"\x1f\x8b fake gzip bytes")
    signed = json.loads(_ok(runner, ["sign", str(subset), "--key", str(key), "--json"]))
    assert signed == {
        "target": str(subset),
        "kind": "file",
        "signature": f"{subset}.sig",
        "key_id": signed["key_id"],
        "signer": "publisher",
    }
    doc = json.loads(_ok(runner, ["verify", str(subset), "--trust", str(trust), "--json"]))
    assert doc["ok"] is True and doc["kind"] == "file" and doc["bytes"] == subset.stat().st_size
    subset.write_bytes(b"\x1f\x8b other bytes")
    result = runner.invoke(main, ["verify", str(subset), "--trust", str(trust)])
    assert result.exit_code == 3 and "signature does not match" in result.stderr


def test_sign_with_a_missing_key_is_a_usage_error(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    result = runner.invoke(main, ["sign", str(model), "--key", str(tmp_path / "nope.key")])
    assert result.exit_code == 2 and not Path(f"{model}.sig").exists()


def test_installed_entry_point_verifies_a_bundle(tmp_path: Path, model: Path) -> None:
    """The console script, as a publisher or a technician runs it."""
    runner = CliRunner()
    key, trust = _keys(runner, tmp_path)
    _pack(runner, model, tmp_path / "bundle", "--sign-key", str(key))
    script = Path(sys.executable).parent / "iaflash-engines"
    proc = subprocess.run(
        [str(script), "verify", str(tmp_path / "bundle"), "--trust", str(trust), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "publisher"


def test_pack_detector_needs_and_embeds_a_detector_spec(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    base = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "det",
        "--version",
        "1",
        "--task",
        "detector",
    ]
    result = runner.invoke(main, [*base, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--task detector needs --detector-spec" in result.stderr
    spec = tmp_path / "detector.json"
    spec.write_text(
        json.dumps(
            {
                "format": "yolo",
                "box_format": "cxcywh",
                "normalized": False,
                "vehicle_classes": [0, 2],
                "outputs": ["logits"],
            }
        )
    )
    _ok(runner, [*base, "--out", str(tmp_path / "b"), "--detector-spec", str(spec)])
    manifest = load_bundle(tmp_path / "b").manifest
    assert manifest.task == "detector" and manifest.detector is not None
    assert manifest.detector.vehicle_classes == (0, 2)


def test_pack_with_an_unprotected_sign_key_writes_nothing(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    key, _ = _keys(runner, tmp_path)
    key.chmod(0o644)
    args = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "t",
        "--version",
        "1",
        "--out",
        str(tmp_path / "b"),
        "--sign-key",
        str(key),
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and f"chmod 600 {key}" in result.stderr
    assert not (tmp_path / "b").exists()


def test_pack_full_range_make_is_repeatable_and_recorded_in_the_manifest(
    runner: CliRunner, tmp_path: Path, model: Path
) -> None:
    doc = _pack(runner, model, tmp_path / "b", "--full-range-make", "RENAULT", "--full-range-make", "PEUGEOT")
    assert doc["full_range_makes"] == ["RENAULT", "PEUGEOT"]
    manifest = load_bundle(tmp_path / "b").manifest
    assert manifest.full_range_makes == ("RENAULT", "PEUGEOT")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["full_range_makes"] == ["RENAULT", "PEUGEOT"]


def test_pack_without_full_range_make_omits_the_field(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    doc = _pack(runner, model, tmp_path / "b")
    assert doc["full_range_makes"] == []
    assert "full_range_makes" not in json.loads((tmp_path / "b" / "manifest.json").read_text())


def test_pack_refuses_a_full_range_make_no_label_has(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    args = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "t",
        "--version",
        "1",
        "--out",
        str(tmp_path / "b"),
        "--full-range-make",
        "TOYOTA",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert "'full_range_makes' lists 'TOYOTA', the make of no label in labels.csv" in result.stderr
    assert not (tmp_path / "b").exists()


def test_pack_full_range_make_with_a_detector_is_a_usage_error(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    spec = tmp_path / "detector.json"
    spec.write_text(
        json.dumps(
            {
                "format": "yolo",
                "box_format": "cxcywh",
                "normalized": False,
                "vehicle_classes": [0],
                "outputs": ["logits"],
            }
        )
    )
    args = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "det",
        "--version",
        "1",
        "--out",
        str(tmp_path / "b"),
        "--task",
        "detector",
        "--detector-spec",
        str(spec),
        "--full-range-make",
        "RENAULT",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "--full-range-make is only for --task classifier" in result.stderr
    assert not (tmp_path / "b").exists()


def test_pack_takes_label_categories_from_the_labels_csv(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    (model.parent / "labels.csv").write_text(
        "index,make,model,aliases,category\n0,RENAULT,CLIO,,car\n1,RENAULT,MASTER,,van\n"
        "2,PEUGEOT,208,,\n3,MAN,TGX,,truck\n"
    )
    _pack(runner, model, tmp_path / "b", "--full-range-make", "RENAULT")
    bundle = load_bundle(tmp_path / "b")
    assert [lb.category for lb in bundle.labels] == ["car", "van", "", "truck"]
    assert (tmp_path / "b" / "labels.csv").read_text().splitlines()[0] == "index,make,model,aliases,category"


def test_pack_refuses_a_bad_label_category_with_its_line(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    (model.parent / "labels.csv").write_text(
        "index,make,model,aliases,category\n0,RENAULT,CLIO,,car\n1,RENAULT,MASTER,,minibus\n"
        "2,PEUGEOT,208,,\n3,MAN,TGX,,truck\n"
    )
    args = [
        "pack",
        str(model),
        "--labels",
        str(model.parent / "labels.csv"),
        "--name",
        "t",
        "--version",
        "1",
        "--out",
        str(tmp_path / "b"),
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert "labels.csv:3: category 'minibus' is not a known value" in result.stderr
    assert not (tmp_path / "b").exists()


def test_pack_writes_scale_and_the_crop_contract(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    doc = _pack(
        runner,
        model,
        tmp_path / "bundle",
        "--scale",
        "1",
        "--mean",
        "123.7,116.3,103.5",
        "--std",
        "58.4,57.1,57.4",
        "--crop-margin",
        "0",
        "--resize",
        "letterbox",
        "--interpolation",
        "linear",
        "--accept-grey",
        "--hflip-tta",
        "--ood-energy-threshold",
        "-4.5",
    )
    manifest = load_bundle(tmp_path / "bundle").manifest
    assert manifest.preprocessing.scale == 1.0 and manifest.preprocessing.resize == "letterbox"
    assert manifest.crop is not None
    assert (manifest.crop.margin, manifest.crop.aspect, manifest.crop.interpolation) == (0.0, "letterbox", "linear")
    assert manifest.crop.color_modes == ("color", "grey")
    assert manifest.tta is not None and manifest.tta.hflip is True
    assert manifest.ood is not None and (manifest.ood.threshold, manifest.ood.temperature) == (-4.5, 1.0)
    assert doc["crop"] == {
        "margin": 0.0,
        "aspect": "letterbox",
        "interpolation": "linear",
        "color_modes": ["color", "grey"],
    }
    assert doc["crop_declared"] is True and doc["tta"] == {"hflip": True}
    assert doc["preprocessing"]["scale"] == 1.0  # type: ignore[index]


def test_pack_without_crop_options_keeps_the_old_crop(runner: CliRunner, tmp_path: Path, model: Path) -> None:
    """No crop section is written: the agent applies the legacy 10 % margin, colour frames only."""
    doc = _pack(runner, model, tmp_path / "bundle")
    raw = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert not {"crop", "tta", "ood"} & set(raw)
    assert raw["preprocessing"]["scale"] == pytest.approx(1 / 255)
    assert doc["crop_declared"] is False
    assert doc["crop"] == {"margin": 0.1, "aspect": "stretch", "interpolation": "auto", "color_modes": ["color"]}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "detector", "--crop-margin", "0"], "--crop-margin: only for --task classifier"),
        (["--output-kind", "probabilities", "--ood-energy-threshold", "-3"], "needs --output-kind logits"),
        (["--crop-margin", "1.5"], "1.5 is not in the range 0<=x<=1"),
        (["--scale", "0"], "0.0 is not in the range x>0"),
    ],
)
def test_pack_crop_options_misused_are_usage_errors(
    runner: CliRunner, tmp_path: Path, model: Path, extra: list[str], message: str
) -> None:
    args = ["pack", str(model), "--labels", str(tmp_path / "labels.csv"), "--name", "t", "--version", "1"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "b"), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "b").exists()
