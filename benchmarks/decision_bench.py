"""The decision on real photos, through the daemon's path, with an operating point fitted out of fold.

Reads ``../shared/data/cars-dev`` (see its README; the benchmark says so and stops when it is
absent; nothing it reads or writes goes into the repository). Steps:

1. **Radar-like frames.** Every val photo (1,221) is pasted into a 2448×2048 frame of background
   clutter: half with a sidecar vehicle box (the car a third to a half of the frame), half without
   (the car fills most of the frame, so the daemon classifies the whole frame), about 20 %
   greyscale (an infrared night shot) and 15 % low-light. Frames and sidecars are written as a
   labelled-captures folder under ``--work`` (outside the repository).
2. **The daemon's path.** ``iaflash.agent.evaluation.evaluate.run_inference`` runs each capture
   through the daemon's own intake (``Preparer.prepare_capture``: reduced decode, box, the
   bundle's crop contract, colour mode, quality gates, flip view) and model; the views are fused
   as the daemon fuses them. The same photos, tight, give the tight top-1.
3. **Clones.** Each photo is read against its own record (genuine), against a record of another
   make (make-level clone) and, when its make has another model, of another model of that make
   (model-level clone). Rates are per kind, so they do not depend on the clone share.
4. **Cross-fit.** val is split into K folds (by position, so every class is in every fold);
   for each fold, ``iaflash.agent.evaluation.fit.fit_operating_point`` (temperature and
   thresholds) is fitted on the other folds and every pair of the fold is judged by the daemon's
   ``decide`` at that point; a fold whose fitted point does not meet its target never flags
   (the daemon's rule). So every val photo is reported once as a genuine capture and once per
   clone level, each time out of fold.
5. **Today's defaults**, for comparison: the same frames through the legacy crop (10 % margin,
   what agents did before the crop contract) and ``DecisionConfig()``'s thresholds, with the
   bundle's temperature and no operating point rule.

``--detector BUNDLE``: a vehicle detector bundle (``task: detector``, e.g. one written by
``iaflash-central train-detector``). Frames without a sidecar box then go through the daemon's
detector path (the intake's ``Preparer`` with the ``(backend, bundle)`` pair the service loads:
``detect_vehicles`` + ``select_vehicle``) instead of classifying the whole frame; frames with a
box and the tight photos are unchanged.

``--guard G|auto``: both fits (plain, on readings) keep a guard (docs/DECISION.md, "The guard");
``auto``: each fold chooses its own by cross-validation inside its fitting set (printed per fold
with the escapes per guard tried).

Two models: ``--best`` (a bundle, or a training run directory with model.onnx + labels.csv +
report.json) and a deliberately weak one built here (the demo's 8×8 colour-grid linear head,
fitted on the train photos), unless ``--no-weak``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decision_bench.py --best /work/train-run/out \\
        --work /tmp/decision-bench --json /tmp/decision-bench/result.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from iaflash.agent.config import DecisionConfig
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.evaluation.crossfit import Reading, cross_fit
from iaflash.agent.evaluation.dataset import Sample, load_dataset
from iaflash.agent.evaluation.evaluate import Inference, classified, daemon_scores, run_inference
from iaflash.agent.evaluation.fit import clopper_pearson_upper, parse_guard
from iaflash.agent.evaluation.simulate import Pair, Rates, pair_verdicts, rates, simulate_pairs
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle, Label, Preprocessing, load_bundle, write_bundle
from iaflash.engines.detect import detector_spec
from iaflash.engines.factory import create_backend
from iaflash.engines.manifest import CropSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars-dev"
FRAME_W, FRAME_H = 2448, 2048
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# Badge twins and shared platforms, from public automotive facts (not from the photos): each group is
# (make, model prefix) pairs; --twins declares, as a model owner would, the groups whose labels the
# bundle has (docs/DECISION.md, "Label groups and look-alike groups").
PLATFORM_TWINS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("CHEVROLET", "EXPRESS"), ("GMC", "SAVANA")),  # GM full-size vans
    (("CHEVROLET", "TAHOE"), ("GMC", "YUKON"), ("CADILLAC", "ESCALADE SUV")),  # GMT900 SUVs
    (("CHEVROLET", "AVALANCHE"), ("CADILLAC", "ESCALADE EXT")),  # GMT900 sport-utility trucks
    (("CHEVROLET", "SILVERADO"), ("GMC", "SIERRA")),  # GM full-size pickups
    (("CHEVROLET", "COLORADO"), ("GMC", "CANYON")),  # GM mid-size pickups
    (("CHEVROLET", "TRAVERSE"), ("GMC", "ACADIA"), ("BUICK", "ENCLAVE")),  # GM Lambda crossovers
    (("CHEVROLET", "TRAILBLAZER"), ("GMC", "ENVOY"), ("BUICK", "RAINIER"), ("ISUZU", "ASCENDER")),  # GMT360
    (("CHEVROLET", "EQUINOX"), ("GMC", "TERRAIN")),  # GM Theta crossovers
    (("DODGE", "DURANGO SUV 2012"), ("JEEP", "GRAND CHEROKEE SUV 2012")),  # Chrysler WK2 platform
    (("DODGE", "DURANGO SUV 2007"), ("CHRYSLER", "ASPEN")),  # Chrysler HB platform
    (("DODGE", "GRAND CARAVAN"), ("CHRYSLER", "TOWN AND COUNTRY"), ("RAM", "C/V")),  # Chrysler RT minivans
    (("DODGE", "SPRINTER"), ("MERCEDES-BENZ", "SPRINTER"), ("FREIGHTLINER", "SPRINTER")),  # one van, three badges
    (("FORD", "ESCAPE"), ("MAZDA", "TRIBUTE"), ("MERCURY", "MARINER")),  # Ford CD2
    (("MITSUBISHI", "ECLIPSE"), ("EAGLE", "TALON"), ("PLYMOUTH", "LASER")),  # Diamond-Star Motors
    (("DODGE", "NEON"), ("PLYMOUTH", "NEON")),
    (("GEO", "METRO"), ("SUZUKI", "SWIFT")),
    (("PEUGEOT", "108"), ("CITROEN", "C1"), ("TOYOTA", "AYGO")),
    (("DACIA", "SANDERO"), ("RENAULT", "SANDERO")),
)


def twin_groups(labels: Sequence[Label]) -> tuple[tuple[str, ...], ...]:
    """The PLATFORM_TWINS groups this taxonomy has labels of, at least two makes each, as label names."""
    out = []
    for group in PLATFORM_TWINS:
        hits = [lb for lb in labels for make, prefix in group if lb.make == make and lb.model.startswith(prefix)]
        if len({lb.make for lb in hits}) >= 2:
            out.append(tuple(dict.fromkeys(lb.name for lb in hits)))
    return tuple(out)


# ---------------------------------------------------------------- data and frames


def read_split(data: Path, split: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader((data / "labels.csv").read_text().splitlines()))
    return [r for r in rows if r["split"] == split]


def _clutter(rng: np.random.Generator) -> np.ndarray:
    """A road-like background: a vertical gradient, noise, and random rectangles (signs, cars, shadows)."""
    ramp = np.linspace(70, 150, FRAME_H, dtype=np.float32)[:, None, None]
    frame = np.repeat(np.repeat(ramp, FRAME_W, axis=1), 3, axis=2)
    frame += rng.normal(0, 10, (FRAME_H // 8, FRAME_W // 8, 3)).repeat(8, 0).repeat(8, 1)
    for _ in range(int(rng.integers(6, 14))):
        x, y = int(rng.integers(0, FRAME_W - 100)), int(rng.integers(0, FRAME_H - 100))
        w, h = int(rng.integers(60, 700)), int(rng.integers(40, 500))
        frame[y : y + h, x : x + w] = rng.integers(20, 235, 3)
    return np.clip(frame, 0, 255).astype(np.uint8)


def _condition(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "grey":  # an infrared night shot: no colour, flat contrast
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        return cv2.cvtColor(cv2.convertScaleAbs(grey, alpha=0.8, beta=20), cv2.COLOR_GRAY2BGR)
    if kind == "low_light":  # dusk: darker, noisier
        dark = image.astype(np.float32) * 0.45 + rng.normal(0, 6, image.shape)
        return np.clip(dark, 0, 255).astype(np.uint8)
    return image


def build_frame(
    photo: np.ndarray, n: int, variant: int = 0
) -> tuple[np.ndarray, tuple[int, int, int, int] | None, str]:
    """(frame, sidecar box or None, condition) for val photo number ``n`` (deterministic).

    ``variant`` 1 is a second capture of the same photo: another background and place, the box
    swapped (a photo with a sidecar box in variant 0 has none in variant 1) and another condition.
    """
    rng = np.random.default_rng(10_000 + n + 1_000_000 * variant)
    with_box = (n + variant) % 2 == 0
    c = n + 3 * variant
    condition = "grey" if c % 5 == 1 else "low_light" if c % 7 == 3 else "day"
    frame = _clutter(rng)
    h, w = photo.shape[:2]
    share = rng.uniform(0.35, 0.55) if with_box else rng.uniform(0.82, 0.92)
    scale = min(share * FRAME_W / w, 0.95 * FRAME_H / h)
    car = cv2.resize(photo, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR)
    ch, cw = car.shape[:2]
    x = int(rng.integers(0, FRAME_W - cw + 1)) if with_box else (FRAME_W - cw) // 2
    y = int(rng.integers(0, FRAME_H - ch + 1)) if with_box else (FRAME_H - ch) // 2
    frame[y : y + ch, x : x + cw] = car
    return _condition(frame, condition, rng), ((x, y, cw, ch) if with_box else None), condition


def write_captures(
    data: Path, rows: Sequence[dict[str, str]], out: Path, variant: int = 0, prefix: str = "val"
) -> dict[str, str]:
    """The val photos as radar captures (frames + sidecars + truth.csv, all genuine); capture id → condition."""
    conditions: dict[str, str] = {}
    done = out / "conditions.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    truth = [["capture", "make", "model", "truth", "registered_make", "registered_model"]]
    for n, row in enumerate(rows):
        cid = f"{prefix}{n:05d}"
        photo = cv2.imread(str(data / row["image"]), cv2.IMREAD_COLOR)
        frame, box, condition = build_frame(photo, n, variant)
        cv2.imwrite(str(out / f"{cid}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
        sidecar = {
            "schema_version": 1,
            "capture_id": cid,
            "site_id": "bench",
            "captured_at": "2026-12-01T12:00:00Z",
            "plate": "AB-123-CD",
            "vehicle_box": None if box is None else list(box),
            "images": [f"{cid}.jpg"],
        }
        (out / f"{cid}.json").write_text(json.dumps(sidecar))
        truth.append([cid, row["make"], row["model"], "genuine", "", ""])
        conditions[cid] = f"{'box' if box else 'no_box'}/{condition}"
        if (n + 1) % 200 == 0:
            print(f"  frames {n + 1}/{len(rows)}", file=sys.stderr, flush=True)
    with (out / "truth.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(truth)
    done.write_text(json.dumps(conditions))
    return conditions


def tight_samples(data: Path, rows: Sequence[dict[str, str]]) -> list[Sample]:
    return [Sample(data / r["image"], r["make"], r["model"], None, f"labels.csv:{r['image']}") for r in rows]


# ---------------------------------------------------------------- models


def bundle_from_run(run: Path, out: Path) -> Bundle:
    """A training run's model.onnx + labels.csv as a bundle trained on tight crops (crop margin 0)."""
    if (run / "manifest.json").is_file():
        return load_bundle(run)
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else {}
    size = int(report.get("size") or report.get("config", {}).get("size") or 224)
    labels = [
        Label(int(r["index"]), r["make"], r["model"])
        for r in csv.DictReader((run / "labels.csv").read_text().splitlines())
    ]
    pp = Preprocessing(height=size, width=size, color_order="RGB", mean=MEAN, std=STD, resize="stretch")
    return write_bundle(
        out,
        onnx_bytes=(run / "model.onnx").read_bytes(),
        labels=labels,
        name="cars-dev-best",
        version="bench",
        input_name="input",
        input_shape=["N", 3, size, size],
        preprocessing=pp,
        output_name="logits",
        temperature=float(report.get("temperature", 1.0) or 1.0),
        crop=CropSpec(margin=0.0, aspect="stretch"),
    )


