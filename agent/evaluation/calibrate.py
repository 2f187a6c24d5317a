"""Calibration of a classifier's scores: NLL, expected calibration error, temperature fitting.

The decision compares P(registered make/model | image) with thresholds, so those probabilities
must mean what they say. Temperature scaling (one scalar T, ``softmax(logits / T)``) fixes the
usual over-confidence of a trained network without changing its top-1 prediction.

* :func:`nll`, :func:`expected_calibration_error` and :func:`reliability` measure calibration.
* :func:`fit_temperature` finds the T minimising the NLL by golden-section search on log T
  (the NLL is convex in 1/T, hence unimodal in log T): numpy only.
* :func:`write_calibrated_bundle` writes a NEW bundle: the same ONNX and labels, the fitted
  temperature, version suffix ``+cal``, every file re-hashed by :func:`iaflash.engines.bundle.write_bundle`.

All functions here take *raw* logits: the model output, or ``log(p)`` for a bundle whose
``output_kind`` is ``probabilities`` (what the daemon does before applying the temperature).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iaflash.agent.decision.verdict import softmax
from iaflash.agent.errors import CalibrationError
from iaflash.engines.bundle import LABELS_FILE, MANIFEST_FILE, MODEL_FILE, Bundle, OperatingPoint, write_bundle

__all__ = [
    "ECE_BINS",
    "CalibrationError",
    "ReliabilityBin",
    "bumped_version",
    "calibration_summary",
    "expected_calibration_error",
    "fit_temperature",
    "log_softmax",
    "nll",
    "reliability",
    "write_calibrated_bundle",
]

ECE_BINS = 15
T_MIN, T_MAX = 0.01, 100.0
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin ``(lo, hi]``: how many predictions, their mean confidence and accuracy."""

    lo: float
    hi: float
    count: int
    confidence: float
    accuracy: float


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise CalibrationError(f"need logits [N, C] and N labels with N > 0, got {list(z.shape)} and {list(y.shape)}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise CalibrationError(f"labels must lie in 0..{z.shape[1] - 1}, got {y.min()}..{y.max()}")
    if not np.isfinite(z).all():
        raise CalibrationError("logits contain NaN or infinity; check the model's output")
    return z, y


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``log(softmax(logits / T))`` over the last axis, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(z, temperature)[np.arange(len(y)), y].mean())


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under ``softmax(logits / T)``."""
    return _nll(*_check(logits, labels), temperature)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Equal-width confidence bins ``(k/bins, (k+1)/bins]`` of the top-1 predictions.

    A confidence of exactly 0 falls in the first bin. Empty bins have count 0 and NaN-free zeros.
    """
    p, y = _check(probs, labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        members = index == k
        count = int(members.sum())
        out.append(
            ReliabilityBin(
                lo=k / bins,
                hi=(k + 1) / bins,
                count=count,
                confidence=float(confidence[members].mean()) if count else 0.0,
                accuracy=float(correct[members].mean()) if count else 0.0,
            )
        )
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: sum over bins of (bin share) x |accuracy - mean confidence|, top-1 predictions."""
    table = reliability(probs, labels, bins)
    total = sum(b.count for b in table)
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in table))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, tol: float = 1e-5) -> float:
    """The temperature T in [0.01, 100] minimising the NLL of ``softmax(logits / T)``.

    Golden-section search on log T, stopping when the bracket is narrower than ``tol`` (in log T).
    A result at either bound raises CalibrationError: no temperature fits such data (for example,
    a set the model classifies perfectly drives T towards 0, which would make every score 0 or 1).
    """
    z, y = _check(logits, labels)

    def loss(log_t: float) -> float:
        return _nll(z, y, math.exp(log_t))

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = loss(b)
    fitted = math.exp((lo + hi) / 2)
    if not T_MIN * 1.01 < fitted < T_MAX / 1.01:
        why = (
            "every prediction is already right and confident, so the NLL keeps falling as T shrinks"
            if fitted < 1
            else "the predictions carry no information about the labels"
        )
        raise CalibrationError(
            f"the fitted temperature reached the search bound {fitted:.3g}: {why}; fix: calibrate on a larger "
            "held-out set with the model's real mistakes in it (not its training images)"
        )
    return fitted


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """NLL and ECE of the logits at ``temperature``."""
    return {
        "nll": nll(logits, labels, temperature),
        "ece": expected_calibration_error(softmax(logits, temperature), labels),
    }


def bumped_version(version: str) -> str:
    """``1.2.0`` → ``1.2.0+cal``; a version already calibrated gets a counter: ``+cal`` → ``+cal2``."""
    match = re.fullmatch(r"(.*)\+cal(\d*)", version)
    if match is None:
        return f"{version}+cal"
    return f"{match.group(1)}+cal{int(match.group(2) or 1) + 1}"


def _check_out_dir(bundle: Bundle, out: Path) -> None:
    if out.resolve() == bundle.path.resolve():
        raise CalibrationError(
            f"{out}: is the source bundle; fix: give --out a new directory (bundles are never rewritten in place)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CalibrationError(f"{out}: exists and is not an empty directory; fix: choose a new directory")
    extra = sorted(set(bundle.manifest.files) - {MODEL_FILE, LABELS_FILE})
    if extra:
        raise CalibrationError(
            f"{bundle.path}/{MANIFEST_FILE}: lists files this tool cannot carry over ({', '.join(extra)}); "
            "fix: re-pack the calibrated bundle with the publisher's tooling"
        )


def write_calibrated_bundle(bundle: Bundle, temperature: float, out: Path) -> Bundle:
    """Write a new bundle in ``out``: same ONNX and labels, ``temperature``, version ``+cal``.

    The source's signature (if any) is not copied: the manifest changed, so it must be re-signed.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise CalibrationError(f"temperature must be a positive finite number, got {temperature!r}")
    note = f"Temperature {temperature:.4f} fitted by iaflash-agent calibrate on {bundle.manifest.version}."
    if bundle.manifest.operating_point is not None:
        note += " Its operating point was fitted at the old temperature and is dropped: run iaflash-agent fit."
    return derived_bundle(bundle, Path(out), note=note, temperature=temperature, operating_point=None)


def derived_bundle(
    bundle: Bundle, out: Path, *, note: str, temperature: float, operating_point: OperatingPoint | None
) -> Bundle:
    """A NEW bundle in ``out`` from ``bundle``: same ONNX, labels, crop contract, TTA, OOD gate and
    look-alike groups; the given temperature and operating point; version ``+cal``; ``note`` appended
    to the description. The source's signature is not copied: the manifest changed, re-sign it.
    """
    _check_out_dir(bundle, out)
    m = bundle.manifest
    return write_bundle(
        out,
        onnx_bytes=bundle.model_path.read_bytes(),
        labels=bundle.labels,
        name=m.name,
        version=bumped_version(m.version),
        task=m.task,
        input_name=m.input_name,
        input_shape=m.input_shape,
        preprocessing=m.preprocessing,
        output_name=m.output_name,
        output_kind=m.output_kind,
        temperature=temperature,
        demo=m.demo,
        full_range_makes=m.full_range_makes,
        crop=m.crop,
        tta=m.tta,
        ood=m.ood,
        lookalike_groups=m.lookalike_groups,
        operating_point=operating_point,
        description=f"{m.description} {note}".strip(),
    )
