"""``iaflash-engines build``: compile a bundle's ONNX model into a TensorRT plan on this box.

Exit codes: 0 ok (built, or already up to date), 1 operational error (no TensorRT, build
failed), 2 usage error. ``--json`` prints one JSON document on stdout; progress and
diagnostics go to stderr (a rich progress bar on a terminal, plain lines otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np

from iaflash.engines.build import (
    BuildEnv,
    build_engine,
    cached_plan,
    plan_key,
    read_plan_meta,
)
from iaflash.engines.bundle import Bundle, load_bundle
from iaflash.engines.errors import EngineError
from iaflash.engines.options import DEFAULT_CACHE_DIR, PRECISIONS, BuildOptions, Progress

__all__ = ["commands"]

CONTEXT = {"help_option_names": ["-h", "--help"]}
EXIT_ERROR, EXIT_USAGE = 1, 2
NO_TENSORRT = "TensorRT is not installed on this machine: engines are built on the Jetson itself (see docs/JETSON.md)"


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _progress_display() -> Iterator[Progress]:
    """A rich progress bar when stderr is a terminal, else one plain line per stage."""
    if not sys.stderr.isatty():
        seen: set[str] = set()

        def plain(stage: str, fraction: float) -> None:
            if stage not in seen:
                seen.add(stage)
                click.echo(f"build: {stage} ({fraction:.0%})", err=True)

        yield plain
        return
    from rich.console import Console  # noqa: PLC0415  # only for interactive runs
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("parse", total=1.0)

        def rich(stage: str, fraction: float) -> None:
            bar.update(task, completed=fraction, description=stage)

        yield rich


def _calibration_batches(bundle: Bundle, folder: Path, batch: int) -> list[np.ndarray]:
    """JPEGs of ``folder`` preprocessed like captures (stretch resize), as NCHW float32 batches."""
    import cv2  # noqa: PLC0415  # only int8 builds read images

    pp = bundle.manifest.preprocessing
    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"}):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            click.echo(f"warning: {path} is not a readable JPEG; skipped", err=True)
            continue
        img = cv2.resize(bgr, (pp.width, pp.height), interpolation=cv2.INTER_AREA)
        img = img[:, :, ::-1] if pp.color_order == "RGB" else img
        chw = (
            (img.astype(np.float32) * pp.scale - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
        ).transpose(2, 0, 1)
        images.append(chw)
    usable = len(images) - len(images) % batch
    if usable == 0:
        _fail(
            f"{folder}: needs at least {batch} readable JPEGs (one batch) for int8 calibration; "
            "fix: copy a few hundred typical captures there"
        )
    return [np.stack(images[i : i + batch]).astype(np.float32) for i in range(0, usable, batch)]


def _check_tensorrt() -> BuildEnv:
    if importlib.util.find_spec("tensorrt") is None:
        _fail(NO_TENSORRT)
    try:
        return BuildEnv.detect()
    except EngineError as exc:
        _fail(f"TensorRT cannot build here: {exc}")


@click.command(context_settings=CONTEXT)
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp16",
    show_default=True,
    help="Engine precision; int8 needs --calibration and an accuracy check before deployment.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Largest batch the engine accepts (the agent's [model] max_batch).",
)
@click.option(
    "--workspace-mb",
    type=click.IntRange(64),
    default=1024,
    show_default=True,
    help="TensorRT builder workspace in MiB (the agent's [model] workspace_mb).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_CACHE_DIR,
    show_default=True,
    help="Plan cache (the agent's [model] engine_cache_dir).",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of typical capture JPEGs for int8 calibration.",
)
@click.option("--force", is_flag=True, help="Rebuild even when an up-to-date plan is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout.")
def build(
    bundle_dir: Path,
    precision: str,
    max_batch: int,
    workspace_mb: int,
    cache_dir: Path,
    calibration: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Build the TensorRT plan of a model bundle on this box (minutes on a Jetson).

    The plan is cached under its staleness key; the agent uses it at its next start (or
    builds it itself in the background while serving with ONNX Runtime). Use the same
    --precision/--max-batch/--workspace-mb/--cache-dir as the agent's [model] section.

    \b
    Example:
      iaflash-engines build /var/lib/iaflash/models/classifier --precision fp16 --max-batch 4
      iaflash-engines build bundle/ --precision int8 --calibration captures/ --json
    """
    if precision == "int8" and calibration is None:
        raise click.UsageError("--precision int8 needs --calibration DIR_OF_JPEGS")
    if calibration is not None and precision != "int8":
        raise click.UsageError("--calibration is only used with --precision int8")
    env = _check_tensorrt()
    try:
        bundle = load_bundle(bundle_dir)
        options = BuildOptions(precision=precision, workspace_mb=workspace_mb, max_batch=max_batch, cache_dir=cache_dir)
        key, inputs = plan_key(bundle, options, env)
        path = None if force else cached_plan(bundle, key, cache_dir, inputs=inputs)
        cached = path is not None
        if path is None:
            batches = _calibration_batches(bundle, calibration, max_batch) if calibration else None
            with _progress_display() as progress:
                path = build_engine(
                    bundle,
                    precision=precision,
                    workspace_mb=workspace_mb,
                    max_batch=max_batch,
                    cache_dir=cache_dir,
                    progress=progress,
                    calibration=batches,
                    env=env,
                )
    except EngineError as exc:
        _fail(str(exc))
    _report(bundle_dir, path, key, cached, precision, env, as_json)


def _report(bundle_dir: Path, path: Path, key: str, cached: bool, precision: str, env: BuildEnv, as_json: bool) -> None:
    meta = read_plan_meta(path) or {}
    doc: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "plan": str(path),
        "key": key,
        "cached": cached,
        "precision": meta.get("precision", precision),
        "build_seconds": meta.get("build_seconds"),
        "plan_bytes": meta.get("plan_bytes"),
        "env": env.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    state = "up to date" if cached else f"built in {doc['build_seconds']} s"
    click.echo(f"{path}: {state} ({doc['precision']}, TensorRT {env.tensorrt} on {env.gpu})")
    click.echo(f"staleness key {key}")


commands = [build]
