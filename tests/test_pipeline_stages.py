"""agent.pipeline.pipeline on its own: intake workers → classifier → decision → committer, with
the real demo models, registry and spool, and no broker or service around it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_site import Site, build_models, make_site
from waiting import wait_until

from iaflash.agent.capture.spool import Spool
from iaflash.agent.outbox.store import Outbox
from iaflash.agent.pipeline.pipeline import Pipeline
from iaflash.agent.registry.cache import Registry
from iaflash.agent.registry.plates import load_hmac_key
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle, load_bundle
from iaflash.engines.onnxrt import OnnxRuntimeBackend


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("models"))


def _loaded(path: Path) -> tuple[Backend, Bundle]:
    bundle = load_bundle(path)
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(bundle)
    return backend, bundle


@pytest.fixture
def pipeline_site(tmp_path: Path, models: Path) -> Iterator[tuple[Site, Pipeline]]:
    site = make_site(tmp_path / "site", models, port=1, n=20)
    backend, bundle = _loaded(site.cfg.model.bundle)
    detector = _loaded(site.cfg.model.detector_bundle) if site.cfg.model.detector_bundle else None
    assert site.cfg.registry.hmac_key_file is not None
    key = load_hmac_key(site.cfg.registry.hmac_key_file.read_bytes().strip())
    spool = Spool(site.cfg.spool.dir, site.cfg.spool)
    spool.ensure_layout()
    registry = Registry(site.cfg.registry.db, key)
    pipe = Pipeline(site.cfg, spool, backend, bundle, registry, key, detector=detector)
    yield site, pipe
    pipe.stop()
    registry.close()


def test_every_capture_gets_its_expected_verdict_and_flags_reach_the_outbox(
    pipeline_site: tuple[Site, Pipeline],
) -> None:
    site, pipe = pipeline_site
    pipe.start()
    site.drop(site.scenario)
    wait_until(lambda: site.processed_count() >= site.expected_verdicts(), 120, "every verdict")
    wait_until(lambda: not list((site.cfg.spool.dir / "processing").iterdir()), 30, "processing/ to empty")
    with Outbox(site.cfg.outbox.db) as outbox:
        flagged = {json.loads(r.payload)["capture_id"]: json.loads(r.payload)["verdict"] for r in outbox.pending(100)}
    expected = site.expected_flags()
    assert {cid: f"{v['outcome']}/{v['level']}" for cid, v in flagged.items()} == expected
    assert sum(pipe.outcomes.values()) == site.expected_verdicts()
    assert pipe.fatal is None and pipe.healthy()
