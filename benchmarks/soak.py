"""Soak: the real agent (a subprocess) and a real mosquitto, both SIGKILLed at random, with poison inputs.

Waves of demo captures land in the spool. Each wave also holds a 30,000-deep sidecar and a
symlinked sidecar. Meanwhile the agent and the broker are SIGKILLed at random and restarted. At
the end, once everything has drained, it prints:

* lost: captures that had to be flagged and whose event never reached central;
* double: captures that got two different event ids;
* duplicate: deliveries of an event id already received (at least once: allowed, counted);
* poison_rejected / poison_expected, and the agent's restarts.

Not part of the test suite (it runs for minutes):

    .venv/bin/python benchmarks/soak.py --waves 4 --kills 6
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.agent.demo.runner import demo_config, prepare_workdir
from iaflash.agent.demo.scenario import build_scenario, start_time, write_capture
from iaflash.central.subscriber import Subscriber


def toml(doc: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, (int, float)) else json.dumps(str(v))

    return "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in vals.items()) for s, vals in doc.items())


def agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "iaflash.agent", "run", "--config", str(config)], stdout=out, stderr=out
        )


def processed(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return int(conn.execute("SELECT count(*) FROM processed").fetchone()[0])
    except sqlite3.Error:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--per-wave", type=int, default=20)
    ap.add_argument("--kills", type=int, default=6, help="random SIGKILLs (agent or broker) per run")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="iaflash-soak-"))
    scenario = build_scenario(args.per_wave)
    prepare_workdir(work, scenario, lambda *_: None)
    broker = MosquittoBroker(workdir=work / "broker", persistence=True).start()
    doc = demo_config(work, broker.port, "5")
    doc["log"] = {"level": "INFO", "format": "json"}
    config = work / "agent.toml"
    config.write_text(toml(doc))
    incoming = work / "spool" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    central = Subscriber("127.0.0.1", broker.port, client_id="soak-central").start()
    log = work / "agent.log"
    proc, restarts = agent(config, log), 0
    expected: dict[str, str] = {}
    verdicts = 0
    poison = 0
    kills_left = args.kills
    for wave in range(args.waves):
        for i, c in enumerate(scenario):
            cid = f"w{wave}-{c.capture_id}"
            write_capture(
                dataclasses.replace(c, capture_id=cid),
                incoming,
                start_time() + timedelta(minutes=wave, seconds=i),
                seed=wave * 1000 + i,
            )
            if c.expect.startswith("mismatch"):
                expected[cid] = c.expect
            verdicts += c.expect != "rejected"
        (incoming / f"w{wave}-deep.json").write_bytes(b"[" * 30_000 + b"]" * 30_000)
        os.symlink(work / "agent.toml", incoming / f"w{wave}-linked.json")
        poison += 2
        while kills_left and rnd.random() < 0.8:
            time.sleep(rnd.uniform(0.5, 4.0))
            kills_left -= 1
            if rnd.random() < 0.5:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                proc, restarts = agent(config, log), restarts + 1
            else:
                broker.restart()
        if proc.poll() is not None:  # it must not exit on its own: count it and bring it back
            proc, restarts = agent(config, log), restarts + 1
    deadline = time.monotonic() + 300
    while processed(work / "state.db") < verdicts and time.monotonic() < deadline:
        time.sleep(0.5)
    central.wait_for(len(expected), timeout=120)
    time.sleep(2)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    central.stop()
    broker.stop()
    per_capture: dict[str, set[str]] = collections.defaultdict(set)
    for event in central.events:
        per_capture[event["capture_id"]].add(event["event_id"])
    rejected = [json.loads(p.read_text()) for p in (work / "spool" / "rejected").glob("*.error.json")]
    poison_rejected = sum(r["reason"] in ("sidecar_too_deep", "not_a_file") for r in rejected)
    rows = {
        "captures": verdicts,
        "processed": processed(work / "state.db"),
        "flags_expected": len(expected),
        "lost": len(set(expected) - set(per_capture)),
        "double": sum(len(ids) > 1 for ids in per_capture.values()),
        "duplicate": central.duplicates,
        "poison_expected": poison,
        "poison_rejected": poison_rejected,
        "agent_restarts_by_kill": restarts,
        "agent_alive_at_end": alive,
    }
    width = max(map(len, rows))
    for key, val in rows.items():
        print(f"{key:<{width}}  {val}")
    print(f"workdir: {work}")


if __name__ == "__main__":
    main()
