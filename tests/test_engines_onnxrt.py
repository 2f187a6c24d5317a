"""The backend contract (parametrised over every backend kind) and the ONNX Runtime backend."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import classifier_onnx, classifier_reference, make_bundle

import iaflash.engines
from iaflash.engines.base import BACKEND_KINDS, Backend
from iaflash.engines.bundle import Bundle, Label, sha256_file
from iaflash.engines.errors import BackendUnavailable, InferenceError, ModelLoadError
from iaflash.engines.factory import backend_availability, create_backend
from iaflash.engines.onnxrt import OnnxRuntimeBackend


@pytest.fixture(params=BACKEND_KINDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A fresh backend of each kind; kinds that cannot run here are skipped with their reason."""
    kind: str = request.param
    ok, reason = backend_availability(kind)
    if not ok:
        pytest.skip(f"{kind}: {reason}")
    b = create_backend(kind, threads=1)
    yield b
    b.close()


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "dyn", batch="N")


@pytest.fixture
def bundle_b1(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "b1", batch=1)


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------- contract, every backend


def test_specs_describe_the_loaded_model(backend: Backend, bundle: Bundle) -> None:
    backend.load(bundle)
    assert backend.input_spec.name == "input"
    assert backend.input_spec.shape[1:] == (3, 8, 8)
    assert not isinstance(backend.input_spec.shape[0], int)
    assert backend.input_spec.dtype == "float32"
    assert backend.output_spec.name == "logits"
    assert backend.output_spec.shape[-1] == 4
    assert backend.output_spec.dtype == "float32"


def test_infer_matches_numpy_reference_for_batches(backend: Backend, bundle: Bundle) -> None:
    backend.load(bundle)
    for n in (1, 3):
        batch = _batch(n, seed=n)
        out = backend.infer(batch)
        assert out.shape == (n, 4)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, classifier_reference(batch), atol=1e-5, rtol=1e-5)


def test_fixed_batch_one_model_runs_bigger_batches_row_by_row(backend: Backend, bundle_b1: Bundle) -> None:
    backend.load(bundle_b1)
    assert backend.input_spec.shape[0] == 1
    batch = _batch(5)
    out = backend.infer(batch)
    assert out.shape == (5, 4)
    np.testing.assert_allclose(out, classifier_reference(batch), atol=1e-5, rtol=1e-5)


def test_warmup_runs_a_zero_batch_whose_output_is_the_bias(backend: Backend, bundle: Bundle) -> None:
    backend.load(bundle)
    backend.warmup()
    zero_out = backend.infer(np.zeros((1, 3, 8, 8), np.float32))
    np.testing.assert_allclose(zero_out, classifier_reference(np.zeros((1, 3, 8, 8))), atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((1, 3, 8, 8), np.float64), r"expected dtype float32, got float64"),
        (np.zeros((3, 8, 8), np.float32), r"expected 4 dims \[N, 3, 8, 8\], got 3 dims \[3, 8, 8\]"),
        (np.zeros((1, 3, 8, 9), np.float32), r"expected shape \[N, 3, 8, 8\], got \[1, 3, 8, 9\]"),
        (np.zeros((1, 1, 8, 8), np.float32), r"expected shape \[N, 3, 8, 8\], got \[1, 1, 8, 8\]"),
        (np.zeros((0, 3, 8, 8), np.float32), r"expected shape \[N, 3, 8, 8\], got \[0, 3, 8, 8\]"),
    ],
    ids=["dtype", "rank", "width", "channels", "empty-batch"],
)
def test_bad_batch_raises_inference_error_with_expected_and_got(
    backend: Backend, bundle: Bundle, batch: np.ndarray, message: str
) -> None:
    backend.load(bundle)
    with pytest.raises(InferenceError, match=message):
        backend.infer(batch)


def test_infer_before_load_says_to_load_first(backend: Backend) -> None:
    with pytest.raises(InferenceError, match=r"not loaded; fix: call load\(bundle\) first"):
        backend.infer(_batch(1))


