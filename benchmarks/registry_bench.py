"""Registry cache benchmark: import speed, lookup latency, size on disk.

Usage: .venv/bin/python benchmarks/registry_bench.py [--records 1000000[,10000000,...]] [--lookups 10000]
       [--extrapolate 50000000] [--workdir DIR] [--compare-sqlite-utils]

For each size N: generates N synthetic SIV plates, writes a hashed snapshot file (central side)
and signs it (format 2, streamed), then, each in a FRESH process so that its peak RSS is the
import's own: imports it with iaflash.agent.registry.cache.import_subset into an empty cache (the
anchor), and with import_signed_subset over the full cache (streamed signature check, then the
parse of the same open file, hashed again before the commit). Then times 10k lookups through
Registry.lookup (normalise + HMAC + raw sqlite3 SELECT) and raw primary-key SELECTs (the anchor),
half hits and half misses. With two sizes or more, extrapolates the last two to --extrapolate
records (the method is printed). --compare-sqlite-utils also times sqlite-utils insert_all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from iaflash.agent.registry.cache import (
    Registry,
    import_signed_subset,
    import_subset,
    records_from_plates,
    write_subset,
)
from iaflash.agent.registry.plates import key_id, plate_key
from iaflash.engines.signing import generate_keypair, sign_file

LETTERS = "ABCDEFGHJKLMNPQRTVWXYZ"  # SIV letters without I, O, U; no S so no SS block
MAKES = [
    ("RENAULT", "CLIO"),
    ("PEUGEOT", "208"),
    ("CITROEN", "C3"),
    ("DACIA", "SANDERO"),
    ("VOLKSWAGEN", "GOLF"),
    ("TOYOTA", "YARIS"),
    ("FORD", "FIESTA"),
    ("BMW", "SERIE 3"),
]


def siv(i: int) -> str:
    """The i-th SIV plate (distinct for i < 22**4 * 999)."""
    num = i % 999 + 1
    rest = i // 999
    letters = ""
    for _ in range(4):
        rest, r = divmod(rest, len(LETTERS))
        letters += LETTERS[r]
    return f"{letters[:2]}-{num:03d}-{letters[2:]}"


def rows(n: int, offset: int = 0) -> Iterator[tuple[str, str, str, str | None, str | None]]:
    for i in range(offset, offset + n):
        make, model = MAKES[i % len(MAKES)]
        yield siv(i), make, model, "VP", "CI"


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def time_lookups(db: Path, key: bytes, n: int, lookups: int) -> dict[str, float]:
    rng = random.Random(1)
    hits = [siv(rng.randrange(n)) for _ in range(lookups // 2)]
    misses = [siv(n + rng.randrange(n)) for _ in range(lookups - len(hits))]
    plates = hits + misses
    rng.shuffle(plates)
    reg = Registry(db, key)
    api: list[float] = []
    found = 0
    for p in plates:
        t0 = time.perf_counter()
        found += reg.lookup(p) is not None
        api.append(time.perf_counter() - t0)
    reg.close()
    assert found == len(hits), (found, len(hits))
    keys = [plate_key(key, p) for p in plates]
    conn = sqlite3.connect(str(db))
    raw: list[float] = []
    for k in keys:
        t0 = time.perf_counter()
        conn.execute("SELECT make, model, genre, body FROM vehicles WHERE plate_key = ?", (k,)).fetchone()
        raw.append(time.perf_counter() - t0)
    conn.close()
    return {
        "raw_p50": percentile(raw, 0.5),
        "raw_p99": percentile(raw, 0.99),
        "api_p50": percentile(api, 0.5),
        "api_p99": percentile(api, 0.99),
    }


def time_sqlite_utils(n: int, key: bytes, work: Path) -> float:
    db = sqlite_utils.Database(work / "su.db")
    conn = db.conn
    conn.execute(
        "CREATE TABLE vehicles (plate_key BLOB PRIMARY KEY, make TEXT, model TEXT, genre TEXT, body TEXT) WITHOUT ROWID"
    )
    db.enable_wal()
    recs = (
        {
            "plate_key": bytes.fromhex(r["plate_key"]),
            "make": r["make"],
            "model": r["model"],
            "genre": r["genre"],
            "body": r["body"],
        }
        for r in records_from_plates(key, rows(n))
    )
    t0 = time.perf_counter()
    with db.atomic():
        db.table("vehicles").insert_all(recs, batch_size=10_000)
    return time.perf_counter() - t0


def child_import(mode: str, db: Path, file: Path, trust: Path, kid: str) -> dict[str, float]:
    """Run one import in a fresh process; its time and the process's peak RSS (the import's own memory)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(db), str(file), str(trust), kid],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM): unlike ru_maxrss, it is not inherited across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, db: str, file: str, trust: str, kid: str) -> None:
    rss_before = _vm_hwm_mb()
    t0 = time.perf_counter()
    if mode == "signed":
        _, signer = import_signed_subset(
            Path(db), Path(file), trust_dir=Path(trust), allow_unsigned=False, expected_key_id=kid
        )
        assert signer == "publisher", signer
    else:
        import_subset(Path(db), Path(file), expected_key_id=kid)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": _vm_hwm_mb(), "rss_before_mb": rss_before}))


