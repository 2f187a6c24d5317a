"""The native TensorRT backend and the CUDA shim, against thin fakes of tensorrt and pycuda.

The fakes (tests/fake_trt.py) stand in only for the native libraries; the plan cache, the
runner, the buffers and the shim are the real code. The fake engine runs the bundle's ONNX
with onnxruntime, so the numbers are checked against the numpy reference. Tests marked
``gpu`` run the real thing and are skipped, with the reason, where tensorrt is missing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_trt import STATE, State, install, install_cuda_python
from onnx_builders import classifier_onnx, classifier_reference, make_bundle

from iaflash.engines.build import BuildEnv
from iaflash.engines.bundle import Bundle, Label
from iaflash.engines.cuda import available as cuda_available
from iaflash.engines.cuda import open_cuda
from iaflash.engines.errors import BackendUnavailable, CudaError, InferenceError, ModelLoadError
from iaflash.engines.factory import backend_availability, create_backend
from iaflash.engines.onnxrt import OnnxRuntimeBackend
from iaflash.engines.options import BuildOptions
from iaflash.engines.swap import SwappingBackend
from iaflash.engines.trt import TensorRTBackend

ENV = BuildEnv(
    tensorrt="10.3.0",
    cuda_runtime="12.2",
    cuda_driver="12.2",
    gpu="Orin (fake)",
    compute_capability="8.7",
    tegra_release="# R36 (release), REVISION: 3.0",
)


@pytest.fixture(params=["10.3.0", "8.6.2"], ids=["trt10", "trt8.6"])
def fake(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> State:
    """The fake tensorrt (both supported API generations) and pycuda, for this test only."""
    return install(monkeypatch, version=request.param)


@pytest.fixture
def options(tmp_path: Path) -> BuildOptions:
    return BuildOptions(precision="fp16", workspace_mb=256, max_batch=4, cache_dir=tmp_path / "engines")


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "dyn", batch="N")


@pytest.fixture
def backend(fake: State, options: BuildOptions) -> Iterator[TensorRTBackend]:
    b = TensorRTBackend(options=options, env=ENV)
    yield b
    b.close()


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


def test_importing_the_trt_modules_loads_no_native_library() -> None:
    code = (
        "import sys, iaflash.engines.trt, iaflash.engines.build, iaflash.engines.cuda, "
        "iaflash.engines.cli_build, iaflash.engines.cli; "
        "print(sorted(m for m in ('tensorrt', 'pycuda', 'cuda', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_without_tensorrt_the_backend_says_why_and_auto_is_onnxruntime(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without it
    ok, reason = TensorRTBackend.is_available()
    assert (ok, reason) == (False, "python package 'tensorrt' is not installed (on a Jetson it comes with JetPack)")
    assert backend_availability("tensorrt") == (ok, reason)
    with caplog.at_level(logging.INFO, logger="iaflash.engines.factory"):
        auto = create_backend("auto", threads=1)
    assert type(auto) is OnnxRuntimeBackend
    assert any("falling back to ONNX Runtime" in r.getMessage() for r in caplog.records)
    with pytest.raises(BackendUnavailable, match=r"^TensorRT backend not available: python package"):
        create_backend("tensorrt")


def test_with_tensorrt_and_cuda_the_backend_is_available_and_auto_swaps(fake: State) -> None:
    ok, reason = TensorRTBackend.is_available()
    assert ok is True
    assert reason.startswith("tensorrt ") and "Orin (fake) (sm_87) via pycuda, driver 12.2" in reason
    assert isinstance(create_backend("tensorrt"), TensorRTBackend)
    assert isinstance(create_backend("auto"), SwappingBackend)


def test_cuda_shim_reports_device_and_versions(fake: State) -> None:
    cuda = open_cuda()
    assert cuda.library == "pycuda"
    assert (cuda.device_name(), cuda.compute_capability()) == ("Orin (fake)", (8, 7))
    assert (cuda.driver_version(), cuda.runtime_version()) == ("12.2", "12.2")
    host = cuda.pinned_empty((2, 3), np.dtype(np.float32))
    assert host.shape == (2, 3) and host.dtype == np.float32
    cuda.close()
    assert cuda_available()[0] is True


def test_cuda_shim_over_cuda_python_copies_through_pinned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    state = install_cuda_python(monkeypatch)
    cuda = open_cuda()
    assert (cuda.library, cuda.device_name(), cuda.compute_capability()) == ("cuda-python", "Orin (fake)", (8, 7))
    assert (cuda.driver_version(), cuda.runtime_version()) == ("12.6", "12.2")
    host = cuda.pinned_empty((2, 3), np.dtype(np.float32))
    host[:] = np.arange(6, dtype=np.float32).reshape(2, 3)
    back = cuda.pinned_empty((2, 3), np.dtype(np.float32))
    stream = cuda.stream_create()
    with cuda.context():
        ptr = cuda.device_alloc(host.nbytes)
        cuda.htod_async(ptr, host, stream)
        cuda.dtoh_async(back, ptr, stream)
        cuda.stream_synchronize(stream)
    np.testing.assert_array_equal(back, host)
    with pytest.raises(CudaError, match="cudaMalloc failed: out of memory"):
        cuda.device_alloc(2 << 30)
    cuda.device_free(ptr)
    cuda.stream_destroy(stream)
    cuda.close()
    assert state.memory == {}


def test_cuda_shim_without_pycuda_or_cuda_python_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("pycuda", "cuda"):
        monkeypatch.setitem(sys.modules, name, None)
    ok, reason = cuda_available()
    assert ok is False
    assert "neither pycuda nor cuda-python is installed; fix: pip install pycuda" in reason


# ---------------------------------------------------------------- the backend contract, on the fake


def test_specs_describe_the_loaded_model(backend: TensorRTBackend, bundle: Bundle) -> None:
    backend.load(bundle)
    assert backend.input_spec.name == "input"
    assert backend.input_spec.shape == ("N", 3, 8, 8)
    assert backend.input_spec.dtype == "float32"
    assert backend.output_spec.name == "logits"
    assert backend.output_spec.shape == ("N", 4)
    assert backend.output_spec.dtype == "float32"


@pytest.mark.parametrize("n", [1, 3, 4, 9], ids=["one", "below-max", "max", "above-max-in-chunks"])
def test_infer_matches_numpy_reference_for_every_batch_size(backend: TensorRTBackend, bundle: Bundle, n: int) -> None:
    backend.load(bundle)
    batch = _batch(n, seed=n)
    out = backend.infer(batch)
    assert out.shape == (n, 4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, classifier_reference(batch), atol=1e-5, rtol=1e-5)


def test_fixed_batch_one_model_runs_bigger_batches_row_by_row(backend: TensorRTBackend, tmp_path: Path) -> None:
    backend.load(make_bundle(tmp_path / "b1", batch=1))
    assert backend.input_spec.shape == (1, 3, 8, 8)
    batch = _batch(3)
    np.testing.assert_allclose(backend.infer(batch), classifier_reference(batch), atol=1e-5)


def test_warmup_runs_a_zero_batch(backend: TensorRTBackend, bundle: Bundle) -> None:
    backend.load(bundle)
    backend.warmup()
    zero = np.zeros((1, 3, 8, 8), np.float32)
    np.testing.assert_allclose(backend.infer(zero), classifier_reference(zero), atol=1e-6)


def test_bad_batch_and_unloaded_backend_raise_inference_error(backend: TensorRTBackend, bundle: Bundle) -> None:
    with pytest.raises(InferenceError, match=r"tensorrt backend is not loaded; fix: call load\(bundle\) first"):
        backend.infer(_batch(1))
    backend.load(bundle)
    with pytest.raises(InferenceError, match=r"expected shape \[N, 3, 8, 8\], got \[1, 3, 8, 9\]"):
        backend.infer(np.zeros((1, 3, 8, 9), np.float32))


def test_info_reports_gpu_precision_versions_and_the_staleness_key(backend: TensorRTBackend, bundle: Bundle) -> None:
    backend.load(bundle)
    info = backend.info
    assert (info.kind, info.precision, info.device) == ("tensorrt", "fp16", "Orin (fake)")
    assert info.versions["tensorrt"] == "10.3.0" and info.versions["cuda_runtime"] == "12.2"
    assert len(info.engine_key) == 64
    plan = next(Path(str(backend._options.cache_dir)).glob("*.plan"))
    assert plan.name == f"tiny-classifier-1.0.0-{info.engine_key[:16]}.plan"
    backend.close()
    backend.load(bundle)
    assert backend.info.engine_key == info.engine_key
    assert STATE.builds == 1  # the second load used the cached plan


def test_corrupt_onnx_is_a_model_load_error_listing_each_parser_error(backend: TensorRTBackend, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bad", onnx_bytes=b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match=r"model\.onnx: .*fix: the file is corrupt.*; 2 parser errors:") as info:
        backend.load(bundle)
    message = str(info.value)
    assert "\n  - node -1: ModelImporter: failed to parse ONNX" in message
    assert "\n  - node -1: In node -1 (parseGraph): INVALID_GRAPH" in message
    assert str(bundle.model_path) in message


def test_missing_model_file_is_a_model_load_error(backend: TensorRTBackend, bundle: Bundle) -> None:
    bundle.model_path.unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx: model file is missing; fix: re-install"):
        backend.load(bundle)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"onnx_bytes": classifier_onnx(input_name="pixels")},
            r"input_name 'input' is not in the model \(it has 'pixels'\)",
        ),
        (
            {"onnx_bytes": classifier_onnx(num_classes=4), "labels": (Label(0, "A", "B"), Label(1, "C", "D"))},
            r"has 4 classes but labels\.csv has 2 rows",
        ),
        (
            {"height": 16, "width": 16, "onnx_bytes": classifier_onnx(height=8, width=8)},
            r"has 8 at axis 2, manifest says 16",
        ),
    ],
    ids=["input-name", "label-count", "input-size"],
)
def test_bundle_not_matching_its_model_is_refused(
    backend: TensorRTBackend, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        backend.load(make_bundle(tmp_path / "b", **kwargs))  # type: ignore[arg-type]  # test keywords


def test_engine_key_changes_with_the_model(backend: TensorRTBackend, tmp_path: Path) -> None:
    backend.load(make_bundle(tmp_path / "a", batch="N"))
    key = backend.info.engine_key
    backend.load(make_bundle(tmp_path / "b", batch=1))
    assert backend.info.engine_key != key


def test_only_the_name_based_api_exists_on_the_fake_engine(backend: TensorRTBackend, bundle: Bundle) -> None:
    """The fake has no binding API, so every other test here proves the backend never uses it."""
    backend.load(bundle)
    runner = backend._runner
    assert runner is not None
    for removed in ("execute_v2", "execute_async_v2", "set_binding_shape", "get_binding_shape"):
        assert not hasattr(runner._context, removed)
    for removed in ("get_binding_index", "num_bindings", "binding_is_input", "get_binding_shape"):
        assert not hasattr(runner._engine, removed)


def test_close_frees_every_device_buffer(backend: TensorRTBackend, bundle: Bundle) -> None:
    backend.load(bundle)
    assert len(STATE.memory) == 2  # one input, one output buffer
    backend.close()
    assert STATE.memory == {}
    assert STATE.pushes == STATE.pops


# ---------------------------------------------------------------- threads and the CUDA context


def test_infer_from_a_worker_thread_pushes_and_pops_the_primary_context(
    backend: TensorRTBackend, bundle: Bundle
) -> None:
    backend.load(bundle)  # main thread
    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    before = STATE.pushes

    def worker() -> None:
        try:
            results.extend(backend.infer(_batch(2, seed=i)) for i in range(3))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert errors == []
    np.testing.assert_allclose(results[2], classifier_reference(_batch(2, seed=2)), atol=1e-5)
    assert STATE.pushes - before == 3  # one push per infer call
    assert STATE.pushes == STATE.pops


def test_the_fake_driver_refuses_work_without_a_current_context(fake: State) -> None:
    """Why the push/pop matters: like the real driver, nothing runs in a thread with no context."""
    drv = sys.modules["pycuda.driver"]
    with pytest.raises(drv.LogicError, match="invalid device context"):
        drv.mem_alloc(16)


# ---------------------------------------------------------------- real GPU


@pytest.mark.gpu
def test_real_tensorrt_builds_and_matches_the_reference(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not importable here (no NVIDIA GPU / JetPack)")
    ok, reason = TensorRTBackend.is_available()
    if not ok:
        pytest.skip(reason)
    options = BuildOptions(precision="fp32", workspace_mb=256, max_batch=4, cache_dir=tmp_path / "engines")
    with TensorRTBackend(options=options) as backend:
        backend.load(make_bundle(tmp_path / "dyn", batch="N"))
        for n in (1, 3, 6):
            batch = _batch(n, seed=n)
            np.testing.assert_allclose(backend.infer(batch), classifier_reference(batch), atol=1e-4, rtol=1e-4)
        meta = json.loads(next((tmp_path / "engines").glob("*.json")).read_text())
        assert meta["key"] == backend.info.engine_key