def weak_bundle(data: Path, out: Path) -> Bundle:
    """The deliberately weak model: the demo's 8×8 colour grid + a linear head fitted on the train photos."""
    from iaflash.agent.capture.preprocess import preprocess  # noqa: PLC0415
    from iaflash.agent.demo.model import INPUT, PREPROCESSING, features, fit_softmax, onnx_bytes  # noqa: PLC0415

    if (out / "manifest.json").is_file():
        return load_bundle(out)
    rows = read_split(data, "train")
    names = sorted({(r["make"], r["model"]) for r in rows})
    index = {name: i for i, name in enumerate(names)}
    x = np.stack([preprocess(cv2.imread(str(data / r["image"]), cv2.IMREAD_COLOR), PREPROCESSING)[0] for r in rows])
    y = np.array([index[(r["make"], r["model"])] for r in rows])
    feats = features(x)
    weights, bias = fit_softmax(feats, y, len(names), steps=300)
    return write_bundle(
        out,
        onnx_bytes=onnx_bytes(weights, bias),
        labels=[Label(i, make, model) for i, (make, model) in enumerate(names)],
        name="cars-dev-weak",
        version="bench",
        input_name="input",
        input_shape=["N", 3, INPUT, INPUT],
        preprocessing=PREPROCESSING,
        output_name="logits",
        crop=CropSpec(margin=0.0, aspect="stretch"),
    )


