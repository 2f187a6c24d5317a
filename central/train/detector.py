"""``iaflash-central train-detector``: frames with boxes (or tight photos to paste) in, a signed vehicle localiser out.

The bundle is a detector of the ``yolo`` contract (docs/DETECTOR.md): one ONNX file, input
``[N, 3, S, S]`` (the frame stretched, RGB, ImageNet mean/std), output ``[N, 5, P]`` rows
``(x1, y1, x2, y2, score)`` with normalised corners; labels ``0,car,car,``. It is written by the
engines' ``write_bundle``, signed like ``train`` does, loaded back (through the trust store when
given) and run through the daemon's own detector path on held-out frames before the command
succeeds. See docs/TRAINING.md, "Training a vehicle localiser".

Exit codes: 0 ok, 1 operational error (bad labels or photos, bad weights, a failed export or
bundle check), 2 usage error. torch is imported only when the command runs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from .options import shared_options

__all__ = ["train_detector_command"]

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _frame_size(value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 1224x1024") from exc
    if min(w, h) < 32:
        raise click.BadParameter(f"{value!r}: both sides must be at least 32 pixels")
    return w, h


def _labelled(opts: dict[str, Any], note: Any) -> tuple[list[Any], list[Any]]:
    """LABELS' train and val frames, every box checked against its frame before anything long runs."""
    from .detector_data import check_boxes, image_size, read_frames  # noqa: PLC0415

    frames = read_frames(opts["labels"], opts["root"])
    for f in frames:
        check_boxes(f, image_size(f.path, f.where))
    val = [f for f in frames if f.split == "val"]
    note(f"{opts['labels']}: {len(frames)} frame(s), {len(val)} held out (split val)")
    return [f for f in frames if f.split == "train"], val


