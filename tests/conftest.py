"""Shared fixtures: a real Mosquitto broker on a free 127.0.0.1 port, real files in tmp_path, tiny signed models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_models import build_tiny_models
from tmpfs_mounts import Mount, tmpfs_mounts

from iaflash.agent.demo.broker import MosquittoBroker, find_mosquitto


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A private mosquitto (MQTT 5 and 3.1.1) on a free port; the test may kill() and start() it."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is required by the tests: run './run test' (installs it) or apt-get install mosquitto")
    b = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """``mount(path, size="64m")``: a real tmpfs at path (root only; tests mark themselves ``needs_root``)."""
    yield from tmpfs_mounts()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ (a tiny signed classifier), detector/ (the demo detector), trust/ (models, commands), central.key."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
