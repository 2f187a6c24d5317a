"""ONNX export of a trained network: one file, opset 17, a dynamic batch, checked against PyTorch.

The TorchScript exporter (``dynamo=False``) writes a single opset-17 file, which the TensorRT
versions of JetPack 5/6 parse; the dynamo exporter would write opset 18 with external data.
:func:`check_export` runs the file in ONNX Runtime (CPU) and compares with PyTorch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from iaflash.central.errors import ExportError

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "ExportError", "check_export", "export_onnx"]

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: torch.nn.Module, path: Path, size: tuple[int, int]) -> Path:
    """Write ``model`` (in eval mode, on the CPU) to ``path`` with input [N, 3, H, W] float32."""
    model = model.cpu().eval()
    dummy = torch.zeros(1, 3, *size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # dynamo=False is chosen on purpose (one opset-17 file for JetPack's TensorRT); the TorchScript
        # exporter and its helpers warn that they are deprecated, which is known and not actionable here.
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, dummy, path)
    return path


def _export(model: torch.nn.Module, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        opset_version=OPSET,
        dynamo=False,
        do_constant_folding=True,
    )


def check_export(
    model: torch.nn.Module, path: Path, size: tuple[int, int], atol: float = 1e-4, batch: int = 3, seed: int = 0
) -> float:
    """The largest |ONNX Runtime - PyTorch| over a random batch; :class:`ExportError` above ``atol``."""
    import onnxruntime as ort  # noqa: PLC0415 -- the agent's runtime, needed only by this check

    x = np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32)
    with torch.no_grad():
        expected = model.cpu().eval()(torch.from_numpy(x)).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= atol:
        raise ExportError(
            f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} (> {atol:.0e}); "
            "fix: report it with the torch and onnxruntime versions"
        )
    return diff
