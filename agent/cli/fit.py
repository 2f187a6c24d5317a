"""``iaflash-agent fit``: fit a bundle's operating point (temperature + thresholds) for a target false-flag rate.

It reads a labelled dataset (photos or labelled captures, docs/EVALUATION.md), runs it through the
daemon's own intake and model, simulates clones for photos, and fits with
:func:`iaflash.agent.evaluation.fit.fit_operating_point`. The new bundle (``--out``) carries the
operating point in its manifest; it is unsigned (sign it before deploying). Exit codes: 0 the target
is met, 3 it is not (the bundle is still written and never flags until re-fitted), 1 operational error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import click

from iaflash.agent.cli.eval import (  # the CLI's shared options
    _batch_option,
    _guard_option,
    _load,
    _operational,
    _reading,
    _robust_option,
    _threads_option,
    _with_paths,
)
from iaflash.engines.cli_common import CONTEXT, EXIT_PROBLEMS, json_option

__all__ = ["fit"]


@click.command(context_settings=CONTEXT)
@_with_paths
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory of the NEW bundle with the fitted operating point (must not exist, or be empty).",
)
@click.option(
    "--target",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.001,
    show_default=True,
    help="Target false-flag rate, judged on the 95% upper confidence bound.",
)
@click.option(
    "--two-sided", is_flag=True, help="Use the upper end of the two-sided 95% interval (stricter) instead of one-sided."
)
@click.option("--keep-temperature", is_flag=True, help="Keep the bundle's temperature; fit only the thresholds.")
@click.option(
    "--clones-per-image",
    type=click.IntRange(0, 10),
    default=1,
    show_default=True,
    help="Simulated clones per photo and level (make, model).",
)
@_robust_option
@_guard_option
@_batch_option
@_threads_option
@json_option
@_operational
def fit(
    bundle_dir: Path,
    dataset: Path,
    out_dir: Path,
    target: float,
    two_sided: bool,
    keep_temperature: bool,
    clones_per_image: int,
    robust_margins: tuple[float, ...],
    guard: float | str,
    batch_size: int,
    threads: int,
    as_json: bool,
) -> None:
    """Fit BUNDLE's temperature and thresholds on the labelled DATASET for a target false-flag rate.

    "Met" means the Clopper-Pearson 95% upper bound of the genuine false-flag rate is at or below
    --target; among the threshold points that meet it, the one catching the most clones wins. The
    new bundle carries the operating point (a daemon never flags with a bundle that has none, or
    one that misses its target). Fit on held-out data, never on the model's training images.

    --robust-margin reads each genuine item again with another crop margin (docs/DECISION.md,
    "Readings"): the thresholds must then hold whichever way the box falls, which keeps them away
    from the edge of the fitting set.

    --guard keeps a margin beyond the worst genuine sample seen (docs/DECISION.md, "The guard"):
    without it, a point fitted at the edge of n genuine samples lets about one new vehicle in n
    through. --guard auto chooses it by cross-validation inside DATASET.

    \b
    Example:
      iaflash-agent fit /models/classifier-1.4.0 val/labels.csv --out /models/classifier-1.4.0+op --target 0.0025
      iaflash-agent fit ... --robust-margin 0 --robust-margin 0.1 --guard auto
    """
    from iaflash.agent.decision.taxonomy import Taxonomy  # noqa: PLC0415  # `--help` stays fast
    from iaflash.agent.evaluation.fit import (  # noqa: PLC0415
        choose_guard,
        fit_operating_point,
        samples_from_inference,
        with_readings,
        write_fitted_bundle,
    )

    bundle, inference = _load(bundle_dir, dataset, batch_size, threads)
    taxonomy = Taxonomy.from_bundle(bundle)
    samples = samples_from_inference(inference, taxonomy, clones_per_image=clones_per_image)
    if robust_margins:
        readings = [(f"margin={m:g}", _reading(bundle, dataset, m, batch_size, threads)) for m in robust_margins]
        samples = with_readings(samples, readings)
    sided: Literal["one", "two"] = "two" if two_sided else "one"
    temperature = bundle.manifest.temperature if keep_temperature else None
    choice = None
    if guard == "auto":
        choice = choose_guard(
            samples,
            taxonomy=taxonomy,
            target=target,
            sided=sided,
            temperature=temperature,
            output_kind=bundle.manifest.output_kind,
        )
    result = fit_operating_point(
        samples,
        taxonomy=taxonomy,
        target=target,
        sided=sided,
        temperature=temperature,
        dataset_sha256=inference.dataset_sha256 or None,
        output_kind=bundle.manifest.output_kind,
        guard=choice.guard if choice is not None else float(guard),
    )
    new = write_fitted_bundle(bundle, result.operating_point, out_dir)
    op, chosen = result.operating_point, result.chosen
    doc = {"schema": "iaflash.fit/1", "bundle": str(out_dir), "version": new.manifest.version, **result.to_dict()}
    if choice is not None:
        doc["guard_choice"] = choice.to_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(f"operating point {op.id}  target {op.target:g}  ({'met' if op.met else 'NOT met'})")
        click.echo(f"false flags     {op.flags}/{op.n_genuine} genuine, 95% upper bound {op.upper_bound:.4%}")
        if robust_margins:
            margins = ", ".join(f"{m:g}" for m in robust_margins)
            click.echo(f"readings        {chosen.genuine_readings} genuine readings (crop margins {margins} too)")
        make, model = f"{chosen.make_caught}/{chosen.n_make_clones}", f"{chosen.model_caught}/{chosen.n_model_clones}"
        click.echo(f"clones caught   make {make}  model {model}")
        click.echo("thresholds      " + "  ".join(f"{k} {v:g}" for k, v in op.thresholds.items()))
        click.echo(f"temperature     {op.temperature:.4f}")
        if choice is not None:
            tried = "  ".join(f"{g:g}: {k}" for g, k in choice.escapes.items())
            click.echo(
                f"guard           {op.guard:g} (auto; genuine vehicles flagged out of {choice.folds} inner folds "
                f"per guard: {tried})"
            )
        elif op.guard != 1.0:
            click.echo(f"guard           {op.guard:g}")
        click.echo(f"needs           {result.genuine_needed} genuine samples with 0 flags for this target")
        click.echo(f"wrote {out_dir} (version {new.manifest.version}, unsigned: sign it before deploying)")
    for warning in result.warnings:
        click.echo(f"WARNING: {warning}", err=True)
    if not op.met:
        sys.exit(EXIT_PROBLEMS)
