"""The fit's grid scan: every one of the 4,320 threshold points counted, point by point vs at once.

``fit_operating_point`` and ``choose_guard`` count flags and caught clones at every grid point; the
vectorised scan (``_scan``) must give exactly the per-point rule's counts (checked here on every
run, and in tests/test_evaluation_guard.py). Samples are generated: four labels, two makes, a share
of confident errors, two clones per genuine sample, and (``--readings``) a second reading of each
genuine sample in the same unit. Both are timed side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_scan_bench.py --sizes 300 1000 3000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.evaluation import fit as fit_module
from iaflash.agent.evaluation.fit import FitSample
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import Label

LABELS = (
    Label(0, "RENAULT", "CLIO"),
    Label(1, "RENAULT", "MEGANE"),
    Label(2, "PEUGEOT", "208"),
    Label(3, "PEUGEOT", "3008"),
)


def samples(n: int, seed: int, readings: bool) -> list[FitSample]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        y = int(rng.integers(4))
        seen = int(rng.integers(4)) if rng.random() < 0.15 else y
        logits = rng.normal(0.0, 1.0, 4)
        logits[seen] += rng.uniform(2.0, 8.0)
        rec = LABELS[y]
        out.append(FitSample(logits, RegistryRecord(rec.make, rec.model, "VP", None), True, y, sample_id=f"g{k}"))
        other = LABELS[(y + 2) % 4]
        out.append(
            FitSample(logits, RegistryRecord(other.make, other.model, "VP", None), False, y, "make", sample_id=f"m{k}")
        )
        twin = LABELS[y ^ 1]
        out.append(
            FitSample(logits, RegistryRecord(twin.make, twin.model, "VP", None), False, y, "model", sample_id=f"d{k}")
        )
        if readings:
            out[-3] = replace(out[-3], unit=f"g{k}")
            out.append(replace(out[-3], logits=logits + rng.normal(0, 0.5, 4), reading="again", sample_id=f"g{k}@r"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000], help="genuine samples per run")
    parser.add_argument("--readings", action="store_true", help="a second reading of every genuine sample")
    args = parser.parse_args(argv)
    base = DecisionConfig.model_validate({})
    taxonomy = Taxonomy(LABELS)
    grid = fit_module._grid(base, None)
    print("| genuine | samples | grid points | point by point (s) | at once (s) | ratio | equal |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        s = samples(n, seed=n, readings=args.readings)
        feats = fit_module._features(s, fit_module._probs(s, 1.0, "logits"), taxonomy, base)
        t0 = time.perf_counter()
        slow = [fit_module._point(feats, t, fit_module._flags(feats, t), 0.95, "one") for t in grid]
        t1 = time.perf_counter()
        fast = fit_module._scan(feats, base, None, 0.95, "one")
        t2 = time.perf_counter()
        equal = slow == fast
        print(
            f"| {n} | {len(s)} | {len(grid)} | {t1 - t0:.3f} | {t2 - t1:.3f} | {(t1 - t0) / (t2 - t1):.1f}x | {equal} |"
        )
        if not equal:
            print("the vectorised scan differs from the per-point rule: a bug", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
