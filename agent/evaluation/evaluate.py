"""Evaluate a classifier bundle on labelled photos or captures, through the daemon's own path.

* :func:`run_inference` turns every sample into the daemon's capture and runs the daemon's own
  intake (:class:`iaflash.agent.capture.intake.Preparer`: JPEG checks, reduced decode, vehicle
  box, crop, quality gates, tensor), then the bundle's model and the daemon's calibrated softmax.
  Nothing of the intake is re-implemented here. Samples whose label is outside the taxonomy are
  kept aside as *unsupported*; captures the daemon would reject are kept aside as *rejected*.
* :func:`evaluate` assembles the document (schema ``iaflash.evaluation/2``) that
  ``iaflash-agent evaluate --json`` prints and the HTML report shows: accuracy, calibration,
  the joint sweep (:mod:`iaflash.agent.evaluation.simulate`, through the daemon's ``decide``),
  operating points judged on the 95 % upper bound, confusions, flagged genuine items,
  provenance, warnings, and one row per sample.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np

from iaflash.agent.capture.intake import Preparer
from iaflash.agent.capture.preprocess import inspect_jpeg
from iaflash.agent.capture.sidecar import Capture, parse_sidecar
from iaflash.agent.config import DecisionConfig, SpoolConfig
from iaflash.agent.decision.operating import decision_policy
from iaflash.agent.decision.taxonomy import Taxonomy, norm_make
from iaflash.agent.decision.verdict import Verdict, thresholds_of
from iaflash.agent.errors import CaptureRejected, DatasetError
from iaflash.agent.evaluation.calibrate import ECE_BINS, calibration_summary, reliability
from iaflash.agent.evaluation.dataset import IMAGE_SUFFIXES, Sample, dataset_digest, load_dataset
from iaflash.agent.evaluation.simulate import (
    MIN_TOP1_GRID,
    THRESHOLD_GRID,
    Pair,
    Progress,
    Rates,
    SweepPoint,
    genuine_needed,
    joint_sweep,
    outcome_name,
    outcome_rates,
    pair_verdicts,
    rates,
    recommend,
    simulate_pairs,
    sweep_config,
)
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle, sha256_file
from iaflash.engines.factory import create_backend
from iaflash.engines.manifest import Manifest
from iaflash.engines.scores import fuse, raw_logits, score_views

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "Inference",
    "Pair",
    "Sample",
    "accuracy",
    "evaluate",
    "load_dataset",
    "require_supported",
    "run_inference",
]

SCHEMA = "iaflash.evaluation/2"
FLAGGED_LISTED = 500
"""At most this many flagged genuine items are listed per operating point (all are counted)."""
_PHOTO_LIMITS = {"max_image_pixels": 1 << 40, "min_image_side": 1}
"""Labelled photos are not radar frames: the frame-size gates of the spool do not apply to them."""


@dataclass(frozen=True)
class Inference:
    """What the daemon's intake and model made of the supported samples.

    ``logits`` ``[N, C]`` are the raw logits of each sample's first view (``log p`` for probability
    outputs; NaN rows for samples the intake left unclassified), for calibration; ``outputs`` and
    ``views`` are every view's outputs (flip, second image), which :func:`as_probs` fuses exactly as
    the daemon does. ``evidence`` is the intake's evidence per sample (vehicle source, box, decode reduction…),
    ``digests`` the sha256 of each sample's image, ``rejected`` the captures the daemon rejects.
    """

    samples: tuple[Sample, ...]
    logits: np.ndarray
    labels: np.ndarray
    image_problems: tuple[str | None, ...]
    unsupported: tuple[Sample, ...]
    evidence: tuple[dict[str, Any], ...] = ()
    digests: tuple[str, ...] = ()
    rejected: tuple[tuple[Sample, str], ...] = ()
    dataset_sha256: str = ""
    outputs: tuple[np.ndarray | None, ...] = ()
    views: tuple[tuple[str, ...], ...] = ()


def _photo_capture(sample: Sample, n: int) -> Capture:
    doc = {
        "schema_version": 1,
        "capture_id": f"eval-{n:06d}",
        "site_id": "evaluation",
        "captured_at": "2026-01-01T00:00:00Z",
        "vehicle_box": None if sample.box is None else list(sample.box),
    }
    return parse_sidecar(json.dumps(doc).encode(), source=sample.where)


def preparers(bundle: Bundle, spool_cfg: SpoolConfig, detector: Any = None) -> tuple[Preparer, Preparer]:
    """The daemon's intake for captures (``spool_cfg``'s limits) and for photos (no frame-size gates)."""
    photo_cfg = SpoolConfig.model_validate({**spool_cfg.model_dump(), **_PHOTO_LIMITS})
    return Preparer(spool_cfg, bundle.manifest, detector), Preparer(photo_cfg, bundle.manifest, detector)


def _read(sample: Sample) -> tuple[bytes, str]:
    try:
        data = sample.image.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{sample.where}: cannot read {sample.image} ({exc.strerror})") from exc
    return data, hashlib.sha256(data).hexdigest()


@dataclass
class _Prepared:
    sample: Sample
    tensor: np.ndarray | None
    views: tuple[str, ...]
    problem: str | None
    evidence: dict[str, Any]
    digest: str


def _capture_images(sample: Sample, first: bytes) -> list[bytes]:
    """The capture's image bytes in sidecar order (the first one already read)."""
    if sample.capture is None or len(sample.capture.images) < 2:
        return [first]
    root = sample.image.parent
    try:
        return [first, *((root / name).read_bytes() for name in sample.capture.images[1:])]
    except OSError as exc:
        raise DatasetError(
            f"{sample.where}: cannot read an image of capture {sample.capture.capture_id!r} ({exc})"
        ) from exc


