"""iaflash.engines.bundle: round trip, sha256 verification, manifest and labels validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from onnx_builders import LABELS, classifier_onnx, make_bundle

from iaflash.engines.bundle import (
    DetectorSpec,
    Label,
    Manifest,
    Preprocessing,
    labels_csv,
    load_bundle,
    parse_labels,
    sha256_file,
)
from iaflash.engines.errors import BundleError


def _manifest(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return data


def _write_manifest(path: Path, data: dict[str, Any]) -> None:
    (path / "manifest.json").write_text(json.dumps(data))


def test_write_then_load_round_trips_every_field(tmp_path: Path) -> None:
    pp = Preprocessing(
        height=8,
        width=8,
        color_order="BGR",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.5, 1.0),
        scale=1.0,
        resize="letterbox",
    )
    onnx_bytes = classifier_onnx()
    written = make_bundle(
        tmp_path / "b",
        onnx_bytes=onnx_bytes,
        temperature=1.7,
        demo=True,
        description="tiny test model",
        output_kind="logits",
    )
    # Rewrite with the non-default preprocessing through the manifest to check it survives JSON.
    data = _manifest(written.path)
    data["preprocessing"] = pp.to_dict()
    _write_manifest(written.path, data)

    bundle = load_bundle(tmp_path / "b")

    assert bundle.manifest.preprocessing == pp
    assert bundle.manifest.temperature == 1.7
    assert bundle.manifest.demo is True
    assert bundle.manifest.description == "tiny test model"
    assert bundle.manifest.input_shape == ("N", 3, 8, 8)
    assert bundle.labels == LABELS
    assert bundle.labels[2].aliases == ("GOLF VII", "GOLF VIII")
    assert bundle.labels[3].name == "MERCEDES-BENZ CLASSE G"
    assert bundle.model_path == tmp_path / "b" / "model.onnx"
    assert bundle.model_sha256 == sha256_file(bundle.model_path)
    assert bundle.model_path.read_bytes() == onnx_bytes
    assert set(bundle.manifest.files) == {"model.onnx", "labels.csv"}
    assert Manifest.from_dict(bundle.manifest.to_dict()) == bundle.manifest


def test_write_bundle_leaves_no_temporary_files(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["labels.csv", "manifest.json", "model.onnx"]


def test_labels_csv_format_is_index_make_model_pipe_separated_aliases(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    lines = (bundle.path / "labels.csv").read_text().splitlines()
    assert lines[0] == "index,make,model,aliases"
    assert lines[3] == "2,VOLKSWAGEN,GOLF,GOLF VII|GOLF VIII"


def test_tampered_model_is_refused_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with bundle.model_path.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx sha256 .* does not match manifest\.json") as info:
        load_bundle(bundle.path)
    assert "re-pack the bundle" in str(info.value)
    assert bundle.model_sha256[:12] in str(info.value)


def test_tampered_labels_are_refused_naming_labels_csv(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    labels = bundle.path / "labels.csv"
    labels.write_text(labels.read_text().replace("PEUGEOT", "PEUGEOT_X"))
    with pytest.raises(BundleError, match=r"labels\.csv sha256 .* does not match"):
        load_bundle(bundle.path)


def test_missing_listed_file_is_refused_naming_it(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    bundle.model_path.unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: listed in manifest\.json but missing"):
        load_bundle(bundle.path)


def test_missing_manifest_is_refused_with_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match=r"manifest\.json: missing; fix: point at a bundle directory"):
        load_bundle(tmp_path / "b")


def test_bundle_path_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "nowhere")


def test_manifest_that_is_not_json_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle.path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_bundle(bundle.path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(colour="red"), r"field 'colour' is not a known key; fix: remove it"),
        (lambda d: d.pop("name"), r"field 'name' is missing"),
        (lambda d: d.update(schema_version=2), r"field 'schema_version' is 2, this agent reads 1"),
        (
            lambda d: d.update(task="segmenter"),
            r"field 'task' is 'segmenter', not a known value; fix: use one of",
        ),
        (lambda d: d.update(temperature=0), r"field 'temperature' must be > 0"),
        (lambda d: d.update(temperature="1"), r"field 'temperature' must be int or float"),
        (
            lambda d: d.update(input_shape=["N", 3, 9, 8]),
            r"field 'input_shape' .* preprocessing gives 8 at axis 2",
        ),
        (lambda d: d.update(input_shape=["N", 3, 8]), r"field 'input_shape' must be 4 positive ints"),
        (lambda d: d["preprocessing"].update(resize="zoom"), r"field 'resize' is 'zoom', not a known value"),
        (lambda d: d["preprocessing"].update(std=[1, 0, 1]), r"field 'preprocessing.std' must be > 0"),
        (lambda d: d["preprocessing"].update(mean=[1, 2]), r"field 'preprocessing.mean' must be a list of 3"),
        (lambda d: d["preprocessing"].update(gamma=2), r"field 'preprocessing.gamma' is not a known key"),
        (lambda d: d["files"].pop("labels.csv"), r"field 'files' does not list labels\.csv"),
        (
            lambda d: d["files"].update({"../x": "0" * 64}),
            r"field 'files' lists '\.\./x', which is not a plain",
        ),
        (
            lambda d: d["files"].update({"model.onnx": "XYZ"}),
            r"field 'files\.model\.onnx' must be a lowercase",
        ),
        (lambda d: d.update(demo="yes"), r"field 'demo' must be bool"),
    ],
    ids=[
        "unknown-key",
        "missing-name",
        "schema-version",
        "task",
        "temperature-zero",
        "temperature-string",
        "shape-vs-size",
        "shape-rank",
        "resize",
        "std-zero",
        "mean-length",
        "pp-unknown-key",
        "files-missing-labels",
        "files-path-escape",
        "files-bad-digest",
        "demo-not-bool",
    ],
)
def test_bad_manifest_field_is_refused_naming_field_and_fix(tmp_path: Path, change: Any, message: str) -> None:
    bundle = make_bundle(tmp_path / "b")
    data = _manifest(bundle.path)
    change(data)
    _write_manifest(bundle.path, data)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(bundle.path)
    assert str(info.value).startswith(str(bundle.path / "manifest.json"))
    assert "fix:" in str(info.value)


@pytest.mark.parametrize(
    ("labels_text", "message"),
    [
        ("idx,make,model,aliases\n0,A,B,\n", r"labels\.csv:1: header must be 'index,make,model,aliases'"),
        ("index,make,model,aliases\n0,A,B,\n2,C,D,\n", r"index 1 is missing; fix: renumber"),
        ("index,make,model,aliases\n0,A,B,\n0,C,D,\n", r"index 0 appears twice"),
        ("index,make,model,aliases\n0,A,B,\n1,A,B,\n", r"label 'A B' appears twice"),
        ("index,make,model,aliases\nzero,A,B,\n", r"labels\.csv:2: index 'zero' is not an integer"),
        ("index,make,model,aliases\n0,A,,\n", r"labels\.csv:2: make and model must not be empty"),
        ("index,make,model,aliases\n0,A,B\n", r"labels\.csv:2: expected 4 columns"),
        ("index,make,model,aliases\n", r"has no label rows"),
        (
            "index,make,model,aliases,category\n0,A,B,,lorry\n",
            r"labels\.csv:2: category 'lorry' is not a known value; fix: use one of car, van, truck, bus, motorcycle",
        ),
        ("index,make,model,aliases,category\n0,A,B,,Car\n", r"labels\.csv:2: category 'Car' is not a known"),
        (
            "index,make,model,aliases,category\n0,A,B,,car,extra\n",
            r"labels\.csv:2: expected 5 columns \(index,make,model,aliases,category\), got 6; fix: quote",
        ),
        (
            "index,make,model,aliases,category\n0,A,B,\n",
            r"labels\.csv:2: expected 5 columns .*, got 4",
        ),
        (
            "index,make,model,aliases\n0,A,B,,car\n",
            r"labels\.csv:2: expected 4 columns .*, got 5; fix: add ',category' to the header line",
        ),
        (
            "index,make,model,aliases,category,colour\n0,A,B,,car,red\n",
            r"labels\.csv:1: header must be 'index,make,model,aliases' optionally followed by ',category,group'",
        ),
    ],
    ids=[
        "header",
        "gap",
        "duplicate-index",
        "duplicate-name",
        "non-integer",
        "empty-model",
        "columns",
        "empty",
        "unknown-category",
        "upper-case-category",
        "six-columns",
        "category-header-short-row",
        "category-without-header",
        "six-column-header",
    ],
)
def test_bad_labels_are_refused_with_line_and_fix(tmp_path: Path, labels_text: str, message: str) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle.path / "labels.csv").write_text(labels_text)
    data = _manifest(bundle.path)
    data["files"]["labels.csv"] = sha256_file(bundle.path / "labels.csv")
    _write_manifest(bundle.path, data)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle.path)


def test_labels_rows_may_come_in_any_order_and_are_returned_by_index(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle.path / "labels.csv").write_text("index,make,model,aliases\n1,C,D,\n0,A,B, x | y \n")
    data = _manifest(bundle.path)
    data["files"]["labels.csv"] = sha256_file(bundle.path / "labels.csv")
    _write_manifest(bundle.path, data)
    labels = load_bundle(bundle.path).labels
    assert labels == (Label(0, "A", "B", ("x", "y")), Label(1, "C", "D", ()))


def test_write_bundle_refuses_bad_labels_before_writing_anything(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="index 1 is missing"):
        make_bundle(tmp_path / "b", labels=(Label(0, "A", "B"), Label(2, "C", "D")))
    assert not (tmp_path / "b").exists()


def test_verify_hook_sees_raw_manifest_bytes_and_can_refuse(tmp_path: Path) -> None:
    """The signature seam: a verifier gets manifest.json's bytes and the directory before parsing."""
    bundle = make_bundle(tmp_path / "b")
    seen: list[tuple[bytes, Path]] = []

    def verifier(raw: bytes, root: Path) -> None:
        seen.append((raw, root))
        raise BundleError(f"{root}/manifest.sig: missing; fix: sign the bundle")

    with pytest.raises(BundleError, match=r"manifest\.sig: missing"):
        load_bundle(bundle.path, verify=verifier)
    assert seen == [((bundle.path / "manifest.json").read_bytes(), bundle.path)]


