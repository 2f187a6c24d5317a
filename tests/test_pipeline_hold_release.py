"""agent.pipeline.pipeline: every capture lets go of its models, even when the inference thread dies.

Each claimed capture holds the model set it was taken with until inference has decided it
(agent/pipeline/models.py); a reload waits for the old set's holds to drain before closing it. When
inference dies, the captures it never decides (the one an intake worker could not queue, those
left in the queue) must release their holds too, and stay in processing/ for the next start.

The classifier runs on the TensorRT backend over the fakes of the native libraries
(tests/fake_trt.py): its execution is the one thing the test controls, held on a gate until the
queue is full, then failing with what no worker survives.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_trt
import pytest
from e2e_site import Site, build_models, make_site
from waiting import wait_until

from iaflash.agent.capture.spool import Spool
from iaflash.agent.pipeline import pipeline as pipeline_module
from iaflash.agent.pipeline.pipeline import Pipeline
from iaflash.agent.registry.cache import Registry
from iaflash.agent.registry.plates import load_hmac_key
from iaflash.engines.build import BuildEnv
from iaflash.engines.bundle import load_bundle
from iaflash.engines.onnxrt import OnnxRuntimeBackend
from iaflash.engines.options import BuildOptions
from iaflash.engines.trt import TensorRTBackend

ENV = BuildEnv(
    tensorrt="10.3.0",
    cuda_runtime="12.2",
    cuda_driver="12.2",
    gpu="Orin (fake)",
    compute_capability="8.7",
    tegra_release="# R36 (release), REVISION: 3.0",
)


class NativeAbort(BaseException):
    """A failure at the native boundary that is no ``Exception``: no per-capture handler catches it."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("models"))


class Gate:
    """Holds the fake TensorRT execution until opened, then makes it fail with :class:`NativeAbort`."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def execute(self, stream_handle: int) -> bool:
        self.entered.set()
        self.opened.wait(60)
        raise NativeAbort("the device was lost")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """In place of the fake engine's ``execute_async_v3`` (the native call, nothing of ours)."""

        def execute_async_v3(context: Any, stream_handle: int) -> bool:
            return self.execute(stream_handle)

        monkeypatch.setattr(fake_trt._ExecutionContext, "execute_async_v3", execute_async_v3)


@pytest.fixture
def stalled(
    tmp_path: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Site, Pipeline, Gate, Spool]]:
    """A pipeline (one intake worker, batches of one) whose classifier is held on the gate."""
    fake_trt.install(monkeypatch)
    site = make_site(
        tmp_path / "site", models, port=1, n=30, overrides={"model": {"max_batch": 1}, "spool": {"intake_threads": 1}}
    )
    bundle = load_bundle(site.cfg.model.bundle)
    options = BuildOptions(precision="fp16", workspace_mb=256, max_batch=4, cache_dir=tmp_path / "engines")
    backend = TensorRTBackend(options=options, env=ENV)
    backend.load(bundle)
    assert site.cfg.model.detector_bundle is not None
    detector_bundle = load_bundle(site.cfg.model.detector_bundle)
    detector = OnnxRuntimeBackend(threads=1)
    detector.load(detector_bundle)
    gate = Gate()
    gate.install(monkeypatch)
    assert site.cfg.registry.hmac_key_file is not None
    key = load_hmac_key(site.cfg.registry.hmac_key_file.read_bytes().strip())
    spool = Spool(site.cfg.spool.dir, site.cfg.spool)
    spool.ensure_layout()
    registry = Registry(site.cfg.registry.db, key)
    pipe = Pipeline(site.cfg, spool, backend, bundle, registry, key, detector=(detector, detector_bundle))
    yield site, pipe, gate, spool
    gate.opened.set()
    pipe.stop()
    registry.close()
    backend.close()
    detector.close()


def _claimed(spool: Spool) -> set[str]:
    return {p.name.removesuffix(".json") for p in spool.processing.glob("*.json")}


def test_when_inference_dies_with_a_full_queue_every_hold_is_released_and_the_captures_wait_in_processing(
    stalled: tuple[Site, Pipeline, Gate, Spool],
) -> None:
    """The capture being classified, the 8 queued and the one an intake worker could not queue: 10 holds, 0 after.

    Before the fix the one dropped by ``_put`` and the 8 left in the queue kept their holds for
    ever (a reload then waited its 30 s for the old models, and stop() behind it).
    """
    site, pipe, gate, spool = stalled
    models = pipe.models
    pipe.start()
    site.drop(site.scenario)
    assert gate.entered.wait(60), "the first capture never reached the classifier"
    in_flight = 1 + pipeline_module.QUEUE_DEPTH + 1  # classified + queued + waiting in _put
    wait_until(lambda: models.users == in_flight, 60, f"{in_flight} captures holding the models")
    assert pipe.queue_depth() == pipeline_module.QUEUE_DEPTH
    claimed = _claimed(spool)
    assert len(claimed) == in_flight

    gate.opened.set()
    wait_until(lambda: pipe.fatal is not None, 30, "the inference thread to fail")
    pipe.stop()

    assert isinstance(pipe.fatal, NativeAbort)
    assert not pipe.alive()
    assert models.users == 0
    assert models.wait_idle(0.0)  # what a reload waits on before it closes the old models
    assert _claimed(spool) == claimed  # none lost, none judged: each waits in processing/ with its images
    assert not list(spool.done.iterdir())
    assert not list(spool.rejected.glob("*.json"))
    assert spool.recover(lambda _capture_id: False) == (0, len(claimed))  # the next start requeues them
    requeued = {p.name.removesuffix(".json") for p in spool.incoming.glob("*.json")}
    assert claimed <= requeued