def _prepare(sample: Sample, n: int, pair: tuple[Preparer, Preparer]) -> _Prepared | tuple[Sample, str]:
    data, digest = _read(sample)
    preparer = pair[0] if sample.capture is not None else pair[1]
    capture = sample.capture or _photo_capture(sample, n)
    try:
        done = preparer.prepare_capture(capture, _capture_images(sample, data))
    except CaptureRejected as exc:
        if sample.capture is None:  # a photo the daemon cannot read is a dataset error
            raise DatasetError(f"{sample.where}: {sample.image}: {exc}") from exc
        return sample, str(exc)
    width, height = inspect_jpeg(data, max_pixels=1 << 40, min_side=1)
    evidence = {**done.evidence, "frame_size": [width, height], "sidecar_box": sample.box}
    return _Prepared(sample, done.tensor, done.views, done.problem, evidence, digest)


def run_inference(
    bundle: Bundle,
    samples: Sequence[Sample],
    *,
    backend_kind: str = "onnxruntime",
    batch_size: int = 16,
    threads: int = 0,
    progress: Progress | None = None,
    spool_cfg: SpoolConfig | None = None,
    detector: Any = None,
) -> Inference:
    """Run every supported sample through the daemon's intake and the bundle's model; see :class:`Inference`.

    ``detector`` is the daemon's ``(backend, bundle)`` pair, used when a sample has no box.
    """
    taxonomy = Taxonomy(bundle.labels)
    indices = [taxonomy.resolve(s.make, s.model) for s in samples]
    kept = [(s, int(i)) for s, i in zip(samples, indices, strict=True) if i is not None]
    intake = preparers(bundle, spool_cfg or SpoolConfig.model_validate({}), detector)
    prepared: list[_Prepared] = []
    labels: list[int] = []
    rejected: list[tuple[Sample, str]] = []
    outputs: list[np.ndarray | None] = []
    with create_backend(backend_kind, threads=threads) as backend:
        backend.load(bundle)
        size = batch_size if backend.input_spec.batch_dynamic else int(backend.input_spec.shape[0] or 1)
        for start in range(0, len(kept), size):
            chunk: list[_Prepared] = []
            for n, (sample, label) in enumerate(kept[start : start + size], start=start):
                item = _prepare(sample, n, intake)
                if isinstance(item, tuple):
                    rejected.append(item)
                    continue
                chunk.append(item)
                labels.append(label)
            outputs.extend(_infer(backend, [p.tensor for p in chunk]))
            prepared.extend(chunk)
            if progress is not None:
                progress(min(start + size, len(kept)), len(kept))
    logits = _first_views(outputs, len(bundle.labels), bundle)
    digests = [p.digest for p in prepared]
    return Inference(
        samples=tuple(p.sample for p in prepared),
        logits=logits,
        labels=np.array(labels, dtype=np.int64),
        image_problems=tuple(p.problem for p in prepared),
        unsupported=tuple(s for s, i in zip(samples, indices, strict=True) if i is None),
        evidence=tuple(p.evidence for p in prepared),
        digests=tuple(digests),
        rejected=tuple(rejected),
        dataset_sha256=dataset_digest([p.sample for p in prepared], digests),
        outputs=tuple(outputs),
        views=tuple(p.views for p in prepared),
    )