def test_sha256_file_streams_a_file_larger_than_one_chunk(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"a" * (3 << 20))
    assert sha256_file(path) == hashlib.sha256(b"a" * (3 << 20)).hexdigest()


# ---------------------------------------------------------------- full_range_makes and label categories

CATEGORISED = (
    Label(0, "RENAULT", "CLIO", ("CLIO V",), "car"),
    Label(1, "RENAULT", "MASTER", (), "van"),
    Label(2, "PEUGEOT", "208"),
    Label(3, "MERCEDES-BENZ", "ACTROS", (), "truck"),
)

OLD_MANIFEST = """{{
  "schema_version": 1,
  "name": "tiny-classifier",
  "version": "1.0.0",
  "task": "classifier",
  "input_name": "input",
  "input_shape": [
    "N",
    3,
    8,
    8
  ],
  "input_dtype": "float32",
  "preprocessing": {{
    "height": 8,
    "width": 8,
    "color_order": "RGB",
    "mean": [
      0.485,
      0.456,
      0.406
    ],
    "std": [
      0.229,
      0.224,
      0.225
    ],
    "scale": 0.00392156862745098,
    "resize": "stretch"
  }},
  "output_name": "logits",
  "output_kind": "logits",
  "temperature": 1.0,
  "files": {{
    "labels.csv": "{labels}",
    "model.onnx": "{model}"
  }},
  "demo": false,
  "description": ""
}}
"""

