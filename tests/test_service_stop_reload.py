"""stop() and a model reload never overlap: stop waits for the reload in flight; a later reload does nothing.

stop() used to run beside a reload: it waited only for a SIGHUP reload thread (60 s at most) and not
at all for the signed ``reload`` command, so it could stop the pipeline and close the models while
a reload swapped new ones in, and the reload then put models back on a stopped agent.

A real Service in this process (a tiny signed classifier, the demo detector, a real registry and
outbox), a real mosquitto and central's real signed command client. The reload is held in the
middle by the Service's ``reload_hook`` seam (an Event), and stop runs on another thread, as it does
in the daemon (the thread of ``run()``); the order is read from the Service's own log lines.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_site import Site, make_site
from waiting import wait_until

from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.pipeline.models import ModelSet
from iaflash.agent.service import Service
from iaflash.central.commands import CommandClient

pytestmark = pytest.mark.slow


class Hold:
    """The Service's reload hook: at ``step``, record the new models, say so, and wait to be released."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.reached = threading.Event()
        self.release = threading.Event()
        self.new: list[ModelSet] = []

    def __call__(self, step: str, new: ModelSet) -> None:
        if step == self.step:
            self.new.append(new)
            self.reached.set()
            assert self.release.wait(60), "the test never released the reload"


@pytest.fixture
def running(tmp_path: Path, tiny_models: Path, broker: MosquittoBroker) -> Iterator[tuple[Site, Service]]:
    site = make_site(
        tmp_path / "site",
        tiny_models,
        broker.port,
        n=4,
        overrides={"model": {"backend": "onnxruntime"}, "spool": {"min_free_mb": 1}},
    )
    service = Service(site.cfg)
    service.start()
    try:
        yield site, service
    finally:
        service.stop()  # idempotent


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def logged(caplog: pytest.LogCaptureFixture, start: str) -> Callable[[], bool]:
    return lambda: any(m.startswith(start) for m in messages(caplog))


def test_stop_waits_for_a_reload_command_in_flight_then_closes_the_models_it_swapped_in(
    running: tuple[Site, Service], tiny_models: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    site, service = running
    caplog.set_level(logging.INFO)
    hold = Hold("swapped")  # the new models are in the pipeline; the service does not hold them yet
    service.reload_hook = hold
    old, pipeline = service.models, service.pipeline
    assert old is not None and pipeline is not None and service.link is not None
    assert service.link.wait_commands_ready(10)
    answer: dict[str, Any] = {}

    def send_reload() -> None:  # central's signed reload command, answered on the command worker's thread
        with CommandClient("127.0.0.1", broker.port, private_key_path=tiny_models / "central.key") as client:
            answer.update(client.send(site.cfg.site.site_id, site.cfg.site.device_id, "reload", timeout=60))

    sender = threading.Thread(target=send_reload)
    stopper = threading.Thread(target=service.stop, name="main")  # stop() runs on run()'s thread in the daemon
    sender.start()
    try:
        assert hold.reached.wait(30), "the reload command never reached its swap"
        stopper.start()
        waiting = logged(caplog, "stop: waiting for the model reload in progress (command) to finish")
        wait_until(lambda: waiting() or not pipeline.alive(), 20, "stop to wait for the reload, or to tear down")
        # nothing is torn down under the reload: the pipeline runs, the link is up, stop is still waiting
        assert waiting(), messages(caplog)
        assert stopper.is_alive() and pipeline.alive() and service.link is not None and service.models is old
    finally:
        hold.release.set()
    stopper.join(60)
    sender.join(60)
    assert not stopper.is_alive() and not sender.is_alive()
    assert answer.get("ok") is True, answer  # the reload finished, and answered before the link went down
    assert answer["result"]["running"]["version"] == "1.0.0"
    # then stop closed everything, the new models too: none came back after it
    new = hold.new[0]
    assert service.models is None and service.backend is None and service.pipeline is None
    assert new._closed and old._closed
    assert service.reloads == {"ok": 1, "failed": 0}
    order = messages(caplog)
    switched = next(i for i, m in enumerate(order) if m.startswith("model reload (command): switched from"))
    assert order.index(next(m for m in order if m.startswith("stop: waiting for the model reload"))) < switched


def test_a_sighup_reload_loading_when_the_agent_stops_drops_its_models_and_a_later_reload_does_nothing(
    running: tuple[Site, Service], caplog: pytest.LogCaptureFixture
) -> None:
    _, service = running
    caplog.set_level(logging.INFO)
    hold = Hold("loaded")  # the new models are loaded and warm, not swapped in yet
    service.reload_hook = hold
    old, pipeline = service.models, service.pipeline
    assert old is not None and pipeline is not None
    stop = threading.Event()
    codes: list[int] = []
    main = threading.Thread(target=lambda: codes.append(service.run(stop)), name="main")  # as `iaflash-agent run`
    main.start()
    late: dict[str, Any] = {}
    late_reload = threading.Thread(target=lambda: late.update(service.reload("command")))
    try:
        service.request_reload("SIGHUP")  # what the SIGHUP handler does; run() starts the reload thread
        assert hold.reached.wait(30), "the SIGHUP reload never finished loading"
        stop.set()  # SIGTERM: run() leaves its loop and calls stop() on its thread
        wait_until(
            logged(caplog, "stop: waiting for the model reload in progress (SIGHUP) to finish"),
            20,
            "stop to wait for the SIGHUP reload",
        )
        assert main.is_alive() and pipeline.alive() and service.models is old
        late_reload.start()  # asked for once stop has begun: it must do nothing, whoever gets the lock first
    finally:
        hold.release.set()
    main.join(60)
    late_reload.join(60)
    assert codes == [0] and not late_reload.is_alive()
    dropped = hold.new[0]
    assert dropped._closed and old._closed and service.models is None and service.pipeline is None
    assert service.reloads == {"ok": 0, "failed": 0}  # neither counted as a failed reload
    assert late["ok"] is False and late["error"] == "model reload not done: the agent is stopping; nothing was loaded"
    warnings = messages(caplog, logging.WARNING)
    assert (
        "model reload (SIGHUP) not done: the agent began to stop while the new models loaded; they were dropped"
        in warnings
    )
    assert "model reload (command) not done: the agent is stopping; nothing was loaded" in warnings
    assert not [m for m in messages(caplog, logging.ERROR) if m.startswith("model reload")]
    # and once stopped, a reload still does nothing, and says so
    assert service.reload("SIGHUP")["ok"] is False
    assert messages(caplog, logging.WARNING)[-1].startswith("model reload (SIGHUP) not done: the agent is stopping")
