"""Outbox drain rate beside a raw paho pipelined client, against the same local mosquitto, one run.

Usage: .venv/bin/python benchmarks/outbox_bench.py [--n 20000] [--repeat 3] [--inflight 100]

Starts its own mosquitto on a free 127.0.0.1 port (no persistence, as the tests), then, ``--repeat``
times in turn:

* **raw paho**: one paho 2.x client, QoS 1, ``max_inflight`` = ``--inflight``, publishes N
  event-sized payloads at once and waits for the N PUBACKs (no disk): the anchor;
* **outbox, grouped**: N real events recorded in a real SQLite outbox (WAL, synchronous=FULL),
  then the agent's own ``MqttLink`` + ``Publisher`` drain it (PUBACKs settled in one
  transaction per drained batch), timed from the publisher's start to the last row deleted;
* **outbox, one PUBACK per txn**: the same with ``ACK_BATCH_MAX = 1`` (one fsync'd delete per
  PUBACK, still in the settle thread), to show what the grouping itself brings.

Prints the median rate of each and its ratio to raw paho in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from iaflash.agent.config import parse_config
from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.link import publisher as publisher_module
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.link.publisher import Publisher
from iaflash.agent.outbox.events import build_event, topic_for
from iaflash.agent.outbox.store import Outbox

VERDICT = {
    "outcome": "mismatch",
    "level": "make",
    "reason": "P(registered make) below threshold",
    "registry_stale": False,
    "p_make": 0.01,
    "p_model": 0.0,
    "top_k": [{"make": "VOLKSWAGEN", "model": "GOLF", "p": 0.95}],
    "registry": {"make": "RENAULT", "model": "CLIO", "genre": "VP", "body": "CI"},
    "thresholds": {"make": 0.05},
    "model": {"name": "bench", "version": "1", "backend": "onnxruntime", "device": "cpu"},
}


def fill(path: Path, n: int, topic: str) -> int:
    """Record ``n`` real events in the outbox at ``path``; returns the payload size in bytes."""
    items = []
    for i in range(n):
        doc = build_event(
            verdict=VERDICT,
            site_id="bench",
            device_id="box",
            capture_id=f"cap-{i}",
            captured_at="2026-12-01T08:00:00+01:00",
            plate_key="ab" * 32,
            timings_ms={"decode": 10.0, "infer": 8.0},
        )
        items.append((f"cap-{i}", "mismatch", doc, topic))
    with Outbox(path) as ob:
        for start in range(0, n, 1000):
            ob.record_many(items[start : start + 1000])
        return len(ob.pending(1)[0].payload)


def raw_paho(port: int, n: int, payload: bytes, inflight: int) -> float:
    """Seconds for one paho client to get N PUBACKs, all N handed over at once (paho pipelines them)."""
    done = threading.Event()
    count = [0]

    def on_publish(client: mqtt.Client, userdata: object, mid: int, rc: object, props: object) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            client.publish("bench/raw", payload, qos=1)
        if not done.wait(300):
            raise RuntimeError(f"raw paho: only {count[0]} of {n} PUBACKs after 300 s")
        return time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()


def drain(port: int, work: Path, n: int, inflight: int, batch_max: int) -> tuple[float, int]:
    """Seconds for the agent's publisher to empty an outbox of N events; and the payload size."""
    cfg = parse_config(
        {"site": {"site_id": "bench", "device_id": "box"}, "mqtt": {"port": port, "max_inflight": inflight}}
    )
    path = work / f"outbox-{time.monotonic_ns()}.db"
    size = fill(path, n, topic_for(cfg.topic_root, "mismatch"))
    link = MqttLink(cfg)
    link.start()
    if not link.wait_connected(10):
        raise RuntimeError(f"the link did not connect to 127.0.0.1:{port}")
    publisher_module.ACK_BATCH_MAX = batch_max
    pub = Publisher(path, link, cfg.mqtt)
    try:
        t0 = time.perf_counter()
        pub.start()
        deadline = t0 + 600
        while pub.stats()["acked"] < n:
            if time.perf_counter() > deadline or pub.error is not None:
                raise RuntimeError(f"outbox drain: {pub.stats()} after {time.perf_counter() - t0:.0f} s")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
    finally:
        pub.stop()
        link.stop()
    with Outbox(path) as ob:
        if ob.depth() != 0:
            raise RuntimeError(f"outbox not empty after {n} PUBACKs: {ob.depth()} rows left")
    for p in work.glob(path.name + "*"):
        p.unlink()
    return elapsed, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="events per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; medians are printed")
    ap.add_argument("--inflight", type=int, default=100, help="publishes in flight (both clients)")
    ap.add_argument("--no-ungrouped", action="store_true", help="skip the one-PUBACK-per-transaction comparison")
    args = ap.parse_args()
    default_batch = publisher_module.ACK_BATCH_MAX
    rates: dict[str, list[float]] = {"raw": [], "grouped": [], "ungrouped": []}
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp, MosquittoBroker(workdir=Path(tmp) / "mosq") as b:
        work = Path(tmp)
        size = 0
        for _ in range(args.repeat):
            t, size = drain(b.port, work, args.n, args.inflight, default_batch)
            rates["grouped"].append(args.n / t)
            rates["raw"].append(args.n / raw_paho(b.port, args.n, b"x" * size, args.inflight))
            if not args.no_ungrouped:
                t, _ = drain(b.port, work, args.n, args.inflight, 1)
                rates["ungrouped"].append(args.n / t)
    publisher_module.ACK_BATCH_MAX = default_batch
    raw = statistics.median(rates["raw"])
    rows = [
        ("raw paho, pipelined (anchor)", rates["raw"]),
        (f"outbox drain, grouped PUBACKs (≤ {default_batch}/txn)", rates["grouped"]),
    ]
    if rates["ungrouped"]:
        rows.append(("outbox drain, 1 PUBACK per txn (settle thread)", rates["ungrouped"]))
    print(
        f"outbox benchmark: {args.n:,} events of {size} B per run, {args.inflight} in flight, QoS 1, "
        f"local mosquitto, {os.cpu_count()} CPUs, median of {args.repeat}"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'client':<{width}}  {'events/s':>9}  {'vs raw paho':>11}  runs")
    for name, values in rows:
        med = statistics.median(values)
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<{width}}  {med:>9,.0f}  {med / raw:>10.2f}×  {runs}")


if __name__ == "__main__":
    main()