OLD_LABELS = (
    "index,make,model,aliases\n"
    "0,RENAULT,CLIO,CLIO V\n"
    "1,PEUGEOT,208,\n"
    "2,VOLKSWAGEN,GOLF,GOLF VII|GOLF VIII\n"
    "3,MERCEDES-BENZ,CLASSE G,G-CLASS\n"
)


def test_bundle_without_new_fields_is_byte_identical_to_the_old_format(tmp_path: Path) -> None:
    """No full_range_makes and no categories: manifest.json and labels.csv are what older agents wrote
    (so existing sha256s and signatures stay valid)."""
    bundle = make_bundle(tmp_path / "b")
    labels_sha = hashlib.sha256(OLD_LABELS.encode()).hexdigest()
    assert (bundle.path / "labels.csv").read_text() == OLD_LABELS
    expected = OLD_MANIFEST.format(labels=labels_sha, model=bundle.model_sha256)
    assert (bundle.path / "manifest.json").read_text() == expected
    assert bundle.manifest.full_range_makes == ()
    assert all(label.category == "" for label in bundle.labels)


def test_old_four_column_bundle_written_by_hand_loads_unchanged(tmp_path: Path) -> None:
    """A bundle as an older packer wrote it (files placed directly, no new fields) loads, and its
    manifest serialises back to the same bytes."""
    root = tmp_path / "old"
    root.mkdir()
    onnx_bytes = classifier_onnx()
    (root / "model.onnx").write_bytes(onnx_bytes)
    (root / "labels.csv").write_text(OLD_LABELS)
    manifest_text = OLD_MANIFEST.format(
        labels=hashlib.sha256(OLD_LABELS.encode()).hexdigest(), model=hashlib.sha256(onnx_bytes).hexdigest()
    )
    (root / "manifest.json").write_text(manifest_text)
    bundle = load_bundle(root)
    assert bundle.labels == LABELS
    assert bundle.manifest.full_range_makes == ()
    assert json.dumps(bundle.manifest.to_dict(), indent=2, ensure_ascii=False) + "\n" == manifest_text
    assert labels_csv(bundle.labels).decode() == OLD_LABELS


