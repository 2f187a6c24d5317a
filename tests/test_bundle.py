"""engines.bundle: round trip, sha256 verification, manifest and labels validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from onnx_builders import LABELS, classifier_onnx, make_bundle

from engines.bundle import (
    Label,
    Manifest,
    Preprocessing,
    load_bundle,
    sha256_file,
)
from engines.errors import BundleError


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
def test_bad_manifest_field_is_refused_naming_field_and_fix(
    tmp_path: Path, change: Any, message: str
) -> None:
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
