"""Which thresholds the daemon decides with: the bundle's fitted operating point, config only stricter.

A bundle carries an operating point fitted for a target false-flag rate
(:class:`~iaflash.engines.bundle.OperatingPoint`, written by ``iaflash-agent fit``). The rules:

* the bundle's thresholds are the default; a threshold set in ``[decision]`` is used only where it is
  *stricter* (a higher ``min_top1``, a lower ``make_threshold``/``model_threshold``/``other_threshold``);
  a looser one is ignored, and said so at start;
* ``decision.override_operating_point = true`` uses the config's thresholds as given (said at start and
  named in every verdict's evidence);
* a bundle with no operating point, or one that does not meet its own target, **never flags**: a would-be
  mismatch is ``inconclusive`` with reason ``no_operating_point`` (unless overridden).

Pure: no I/O; the pipeline logs :attr:`Policy.notes` once at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from iaflash.agent.config import DecisionConfig
from iaflash.engines.bundle import OperatingPoint

__all__ = ["NO_OPERATING_POINT", "STRICTER", "Policy", "decision_policy"]

NO_OPERATING_POINT = "no_operating_point"
STRICTER: dict[str, Callable[[float, float], float]] = {
    "min_top1": max,
    "make_threshold": min,
    "model_threshold": min,
    "other_threshold": min,
}
"""For each flag threshold, which of two values is the stricter (fewer flags)."""


@dataclass(frozen=True)
class Policy:
    """The thresholds to decide with, the operating point they come from, and whether flags are allowed."""

    cfg: DecisionConfig
    operating_point: OperatingPoint | None
    no_flag_reason: str | None
    notes: tuple[str, ...] = ()


def _no_flags(op: OperatingPoint | None) -> str:
    fix = "fix: fit one on labelled data (`iaflash-agent fit`, docs/DECISION.md) and install that bundle"
    if op is None:
        return f"{NO_OPERATING_POINT}: the model bundle has no fitted operating point, so it never flags; {fix}"
    return (
        f"{NO_OPERATING_POINT}: the bundle's operating point {op.id} does not meet its target (upper bound "
        f"{op.upper_bound:.5f} > {op.target}), so it never flags; {fix}"
    )


def decision_policy(cfg: DecisionConfig, op: OperatingPoint | None) -> Policy:
    """Combine the config's ``[decision]`` section with the bundle's operating point (see the module doc)."""
    usable = op is not None and op.met
    if cfg.override_operating_point:
        note = "decision.override_operating_point = true: deciding with the config's thresholds as given" + (
            "" if usable else ", although the bundle has no operating point that meets its target"
        )
        return Policy(cfg, op, None, (note,))
    if op is None or not usable:
        return Policy(cfg, op, _no_flags(op), (_no_flags(op),))
    values = cfg.model_dump()
    notes = []
    for key, stricter in STRICTER.items():
        fitted = op.thresholds.get(key)
        if fitted is None:
            continue
        if key not in cfg.model_fields_set:
            values[key] = fitted
            continue
        values[key] = stricter(values[key], fitted)
        if values[key] != getattr(cfg, key):
            notes.append(
                f"decision.{key} = {getattr(cfg, key)} is looser than the bundle's operating point {op.id} "
                f"({fitted}): ignored; set decision.override_operating_point = true to force it"
            )
    match = op.thresholds.get("match_threshold")
    if match is not None and "match_threshold" not in cfg.model_fields_set:
        values["match_threshold"] = match
    values["match_threshold"] = max(values["match_threshold"], values["model_threshold"])
    return Policy(DecisionConfig.model_validate(values), op, None, tuple(notes))
