"""A tiny signed classifier beside the demo detector, for the tests that run a whole Service in process."""

from __future__ import annotations

import shutil
from pathlib import Path

from onnx_builders import LABELS, classifier_onnx

from iaflash.agent.demo.detector import build_demo_detector_bundle
from iaflash.engines.bundle import Preprocessing, write_bundle
from iaflash.engines.signing import generate_keypair, sign_bundle


def build_tiny_models(out: Path) -> Path:
    """The body of the ``tiny_models`` fixture (conftest.py), laid out as make_site (e2e_site.py) takes it.

    ``model/``: a classifier of 8x8 inputs (onnx_builders), version 1.0.0; ``detector/``: the demo
    detector; both signed by a key of role models. ``trust/models`` and ``trust/commands`` hold the
    public keys; ``central.key`` signs central's commands (central.commands.CommandClient).
    """
    for role in ("models", "commands"):
        (out / "trust" / role).mkdir(parents=True)
    key, pub = generate_keypair(out / "publisher", role="models")
    shutil.copy(pub, out / "trust" / "models" / pub.name)
    _, central_pub = generate_keypair(out / "central", role="commands")
    shutil.copy(central_pub, out / "trust" / "commands" / central_pub.name)
    write_bundle(
        out / "model",
        onnx_bytes=classifier_onnx(),
        labels=LABELS,
        name="tiny",
        version="1.0.0",
        input_name="input",
        input_shape=["N", 3, 8, 8],
        preprocessing=Preprocessing(height=8, width=8),
        output_name="logits",
    )
    build_demo_detector_bundle(out / "detector")
    for bundle in ("model", "detector"):
        sign_bundle(out / bundle, key, signer="test-publisher")
    return out
