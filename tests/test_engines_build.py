"""Engine building: the staleness key, the plan cache, rebuilds, the background
build-and-swap, and the ``iaflash-engines build`` command (tensorrt/pycuda faked, see fake_trt.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from fake_trt import State, install
from onnx_builders import classifier_reference, make_bundle

from iaflash.engines import build as build_mod
from iaflash.engines.build import (
    BuildEnv,
    build_engine,
    cached_plan,
    plan_key,
    profile_shapes,
    staleness_key,
)
from iaflash.engines.bundle import Bundle
from iaflash.engines.cli import main
from iaflash.engines.cli_build import NO_TENSORRT
from iaflash.engines.errors import InferenceError, ModelLoadError
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
SHA = "ab" * 32
KEY_ARGS: dict[str, object] = {"precision": "fp16", "workspace_mb": 1024, "max_batch": 4, "env": ENV}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> State:
    return install(monkeypatch)


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "bundle", batch="N")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "engines"


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


def _build(bundle: Bundle, cache: Path, **kwargs: object) -> Path:
    args: dict[str, object] = {"precision": "fp16", "workspace_mb": 256, "max_batch": 4, "cache_dir": cache, "env": ENV}
    return build_engine(bundle, **{**args, **kwargs})  # type: ignore[arg-type]  # test keywords


# ---------------------------------------------------------------- staleness key


def test_staleness_key_is_the_sha256_of_canonical_json_and_stable() -> None:
    key = staleness_key(SHA, **KEY_ARGS)  # type: ignore[arg-type]  # test keywords
    doc = {
        "onnx_sha256": SHA,
        "tensorrt": "10.3.0",
        "cuda_runtime": "12.2",
        "cuda_driver": "12.2",
        "gpu": "Orin (fake)",
        "compute_capability": "8.7",
        "tegra_release": "# R36 (release), REVISION: 3.0",
        "precision": "fp16",
        "workspace_mb": 1024,
        "max_batch": 4,
        "profiles": {"*": [[1], [1], [4]]},
        "recipe": 1,
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    assert key == hashlib.sha256(canonical.encode()).hexdigest()
    assert staleness_key(SHA, **KEY_ARGS) == key  # type: ignore[arg-type]  # test keywords


@pytest.mark.parametrize(
    "change",
    [
        {"onnx": "cd" * 32},
        {"precision": "fp32"},
        {"workspace_mb": 2048},
        {"max_batch": 8},
        {"profiles": {"input": [[1, 3, 8, 8], [1, 3, 8, 8], [4, 3, 8, 8]]}},
        *({"env": {f.name: "other"}} for f in dataclasses.fields(BuildEnv)),
        {"env": {"tegra_release": None}},
    ],
    ids=lambda c: "-".join(f"{k}.{next(iter(v))}" if k == "env" else k for k, v in c.items()),
)
def test_each_input_changes_the_staleness_key(change: dict[str, object]) -> None:
    base = staleness_key(SHA, **KEY_ARGS)  # type: ignore[arg-type]  # test keywords
    args = dict(KEY_ARGS)
    if "env" in change:
        args["env"] = dataclasses.replace(ENV, **change["env"])  # type: ignore[arg-type]  # dict of fields
    args.update({k: v for k, v in change.items() if k not in {"env", "onnx"}})
    assert staleness_key(str(change.get("onnx", SHA)), **args) != base  # type: ignore[arg-type]  # test keywords


def test_recipe_version_changes_the_staleness_key(monkeypatch: pytest.MonkeyPatch) -> None:
    base = staleness_key(SHA, **KEY_ARGS)  # type: ignore[arg-type]  # test keywords
    monkeypatch.setattr(build_mod, "RECIPE_VERSION", 2)
    assert staleness_key(SHA, **KEY_ARGS) != base  # type: ignore[arg-type]  # test keywords


def test_profiles_cover_batch_one_to_max_or_the_fixed_batch(tmp_path: Path, bundle: Bundle) -> None:
    assert profile_shapes(bundle, 4) == {"input": [[1, 3, 8, 8], [1, 3, 8, 8], [4, 3, 8, 8]]}
    fixed = make_bundle(tmp_path / "b1", batch=1)
    assert profile_shapes(fixed, 4) == {"input": [[1, 3, 8, 8]] * 3}


def test_build_env_detect_reads_tensorrt_cuda_and_the_tegra_release(fake: State, tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 3.0, GCID: 1\n")
    env = BuildEnv.detect(tegra_release=release)
    assert env == BuildEnv("10.3.0", "12.2", "12.2", "Orin (fake)", "8.7", "# R36 (release), REVISION: 3.0, GCID: 1")
    assert BuildEnv.detect(tegra_release=tmp_path / "absent").tegra_release is None


# ---------------------------------------------------------------- building and the cache


def test_build_writes_the_plan_and_a_sidecar_then_the_cache_hits(fake: State, bundle: Bundle, cache: Path) -> None:
    path = _build(bundle, cache)
    key, inputs = plan_key(bundle, BuildOptions(workspace_mb=256, cache_dir=cache), ENV)
    assert path == cache / f"tiny-classifier-1.0.0-{key[:16]}.plan"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["key"] == key and meta["inputs"] == inputs and meta["precision"] == "fp16"
    assert meta["plan_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cached_plan(bundle, key, cache) == path
    assert fake.flags == {"FP16"}
    assert [p.name for p in cache.iterdir() if p.name.startswith("timing-")]  # timing cache saved


def test_a_changed_environment_makes_the_plan_stale_and_the_log_says_what_changed(
    fake: State, bundle: Bundle, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = _build(bundle, cache)
    newer = dataclasses.replace(ENV, tensorrt="10.4.0")
    key, inputs = plan_key(bundle, BuildOptions(workspace_mb=256, cache_dir=cache), newer)
    with caplog.at_level(logging.INFO, logger="iaflash.engines.build"):
        assert cached_plan(bundle, key, cache, inputs=inputs) is None
    assert f"cached plan {old} is stale (changed: tensorrt)" in caplog.text
    new = _build(bundle, cache, env=newer)
    assert new != old and not old.exists()  # the stale plan of this bundle version is removed


def test_a_sidecar_with_another_key_or_a_damaged_plan_is_not_used(
    fake: State, bundle: Bundle, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _build(bundle, cache)
    key = json.loads(path.with_suffix(".json").read_text())["key"]
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    with caplog.at_level(logging.WARNING, logger="iaflash.engines.build"):
        assert cached_plan(bundle, key, cache) is None
    assert "is damaged (sha256 differs from its sidecar)" in caplog.text
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "key": "0" * 64}))
    assert cached_plan(bundle, key, cache) is None


def test_deserialize_returning_none_discards_the_plan_and_rebuilds(
    fake: State, bundle: Bundle, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _build(bundle, cache)
    fake.deserialize_none = 1
    backend = TensorRTBackend(options=BuildOptions(workspace_mb=256, cache_dir=cache), env=ENV)
    with caplog.at_level(logging.WARNING, logger="iaflash.engines.build"):
        backend.load(bundle)
    assert fake.builds == 2
    assert "TensorRT refused cached plan" in caplog.text and "could not deserialise" in caplog.text
    np.testing.assert_allclose(backend.infer(_batch(2)), classifier_reference(_batch(2)), atol=1e-5)
    backend.close()


def test_without_building_an_unusable_plan_is_a_model_load_error(fake: State, bundle: Bundle, cache: Path) -> None:
    backend = TensorRTBackend(options=BuildOptions(workspace_mb=256, cache_dir=cache), env=ENV, build=False)
    with pytest.raises(
        ModelLoadError, match=r"no valid TensorRT plan for tiny-classifier 1\.0\.0 in .*fix: iaflash-engines build"
    ):
        backend.load(bundle)
    assert fake.builds == 0


@pytest.mark.parametrize("failure", ["raises", "returns-none"])
def test_a_failed_build_leaves_no_partial_plan(fake: State, bundle: Bundle, cache: Path, failure: str) -> None:
    if failure == "raises":
        fake.build_error = RuntimeError("out of memory in tactic 7")
    else:
        fake.build_returns_none = True
    with pytest.raises(ModelLoadError, match=r"TensorRT (failed: out of memory|could not build an engine)"):
        _build(bundle, cache)
    assert [p.name for p in cache.iterdir() if not p.name.startswith("timing-")] == []


def test_fp32_sets_no_fp16_flag_and_a_gpu_without_fast_fp16_builds_fp32(
    fake: State, bundle: Bundle, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _build(bundle, cache, precision="fp32")
    assert fake.flags == set()
    monkeypatch.setattr(sys.modules["tensorrt"].Builder, "platform_has_fast_fp16", False)
    path = _build(bundle, cache, precision="fp16")
    assert json.loads(path.with_suffix(".json").read_text())["precision"] == "fp32"


def test_int8_needs_a_calibration_set_and_feeds_every_batch(fake: State, bundle: Bundle, cache: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"int8 needs a calibration set; fix: .*--calibration"):
        _build(bundle, cache, precision="int8")
    path = _build(bundle, cache, precision="int8", calibration=[_batch(4, seed=i) for i in range(3)])
    assert fake.calibration_batches == 3
    assert fake.flags == {"INT8", "FP16"}
    assert json.loads(path.with_suffix(".json").read_text())["precision"] == "int8"
    assert [p.read_bytes() for p in cache.glob("calib-*.cache")] == [b"fake-calibration"]
    assert fake.memory == {}  # the calibrator's device buffer is freed


@pytest.mark.parametrize(("version", "build_steps"), [("10.3.0", True), ("8.6.2", False)])
def test_progress_reports_stages_and_tensorrt10_build_steps(
    monkeypatch: pytest.MonkeyPatch, bundle: Bundle, cache: Path, version: str, build_steps: bool
) -> None:
    install(monkeypatch, version=version)
    seen: list[tuple[str, float]] = []
    _build(bundle, cache, progress=lambda stage, fraction: seen.append((stage, fraction)))
    stages = [s for s, _ in seen]
    assert stages[:3] == ["parse", "configure", "build"] and stages[-2:] == ["write", "done"]
    assert [f for _, f in seen] == sorted(f for _, f in seen)
    assert (stages.count("build") > 1) is build_steps


# ---------------------------------------------------------------- serve with ONNX Runtime while building


def _swapping(cache: Path) -> SwappingBackend:
    return SwappingBackend(threads=1, options=BuildOptions(workspace_mb=256, cache_dir=cache), env=ENV)


def test_auto_serves_with_onnxruntime_then_swaps_to_tensorrt_after_the_build(
    fake: State, bundle: Bundle, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.build_gate = threading.Event()
    backend = _swapping(cache)
    with caplog.at_level(logging.INFO, logger="iaflash.engines.build"):
        backend.load(bundle)
        assert (backend.info.kind, backend.build_state) == ("onnxruntime", "building")
        np.testing.assert_allclose(backend.infer(_batch(3)), classifier_reference(_batch(3)), atol=1e-5)
        fake.build_gate.set()
        assert backend.swapped.wait(10)
    assert (backend.info.kind, backend.info.precision, backend.build_state) == ("tensorrt", "fp16", "swapped")
    np.testing.assert_allclose(backend.infer(_batch(3)), classifier_reference(_batch(3)), atol=1e-5)
    assert "swapped tiny-classifier 1.0.0 from onnxruntime to tensorrt" in caplog.text
    assert "engine build tiny-classifier 1.0.0: build" in caplog.text
    backend.close()
    assert fake.memory == {}


def test_auto_uses_a_cached_plan_at_once(fake: State, bundle: Bundle, cache: Path) -> None:
    _build(bundle, cache)
    backend = _swapping(cache)
    backend.load(bundle)
    assert (backend.info.kind, backend.build_state, fake.builds) == ("tensorrt", "swapped", 1)
    backend.close()


def test_auto_keeps_onnxruntime_when_the_build_fails_and_says_why_once(
    fake: State, bundle: Bundle, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.build_error = RuntimeError("Myelin: out of device memory")
    backend = _swapping(cache)
    with caplog.at_level(logging.WARNING, logger="iaflash.engines.build"):
        backend.load(bundle)
        assert backend.finished.wait(10)
    assert (backend.info.kind, backend.build_state) == ("onnxruntime", "failed")
    assert backend.build_error is not None and "out of device memory" in backend.build_error
    failures = [r for r in caplog.records if "staying on ONNX Runtime" in r.getMessage()]
    assert len(failures) == 1
    np.testing.assert_allclose(backend.infer(_batch(1)), classifier_reference(_batch(1)), atol=1e-5)
    backend.close()


def test_close_during_the_build_cancels_it_and_never_swaps(fake: State, bundle: Bundle, cache: Path) -> None:
    fake.build_gate = threading.Event()
    backend = _swapping(cache)
    backend.load(bundle)
    threading.Timer(0.1, fake.build_gate.set).start()
    backend.close()  # sets the stop flag; the progress monitor then asks TensorRT to cancel
    assert not backend.swapped.is_set()
    assert list(cache.glob("*.plan")) == []
    assert fake.memory == {} and fake.pushes == fake.pops


# ---------------------------------------------------------------- the CLI


def test_build_help_has_an_example() -> None:
    result = CliRunner().invoke(main, ["build", "-h"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "--precision [fp16|fp32|int8]" in result.output


def test_build_without_tensorrt_exits_1_and_points_at_the_jetson(
    monkeypatch: pytest.MonkeyPatch, bundle: Bundle
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(main, ["build", str(bundle.path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {NO_TENSORRT}"
    assert "see docs/JETSON.md" in NO_TENSORRT


def test_build_writes_a_plan_and_json_reports_key_and_path(fake: State, bundle: Bundle, cache: Path) -> None:
    args = ["build", str(bundle.path), "--cache-dir", str(cache), "--max-batch", "2", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert Path(doc["plan"]).is_file() and doc["plan"].endswith(f"-{doc['key'][:16]}.plan")
    assert (doc["cached"], doc["precision"], doc["env"]["gpu"]) == (False, "fp16", "Orin (fake)")
    assert "build: parse (0%)" in result.stderr  # plain progress lines when stderr is not a terminal
    again = json.loads(CliRunner().invoke(main, args).stdout)
    assert (again["cached"], again["key"], fake.builds) == (True, doc["key"], 1)
    forced = json.loads(CliRunner().invoke(main, [*args, "--force"]).stdout)
    assert (forced["cached"], fake.builds) == (False, 2)


def test_build_int8_without_calibration_is_a_usage_error(fake: State, bundle: Bundle) -> None:
    result = CliRunner().invoke(main, ["build", str(bundle.path), "--precision", "int8"])
    assert result.exit_code == 2
    assert "--precision int8 needs --calibration" in result.stderr


def test_build_int8_calibrates_on_a_folder_of_jpegs(fake: State, bundle: Bundle, cache: Path, tmp_path: Path) -> None:
    images = tmp_path / "captures"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        cv2.imwrite(str(images / f"{i}.jpg"), rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8))
    args = [
        "build",
        str(bundle.path),
        "--precision",
        "int8",
        "--calibration",
        str(images),
        "--max-batch",
        "2",
        "--cache-dir",
        str(cache),
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["precision"] == "int8"
    assert fake.calibration_batches == 2  # 5 images in batches of 2: the incomplete batch is left out


def test_build_of_a_broken_bundle_exits_1_with_the_reason(fake: State, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    result = CliRunner().invoke(main, ["build", str(folder), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "manifest.json" in result.stderr


def test_auto_gives_every_named_output_while_onnxruntime_serves_and_says_why_not_after_the_swap(
    fake: State, bundle: Bundle, cache: Path
) -> None:
    """Multi-output detectors work through "auto" on ONNX Runtime; on TensorRT the refusal names the fix."""
    fake.build_gate = threading.Event()
    backend = _swapping(cache)
    backend.load(bundle)
    outputs = backend.infer_outputs(_batch(2))
    np.testing.assert_allclose(outputs[bundle.manifest.output_name], classifier_reference(_batch(2)), atol=1e-5)
    fake.build_gate.set()
    assert backend.swapped.wait(10)
    with pytest.raises(InferenceError, match="export the detector with one packed output"):
        backend.infer_outputs(_batch(2))
    backend.close()