def legacy_copy(bundle: Bundle, out: Path) -> Bundle:
    """The same model with no crop section: the legacy 10 % margin agents applied before the contract."""
    if (out / "manifest.json").is_file():
        return load_bundle(out)
    m = bundle.manifest
    return write_bundle(
        out,
        onnx_bytes=bundle.model_path.read_bytes(),
        labels=bundle.labels,
        name=m.name,
        version=f"{m.version}-legacy",
        input_name=m.input_name,
        input_shape=list(m.input_shape),
        preprocessing=m.preprocessing,
        output_name=m.output_name,
        output_kind=m.output_kind,
        temperature=m.temperature,
    )


def load_detector(path: Path, threads: int) -> tuple[Backend, Bundle]:
    """The detector as the service loads it (``Service._load_detector``): checked, loaded, warmed up."""
    bundle = load_bundle(path)
    detector_spec(bundle)  # refuses a bundle that is not a detector, as the service does
    backend = create_backend("onnxruntime", threads=threads)
    backend.load(bundle)
    backend.warmup()
    return backend, bundle


def inference(kind: str, bundle: Bundle, samples: Sequence[Sample], args: argparse.Namespace, **kw: Any) -> Inference:
    """``run_inference``, kept in ``--work`` (keyed by the bundle's and detector's manifests and the samples).

    The model part is the slow part (minutes on 2 cores); the decision figures are recomputed from it
    each run. ``--fresh`` runs the model again.
    """
    h = hashlib.sha256((bundle.path / "manifest.json").read_bytes())
    h.update(bundle.model_path.read_bytes())
    detector = kw.get("detector")
    if detector is not None:
        h.update((detector[1].path / "manifest.json").read_bytes())
    h.update("\n".join(s.where for s in samples).encode())
    path = args.work / "inference" / f"{kind}-{h.hexdigest()[:16]}.pkl"
    if path.is_file() and not args.fresh:
        return pickle.loads(path.read_bytes())  # our own file, in our own work folder
    result = run_inference(bundle, samples, threads=args.threads, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(result))
    return result


