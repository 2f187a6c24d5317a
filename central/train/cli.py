"""``iaflash-central train``: labelled photos in, a signed, calibrated classifier bundle out.

Exit codes: 0 ok, 1 operational error (bad labels, bad weights, failed export or bundle check),
2 usage error. torch is imported only when the command runs, so ``iaflash-central -h`` works
without the ``[train]`` extra.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from .options import shared_options

__all__ = ["train_command"]

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _run(opts: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: PLC0415 -- the [train] extra, needed only when training runs

    from .bundling import BundleSpec, calibrate_halves, make_bundle, sign_and_check, smoke_run  # noqa: PLC0415
    from .data import Augment  # noqa: PLC0415
    from .pipeline import fit  # noqa: PLC0415
    from .recipe import TrainConfig  # noqa: PLC0415

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    cfg = TrainConfig(
        backbone=opts["backbone"],
        weights=str(opts["weights"] or ""),
        recipe=opts["recipe"],
        size=opts["size"],
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        seed=opts["seed"],
        freeze_blocks=opts["freeze_blocks"],
        cache_views=opts["cache_views"],
        augment=Augment(p_grey=opts["p_grey"]),
    )
    workdir: Path = opts["workdir"]
    report, tax = fit(
        opts["labels"],
        workdir / "export",
        workdir,
        cfg,
        min_count=opts["min_count"],
        fold_rare=opts["fold_rare"],
        root=opts["root"],
        workers=opts["workers"],
        drop_duplicates=opts["drop_duplicates"],
        stop_after=opts["stop_after"],
    )
    import numpy as np  # noqa: PLC0415

    val = np.load(workdir / "export" / "val_logits.npz")
    calibration = calibrate_halves(val["logits"], val["targets"], tax.makes())
    spec = BundleSpec(
        name=opts["name"],
        version=opts["version"],
        size=cfg.size,
        description=f"EfficientNet-Lite ({cfg.backbone}) trained by iaflash-central train on {opts['labels']}",
        accept_grey=opts["accept_grey"],
    )
    if opts["accept_grey"] and "val_grey_top1" not in report:
        raise click.ClickException(
            "--accept-grey needs val photos to measure the greyscale top-1 on; fix: give the label file a val split"
        )
    bundle = make_bundle(opts["out"], workdir / "export" / "model.onnx", tax, spec, calibration["temperature"])
    bundle = sign_and_check(bundle, opts["key"], opts["trust_dir"])
    shape = smoke_run(bundle)
    report = {
        **report,
        "calibration": calibration,
        "bundle": str(bundle.path),
        "signed": opts["key"] is not None,
        "smoke_output_shape": list(shape),
        "color_modes": list(bundle.manifest.crop.color_modes),
    }
    (opts["out"].parent / f"{opts['out'].name}.train-report.json").write_text(json.dumps(report, indent=1))
    return report


@click.command("train", context_settings=CONTEXT)
@click.argument("labels", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    required=True,
    help="Checkpoints and feature caches; run again with the same one to resume.",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder the CSV's image paths are relative to (default: the CSV's folder).",
)
@click.option(
    "--recipe",
    type=click.Choice(["auto", "cached", "full"]),
    default="auto",
    show_default=True,
    help="cached: CPU (frozen early blocks cached); full: GPU fine-tune with AMP; auto: full if CUDA.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--size", type=click.IntRange(min=32), default=224, show_default=True, help="Input size (pixels).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option(
    "--freeze-blocks",
    type=int,
    default=8,
    show_default=True,
    help="cached recipe: blocks 0..N-1 are frozen and cached (-1: the backbone's default).",
)
@click.option(
    "--cache-views",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="cached recipe: views cached per training photo (1 plain + augmented ones).",
)
@click.option(
    "--p-grey",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Share of augmented views turned greyscale (infrared-like night shots).",
)
@click.option(
    "--accept-grey",
    is_flag=True,
    help="Declare greyscale frames accepted in the bundle's crop contract (greyscale val top-1 is reported).",
)
@click.option(
    "--min-count",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Classes with fewer training photos fold into OTHER.",
)
@click.option(
    "--no-fold-rare",
    "fold_rare",
    is_flag=True,
    default=True,
    flag_value=False,
    help="Refuse rare classes instead of folding them into OTHER.",
)
@click.option("--drop-duplicates", is_flag=True, help="Drop identical photos (all copies if their labels conflict).")
@click.option("--name", default="iaflash-makemodel", show_default=True, help="Bundle name.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch CPU threads (0: torch's default).")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Photo loading processes (full recipe).")
@shared_options
def train_command(as_json: bool, **opts: Any) -> None:
    """Train a make/model classifier and write a signed, calibrated bundle.

    LABELS is a CSV (image, make, model[, split, view, x1, y1, x2, y2]) or a folder
    ROOT/<MAKE>/<MODEL>/*.jpg. Progress goes to stderr; see docs/TRAINING.md.

    \b
    Example:
      iaflash-central train photos/labels.csv --out bundles/makemodel-1.0.0 \\
          --workdir runs/makemodel --key keys/publisher.key --trust-dir keys/trusted --threads 2
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from iaflash.engines.errors import EngineError  # noqa: PLC0415

    from .data import DataError  # noqa: PLC0415 -- cv2/numpy only

    try:
        report = _run(opts)
    except ImportError as exc:
        raise click.ClickException(f"{exc}; fix: pip install 'iaflash-edge[train]' (torch CPU wheel first)") from exc
    except (DataError, EngineError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1, default=str))
    else:
        cal = report["calibration"]
        click.echo(
            f"bundle {report['bundle']}: val top-1 {report['val_top1']:.4f}, make top-1 "
            f"{report['val_make_top1']:.4f}, temperature {cal['temperature']:.3f}"
            + (f", greyscale top-1 {report['val_grey_top1']:.4f}" if "val_grey_top1" in report else "")
            + f", frames accepted: {'/'.join(report['color_modes'])}",
            err=True,
        )
