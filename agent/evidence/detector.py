"""An operator's face/person/plate detector bundle for the anonymiser (``evidence.detector_bundle``).

It is an ordinary signed detector bundle (docs/DETECTOR.md: ``nms`` or ``yolo`` output contract),
run through the daemon's own preprocessing and decoding (:func:`iaflash.agent.capture.vehicle.detect_vehicles`
is the generic "run a detector bundle on a BGR image"). Its classes are read by name from the
``make`` column of labels.csv: ``face``; ``person`` or ``pedestrian``; ``plate``,
``license_plate``, ``licence_plate`` or ``number_plate``. ``detector.vehicle_classes`` is not used.
A bundle that is missing, unsigned, tampered with, not a detector, or has none of these
classes is refused with an :class:`~iaflash.agent.errors.AnonymiseError` naming the config key.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from iaflash.agent.capture.vehicle import detect_vehicles
from iaflash.agent.config import Config
from iaflash.agent.errors import AnonymiseError
from iaflash.agent.evidence.anonymise import Found
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle
from iaflash.engines.detect import detector_spec
from iaflash.engines.errors import EngineError
from iaflash.engines.factory import create_backend
from iaflash.engines.signing import load_trusted_bundle

__all__ = ["KINDS", "BundleFinder", "load_finder"]

KINDS = {
    "face": "face",
    "person": "person",
    "pedestrian": "person",
    "plate": "plate",
    "license_plate": "plate",
    "licence_plate": "plate",
    "number_plate": "plate",
}
"""labels.csv class name (make column, any case) → what the anonymiser masks."""

_KEY = "evidence.detector_bundle"


class BundleFinder:
    """A loaded detector bundle whose face/person/plate detections the anonymiser masks (thread-safe)."""

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle, self.backend = bundle, backend
        self.kinds = {
            label.index: KINDS[label.make.strip().lower()]
            for label in bundle.labels
            if label.make.strip().lower() in KINDS
        }
        if not self.kinds:
            names = ", ".join(sorted({label.make for label in bundle.labels}))
            raise AnonymiseError(
                f"{bundle.path} ({_KEY}): no class is a face, person or plate (labels: {names}); "
                f"fix: name its classes {', '.join(sorted(KINDS))} in labels.csv"
            )
        self._lock = threading.Lock()  # TensorRT contexts are not thread-safe; ONNX Runtime does not mind

    @property
    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {"name": m.name, "version": m.version, "classes": sorted(set(self.kinds.values()))}

    def find(self, image_bgr: np.ndarray) -> list[Found]:
        with self._lock:
            detections = detect_vehicles(image_bgr, self.backend, self.bundle)
        found = []
        for d in detections:
            kind = self.kinds.get(d.cls)
            if kind is not None:
                found.append(Found(kind, d.xywh(), d.score))
        return found

    def close(self) -> None:
        self.backend.close()


def load_finder(cfg: Config) -> BundleFinder | None:
    """The configured detector, loaded (signature, sha256, task checked) and warmed up; None when unset."""
    path = cfg.evidence.detector_bundle
    if path is None:
        return None
    if not Path(path).is_dir():
        raise AnonymiseError(
            f"{_KEY} = {path}: no such bundle directory; the evidence is not sent; "
            "fix: install the bundle there or unset evidence.detector_bundle (the safe default masks without it)"
        )
    try:
        bundle = load_trusted_bundle(
            Path(path),
            cfg.security.trust_dir,
            cfg.security.allow_unsigned,
            state_file=cfg.trust_state_file,  # checked against what the box ran; the agent's loads record
        )
        detector_spec(bundle)
        backend = create_backend("onnxruntime", threads=1)
        backend.load(bundle)
        backend.warmup()
    except EngineError as exc:
        raise AnonymiseError(
            f"{_KEY} = {path}: the bundle is refused ({exc}); the evidence is not sent; "
            "fix: install a signed detector bundle (docs/EVIDENCE.md) or unset the key"
        ) from exc
    return BundleFinder(bundle, backend)