# ---------------------------------------------------------------- pairs, the cross-fit, today's defaults


def at_defaults(inference: Inference, bundle: Bundle, pairs: Sequence[Pair]) -> Rates:
    """Counts at DecisionConfig() and the bundle's temperature, as given (no operating-point rule)."""
    taxonomy = Taxonomy.from_bundle(bundle)
    probs, problems = daemon_scores(inference, bundle.manifest)
    return rates(pair_verdicts(probs, pairs, problems, taxonomy, DecisionConfig.model_validate({})), pairs)


def _hits(inference: Inference, bundle: Bundle) -> np.ndarray:
    probs, _ = daemon_scores(inference, bundle.manifest)
    ok = classified(inference)
    return np.array([bool(ok[i]) and int(np.argmax(probs[i])) == int(inference.labels[i]) for i in range(len(ok))])


def top1(inference: Inference, bundle: Bundle) -> tuple[float, int]:
    """Top-1 over ALL samples (an unclassified sample counts as wrong), and how many were classified."""
    hits = _hits(inference, bundle)
    return float(hits.mean()) if len(hits) else 0.0, int(classified(inference).sum())


def per_condition(inference: Inference, bundle: Bundle, conditions: dict[str, str]) -> dict[str, str]:
    hits, ok = _hits(inference, bundle), classified(inference)
    by: dict[str, list[int]] = {}
    for i, s in enumerate(inference.samples):
        key = conditions.get(s.capture.capture_id if s.capture else "", "?")
        by.setdefault(key, [0, 0, 0])
        by[key][0] += 1
        by[key][1] += bool(hits[i])
        by[key][2] += not ok[i]
    return {k: f"{v[1] / v[0]:.1%} of {v[0]} ({v[2]} not classified)" for k, v in sorted(by.items())}