def make_trust(work: Path, file: Path) -> tuple[Path, float]:
    """A fresh trusted publisher key; ``file`` signed with it (format 2). Returns the trust dir and the signing time."""
    (work / "keys").mkdir()
    (work / "trust").mkdir()
    private, public = generate_keypair(work / "keys" / "publisher")
    (work / "trust" / "publisher.pub").write_bytes(public.read_bytes())
    t0 = time.perf_counter()
    sign_file(file, private)
    return work / "trust", time.perf_counter() - t0


def run_size(n: int, lookups: int, compare_sqlite_utils: bool, workdir: Path | None) -> dict[str, float]:
    key = bytes(range(32))
    kid = key_id(key)
    with tempfile.TemporaryDirectory(prefix="registry-bench-", dir=workdir) as tmp:
        work = Path(tmp)
        file, db = work / "snap.jsonl.gz", work / "registry.db"
        t0 = time.perf_counter()
        write_subset(file, dataset_id="bench", seq=1, key_id=kid, records=records_from_plates(key, rows(n)))
        r: dict[str, float] = {"records": n, "write_s": time.perf_counter() - t0, "file_b": file.stat().st_size}
        trust, r["sign_s"] = make_trust(work, file)
        plain = child_import("plain", db, file, trust, kid)  # into an empty cache
        r["import_s"], r["import_rss_mb"], r["base_rss_mb"] = (
            plain["seconds"],
            plain["peak_rss_mb"],
            plain["rss_before_mb"],
        )
        signed = child_import("signed", db, file, trust, kid)  # replacing the full cache
        r["signed_s"], r["signed_rss_mb"] = signed["seconds"], signed["peak_rss_mb"]
        r.update(time_lookups(db, key, n, lookups))
        r["db_b"] = sum(p.stat().st_size for p in work.glob("registry.db*"))
        if compare_sqlite_utils:
            r["sqlite_utils_s"] = time_sqlite_utils(n, key, work)
    return r


