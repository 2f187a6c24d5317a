"""The evaluation report: one self-contained HTML page (inline SVG plots, inline thumbnails).

:func:`render_html` takes the document :func:`iaflash.agent.evaluation.evaluate.evaluate` returns
(the same one ``--json`` prints), so the page and the JSON can never disagree. It shows, in order:
the loud warnings, provenance, headline figures, the operating points (configured, shipped,
recommended) with make-level and model-level clone detection, the operating curve on a LOG
false-flag axis with the target line and the 95 % upper bounds, the Pareto table of the joint
sweep, the most confused label pairs, every flagged genuine item with its thumbnail and box,
and the calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from iaflash.agent.evaluation.plots import COLORS, Series, line_plot, reliability_plot
from iaflash.agent.evaluation.thumbnail import thumbnail_svg

__all__ = ["Series", "line_plot", "pareto", "reliability_plot", "render_html"]

THUMBNAILS = 200
"""At most this many flagged items get a thumbnail per operating point (all are listed)."""


def _pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}%}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def pareto(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep points no other point beats on both the upper bound and make-level detection."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda q: (q["false_flag_upper"], -q["make_detection"], -q["model_detection"])):
        if p["make_detection"] > best:
            front.append(p)
            best = p["make_detection"]
    return front


def _curve(doc: dict[str, Any]) -> str:
    sweep, target = doc["sweep"], doc["target"]["false_flag_rate"]
    levels = sorted({p["min_top1"] for p in sweep})
    shown = levels if len(levels) <= 4 else [levels[0], *levels[len(levels) // 2 : len(levels) // 2 + 1], *levels[-2:]]
    series = [
        Series(
            f"min_top1 {m:g}: 95% upper bound → make-level detection",
            [(p["false_flag_upper"], p["make_detection"]) for p in pareto([q for q in sweep if q["min_top1"] == m])],
            COLORS[n % len(COLORS)],
            markers=True,
        )
        for n, m in enumerate(shown)
    ]
    for n, p in enumerate(doc["operating_points"]):
        series.append(
            Series(
                f"{p['name']}: point estimate and 95% upper bound",
                [(max(p["false_flag_rate"], 1e-5), p["make_detection"]), (p["false_flag_upper"], p["make_detection"])],
                COLORS[(n + 3) % len(COLORS)],
                markers=True,
                dashed=True,
            )
        )
    series.append(Series(f"target {target * 100:g}%", [(target, 0.0), (target, 1.0)], COLORS[1], dashed=True))
    lo = min([target / 10, *(p["false_flag_upper"] for p in sweep)])
    return line_plot(
        "Operating curve",
        series,
        x_label="false-flag rate on genuine (log scale)",
        y_label="make-level clone detection",
        log_x=True,
        x_range=(lo * 0.8, 1.0),
    )


def _points_table(doc: dict[str, Any]) -> str:
    rows = []
    for p in doc["operating_points"]:
        t = p["thresholds"]
        rows.append(
            [
                escape(p["name"]),
                f"{t['min_top1']:g} / {t['make_threshold']:g} / {t['model_threshold']:g}",
                f"{p['genuine_flagged']} / {p['genuine']}",
                _pct(p["false_flag_rate"], 3),
                _pct(p["false_flag_upper"], 3),
                "met" if p["met"] else "<b>NOT met</b>",
                _pct(p["genuine_abstained"] / p["genuine"] if p["genuine"] else None, 1),
                f"{_pct(p['make_detection'], 1)} of {p['make_clones']}",
                f"{_pct(p['model_detection'], 1)} of {p['model_clones']}",
            ]
        )
    cf = doc.get("cross_fit")
    if cf:
        rows.append(
            [
                f"cross-fit, out of fold ({cf['folds']} folds)",
                "fitted per fold (--json: cross_fit.fitted)",
                f"{cf['genuine_flagged']} / {cf['genuine']}",
                _pct(cf["false_flag_rate"], 3),
                _pct(cf["false_flag_upper"], 3),
                "met" if cf["met"] else "<b>NOT met</b>",
                _pct(cf["genuine_abstained"] / cf["genuine"] if cf["genuine"] else None, 1),
                f"{_pct(cf['make_detection'], 1)} of {cf['make_clones']}",
                f"{_pct(cf['model_detection'], 1)} of {cf['model_clones']}",
            ]
        )
    head = (
        "point",
        "min_top1 / make / model",
        "genuine flagged",
        "rate",
        "95% upper bound",
        "target",
        "genuine abstained",
        "make-level clones caught",
        "model-level clones caught",
    )
    return _table(head, rows)


def _sweep_table(doc: dict[str, Any]) -> str:
    rows = [
        [
            f"{p['min_top1']:g}",
            f"{p['make_threshold']:g}",
            f"{p['model_threshold']:g}",
            f"{p['genuine_flagged']} / {p['genuine']}",
            _pct(p["false_flag_upper"], 3),
            _pct(p["make_detection"], 1),
            _pct(p["model_detection"], 1),
        ]
        for p in pareto(doc["sweep"])
    ]
    head = (
        "min_top1",
        "make_threshold",
        "model_threshold",
        "genuine flagged",
        "95% upper bound",
        "make-level detection",
        "model-level detection",
    )
    return _table(head, rows)


def _confusions(doc: dict[str, Any]) -> str:
    rows = [
        [escape(c["true"]), escape(c["predicted"]), str(c["count"]), "yes" if c["same_make"] else "no"]
        for c in doc["confusions"]
    ]
    return _table(("true label", "predicted top-1", "count", "same make"), rows) if rows else "<p>No mistakes.</p>"


def _flagged(doc: dict[str, Any]) -> str:
    parts = []
    for name, items in doc["flagged_genuine"].items():
        parts.append(f"<h3>At the {escape(name)} point: {len(items)} genuine item(s) flagged</h3>")
        rows = []
        for n, item in enumerate(items):
            top1 = item["top1"] or {}
            thumb = (
                thumbnail_svg(Path(item["image"]), item["box"], item["frame_size"], item["where"])
                if n < THUMBNAILS
                else ""
            )
            rows.append(
                [
                    thumb,
                    escape(item["where"]),
                    escape(f"{item['truth']['make']} {item['truth']['model']}"),
                    escape(f"{top1.get('make', '')} {top1.get('model', '')} (p {top1.get('p', 0):.3f})"),
                    escape(str(item["box"])),
                    escape(str(item["vehicle_source"])),
                    escape(f"{item['outcome']}: {item['reason']}"),
                ]
            )
        if rows:
            parts.append(
                _table(("frame and box classified", "item", "truth", "top-1", "box", "box from", "verdict"), rows)
            )
    return "".join(parts)


def _provenance(doc: dict[str, Any]) -> str:
    b, d, sig = doc["bundle"], doc["dataset"], doc["bundle"]["signature"]
    signer = (
        "unsigned" if not sig["signed"] else f"{sig.get('signer')} (key {sig.get('key_id')}, {sig.get('signed_at')})"
    )
    items = [
        ("bundle", f"{b['name']} {b['version']} at {b['path']}"),
        ("manifest sha256", b["manifest_sha256"]),
        ("model sha256", b["model_sha256"]),
        ("signature (read, not verified here)", signer),
        ("dataset", f"{d['kind']} at {d['path']}"),
        ("dataset sha256 (labels + images)", d["sha256"]),
        ("listing sha256", d.get("listing_sha256", "—")),
        (
            "items",
            f"{d['samples']} listed, {d['evaluated']} evaluated, {d['unsupported']} unsupported, "
            f"{d['rejected']} rejected, {d['poor_image']} not classified",
        ),
        ("created", doc["created_at"]),
    ]
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in items) + "</table>"


def _headline(doc: dict[str, Any]) -> str:
    acc, cal, sim = doc["accuracy"], doc["calibration"], doc["simulation"]
    items = [
        (
            "top-1 / top-5 / make accuracy (daemon crops)",
            f"{_pct(acc['top1'])} / {_pct(acc['top5'])} / {_pct(acc['make'])}",
        ),
        ("classified", str(acc["classified"])),
        (f"ECE ({cal['bins']} bins) / NLL", f"{cal['ece']:.4f} / {cal['nll']:.4f}"),
        ("temperature", f"{doc['bundle']['temperature']:g}"),
        (
            "pairs",
            f"{sim['pairs']}: {sim['genuine_pairs']} genuine, {sim['make_pairs']} make-level clones, "
            f"{sim['model_pairs']} model-level clones",
        ),
        ("genuine samples the target needs (0 flags)", str(doc["target"]["genuine_needed"])),
    ]
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in items) + "</table>"


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;"
    "vertical-align:top}.warn{font-size:1.15em;padding:.8em;margin:.5em 0;background:#fde8e8;"
    "border-left:6px solid #c00;color:#700;font-weight:bold}.ok{padding:.8em;background:#eef6ee;"
    "border-left:4px solid #2e9e5b}"
)


def render_html(doc: dict[str, Any]) -> str:
    """The whole report page for an evaluation document; self-contained (no external resource)."""
    bundle, target = doc["bundle"], doc["target"]["false_flag_rate"]
    title = f"Evaluation of {bundle['name']} {bundle['version']}"
    warnings = "".join(f'<p class="warn">WARNING: {escape(w)}</p>' for w in doc["warnings"])
    if not warnings:
        warnings = (
            f'<p class="ok">Every operating point shown meets the target {target:.3%} on its 95% upper bound.</p>'
        )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>{warnings}"
        f"<h2>Provenance</h2>{_provenance(doc)}<h2>Headline figures</h2>{_headline(doc)}"
        f"<h2>Operating points (target: 95% upper bound ≤ {target:.3%})</h2>{_points_table(doc)}"
        f"<h2>Operating curve</h2>{_curve(doc)}"
        f"<h2>Joint sweep: the Pareto front</h2>{_sweep_table(doc)}"
        f"<h2>Most confused label pairs</h2>{_confusions(doc)}"
        f"<h2>Flagged genuine items</h2>{_flagged(doc)}"
        f"<h2>Calibration</h2>{reliability_plot(doc['calibration']['reliability'])}"
        f"<p>Schema {escape(doc['schema'])}. The same figures, and one row per item, are printed by "
        "<code>--json</code>.</p></body></html>\n"
    )
