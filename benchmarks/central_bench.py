"""Ingestion rate of ``iaflash-central serve``: events/s for 1 and 3 instances on one shared subscription.

Usage: .venv/bin/python benchmarks/central_bench.py [--events 3000] [--instances 1 3] [--postgres]

A real mosquitto on a free port, real ``serve`` processes (SQLite file, or a private PostgreSQL with
fsync on when --postgres and the binaries exist). With the instances subscribed, the publisher sends
every event pipelined (100 in flight); the clock runs from the first publish to the last row stored.
Each batch of events waiting is one committed transaction (SQLite synchronous=FULL, PostgreSQL fsync on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from central_pg import PgServer, pg_bindir  # the tests' private PostgreSQL helper

from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.outbox.events import build_event, topic_for
from iaflash.central.serve.store import Store

VERDICT = {
    "outcome": "mismatch", "level": "model", "reason": "bench", "registry_stale": False, "p_make": 0.9,
    "p_model": 0.01, "top_k": [{"make": "RENAULT", "model": "MEGANE", "p": 0.85}],
    "registry": {"make": "RENAULT", "model": "CLIO", "genre": None, "body": None}, "thresholds": {"model": 0.05},
    "model": {"name": "bench", "version": "1", "backend": "ort", "device": "cpu"},
}  # fmt: skip


def count(db: str) -> int:
    with Store(db) as s:
        return int(s.query("SELECT COUNT(*) AS n FROM events")[0]["n"])


def run(db: str, instances: int, n: int, work: Path) -> float:
    with Store(db) as s:
        s.migrate()
    broker = MosquittoBroker(workdir=work / f"mosq-{instances}-{time.monotonic_ns()}")
    broker.start()
    procs = []
    try:
        for i in range(instances):
            p = subprocess.Popen(
                [sys.executable, "-c", "from iaflash.central.cli import main; main()", "serve", "--port",
                 str(broker.port), "--db", db, "--instance", str(i), "--no-web"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert p.stderr is not None
            for line in p.stderr:
                if line.startswith("ingesting"):
                    break
            procs.append(p)
        events = [
            build_event(verdict=VERDICT, site_id=f"s{i % 20}", device_id="b1", capture_id=f"c{i}",
                        captured_at="2026-11-02T08:00:00+01:00", plate_key=f"{i:064x}", timings_ms={})
            for i in range(n)
        ]  # fmt: skip
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        pub.max_inflight_messages_set(100)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        t0 = time.perf_counter()
        for e in events:
            pub.publish(topic_for(f"iaflash/v1/{e['site_id']}/b1", "mismatch"), json.dumps(e), qos=1)
        while count(db) < n:
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        pub.disconnect()
        pub.loop_stop()
        return n / elapsed
    finally:
        for p in procs:
            p.terminate()
            p.communicate(timeout=30)
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--postgres", action="store_true", help="also on a private PostgreSQL (fsync on)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="iaflash-central-bench-") as tmp:
        work = Path(tmp)
        for k in args.instances:
            rows.append(("sqlite", k, run(str(work / f"central-{k}.db"), k, args.events, work)))
        if args.postgres and pg_bindir() is not None:
            pg_root = Path(tempfile.mkdtemp(prefix="iaflash-pg-"))
            server = PgServer(pg_root, fsync=True)
            try:
                for k in args.instances:
                    rows.append(("postgresql", k, run(server.new_database(), k, args.events, work)))
            finally:
                server.stop()
    print(f"{'store':<11} {'instances':>9} {'events/s':>9}   ({args.events} events, group commit)")
    for store, k, rate in rows:
        print(f"{store:<11} {k:>9} {rate:>9.0f}")


if __name__ == "__main__":
    main()
