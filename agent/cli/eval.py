"""``iaflash-agent calibrate`` and ``iaflash-agent evaluate``: fit a temperature, measure a bundle.

Both read a labelled dataset (see docs/EVALUATION.md), run the bundle over it with ONNX Runtime
and show progress on stderr (a rich bar on a terminal, plain lines otherwise). ``--json`` prints
one stable document on stdout. Exit codes: 0 ok, 1 operational error, 2 usage error.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from iaflash.agent.cli.progress import progress_callback
from iaflash.agent.config import SpoolConfig, load_config
from iaflash.agent.errors import ConfigError, EngineError, IaflashError
from iaflash.engines.cli_common import CONTEXT, EXIT_ERROR, json_option

if TYPE_CHECKING:
    from iaflash.agent.evaluation.evaluate import Inference
    from iaflash.engines.bundle import Bundle

__all__ = ["calibrate", "commands", "evaluate"]

F = TypeVar("F", bound=Callable[..., Any])


def _operational(func: F) -> F:
    """Our errors become ``error: ...`` on stderr and exit 1; Click keeps exit 2 for usage errors."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            for issue in exc.issues:
                click.echo(f"error: {issue}", err=True)
        except (IaflashError, EngineError) as exc:
            click.echo(f"error: {exc}", err=True)
        except OSError as exc:
            click.echo(f"error: {exc.filename or ''}: {exc.strerror}; fix: check the path and permissions", err=True)
        sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature; mypy can't see it


def _load(
    bundle_dir: Path, dataset: Path, batch_size: int, threads: int, spool_cfg: SpoolConfig | None = None
) -> tuple[Bundle, Inference]:
    """The bundle and its inference over the dataset; all heavy imports are here."""
    from iaflash.agent.evaluation.evaluate import load_dataset, require_supported, run_inference  # noqa: PLC0415  # `--help` fast
    from iaflash.engines.bundle import load_bundle  # noqa: PLC0415

    bundle = load_bundle(bundle_dir)
    if bundle.manifest.task != "classifier":
        raise IaflashError(f"{bundle_dir}: is a {bundle.manifest.task} bundle; fix: give a classifier bundle")
    samples = load_dataset(dataset)
    with progress_callback("classifying images") as progress:
        inference = run_inference(
            bundle, samples, batch_size=batch_size, threads=threads, progress=progress, spool_cfg=spool_cfg
        )
    require_supported(inference, dataset)
    return bundle, inference


def _reading(bundle: Bundle, dataset: Path, margin: float, batch_size: int, threads: int) -> Inference:
    """The dataset run through the daemon's intake again, the bundle's crop contract at another margin."""
    from dataclasses import replace  # noqa: PLC0415

    from iaflash.agent.evaluation.evaluate import load_dataset, run_inference  # noqa: PLC0415

    manifest = bundle.manifest
    variant = replace(bundle, manifest=replace(manifest, crop=replace(manifest.crop_spec, margin=margin)))
    with progress_callback(f"reading again at crop margin {margin:g}") as progress:
        return run_inference(variant, load_dataset(dataset), batch_size=batch_size, threads=threads, progress=progress)


_robust_option = click.option(
    "--robust-margin",
    "robust_margins",
    type=click.FloatRange(0, 1),
    multiple=True,
    metavar="M",
    help="Also read every genuine item with crop margin M (repeatable, e.g. 0 and 0.1: a box a little off). "
    "The fitted point must then hold on every reading: an item counts once, flagged if any reading flags.",
)


def _parse_guard(ctx: click.Context, param: click.Parameter, value: str) -> float | str:
    from iaflash.agent.evaluation.fit import parse_guard  # noqa: PLC0415  # `--help` stays fast

    try:
        return parse_guard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_guard_option = click.option(
    "--guard",
    metavar="G|auto",
    default="1",
    callback=_parse_guard,
    show_default=True,
    help="Margin beyond the worst genuine sample: each is also judged at its probabilities raised to the "
    "power G (1 = none); 'auto' picks the smallest G under which no genuine vehicle flags out of fold "
    'inside the fitting set (docs/DECISION.md, "The guard").',
)
_batch_option = click.option(
    "--batch-size", type=click.IntRange(1, 1024), default=16, show_default=True, help="Images per inference call."
)
_threads_option = click.option(
    "--threads",
    type=click.IntRange(0, 64),
    default=0,
    show_default=True,
    help="ONNX Runtime intra-op threads; 0 = one per core.",
)
_paths = (
    click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(file_okay=False, path_type=Path)),
    click.argument("dataset", type=click.Path(path_type=Path)),
)


def _with_paths(func: F) -> F:
    return _paths[0](_paths[1](func))


