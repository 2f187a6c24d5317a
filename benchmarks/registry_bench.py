"""Registry cache benchmark: import speed, lookup latency, size on disk.

Usage: .venv/bin/python benchmarks/registry_bench.py [--n 1000000] [--lookups 10000] [--compare-sqlite-utils]

Generates N synthetic SIV plates, writes a hashed snapshot file, imports it with
iaflash.agent.registry.cache.import_subset (one transaction, raw executemany) into an empty cache and over the
full cache, then signs it and imports it again with import_signed_subset (verify + parse the
verified bytes from memory). Then times 10k lookups through Registry.lookup (normalise + HMAC + raw
sqlite3 SELECT) and raw primary-key SELECTs, half hits and half misses. --compare-sqlite-utils also
times sqlite-utils insert_all in one transaction.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
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


def time_signed_import(db: Path, file: Path, key: bytes, work: Path) -> float:
    """Sign ``file`` with a fresh key, trust it, and time import_signed_subset over the cache."""
    (work / "keys").mkdir()
    (work / "trust").mkdir()
    private, public = generate_keypair(work / "keys" / "publisher")
    (work / "trust" / "publisher.pub").write_bytes(public.read_bytes())
    sign_file(file, private)
    t0 = time.perf_counter()
    _, signer = import_signed_subset(
        db, file, trust_dir=work / "trust", allow_unsigned=False, expected_key_id=key_id(key)
    )
    assert signer == "publisher", signer
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=10_000)
    ap.add_argument("--compare-sqlite-utils", action="store_true")
    args = ap.parse_args()
    key = bytes(range(32))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        file, db = work / "snap.jsonl.gz", work / "registry.db"
        t0 = time.perf_counter()
        write_subset(
            file, dataset_id="bench", seq=1, key_id=key_id(key), records=records_from_plates(key, rows(args.n))
        )
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        import_subset(db, file, expected_key_id=key_id(key))
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        import_subset(db, file, expected_key_id=key_id(key))
        t_reimport = time.perf_counter() - t0
        t_signed = time_signed_import(db, file, key, work)
        lk = time_lookups(db, key, args.n, args.lookups)
        size = sum(p.stat().st_size for p in work.glob("registry.db*"))
        t_su = time_sqlite_utils(args.n, key, work) if args.compare_sqlite_utils else None
        table = [
            ("records", f"{args.n:,}"),
            ("subset file size", f"{file.stat().st_size / 1e6:.1f} MB ({file.stat().st_size / args.n:.0f} B/rec)"),
            ("write_subset (central side)", f"{t_write:.2f} s"),
            ("import snapshot into empty cache", f"{t_import:.2f} s ({args.n / t_import:,.0f} rec/s)"),
            ("import snapshot replacing cache", f"{t_reimport:.2f} s ({args.n / t_reimport:,.0f} rec/s)"),
            ("signed import replacing cache", f"{t_signed:.2f} s ({args.n / t_signed:,.0f} rec/s)"),
            ("lookup raw sqlite3 p50 / p99", f"{lk['raw_p50'] * 1e6:.1f} / {lk['raw_p99'] * 1e6:.1f} µs"),
            ("Registry.lookup p50 / p99", f"{lk['api_p50'] * 1e6:.1f} / {lk['api_p99'] * 1e6:.1f} µs"),
            ("db size (incl. WAL)", f"{size / 1e6:.1f} MB ({size / args.n:.0f} B/rec)"),
            ("db size extrapolated to 10M", f"{size / args.n * 10_000_000 / 1e9:.2f} GB"),
        ]
        if t_su is not None:
            table.append(("sqlite-utils insert_all, 1 txn", f"{t_su:.2f} s ({args.n / t_su:,.0f} rec/s)"))
    width = max(len(k) for k, _ in table)
    print(f"registry benchmark on {os.cpu_count()} CPUs")
    for k, v in table:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