def _synthetic(opts: dict[str, Any], note: Any) -> tuple[list[Any], list[Any]]:
    """Synthetic train frames from the photos' train split, held-out ones from their val split."""
    from iaflash.central.errors import DataError  # noqa: PLC0415

    from .detector_data import read_photos  # noqa: PLC0415
    from .detector_synth import SynthSpec, synthesise  # noqa: PLC0415

    photos = read_photos(opts["synthesise_from"])
    pool = {s: [p for p in photos if p.split == s] for s in ("train", "val")}
    if not pool["train"]:
        raise DataError(f"{opts['synthesise_from']}: no photo in split train; fix: mark the photos to paste as train")
    width, height = opts["frame_size"]
    kw = {"seed": opts["seed"], "spec": SynthSpec(width=width, height=height), "report": note}
    folder = opts["workdir"] / "synth"
    train = synthesise(pool["train"], opts["frames"], folder / "train", split="train", **kw)
    if not pool["val"]:
        note(f"{opts['synthesise_from']}: no val photos, so no synthetic frames are held out")
        return train, []
    count = opts["val_frames"] if opts["val_frames"] is not None else max(50, opts["frames"] // 10)
    return train, synthesise(pool["val"], count, folder / "val", split="val", **kw)


def _frames(opts: dict[str, Any], note: Any) -> tuple[list[Any], dict[str, list[Any]]]:
    """Training frames, and held-out frames per source ("labels", "synthetic")."""
    from iaflash.central.errors import DataError  # noqa: PLC0415

    train: list[Any] = []
    heldout: dict[str, list[Any]] = {}
    for source, wanted, read in (("labels", "labels", _labelled), ("synthetic", "synthesise_from", _synthetic)):
        if opts[wanted] is not None:
            more, val = read(opts, note)
            train += more
            if val:
                heldout[source] = val
    if not train:
        raise DataError("no training frames (every LABELS row is in split val); fix: mark training frames train")
    return train, heldout


def _config(opts: dict[str, Any]) -> Any:
    from .detector_cache import FitConfig  # noqa: PLC0415

    return FitConfig(
        backbone=opts["backbone"],
        weights=str(opts["weights"] or ""),
        size=opts["size"],
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        width=opts["width"],
        cache_views=opts["cache_views"],
        seed=opts["seed"],
    )


def _train(opts: dict[str, Any], cfg: Any, train: list[Any], heldout: dict[str, list[Any]], note: Any) -> Any:
    """Trunk, feature caches, head: the trained :class:`~.detector_fit.Fitted`."""
    from .detector_cache import build_trunk, cache_features, export_trunk  # noqa: PLC0415
    from .detector_fit import fit_head  # noqa: PLC0415
    from .weights import LITE0_SHA256  # noqa: PLC0415

    workdir: Path = opts["workdir"]
    trunk, channels, strides = build_trunk(cfg)
    trunk_onnx = export_trunk(trunk, workdir / "trunk.onnx", cfg.size)
    weights = cfg.weights or (LITE0_SHA256 if cfg.backbone == "lite0" else f"random-{cfg.seed}")
    trunk_key = json.dumps({"backbone": cfg.backbone, "weights": weights, "size": cfg.size})
    common = {"cfg": cfg, "threads": opts["threads"], "report": note, "trunk_key": trunk_key}
    feats, boxes = cache_features(train, trunk_onnx, workdir / "cache-train", views=cfg.cache_views, **common)
    monitored = [f for frames in heldout.values() for f in frames]
    val = cache_features(monitored, trunk_onnx, workdir / "cache-val", views=1, **common)
    note(
        f"training the head on {len(train)} frame(s) x {cfg.cache_views} view(s), backbone {cfg.backbone} "
        f"(taps at strides {list(strides)}), input {cfg.size}x{cfg.size}, {cfg.epochs} epoch(s)"
    )
    data_key = (workdir / "cache-train" / "meta.json").read_text()
    return fit_head(
        trunk,
        channels,
        strides,
        (feats, boxes),
        val,
        cfg,
        workdir,
        data_key=data_key,
        threshold=opts["score_threshold"],
        report=note,
        stop_after=opts["stop_after"],
    )


def _judge(bundle: Any, train: list[Any], heldout: dict[str, list[Any]], threads: int, note: Any) -> dict[str, Any]:
    """The figures of every held-out source through the daemon's detector path (one training frame if none)."""
    from .detector_check import evaluate_frames  # noqa: PLC0415

    figures: dict[str, Any] = {}
    for source, frames in heldout.items():
        note(f"judging {len(frames)} held-out {source} frame(s) through the daemon's detector path")
        figures[source] = evaluate_frames(bundle, frames, threads=threads, report=note)
    if not figures:  # nothing held out: still run the bundle once as the daemon would
        note("no held-out frames: the bundle is run once on a training frame, and no figure is measured")
        figures["smoke_train_frame"] = evaluate_frames(bundle, train[:1], threads=threads)
    return figures


def _run(opts: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict  # noqa: PLC0415

    import torch  # noqa: PLC0415 -- the [train] extra, needed only when training runs

    from .bundling import sign_and_check  # noqa: PLC0415
    from .data import to_input  # noqa: PLC0415
    from .detector_bundle import make_detector_bundle  # noqa: PLC0415
    from .detector_cache import frame_input  # noqa: PLC0415
    from .detector_fit import check_export, export_localiser  # noqa: PLC0415
    from .progress import Progress  # noqa: PLC0415
    from .recipe import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    progress = Progress(opts["epochs"])
    opts["workdir"].mkdir(parents=True, exist_ok=True)
    cfg = _config(opts)
    train, heldout = _frames(opts, progress.note)
    fitted = _train(opts, cfg, train, heldout, progress.note)
    onnx_path = export_localiser(fitted.model, opts["workdir"] / "export" / "model.onnx")
    example = to_input([frame_input(f, 0, cfg.size, cfg.seed, 0)[0] for f in train[:2]], IMAGENET_MEAN, IMAGENET_STD)
    diff = check_export(fitted.model, onnx_path, example)
    bundle = make_detector_bundle(opts["out"], onnx_path, opts, cfg.size)
    bundle = sign_and_check(bundle, opts["key"], opts["trust_dir"])
    report = {
        "bundle": str(bundle.path),
        "signed": opts["key"] is not None,
        "onnx_max_abs_diff": diff,
        "onnx_bytes": onnx_path.stat().st_size,
        "config": asdict(cfg),
        "epochs_done": len(fitted.history),
        "train_frames": len(train),
        "heldout": _judge(bundle, train, heldout, opts["threads"] or 2, progress.note),
        "history": fitted.history,
        "wall_s": fitted.wall_s,
        "elapsed_s": time.monotonic() - progress.start,
        "torch": torch.__version__,
    }
    (opts["out"].parent / f"{opts['out'].name}.train-report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _summary(report: dict[str, Any]) -> str:
    lines = [f"bundle {report['bundle']} ({'signed' if report['signed'] else 'unsigned'})"]
    for source, f in report["heldout"].items():
        if f.get("median_iou") is None:
            lines.append(f"  {source}: {f['frames']} frame(s), no vehicle to measure")
            continue
        lines.append(
            f"  {source}: {f['vehicles']} vehicle(s) in {f['vehicle_frames']} frame(s): "
            f"recall@0.5 {f['recall_iou50']:.3f}, recall@0.9 {f['recall_iou90']:.3f}, "
            f"median IoU {f['median_iou']:.3f} (selected box {f['selected_median_iou']:.3f}, "
            f"none selected {f['selected_none']}); {f['empty_frames_with_detection']}/{f['empty_frames']} "
            f"no-vehicle frame(s) with a detection; {f['latency_ms_p50']:.1f} ms per frame "
            f"(p90 {f['latency_ms_p90']:.1f})"
        )
    return "\n".join(lines)


@click.command("train-detector", context_settings=CONTEXT)
@click.argument("labels", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    required=True,
    help="Synthetic frames, feature caches and checkpoints; run again with the same one to resume.",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder LABELS' image paths are relative to (default: the CSV's folder).",
)
@click.option(
    "--synthesise-from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A CSV of tight vehicle photos (image[,split]): train frames are made by pasting its train photos, "
    "held-out frames from its val photos.",
)
@click.option(
    "--frames", type=click.IntRange(min=1), default=4000, show_default=True, help="Synthetic training frames."
)
@click.option(
    "--val-frames",
    type=click.IntRange(min=1),
    default=None,
    help="Synthetic held-out frames (default: a tenth of --frames, at least 50).",
)
@click.option(
    "--frame-size",
    type=_frame_size,
    default="1224x1024",
    show_default=True,
    help="Size of the synthetic frames (a 2448x2048 radar frame as the daemon decodes it for its detector).",
)
@click.option("--size", type=click.IntRange(min=32), default=320, show_default=True, help="Input size (pixels).")
@click.option("--epochs", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option("--width", type=click.IntRange(min=8), default=64, show_default=True, help="Channels of the head.")
@click.option(
    "--cache-views",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Views cached per training frame (1 plain, 2 + mirror, more: degraded); 3 suits a small set of real frames.",
)
@click.option(
    "--score-threshold",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.35,
    show_default=True,
    help="The bundle's detector.score_threshold.",
)
@click.option(
    "--iou-threshold",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="The bundle's detector.iou_threshold (host NMS).",
)
@click.option("--name", default="iaflash-vehicle-localiser", show_default=True, help="Bundle name.")
@click.option(
    "--threads", type=click.IntRange(min=0), default=0, help="CPU threads of torch and ONNX Runtime (0: their default)."
)
@shared_options
def train_detector_command(as_json: bool, **opts: Any) -> None:
    """Train a vehicle localiser (one class, "car") and write a signed detector bundle.

    LABELS is a CSV of frames with boxes (image,x1,y1,x2,y2[,split]; one row per vehicle, the
    box cells empty for a frame with no vehicle). --synthesise-from makes training frames from
    tight vehicle photos instead (or as well). Progress goes to stderr; see docs/TRAINING.md.

    \b
    Example:
      iaflash-central train-detector --synthesise-from photos/labels.csv --frames 4000 \\
          --out bundles/localiser-1.0.0 --workdir runs/localiser --key keys/publisher.key \\
          --trust-dir keys/trusted --threads 2
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if opts["labels"] is None and opts["synthesise_from"] is None:
        raise click.UsageError("give LABELS (frames with boxes), --synthesise-from PHOTOS_CSV, or both")
    from iaflash.central.errors import CentralError  # noqa: PLC0415
    from iaflash.engines.errors import EngineError  # noqa: PLC0415

    try:
        report = _run(opts)
    except ImportError as exc:
        raise click.ClickException(f"{exc}; fix: pip install 'iaflash-edge[train]' (torch CPU wheel first)") from exc
    except (CentralError, EngineError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1, default=str))
    click.echo(_summary(report), err=True)