def test_corrupt_onnx_raises_model_load_error_with_path(backend: Backend, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bad", onnx_bytes=b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match=r"model\.onnx: .*fix: the file is corrupt") as info:
        backend.load(bundle)
    assert str(bundle.model_path) in str(info.value)


def test_model_file_removed_after_bundle_load_raises_model_load_error(backend: Backend, bundle: Bundle) -> None:
    bundle.model_path.unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx: model file is missing; fix: re-install"):
        backend.load(bundle)


def test_wrong_input_name_in_manifest_is_a_model_load_error_listing_names(backend: Backend, tmp_path: Path) -> None:
    onnx_bytes = classifier_onnx(input_name="pixels")
    bundle = make_bundle(tmp_path / "b", onnx_bytes=onnx_bytes)
    with pytest.raises(ModelLoadError, match=r"input_name 'input' is not in the model \(it has 'pixels'\)"):
        backend.load(bundle)


def test_label_count_differing_from_model_classes_is_refused(backend: Backend, tmp_path: Path) -> None:
    labels = (Label(0, "A", "B"), Label(1, "C", "D"))
    bundle = make_bundle(tmp_path / "b", onnx_bytes=classifier_onnx(num_classes=4), labels=labels)
    with pytest.raises(ModelLoadError, match=r"has 4 classes but labels\.csv has 2 rows"):
        backend.load(bundle)


def test_manifest_size_differing_from_model_is_refused(backend: Backend, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", height=16, width=16, onnx_bytes=classifier_onnx(height=8, width=8))
    with pytest.raises(ModelLoadError, match=r"has 8 at axis 2, manifest says 16"):
        backend.load(bundle)


def test_info_reports_kind_device_versions_and_stable_engine_key(backend: Backend, bundle: Bundle) -> None:
    backend.load(bundle)
    info = backend.info
    assert info.kind == backend.kind
    assert info.precision in {"fp32", "fp16", "int8"}
    assert info.versions
    assert len(info.engine_key) == 64
    backend.close()
    backend.load(bundle)
    assert backend.info.engine_key == info.engine_key
    assert json.loads(json.dumps(info.to_dict()))["engine_key"] == info.engine_key


def test_engine_key_changes_with_the_model(backend: Backend, tmp_path: Path) -> None:
    backend.load(make_bundle(tmp_path / "a", batch="N"))
    key_a = backend.info.engine_key
    backend.load(make_bundle(tmp_path / "b", batch=1))
    assert backend.info.engine_key != key_a


# ---------------------------------------------------------------- ONNX Runtime specifics


def test_onnxruntime_cpu_info_and_dynamic_spatial_dims_filled_from_manifest(tmp_path: Path) -> None:
    onnx_bytes = classifier_onnx(spatial_dynamic=True)
    bundle = make_bundle(tmp_path / "b", onnx_bytes=onnx_bytes)
    backend = OnnxRuntimeBackend(threads=1, providers=["CPUExecutionProvider"])
    backend.load(bundle)
    assert backend.input_spec.shape == ("N", 3, 8, 8)
    assert backend.info.device == "cpu"
    assert backend.info.precision == "fp32"
    assert set(backend.info.versions) >= {"onnxruntime"}
    backend.warmup()
    batch = _batch(2)
    np.testing.assert_allclose(backend.infer(batch), classifier_reference(batch), atol=1e-5)


def test_onnxruntime_probabilities_model_sums_to_one(tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path / "b",
        onnx_bytes=classifier_onnx(softmax=True, output_name="logits"),
        output_kind="probabilities",
    )
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(bundle)
    batch = _batch(3)
    out = backend.infer(batch)
    np.testing.assert_allclose(out.sum(axis=1), np.ones(3), atol=1e-6)
    np.testing.assert_allclose(out, classifier_reference(batch, softmax=True), atol=1e-5)


def test_onnxruntime_is_available_names_its_version() -> None:
    ok, reason = OnnxRuntimeBackend.is_available()
    assert ok is True
    assert reason.startswith("onnxruntime ")


def test_negative_threads_are_refused() -> None:
    with pytest.raises(ValueError, match="threads must be >= 0"):
        OnnxRuntimeBackend(threads=-1)


def test_bundle_sha_is_the_engine_key_input(bundle: Bundle) -> None:
    assert bundle.model_sha256 == sha256_file(bundle.model_path)


# ---------------------------------------------------------------- create_backend


def test_create_backend_onnxruntime_gives_onnxruntime() -> None:
    assert isinstance(create_backend("onnxruntime"), OnnxRuntimeBackend)


def test_create_backend_auto_falls_back_to_onnxruntime_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    ok, reason = backend_availability("tensorrt")
    if ok:
        pytest.skip("TensorRT is available here, auto does not fall back")
    with caplog.at_level(logging.INFO, logger="iaflash.engines.factory"):
        backend = create_backend("auto", threads=2)
    assert backend.kind == "onnxruntime"
    assert any("falling back to ONNX Runtime" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_create_backend_tensorrt_unavailable_says_why() -> None:
    ok, reason = backend_availability("tensorrt")
    if ok:
        pytest.skip("TensorRT is available here")
    with pytest.raises(BackendUnavailable, match=r"^TensorRT backend not available: ") as info:
        create_backend("tensorrt")
    assert reason in str(info.value)


def test_create_backend_unknown_kind_lists_the_choices() -> None:
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'openvino': choose one of auto, onnxruntime"):
        create_backend("openvino")


def test_importing_engines_does_not_import_native_libraries() -> None:
    """Checked in a fresh interpreter: onnxruntime/tensorrt are loaded only by load()/is_available()."""
    code = (
        "import sys, iaflash.engines.base, iaflash.engines.factory, iaflash.engines.onnxrt, iaflash.engines.bundle; "
        "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'pycuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert iaflash.engines.__name__ == "iaflash.engines"


def test_onnxruntime_infer_outputs_returns_every_named_output(tmp_path: Path) -> None:
    """Multi-output graphs (NMS detectors: boxes, scores, classes) get all outputs by name."""
    from onnx import TensorProto, helper

    from iaflash.engines.bundle import Label, Preprocessing, write_bundle
    from iaflash.engines.onnxrt import OnnxRuntimeBackend

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["scores"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Neg", ["scores"], ["neg"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bundle = write_bundle(
        tmp_path / "b",
        onnx_bytes=model.SerializeToString(),
        labels=[Label(0, "A", "B")],
        name="two",
        version="1",
        input_name="input",
        input_shape=("N", 3, 4, 4),
        preprocessing=Preprocessing(height=4, width=4),
        output_name="scores",
        output_kind="probabilities",
    )
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(bundle)
    x = np.full((2, 3, 4, 4), 2.0, dtype=np.float32)
    out = backend.infer_outputs(x)
    assert sorted(out) == ["neg", "scores"]
    np.testing.assert_allclose(out["scores"], [2.0, 2.0])
    np.testing.assert_allclose(out["neg"], [-2.0, -2.0])
    backend.close()
