"""iaflash-central export-dataset: reviewed captures → anonymised labelled dataset (real JPEGs, a real SQLite store)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
from anonymise_scenes import make_scene
from click.testing import CliRunner
from test_central_store import an_event

from iaflash.agent.evidence.anonymise import ANONYMISER_VERSION, metadata_segments
from iaflash.central.cli import main as central_main
from iaflash.central.export import DATASET_SCHEMA
from iaflash.central.serve.store import Store
from iaflash.central.train.data import read_labels

SCENE = make_scene(480, 400)
PLATE = "AB-123-CD"


def capture(folder: Path, cid: str, *, box: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{cid}.jpg").write_bytes(SCENE.jpeg)
    sidecar = {
        "capture_id": cid,
        "plate": PLATE,
        "site_id": "site-1",
        **({"vehicle_box": list(SCENE.vehicle)} if box else {}),
    }
    (folder / f"{cid}.json").write_text(json.dumps(sidecar))


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(central_main, ["export-dataset", *args])
    return result.exit_code, result.output


def check_images_are_anonymised(out: Path, names: list[str]) -> None:
    source = cv2.imdecode(np.frombuffer(SCENE.jpeg, np.uint8), cv2.IMREAD_COLOR)
    for name in names:
        data = (out / name).read_bytes()
        assert metadata_segments(data) == []
        sent = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        for x, y, w, h in (*SCENE.third_plates, *SCENE.bystander_faces, SCENE.occupant_face):
            assert not np.all(source[y : y + h, x : x + w] == sent[y : y + h, x : x + w], axis=2).any()


def test_a_folder_of_captures_exports_anonymised_images_labels_and_a_manifest(tmp_path: Path) -> None:
    captures = tmp_path / "done"
    capture(captures, "cap-1")
    capture(captures, "cap-2", box=False)
    capture(captures, "cap-3")
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(
        "capture_id,make,model\ncap-1,renault,clio\ncap-2,peugeot,208\ncap-3,,\ncap-9,bmw,x1\n../x,bmw,x1\n"
    )
    out = tmp_path / "dataset"
    code, output = run("--captures", str(captures), "--decisions", str(decisions), "--out", str(out), "--json")
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads(output) == manifest
    assert manifest["schema"] == DATASET_SCHEMA and manifest["source"] == "folder"
    assert manifest["anonymiser"]["version"] == ANONYMISER_VERSION
    assert manifest["anonymiser"]["policy"]["mask_outside_vehicle"] is True
    assert manifest["counts"] == {
        "images": 1,
        "skipped": {"bad_capture_id": 1, "no_label": 1, "no_vehicle_box": 1, "unreadable": 1},
        "labels": {"RENAULT|CLIO": 1},
    }
    assert manifest["skipped_capture_ids"]["no_vehicle_box"] == ["cap-2"]
    rows = list(csv.reader((out / "labels.csv").read_text().splitlines()))
    x, y, w, h = SCENE.vehicle
    assert rows == [
        ["image", "make", "model", "x1", "y1", "x2", "y2"],
        ["images/cap-1.jpg", "RENAULT", "CLIO", str(x), str(y), str(x + w), str(y + h)],
    ]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    check_images_are_anonymised(out, ["images/cap-1.jpg"])
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert PLATE.encode() not in everything and b"site-1" not in everything
    [sample] = read_labels(out / "labels.csv")  # what iaflash-central train reads
    assert (sample.make, sample.model, sample.box) == ("RENAULT", "CLIO", (x, y, x + w, y + h))


def test_the_review_store_exports_flags_whose_reviewer_named_the_make_and_model(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'central.db'}"
    with Store(url) as store:
        store.migrate()
        ids = []
        for i in range(3):
            doc = an_event(capture=f"cap-{i}")
            store.ingest(doc, site="site-7", device="box-3", topic="t", payload_site=None)
            ids.append(doc["event_id"])
        store.put_evidence(ids[0], {"vehicle_box": list(SCENE.vehicle), "plate_key": "ab" * 32}, SCENE.jpeg)
        store.decide(ids[0], reviewer="ana", action="confirmed_clone", note="", make="Dacia", model="Sandero")
        store.decide(ids[1], reviewer="ana", action="false_flag", note="", make="Renault", model="Clio")  # no evidence
        store.decide(ids[2], reviewer="ana", action="cannot_tell", note="")  # no label
    out = tmp_path / "dataset"
    code, output = run("--store", url, "--out", str(out))
    assert code == 0, output
    assert "exported 1 anonymised image(s)" in output and "skipped 1: no_evidence" in output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["labels"] == {"DACIA|SANDERO": 1} and manifest["source"] == "store"
    check_images_are_anonymised(out, ["images/cap-0.jpg"])


def test_a_non_empty_output_or_a_wrong_source_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "old.txt").write_text("x")
    (tmp_path / "d.csv").write_text("capture_id,make,model\n")
    code, output = run("--captures", str(tmp_path), "--decisions", str(tmp_path / "d.csv"), "--out", str(out))
    assert code == 1 and "is not empty; fix: give a new or empty folder" in output
    code, output = run("--out", str(tmp_path / "new"))
    assert code == 2 and "give either --store URL, or --captures DIR with --decisions FILE" in output
    code, output = run(
        "--captures", str(tmp_path), "--decisions", str(tmp_path / "d.csv"), "--out", str(tmp_path / "e")
    )
    assert code == 1 and "no capture could be exported" in output
