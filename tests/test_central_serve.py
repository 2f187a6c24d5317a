"""Three ``iaflash-central serve`` processes on one MQTT 5 shared subscription, on SQLite and PostgreSQL.

One instance is SIGKILLed mid-burst: the others carry on, the killed one's persistent session keeps
what the broker had assigned to it, and after its restart every event is stored exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import paho.mqtt.client as mqtt
import pytest
from central_pg import PgServer, pg_server, wait_until  # noqa: F401  # pg_server is a fixture
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from test_central_store import an_event

from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.outbox.events import topic_for
from iaflash.central.serve.store import Store

BURST = 600


class Serve:
    """One serve process; ``start`` returns once it has subscribed."""

    def __init__(self, port: int, db: str, instance: str, workdir: Path) -> None:
        self.args = [
            sys.executable, "-c", "from iaflash.central.cli import main; main()", "serve",
            "--port", str(port), "--db", db, "--instance", instance, "--no-web",
        ]  # fmt: skip
        self.log = workdir / f"serve-{instance}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Serve:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            if line.startswith("ingesting "):
                break
        else:
            raise AssertionError("serve did not start: " + "".join(lines))
        self._drainer = threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True)
        self._drainer.start()
        return self

    def _drain(self, stream: IO[str]) -> None:
        with stream, self.log.open("a") as out:
            for line in stream:
                out.write(line)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._drainer.join(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
            self._drainer.join(10)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "central.db")
    server: PgServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(workdir=tmp_path / "mosquitto", persistence=True)
    b.start()
    yield b
    b.stop()


def stored(db: str) -> int:
    with Store(db) as s:
        return int(s.query("SELECT COUNT(*) AS n FROM events")[0]["n"])


@pytest.mark.slow
def test_three_instances_share_a_burst_and_one_killed_mid_burst_loses_nothing(
    persistent_broker: MosquittoBroker, db_url: str, tmp_path: Path
) -> None:
    with Store(db_url) as s:  # migrated once up front: the three then start together on a ready schema
        s.migrate()
    fleet = [Serve(persistent_broker.port, db_url, str(i), tmp_path) for i in (1, 2, 3)]
    for serve in fleet:
        serve.start()
    events = [an_event(site=f"site-{i % 4}", device="box-1", capture=f"c{i}") for i in range(BURST)]
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    pub.max_inflight_messages_set(100)
    pub.connect("127.0.0.1", persistent_broker.port)
    pub.loop_start()
    try:
        infos = []
        for i, doc in enumerate(events):
            topic = topic_for(f"iaflash/v1/{doc['site_id']}/box-1", "mismatch")
            infos.append(pub.publish(topic, json.dumps(doc), qos=1))
            if i == BURST // 3:
                wait_until(lambda: stored(db_url) >= BURST // 6, 60, "the first events stored")
                fleet[1].kill()  # mid-burst
                at_kill = stored(db_url)
        for info in infos:
            info.wait_for_publish(30)
        wait_until(lambda: stored(db_url) >= at_kill + BURST // 3, 60, "the two others carrying on")
        fleet[1].start()  # same instance name: its session (and what was queued for it) comes back
        wait_until(lambda: stored(db_url) == BURST, 90, "every event stored")
    finally:
        pub.disconnect()
        pub.loop_stop()
        for serve in fleet:
            serve.stop()
    with Store(db_url) as s:
        ids = [r["event_id"] for r in s.query("SELECT event_id FROM events")]
        counters = s.counters()
    assert sorted(ids) == sorted(d["event_id"] for d in events)  # nothing lost, nothing twice
    assert counters["stored"] == BURST  # a redelivered event is counted as a duplicate, not stored
    assert not any(k.startswith("refused") for k in counters)
    stopped = [s.log.read_text() for s in (fleet[0], fleet[2])]
    assert all("stopped: " in text for text in stopped)