@click.command(context_settings=CONTEXT)
@_with_paths
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory of the NEW calibrated bundle (must not exist, or be empty).",
)
@_batch_option
@_threads_option
@json_option
@_operational
def calibrate(bundle_dir: Path, dataset: Path, out_dir: Path, batch_size: int, threads: int, as_json: bool) -> None:
    """Fit the temperature of BUNDLE on the labelled DATASET; write a new bundle with it.

    The new bundle has the same ONNX model and labels, the fitted temperature and the version
    suffix "+cal"; it is unsigned (sign it before deploying). Reports NLL and expected calibration
    error before and after. Use a held-out set, not the model's training images.

    \b
    Example:
      iaflash-agent calibrate /models/classifier-1.4.0 val/labels.csv --out /models/classifier-1.4.0+cal
    """
    from iaflash.agent.evaluation.calibrate import calibration_summary, fit_temperature, write_calibrated_bundle  # noqa: PLC0415
    from iaflash.agent.evaluation.evaluate import classified  # noqa: PLC0415

    bundle, inference = _load(bundle_dir, dataset, batch_size, threads)
    samples = len(inference.samples) + len(inference.unsupported)
    ok = classified(inference)  # items the daemon's intake leaves unclassified (no vehicle, poor image) have no logits
    logits, labels = inference.logits[ok], inference.labels[ok]
    temperature = fit_temperature(logits, labels)
    before = calibration_summary(logits, labels, bundle.manifest.temperature)
    after = calibration_summary(logits, labels, temperature)
    new = write_calibrated_bundle(bundle, temperature, out_dir)
    doc = {
        "schema": "iaflash.calibration/1",
        "bundle": str(out_dir),
        "version": new.manifest.version,
        "samples": samples,
        "evaluated": len(inference.samples),
        "unsupported": len(inference.unsupported),
        "temperature": {"before": bundle.manifest.temperature, "after": round(temperature, 6)},
        "nll": {"before": round(before["nll"], 6), "after": round(after["nll"], 6)},
        "ece": {"before": round(before["ece"], 6), "after": round(after["ece"], 6)},
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    click.echo(
        f"temperature  {bundle.manifest.temperature:g} → {temperature:.4f}  "
        f"({len(inference.samples)} images, {len(inference.unsupported)} unsupported)"
    )
    click.echo(f"NLL          {before['nll']:.4f} → {after['nll']:.4f}")
    click.echo(f"ECE          {before['ece']:.4f} → {after['ece']:.4f}")
    click.echo(f"wrote {out_dir} (version {new.manifest.version}, unsigned: sign it before deploying)")


def _with_cross_fit(
    doc: dict[str, Any],
    bundle: Bundle,
    inference: Inference,
    base: Any,
    folds: int,
    target: float,
    clones_per_image: int,
    seed: int,
    readings: Sequence[tuple[str, Inference]] = (),
    guard: float | str = 1.0,
) -> dict[str, Any]:
    """The document with ``cross_fit``: the fit's operating point judged out of fold (and a warning if missed)."""
    from iaflash.agent.decision.taxonomy import Taxonomy  # noqa: PLC0415
    from iaflash.agent.evaluation.crossfit import Reading, cross_fit  # noqa: PLC0415
    from iaflash.agent.evaluation.evaluate import make_pairs, rounded  # noqa: PLC0415

    pairs = make_pairs(inference, Taxonomy(bundle.labels), clones_per_image, seed)
    matched = [Reading.matching(inference, other, name) for name, other in readings]
    with progress_callback("cross-fitting") as progress:
        progress(0, folds)
        result = cross_fit(
            inference,
            bundle,
            pairs,
            folds=folds,
            target=target,
            base=base,
            readings=matched,
            guard=guard,  # type: ignore[arg-type]  # "auto" or a float >= 1 (_parse_guard)
        )
        progress(folds, folds)
    summary = {**rounded(result.to_dict(target)), "readings": [name for name, _ in readings]}
    warnings = list(doc["warnings"])
    if not summary["met"]:
        warnings.append(
            f"Out of fold ({folds} folds), the fitted operating points MISS the target: "
            f"{summary['genuine_flagged']} of {summary['genuine']} genuine flagged, 95% upper bound "
            f"{summary['false_flag_upper']:.3%} > target {target:.3%}."
        )
    return {**doc, "cross_fit": summary, "warnings": warnings}


def _print_summary(doc: dict[str, Any], out: Path | None) -> None:
    acc, cal, data = doc["accuracy"], doc["calibration"], doc["dataset"]
    click.echo(
        f"dataset      {data['evaluated']} of {data['samples']} {data['kind']} evaluated "
        f"({data['unsupported']} unsupported, {data['rejected']} rejected, {data['poor_image']} not classified)"
    )
    click.echo(f"accuracy     top-1 {acc['top1']:.2%}  top-5 {acc['top5']:.2%}  make {acc['make']:.2%}")
    click.echo(
        f"calibration  ECE {cal['ece']:.4f}  NLL {cal['nll']:.4f}  (temperature {doc['bundle']['temperature']:g})"
    )
    for p in doc["operating_points"]:
        click.echo(
            f"{p['name']:<12} false flags {p['genuine_flagged']}/{p['genuine']} ({p['false_flag_rate']:.3%}, "
            f"95% upper {p['false_flag_upper']:.3%}, {'met' if p['met'] else 'NOT met'})  clones caught: "
            f"make {p['make_detection']:.1%}  model {p['model_detection']:.1%}"
        )
    if "cross_fit" in doc:
        p = doc["cross_fit"]
        click.echo(
            f"{'cross-fit':<12} false flags {p['genuine_flagged']}/{p['genuine']} ({p['false_flag_rate']:.3%}, "
            f"95% upper {p['false_flag_upper']:.3%}, {'met' if p['met'] else 'NOT met'})  clones caught: "
            f"make {p['make_detection']:.1%}  model {p['model_detection']:.1%}  ({p['folds']} folds, out of fold)"
        )
    if not any(p["name"] == "recommended" for p in doc["operating_points"]):
        click.echo("recommended  none: no swept point bounds the false-flag rate at the target")
    for warning in doc["warnings"]:
        click.echo(f"WARNING: {warning}", err=True)
    if out is not None:
        click.echo(f"wrote {out}")


@click.command(context_settings=CONTEXT)
@_with_paths
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the HTML report here (self-contained, inline SVG).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Agent config (TOML) whose [decision] thresholds are evaluated; default: built-in defaults.",
)
@click.option(
    "--target-false-flag-rate",
    "target",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.001,
    show_default=True,
    help="Highest acceptable share of genuine vehicles flagged.",
)
@click.option(
    "--clones-per-image",
    type=click.IntRange(1, 100),
    default=1,
    show_default=True,
    help="Simulated clone records per image and per level (another make; another model of the make).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the clone simulation.")
