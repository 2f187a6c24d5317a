"""Where the reviewed vehicle is when the sidecar has no ``vehicle_box``: the site's vehicle detector, run again.

The pipeline does not store the box it chose, so ``send_evidence`` finds it again with the same
bundle (``model.detector_bundle``) and the same rules (:func:`iaflash.agent.capture.vehicle.select_vehicle`),
on the full-size stored image. It runs on its own ONNX Runtime CPU session, loaded on first use,
so it never shares the pipeline's backend (TensorRT contexts are not thread-safe) and costs
nothing until a reviewer asks. When the rules cannot single out one vehicle there is no box, and
the image is not sent.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from iaflash.agent.capture.preprocess import decode_jpeg
from iaflash.agent.capture.vehicle import Box, detect_vehicles, select_vehicle
from iaflash.agent.config import Config
from iaflash.agent.errors import AnonymiseError, CaptureRejected
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle
from iaflash.engines.detect import detector_spec
from iaflash.engines.errors import EngineError
from iaflash.engines.factory import create_backend
from iaflash.engines.signing import load_trusted_bundle

__all__ = ["VehicleLocator", "load_locator"]

_KEY = "model.detector_bundle"


class VehicleLocator:
    """The site's vehicle detector on a CPU session of its own (thread-safe)."""

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle, self.backend = bundle, backend
        self.classes = detector_spec(bundle).vehicle_classes
        self._lock = threading.Lock()

    def locate(self, jpeg: bytes, sidecar: dict[str, Any], name: str) -> tuple[Box | None, str]:
        """The reviewed vehicle's (x, y, w, h) in the image's pixels, or None, and the rule that decided."""
        try:
            image = decode_jpeg(jpeg)
            with self._lock:
                detections = detect_vehicles(image, self.backend, self.bundle)
        except (CaptureRejected, EngineError) as exc:
            raise AnonymiseError(f"{name}: the vehicle detector could not find the vehicle ({exc})") from exc
        lane, direction = sidecar.get("lane"), sidecar.get("direction")
        selection = select_vehicle(
            detections,
            image_size=(image.shape[1], image.shape[0]),
            sidecar_box=None,
            lane=lane if isinstance(lane, int) and not isinstance(lane, bool) else None,
            direction=direction if isinstance(direction, str) else None,
            vehicle_classes=self.classes,
        )
        return selection.box, selection.reason

    def close(self) -> None:
        self.backend.close()


def load_locator(cfg: Config) -> VehicleLocator | None:
    """The configured vehicle detector on a new CPU session; None when the site has none."""
    path = cfg.model.detector_bundle
    if path is None:
        return None
    try:
        bundle = load_trusted_bundle(
            Path(path), cfg.security.trust_dir, cfg.security.allow_unsigned, state_file=cfg.trust_state_file
        )
        locator = VehicleLocator(bundle, create_backend("onnxruntime", threads=1))
        locator.backend.load(bundle)
    except EngineError as exc:
        raise AnonymiseError(
            f"{_KEY} = {path}: the vehicle detector cannot locate the vehicle for the evidence ({exc}); "
            "fix: reinstall the signed detector bundle, or have the radar write vehicle_box"
        ) from exc
    return locator