def test_full_range_makes_and_categories_round_trip(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", labels=CATEGORISED, full_range_makes=("RENAULT", "PEUGEOT"))
    assert bundle.manifest.full_range_makes == ("RENAULT", "PEUGEOT")
    assert [label.category for label in bundle.labels] == ["car", "van", "", "truck"]
    assert bundle.labels == CATEGORISED
    assert _manifest(bundle.path)["full_range_makes"] == ["RENAULT", "PEUGEOT"]
    assert Manifest.from_dict(bundle.manifest.to_dict()) == bundle.manifest
    lines = (bundle.path / "labels.csv").read_text().splitlines()
    assert lines[0] == "index,make,model,aliases,category"
    assert lines[1:] == [
        "0,RENAULT,CLIO,CLIO V,car",
        "1,RENAULT,MASTER,,van",
        "2,PEUGEOT,208,,",
        "3,MERCEDES-BENZ,ACTROS,,truck",
    ]
    assert load_bundle(bundle.path) == bundle


def test_five_column_labels_with_no_category_load_as_empty_categories() -> None:
    labels = parse_labels("index,make,model,aliases,category\n0,A,B,x,\n1,C,D,, \n")
    assert labels == (Label(0, "A", "B", ("x",)), Label(1, "C", "D"))
    assert labels_csv(labels).decode().splitlines()[0] == "index,make,model,aliases"


def test_unknown_full_range_make_is_refused_at_load_naming_the_make_and_fix(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    data = _manifest(bundle.path)
    data["full_range_makes"] = ["RENAULT", "TOYOTA"]
    _write_manifest(bundle.path, data)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle.path)
    message = str(info.value)
    assert message.startswith(str(bundle.path / "manifest.json"))
    assert "field 'full_range_makes' lists 'TOYOTA', the make of no label in labels.csv" in message
    assert "fix: remove it, or add the labels.csv rows of its models" in message


def test_full_range_make_in_another_case_suggests_the_labels_spelling(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"lists 'Renault', .*fix: spell it 'RENAULT' as in labels\.csv"):
        make_bundle(tmp_path / "b", full_range_makes=("Renault",))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("RENAULT", r"field 'full_range_makes' must be list"),
        (["RENAULT", ""], r"field 'full_range_makes' must hold non-empty strings, got ''"),
        (["RENAULT", 3], r"field 'full_range_makes' must hold non-empty strings, got 3"),
        (["RENAULT", "RENAULT"], r"field 'full_range_makes' lists 'RENAULT' twice; fix: list each make once"),
    ],
    ids=["not-a-list", "empty-string", "not-a-string", "duplicate"],
)
def test_bad_full_range_makes_value_is_refused(tmp_path: Path, value: Any, message: str) -> None:
    bundle = make_bundle(tmp_path / "b")
    data = _manifest(bundle.path)
    data["full_range_makes"] = value
    _write_manifest(bundle.path, data)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle.path)


def test_full_range_makes_is_refused_in_a_detector_manifest(tmp_path: Path) -> None:
    spec = DetectorSpec(format="yolo", box_format="cxcywh", normalized=False, vehicle_classes=(0,), outputs=("logits",))
    with pytest.raises(BundleError, match=r"field 'full_range_makes' is only allowed for task classifier"):
        make_bundle(tmp_path / "b", task="detector", detector=spec, full_range_makes=("RENAULT",))
    assert not (tmp_path / "b").exists()


def test_explicit_empty_full_range_makes_loads_as_empty(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    data = _manifest(bundle.path)
    data["full_range_makes"] = []
    _write_manifest(bundle.path, data)
    manifest = load_bundle(bundle.path).manifest
    assert manifest.full_range_makes == ()
    assert "full_range_makes" not in manifest.to_dict()


def test_write_bundle_refuses_a_label_with_a_bad_category_before_writing(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"labels\.csv:3: category 'SUV' is not a known value"):
        make_bundle(tmp_path / "b", labels=(Label(0, "A", "B", (), "car"), Label(1, "C", "D", (), "SUV")))
    assert not (tmp_path / "b").exists()