@click.option(
    "--cross-fit",
    "cross_fit_folds",
    type=click.IntRange(0, 50),
    default=0,
    show_default=True,
    help="Also fit temperature + thresholds on K-1 folds and report every item out of fold (0: off).",
)
@_robust_option
@_guard_option
@_batch_option
@_threads_option
@json_option
@_operational
def evaluate(
    bundle_dir: Path,
    dataset: Path,
    out: Path | None,
    config_path: Path | None,
    target: float,
    clones_per_image: int,
    seed: int,
    cross_fit_folds: int,
    robust_margins: tuple[float, ...],
    guard: float | str,
    batch_size: int,
    threads: int,
    as_json: bool,
) -> None:
    """Measure BUNDLE on the labelled DATASET through the daemon's own intake and decision.

    DATASET is labelled photos (a CSV or <make>/<model>/*.jpg folder) or labelled captures (a
    folder of sidecars and frames with truth.csv: genuine, clone_make or clone_model). Photos are
    read against their own record and, as simulated clones, against another make and another
    model of the same make. Reports a joint sweep over min_top1 and the make/model thresholds,
    the configured, shipped (bundle) and recommended operating points judged on the 95% upper
    bound of the false-flag rate, confused labels and every flagged genuine item. A WARNING is
    printed when the configured or shipped thresholds miss the target.

    \b
    Example:
      iaflash-agent evaluate /models/classifier test/labels.csv --out report.html
      iaflash-agent evaluate /models/classifier captures/ --config /etc/iaflash/agent.toml --json
    """
    from iaflash.agent.evaluation.evaluate import evaluate as run_evaluation  # noqa: PLC0415  # keeps `--help` fast
    from iaflash.agent.evaluation.report import render_html  # noqa: PLC0415

    config = load_config(config_path)
    bundle, inference = _load(bundle_dir, dataset, batch_size, threads, config.spool)
    with progress_callback("sweeping thresholds") as progress:
        doc = run_evaluation(
            bundle,
            inference,
            config.decision,
            target=target,
            clones_per_image=clones_per_image,
            seed=seed,
            progress=progress,
            dataset_path=dataset,
        )
    if robust_margins and not cross_fit_folds:
        raise click.UsageError("--robust-margin applies to the cross-fit; fix: add --cross-fit K (e.g. 5)")
    if guard != 1.0 and not cross_fit_folds:
        raise click.UsageError("--guard applies to the cross-fit; fix: add --cross-fit K (e.g. 5)")
    if cross_fit_folds:
        readings = [(f"margin={m:g}", _reading(bundle, dataset, m, batch_size, threads)) for m in robust_margins]
        doc = _with_cross_fit(
            doc, bundle, inference, config.decision, cross_fit_folds, target, clones_per_image, seed, readings, guard
        )
    if out is not None:
        out.write_text(render_html(doc), encoding="utf-8")
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        for warning in doc["warnings"]:
            click.echo(f"WARNING: {warning}", err=True)
    else:
        _print_summary(doc, out)


commands = [calibrate, evaluate]