def _infer(backend: Any, tensors: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """One backend call for every view of the chunk; each item gets its ``[V, C]`` rows (None: unclassified)."""
    ready = [t for t in tensors if t is not None]
    if not ready:
        return [None] * len(tensors)
    out = np.asarray(backend.infer(np.concatenate(ready)), dtype=np.float64)
    rows: list[np.ndarray | None] = []
    at = 0
    for t in tensors:
        if t is None:
            rows.append(None)
            continue
        rows.append(out[at : at + len(t)])
        at += len(t)
    return rows


def _first_views(outputs: list[np.ndarray | None], classes: int, bundle: Bundle) -> np.ndarray:
    shapes = {o.shape[1:] for o in outputs if o is not None}
    if shapes and shapes != {(classes,)}:
        raise DatasetError(
            f"{bundle.path}: model outputs {sorted(shapes)} scores per image, labels.csv has {classes} "
            "classes; fix: re-pack the bundle"
        )
    logits = np.full((len(outputs), classes), np.nan)
    for n, o in enumerate(outputs):
        if o is not None:
            logits[n] = raw_logits(o[0], bundle.manifest.output_kind)
    return logits


# ---------------------------------------------------------------- figures


def classified(inference: Inference) -> np.ndarray:
    """Mask of the samples that reached the classifier (a tensor, no image problem)."""
    return ~np.isnan(inference.logits).any(axis=1) if len(inference.logits) else np.zeros(0, dtype=bool)


def accuracy(scores: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, k: int = 5) -> dict[str, float]:
    """Top-1, top-k and make accuracy (make of the top-1 label = true make) of scores ``[N, C]``."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return {"top1": 0.0, f"top{k}": 0.0, "make": 0.0}
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0]
    makes = np.array([norm_make(lb.make) for lb in taxonomy.labels])
    return {
        "top1": float((top1 == labels).mean()),
        f"top{k}": float((order[:, :k] == labels[:, None]).any(axis=1).mean()),
        "make": float((makes[top1] == makes[labels]).mean()),
    }


def require_supported(inference: Inference, dataset: Path | None = None) -> None:
    """Refuse an inference in which no sample has a label of the bundle's taxonomy."""
    if not inference.samples:
        where = f"{dataset}: " if dataset is not None else ""
        raise DatasetError(
            f"{where}none of the {len(inference.unsupported) + len(inference.rejected)} samples was evaluated "
            f"({len(inference.unsupported)} with a label outside the bundle's taxonomy, "
            f"{len(inference.rejected)} rejected by the intake); fix: check the make/model spellings "
            "against the bundle's labels.csv and the frames against the spool limits"
        )


def daemon_scores(inference: Inference, manifest: Manifest) -> tuple[np.ndarray, list[str | None]]:
    """The daemon's calibrated probabilities and why each sample is not judged (None: judged).

    Each sample's views are fused by :func:`iaflash.engines.scores.score_views` with ``manifest``
    (its temperature, fusion and OOD gate), the daemon's own function. Unclassified samples get a
    NaN row and their intake problem; an OOD sample keeps its probabilities and the OOD problem.
    """
    probs = np.full(inference.logits.shape, np.nan)
    problems: list[str | None] = list(inference.image_problems)
    for n, out in enumerate(inference.outputs):
        if out is None:
            problems[n] = problems[n] or "not classified"
            continue
        fused, problem = score_views(out, inference.views[n], manifest)
        probs[n] = fused.probs
        problems[n] = problems[n] or problem
    return probs, problems


def as_probs(inference: Inference, temperature: float, output_kind: str = "logits") -> np.ndarray:
    """The probabilities the daemon would compute at ``temperature`` (NaN rows for unclassified samples)."""
    probs = np.full(inference.logits.shape, np.nan)
    for n, out in enumerate(inference.outputs):
        if out is not None:
            probs[n] = fuse(out, inference.views[n], output_kind=output_kind, temperature=temperature).probs
    return probs


def supported_summary(inference: Inference) -> dict[str, Any]:
    """How many samples were evaluated, set aside (unsupported label, rejected), or had no usable image."""
    unsupported = Counter(f"{s.make} {s.model}" for s in inference.unsupported)
    return {
        "samples": len(inference.samples) + len(inference.unsupported) + len(inference.rejected),
        "evaluated": len(inference.samples),
        "unsupported": len(inference.unsupported),
        "unsupported_labels": dict(sorted(unsupported.items())),
        "rejected": len(inference.rejected),
        "rejected_reasons": dict(sorted(Counter(r for _, r in inference.rejected).items())),
        "poor_image": sum(p is not None for p in inference.image_problems),
        "sha256": inference.dataset_sha256,
    }


def rounded(value: Any) -> Any:
    """Floats rounded to 6 decimals (NaN → None), recursively: the document's number format."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def _signature(bundle: Bundle) -> dict[str, Any]:
    path = bundle.path / SIGNATURE_FILE
    if not path.is_file():
        return {"signed": False, "signer": None, "key_id": None, "signed_at": None}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"signed": True, "signer": None, "key_id": None, "signed_at": None, "error": "unreadable signature"}
    return {"signed": True, **{k: doc.get(k) for k in ("signer", "key_id", "signed_at")}}


def bundle_provenance(bundle: Bundle) -> dict[str, Any]:
    """Path, name, version, sha256 of manifest and model, and the signature's signer (not verified here)."""
    return {
        "path": str(bundle.path),
        "name": bundle.manifest.name,
        "version": bundle.manifest.version,
        "temperature": bundle.manifest.temperature,
        "classes": len(bundle.labels),
        "manifest_sha256": sha256_file(bundle.path / MANIFEST_FILE),
        "model_sha256": sha256_file(bundle.model_path),
        "signature": _signature(bundle),
    }


def shipped_config(bundle: Bundle, base: DecisionConfig) -> DecisionConfig | None:
    """The bundle's fitted operating point (manifest ``operating_point``) as a decision config, or None."""
    point = getattr(bundle.manifest, "operating_point", None)
    if point is None:
        return None
    known = set(DecisionConfig.model_fields)
    data = {**base.model_dump(), **{k: v for k, v in point.thresholds.items() if k in known}}
    data["match_threshold"] = max(data["match_threshold"], data["model_threshold"])
    return DecisionConfig.model_validate(data)


# ---------------------------------------------------------------- pairs, rows, flagged items


def capture_pairs(inference: Inference) -> list[Pair]:
    """One pair per capture: the vehicle read against the registry text given in truth.csv."""
    return [
        Pair(n, RegistryRecord(*(s.registered or (s.make, s.model)), None, None), s.kind)
        for n, s in enumerate(inference.samples)
    ]


def make_pairs(inference: Inference, taxonomy: Taxonomy, clones_per_image: int, seed: int) -> list[Pair]:
    """Captures: their truth.csv pair each; photos: genuine + simulated make- and model-level clones."""
    if all(s.capture is not None for s in inference.samples):
        return capture_pairs(inference)
    return simulate_pairs(inference.labels, taxonomy, clones_per_image, seed)


def _box_used(evidence: dict[str, Any]) -> Any:
    """The vehicle box the daemon classified, in frame pixels (the intake's crop evidence)."""
    crop = evidence.get("crop")
    if isinstance(crop, dict):
        return crop.get("box") or crop.get("region")
    if evidence.get("vehicle_source") == "sidecar":
        return evidence.get("sidecar_box")
    if evidence.get("vehicle_source") == "none" and evidence.get("frame_size"):
        return [0, 0, *evidence["frame_size"]]
    return None


def _top1(probs: np.ndarray, taxonomy: Taxonomy) -> dict[str, Any] | None:
    if np.isnan(probs).any():
        return None
    i = int(np.argmax(probs))
    return {"make": taxonomy.labels[i].make, "model": taxonomy.labels[i].model, "p": float(probs[i])}


def _row(
    n: int, inference: Inference, probs: np.ndarray, problems: Sequence[str | None], taxonomy: Taxonomy
) -> dict[str, Any]:
    s, ev = inference.samples[n], inference.evidence[n]
    return {
        "index": n,
        "where": s.where,
        "image": str(s.image),
        "sha256": inference.digests[n],
        "capture_id": None if s.capture is None else s.capture.capture_id,
        "truth": {"make": s.make, "model": s.model, "kind": s.kind},
        "top1": _top1(probs[n], taxonomy),
        "correct": bool(not np.isnan(probs[n]).any() and int(np.argmax(probs[n])) == int(inference.labels[n])),
        "image_problem": problems[n],
        "vehicle_source": ev.get("vehicle_source"),
        "box": _box_used(ev),
        "frame_size": ev.get("frame_size"),
        "intake": {k: v for k, v in ev.items() if k not in ("frame_size", "sidecar_box")},
        "pairs": [],
    }


def _verdict_doc(pair: Pair, verdict: Verdict, point: str) -> dict[str, Any]:
    return {
        "point": point,
        "kind": pair.kind,
        "registered": {"make": pair.record.make, "model": pair.record.model},
        "outcome": outcome_name(verdict),
        "reason": verdict.reason,
        "p_make": verdict.p_make,
        "p_model": verdict.p_model,
    }


def _flagged(rows: list[dict[str, Any]], pairs: Sequence[Pair], verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    items = []
    for pair, verdict in zip(pairs, verdicts, strict=True):
        if pair.kind == "genuine" and verdict.outcome == "mismatch":
            row = rows[pair.sample]
            items.append(
                {
                    **{k: row[k] for k in ("index", "where", "image", "truth", "top1", "box", "frame_size")},
                    "vehicle_source": row["vehicle_source"],
                    "outcome": outcome_name(verdict),
                    "reason": verdict.reason,
                }
            )
    return items


def confusions(inference: Inference, probs: np.ndarray, taxonomy: Taxonomy, top: int = 15) -> list[dict[str, Any]]:
    """The most frequent (true label → predicted top-1) mistakes, with whether the make is the same."""
    counts: Counter[tuple[int, int]] = Counter()
    for n, y in enumerate(int(v) for v in inference.labels):
        if not np.isnan(probs[n]).any() and int(np.argmax(probs[n])) != y:
            counts[(y, int(np.argmax(probs[n])))] += 1
    out = []
    for (y, p), count in counts.most_common(top):
        t, q = taxonomy.labels[y], taxonomy.labels[p]
        out.append(
            {
                "true": f"{t.make} {t.model}",
                "predicted": f"{q.make} {q.model}",
                "count": count,
                "same_make": norm_make(t.make) == norm_make(q.make),
            }
        )
    return out


# ---------------------------------------------------------------- the document


def _point(name: str, cfg: DecisionConfig, r: Rates, target: float, no_flag_reason: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "thresholds": thresholds_of(cfg),
        **r.to_dict(),
        "met": r.met(target),
        "never_flags": no_flag_reason,
    }


def _named_points(
    bundle: Bundle, cfg: DecisionConfig, best: SweepPoint | None
) -> list[tuple[str, DecisionConfig, str | None]]:
    """daemon (config + the bundle's operating point, as the daemon combines them), configured (the
    config as given), shipped (the bundle's point alone) and recommended (the sweep's best)."""
    policy = decision_policy(cfg, bundle.manifest.operating_point)
    named: list[tuple[str, DecisionConfig, str | None]] = [
        ("daemon", policy.cfg, policy.no_flag_reason),
        ("configured", cfg, None),
    ]
    shipped = shipped_config(bundle, cfg)
    if shipped is not None:
        named.append(("shipped", shipped, None))
    if best is not None:
        point = sweep_config(cfg, min_top1=best.min_top1, make=best.make_threshold, model=best.model_threshold)
        named.append(("recommended", point, None))
    return named


def _warnings(points: list[dict[str, Any]], target: float, genuine: int) -> list[str]:
    out = []
    for p in points:
        if p["never_flags"]:
            out.append(f"The daemon NEVER FLAGS with this bundle and config: {p['never_flags']}")
            continue
        if p["name"] == "recommended" or p["met"]:
            continue
        out.append(
            f"The {p['name']} thresholds MISS the target: {p['genuine_flagged']} of {p['genuine']} genuine "
            f"flagged ({p['false_flag_rate']:.3%}), 95% upper bound {p['false_flag_upper']:.3%} > target "
            f"{target:.3%}. Do not deploy them on this evidence."
        )
    need = genuine_needed(target)
    if genuine < need:
        out.append(
            f"Only {genuine} genuine samples: even with no flag at all, the 95% upper bound is "
            f"{1 - 0.05 ** (1 / max(genuine, 1)):.3%}; showing a false-flag rate ≤ {target:.3%} needs at "
            f"least {need} genuine samples with no flag."
        )
    return out


def evaluate(
    bundle: Bundle,
    inference: Inference,
    cfg: DecisionConfig,
    *,
    target: float = 0.001,
    clones_per_image: int = 1,
    seed: int = 0,
    min_top1_grid: Sequence[float] = MIN_TOP1_GRID,
    thresholds: Sequence[float] = THRESHOLD_GRID,
    progress: Progress | None = None,
    dataset_path: Path | None = None,
) -> dict[str, Any]:
    """The evaluation document (schema ``iaflash.evaluation/2``): every figure of the report and one row per sample."""
    require_supported(inference)
    taxonomy, temperature = Taxonomy.from_bundle(bundle), bundle.manifest.temperature
    categories = tuple(lb.category for lb in bundle.labels) if any(lb.category for lb in bundle.labels) else None
    probs, problems = daemon_scores(inference, bundle.manifest)
    is_captures = all(s.capture is not None for s in inference.samples)
    pairs = make_pairs(inference, taxonomy, clones_per_image, seed)
    sweep = joint_sweep(
        probs,
        pairs,
        problems,
        taxonomy,
        cfg,
        min_top1_grid=min_top1_grid,
        threshold_grid=thresholds,
        label_categories=categories,
        progress=progress,
    )
    rows = [_row(n, inference, probs, problems, taxonomy) for n in range(len(inference.samples))]
    named = _named_points(bundle, cfg, recommend(sweep, target))
    points, flagged, outcomes = [], {}, {}
    for name, point_cfg, no_flag_reason in named:
        verdicts = pair_verdicts(probs, pairs, problems, taxonomy, point_cfg, categories, no_flag_reason)
        points.append(_point(name, point_cfg, rates(verdicts, pairs), target, no_flag_reason))
        flagged[name] = _flagged(rows, pairs, verdicts)[:FLAGGED_LISTED]
        outcomes[name] = outcome_rates(verdicts, pairs)
        for pair, verdict in zip(pairs, verdicts, strict=True):
            rows[pair.sample]["pairs"].append(_verdict_doc(pair, verdict, name))
    ok = classified(inference)
    genuine = sum(p.kind == "genuine" for p in pairs)
    dataset = {**supported_summary(inference), "path": None if dataset_path is None else str(dataset_path)}
    dataset["kind"] = "captures" if is_captures else "photos"
    if dataset_path is not None and dataset_path.is_file():
        dataset["listing_sha256"] = sha256_file(dataset_path)
    return cast(
        dict[str, Any],
        rounded(
            {
                "schema": SCHEMA,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "bundle": bundle_provenance(bundle),
                "dataset": dataset,
                "accuracy": {"classified": int(ok.sum()), **accuracy(probs[ok], inference.labels[ok], taxonomy)},
                "calibration": {
                    "bins": ECE_BINS,
                    **calibration_summary(inference.logits[ok], inference.labels[ok], temperature),
                    "reliability": [dict(vars(b)) for b in reliability(probs[ok], inference.labels[ok])],
                },
                "simulation": {
                    "pairs": "captures (truth.csv)" if is_captures else "simulated",
                    "clones_per_image": None if is_captures else clones_per_image,
                    "seed": None if is_captures else seed,
                    **{f"{k}_pairs": sum(p.kind == k for p in pairs) for k in ("genuine", "make", "model")},
                },
                "target": {"false_flag_rate": target, "confidence": 0.95, "genuine_needed": genuine_needed(target)},
                "sweep": [p.to_dict() for p in sweep],
                "operating_points": points,
                "outcomes": outcomes,
                "warnings": _warnings(points, target, genuine),
                "confusions": confusions(inference, probs, taxonomy),
                "flagged_genuine": flagged,
                "rows": rows,
            }
        ),
    )