# ---------------------------------------------------------------- the run


def measure(
    name: str,
    bundle: Bundle,
    data: Path,
    rows: Sequence[dict[str, str]],
    captures: Path,
    conditions: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    tight = inference(f"{name}-tight", bundle, tight_samples(data, rows), args)
    print(f"  {name}: tight photos done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    samples = load_dataset(captures)
    detector = args.detector_pair  # frames without a sidecar box: the daemon's detector path (or the whole frame)
    daemon = inference(f"{name}-daemon", bundle, samples, args, detector=detector)
    print(f"  {name}: daemon crops done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    legacy_bundle = legacy_copy(bundle, args.work / f"{name}-legacy")
    legacy = inference(f"{name}-legacy", legacy_bundle, samples, args, detector=detector)
    print(f"  {name}: legacy crops done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    fit_only: list[bool] = [False] * len(daemon.samples)
    if args.fit_extra is not None:  # photos held out of the model's training: they join every fold's fit
        extra_rows = list(csv.DictReader(args.fit_extra.read_text().splitlines()))
        extra_dir = args.work / f"captures-extra-{hashlib.sha256(args.fit_extra.read_bytes()).hexdigest()[:8]}"
        write_captures(data, extra_rows, extra_dir, prefix="fx")
        extra = inference(f"{name}-daemon-extra", bundle, load_dataset(extra_dir), args, detector=detector)
        print(f"  {name}: {len(extra.samples)} fit-only frames done", file=sys.stderr, flush=True)
        fit_only += [True] * len(extra.samples)
        daemon = concat(daemon, extra)
    pairs = simulate_pairs(daemon.labels, Taxonomy(bundle.labels), clones_per_image=1, seed=0)
    fitted = cross_fit(
        daemon, bundle, pairs, folds=args.folds, target=args.fit_target, fit_only=fit_only, guard=args.guard
    )
    second = None
    if args.second_frame:  # a second capture of each photo (other place, box swapped, other light)
        second_dir = args.work / f"captures2-{len(rows)}"
        write_captures(data, rows, second_dir, variant=1)
        second = inference(f"{name}-daemon2", bundle, load_dataset(second_dir), args, detector=detector)
        print(f"  {name}: second frames done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    readings = reading_maps(daemon, tight, legacy, rows, second)
    robust = cross_fit(
        daemon,
        bundle,
        pairs,
        folds=args.folds,
        target=args.fit_target,
        readings=readings,
        fit_only=fit_only,
        guard=args.guard,
    )
    legacy_pairs = simulate_pairs(legacy.labels, Taxonomy(bundle.labels), clones_per_image=1, seed=0)
    defaults = at_defaults(legacy, legacy_bundle, legacy_pairs)
    t_tight, _ = top1(tight, bundle)
    t_daemon, n_daemon = top1(daemon, bundle)
    t_legacy, n_legacy = top1(legacy, legacy_bundle)
    return {
        "model": name,
        "bundle": str(bundle.path),
        "detector": None if detector is None else str(detector[1].path),
        "crop": bundle.manifest.crop.to_dict() if getattr(bundle.manifest, "crop", None) else None,
        "samples": len(daemon.samples),
        "top1_tight": t_tight,
        "top1_daemon": t_daemon,
        "classified_daemon": n_daemon,
        "top1_legacy": t_legacy,
        "classified_legacy": n_legacy,
        "by_condition": per_condition(daemon, bundle, conditions),
        "fit_only": sum(fit_only),
        "fitted": fitted.rates.to_dict(),
        "robust": robust.rates.to_dict(),
        "readings": "daemon crop, " + ", ".join(r.name for r in readings),
        "defaults": defaults.to_dict(),
        "folds": list(fitted.folds),
        "robust_folds": list(robust.folds),
        "flagged": flagged_genuine(fitted, daemon, args.folds),
        "robust_flagged": flagged_genuine(robust, daemon, args.folds),
        "seconds": time.perf_counter() - t0,
    }


def reading_maps(
    daemon: Inference,
    tight: Inference,
    legacy: Inference,
    rows: Sequence[dict[str, str]],
    second: Inference | None = None,
) -> list[Reading]:
    """The tight photos, the legacy-margin crops (and the second frames) as readings of the daemon's items."""
    item = {
        int(s.capture.capture_id[3:]): i
        for i, s in enumerate(daemon.samples)
        if s.capture is not None and s.capture.capture_id.startswith("val")
    }
    row = {r["image"]: n for n, r in enumerate(rows)}

    def by_capture(inf: Inference) -> np.ndarray:
        return np.array([item.get(int(s.capture.capture_id[3:]), -1) if s.capture else -1 for s in inf.samples])

    tight_items = np.array([item.get(row.get(s.where.split(":", 1)[1], -1), -1) for s in tight.samples])
    out = [Reading(tight, tight_items, name="tight"), Reading(legacy, by_capture(legacy), name="margin=0.1")]
    if second is not None:
        out.append(Reading(second, by_capture(second), name="second frame"))
    return out


def concat(a: Inference, b: Inference) -> Inference:
    """One inference over a's items then b's (the bench's val frames, then its fit-only frames)."""
    return replace(
        a,
        samples=a.samples + b.samples,
        logits=np.concatenate([a.logits, b.logits]),
        labels=np.concatenate([a.labels, b.labels]),
        image_problems=a.image_problems + b.image_problems,
        unsupported=a.unsupported + b.unsupported,
        evidence=a.evidence + b.evidence,
        digests=a.digests + b.digests,
        rejected=a.rejected + b.rejected,
        outputs=a.outputs + b.outputs,
        views=a.views + b.views,
    )


def flagged_genuine(fit: Any, daemon: Inference, folds: int) -> list[dict[str, Any]]:
    """Every genuine capture flagged out of fold: what it is, what it was read as, and at which point."""
    out = []
    for pair, verdict in zip(fit.reported, fit.verdicts, strict=True):
        if pair.clone or not verdict.is_flag:
            continue
        sample = daemon.samples[pair.sample]
        top = verdict.top_k[0] if verdict.top_k else None
        out.append(
            {
                "capture": sample.capture.capture_id if sample.capture else sample.where,
                "registered": f"{pair.record.make} {pair.record.model}",
                "seen": None if top is None else f"{top.make} {top.model} p={top.p:.3f}",
                "level": verdict.level,
                "fold": pair.sample % folds,
                "vehicle": daemon.evidence[pair.sample].get("vehicle_source") if daemon.evidence else None,
            }
        )
    return out


def _rate(r: dict[str, Any], kind: str) -> str:
    n, k = r[f"{kind}_clones"], r[f"{kind}_detected"]
    return f"{k / n:.1%} ({k}/{n})" if n else "—"


def table(results: Sequence[dict[str, Any]], target: float) -> str:
    lines = [
        "| model | operating point | genuine flagged (95 % upper bound) | genuine abstained | "
        "make-level clones caught | model-level clones caught | top-1 tight → daemon crops (lost) |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        also = f", fits also on {res['fit_only']} held-out photos" if res.get("fit_only") else ""
        for label, r, daemon_top1 in (
            (f"fitted out of fold (K={len(res['folds'])}{also})", res["fitted"], res["top1_daemon"]),
            (
                f"fitted out of fold on readings ({res['readings']}){also}",
                res["robust"],
                res["top1_daemon"],
            ),
            ("today's defaults (legacy 10 % margin)", res["defaults"], res["top1_legacy"]),
        ):
            n, k, a = r["genuine"], r["genuine_flagged"], r["genuine_abstained"]
            upper = clopper_pearson_upper(k, n)
            met = "met" if upper <= target else "NOT met"
            lines.append(
                f"| {res['model']} | {label} | {k}/{n} = {k / n:.2%} (≤ {upper:.2%}, {met}) | {a / n:.1%} | "
                f"{_rate(r, 'make')} | {_rate(r, 'model')} | {res['top1_tight']:.1%} → {daemon_top1:.1%} "
                f"({(res['top1_tight'] - daemon_top1) * 100:.1f} pts lost) |"
            )
    return "\n".join(lines)


def _guard(text: str) -> float | str:
    try:
        return parse_guard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--best", type=Path, help="the best classifier: a bundle or a training run directory")
    parser.add_argument("--no-weak", action="store_true", help="skip the deliberately weak model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/iaflash-decision-bench"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--fit-target",
        type=float,
        default=0.0035,
        help="target given to the fit on K-1 folds (~977 genuine: 0 flags bound it at 0.31 %%)",
    )
    parser.add_argument("--target", type=float, default=0.0025, help="reported target: 95 %% upper bound")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fit-extra",
        type=Path,
        help="photos (a labels.csv of the same data, e.g. train photos held out of the model's training) that "
        "join every fold's fit as genuine radar-like captures and are never reported",
    )
    parser.add_argument(
        "--twins",
        action="store_true",
        help="declare the PLATFORM_TWINS groups the taxonomy has as look-alike groups (badge twins never make a flag)",
    )
    parser.add_argument(
        "--second-frame",
        action="store_true",
        help="the fit on readings also reads a second radar-like frame of each photo (box swapped, other light)",
    )
    parser.add_argument(
        "--guard",
        type=_guard,
        default=1.0,
        help="the fit's guard: genuine samples are also judged at probabilities sharpened to this power "
        "(1 = none), or 'auto': each fold chooses its own by cross-validation inside its fitting set",
    )
    parser.add_argument("--limit", type=int, default=0, help="use only the first N val photos (smoke runs)")
    parser.add_argument("--json", dest="json_out", type=Path)
    parser.add_argument("--fresh", action="store_true", help="run the models again (default: reuse --work/inference)")
    parser.add_argument(
        "--detector",
        type=Path,
        help="a vehicle detector bundle: frames without a sidecar box go through the daemon's detector path",
    )
    args = parser.parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        print(f"cars-dev not found at {args.data} (no labels.csv): nothing measured. See the issue for the data.")
        return 0
    rows = read_split(args.data, "val")
    rows = rows[: args.limit] if args.limit else rows
    args.work.mkdir(parents=True, exist_ok=True)
    captures = args.work / f"captures-{len(rows)}"
    print(f"building {len(rows)} radar-like frames in {captures}", file=sys.stderr, flush=True)
    conditions = write_captures(args.data, rows, captures)
    args.detector_pair = None if args.detector is None else load_detector(args.detector, args.threads)
    models: list[tuple[str, Bundle]] = []
    if args.best is not None:
        models.append(("best", bundle_from_run(args.best, args.work / "best-bundle")))
    if not args.no_weak:
        models.append(("weak", weak_bundle(args.data, args.work / "weak-bundle")))
    if args.twins:  # declared as a model owner would (same model, same inference cache: the manifest file is unchanged)
        models = [
            (n, replace(b, manifest=replace(b.manifest, lookalike_groups=twin_groups(b.labels)))) for n, b in models
        ]
        for n, b in models:
            print(f"{n}: look-alike groups {[list(g) for g in b.manifest.lookalike_groups]}", file=sys.stderr)
    try:
        results = [measure(name, b, args.data, rows, captures, conditions, args) for name, b in models]
    finally:
        if args.detector_pair is not None:
            args.detector_pair[0].close()
    print(table(results, args.target))
    for r in results:
        print(f"\n{r['model']}: {r['bundle']} crop={r['crop']} detector={r['detector']} ({r['seconds']:.0f}s)")
        print(f"  top-1 by frame kind (daemon crops): {r['by_condition']}")
        for kind in ("flagged", "robust_flagged"):
            for f in r[kind]:
                print(f"  {kind.replace('_', ' ')} genuine: {f}")
        for kind in ("folds", "robust_folds"):
            for f in r[kind]:
                print(
                    f"  {'plain' if kind == 'folds' else 'readings'} fold {f['fold']}: met={f['met']} "
                    f"thresholds={f['thresholds']} T={f['temperature']:.3f} "
                    f"fit flags {f['flags']}/{f['n_genuine']} (bound {f['upper_bound']:.4f}) guard={f['guard']:g}"
                    + (f" (inner escapes {f['guard_choice']['escapes']})" if "guard_choice" in f else "")
                )
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