def print_size(r: dict[str, float]) -> None:
    n = int(r["records"])
    table = [
        ("records", f"{n:,}"),
        ("subset file size", f"{r['file_b'] / 1e6:.1f} MB ({r['file_b'] / n:.0f} B/rec)"),
        ("write_subset (central side)", f"{r['write_s']:.2f} s"),
        ("sign_file, format 2 (central side)", f"{r['sign_s']:.2f} s"),
        ("import snapshot into empty cache (anchor)", f"{r['import_s']:.2f} s ({n / r['import_s']:,.0f} rec/s)"),
        (
            "signed import replacing the cache",
            f"{r['signed_s']:.2f} s ({n / r['signed_s']:,.0f} rec/s) = {r['signed_s'] / r['import_s']:.2f}× anchor",
        ),
        (
            "peak RSS, unsigned import (anchor)",
            f"{r['import_rss_mb']:.0f} MB (process at start {r['base_rss_mb']:.0f} MB)",
        ),
        (
            "peak RSS, signed import",
            f"{r['signed_rss_mb']:.0f} MB = {r['signed_rss_mb'] / r['import_rss_mb']:.2f}× anchor "
            f"(the whole-file check of before held +{r['file_b'] / 2**20:.0f} MiB)",
        ),
        ("lookup raw sqlite3 p50 / p99 (anchor)", f"{r['raw_p50'] * 1e6:.1f} / {r['raw_p99'] * 1e6:.1f} µs"),
        (
            "Registry.lookup p50 / p99",
            f"{r['api_p50'] * 1e6:.1f} / {r['api_p99'] * 1e6:.1f} µs "
            f"= {r['api_p99'] / r['raw_p99']:.2f}× anchor at p99",
        ),
        ("db size (incl. WAL)", f"{r['db_b'] / 1e9:.2f} GB ({r['db_b'] / n:.0f} B/rec)"),
    ]
    if "sqlite_utils_s" in r:
        table.append(
            ("sqlite-utils insert_all, 1 txn", f"{r['sqlite_utils_s']:.2f} s ({n / r['sqlite_utils_s']:,.0f} rec/s)")
        )
    width = max(len(k) for k, _ in table)
    for k, v in table:
        print(f"{k:<{width}}  {v}")


def extrapolate(small: dict[str, float], big: dict[str, float], target: int) -> None:
    """Sizes grow linearly; seconds per record are taken as linear in ln(records) (B-tree depth), fitted on two runs."""
    n1, n2 = small["records"], big["records"]
    print(
        f"\nextrapolated to {target:,} records from the runs at {int(n1):,} and {int(n2):,}. Method: sizes scale "
        "with the bytes per record of the larger run; seconds per record are fitted as a + b*ln(records) through "
        "the two runs (a B-tree's depth grows with ln N; b >= 0) and multiplied by the target count."
    )
    for label, k in (("import into empty cache", "import_s"), ("signed import replacing", "signed_s")):
        per1, per2 = small[k] / n1, big[k] / n2
        slope = max(0.0, per2 - per1) / math.log(n2 / n1)  # noise can make it negative: never extrapolate a gain
        per = per2 + slope * math.log(target / n2)
        print(f"  {label:<26} {target * per:,.0f} s ({target * per / 60:.1f} min)")
    print(f"  {'db size':<26} {big['db_b'] / n2 * target / 1e9:.2f} GB")
    print(f"  {'subset file':<26} {big['file_b'] / n2 * target / 1e9:.2f} GB")
    print(
        f"  {'signed import peak RSS':<26} bounded (chunked): {big['signed_rss_mb']:.0f} MB at {int(n2):,}, "
        f"{small['signed_rss_mb']:.0f} MB at {int(n1):,}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:7])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", "--n", default="1000000", help="records, or several comma-separated sizes run in turn")
    ap.add_argument("--lookups", type=int, default=10_000)
    ap.add_argument("--extrapolate", type=int, default=50_000_000, help="with two sizes or more: estimate this size")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary files go (default: $TMPDIR)")
    ap.add_argument("--compare-sqlite-utils", action="store_true")
    args = ap.parse_args()
    sizes = [int(x) for x in str(args.records).replace("_", "").split(",")]
    print(
        f"registry benchmark on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}"
    )
    results = []
    for n in sizes:
        t0 = time.perf_counter()
        results.append(run_size(n, args.lookups, args.compare_sqlite_utils, args.workdir))
        print(f"\n== {n:,} records (run took {time.perf_counter() - t0:.0f} s)")
        print_size(results[-1])
        sys.stdout.flush()
    if len(results) >= 2:
        extrapolate(results[-2], results[-1], args.extrapolate)


if __name__ == "__main__":
    main()
