"""verdict.evidence: every key the agent writes is declared in agent/schemas/event.v1.json and docs/MQTT.md.

The evidence object stays open (consumers accept unknown keys), so schema validation alone would
never notice an undocumented key: these tests look at the keys themselves, recursively, on

- real verdicts from :func:`~iaflash.agent.decision.verdict.decide` on generated probabilities (a
  match, a make and a model mismatch, flags held by ``no_flag_reason`` and by the misread check,
  look-alikes, a genre veto, a make-only check, early outcomes) and a random sweep over them;
- the events the commit stage builds from them (``Committer._event``, the agent's own path), and
  the event the daemon's whole pipeline publishes for a generated capture (the image evidence),
  each validated with the project's schema loader;
- the source: every key the agent's modules write into an evidence dict, found in their syntax tree.
"""

from __future__ import annotations

import ast
import re
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_pipeline_evidence import bundle, run, scene

from iaflash.agent.capture.intake import Work
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.capture.spool import Claimed, Spool
from iaflash.agent.config import OUTCOMES, DecisionConfig, parse_config
from iaflash.agent.decision.operating import decision_policy
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import Verdict, decide
from iaflash.agent.outbox.events import validate_event
from iaflash.agent.pipeline.committer import Committer, Decided
from iaflash.agent.registry.record import RegistryRecord
from iaflash.agent.schemas.loader import schema, validator
from iaflash.engines.bundle import Label, OperatingPoint
from iaflash.engines.manifest import CropSpec, OodSpec, TtaSpec

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = "event.v1.json"
SCHEMA = schema(SCHEMA_FILE)
EVIDENCE = SCHEMA["$defs"]["verdict"]["properties"]["evidence"]
IMAGE = EVIDENCE["properties"]["image"]
NESTED = ("checked", "operating_point", "misread_check", "held_flag")

LABELS = (
    Label(0, "RENAULT", "CLIO", category="car"),
    Label(1, "RENAULT", "MEGANE", category="car"),
    Label(2, "PEUGEOT", "208", category="car"),
    Label(3, "CHEVROLET", "EXPRESS", category="van"),
    Label(4, "GMC", "SAVANA", category="van"),
    Label(5, "YAMAHA", "MT-07", category="motorcycle"),
)
CATEGORIES = tuple(lb.category for lb in LABELS)
TWINS = (("CHEVROLET EXPRESS", "GMC SAVANA"),)
TAX = Taxonomy(LABELS, lookalike_groups=TWINS)
TAX_FULL_RANGE = Taxonomy(LABELS, full_range_makes=("RENAULT",), lookalike_groups=TWINS)

CLIO = RegistryRecord("RENAULT", "CLIO", "VP", "CI")
EXPRESS = RegistryRecord("CHEVROLET", "EXPRESS", "CTTE", "BB")
PEUGEOT = RegistryRecord("PEUGEOT", "208", "VP", "CI")
TWINGO = RegistryRecord("RENAULT", "TWINGO", "VP", "CI")  # outside the taxonomy; RENAULT may be full range
G_CLASS = RegistryRecord("MERCEDES-BENZ", "CLASSE G", "VP", "TT")
CLIO_AS_MOTORBIKE = RegistryRecord("RENAULT", "CLIO", "MTL", None)
RECORDS = (CLIO, EXPRESS, PEUGEOT, TWINGO, G_CLASS, CLIO_AS_MOTORBIKE, RegistryRecord("RENAULT", "MEGANE", None, None))
MODEL_INFO = {"name": "tiny", "version": "1", "backend": "onnxruntime", "device": "cpu"}


def operating_point(met: bool = True) -> OperatingPoint:
    return OperatingPoint(
        id="op-0123456789ab",
        target=0.001,
        thresholds={"min_top1": 0.7, "make_threshold": 0.02, "model_threshold": 0.01, "other_threshold": 0.2},
        temperature=1.0,
        n_genuine=3000 if met else 100,
        flags=0,
        upper_bound=0.000998 if met else 0.0295,
        met=met,
        fitted_at="2026-12-01T00:00:00+00:00",
        dataset_sha256="0" * 64,
    )


def peaked(rng: np.random.Generator, **mass: float) -> np.ndarray:
    """Probabilities with ``mass`` on the named labels (``p3=0.8``), the rest spread at random."""
    probs = np.zeros(len(LABELS))
    for key, value in mass.items():
        probs[int(key[1:])] = value
    free = [i for i in range(len(LABELS)) if probs[i] == 0]
    probs[free] = rng.dirichlet(np.ones(len(free))) * (1.0 - probs.sum())
    return probs


def decide_with(
    probs: np.ndarray | None,
    record: RegistryRecord | None,
    *,
    op: OperatingPoint | None = None,
    cfg: DecisionConfig | None = None,
    taxonomy: Taxonomy = TAX,
    **kw: Any,
) -> Verdict:
    """decide() the way the pipeline calls it: the policy from the config and the bundle's operating point."""
    policy = decision_policy(cfg or DecisionConfig(), op)
    return decide(
        probs=probs,
        taxonomy=taxonomy,
        record=record,
        plate_problem=kw.pop("plate_problem", None),
        cfg=policy.cfg,
        model_info=MODEL_INFO,
        label_categories=kw.pop("label_categories", CATEGORIES),
        operating_point=policy.operating_point,
        no_flag_reason=policy.no_flag_reason,
        **kw,
    )


# ---------------------------------------------------------------- the checker


def _resolve(node: dict[str, Any], value: Any) -> dict[str, Any]:
    """The schema node that describes ``value``: ``$ref`` followed, the object branch of a ``oneOf``."""
    if "$ref" in node:
        target: Any = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _resolve(target, value)
    if isinstance(value, dict) and "oneOf" in node:
        objects = [b for b in (_resolve(b, value) for b in node["oneOf"]) if "properties" in b]
        assert len(objects) == 1, f"ambiguous oneOf for an object: {node}"
        return objects[0]
    return node


def undeclared(value: Any, node: dict[str, Any], path: str = "evidence") -> list[str]:
    """Paths of the keys in ``value`` (recursively) that ``node`` does not declare in ``properties``."""
    node = _resolve(node, value)
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in undeclared(v, node.get("items", {}), f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    properties = node.get("properties")
    if properties is None:
        return [f"{path} (an object whose keys the schema does not declare)"]
    missing = []
    for key, item in value.items():
        if key not in properties:
            missing.append(f"{path}.{key}")
        else:
            missing += undeclared(item, properties[key], f"{path}.{key}")
    return missing


def evidence_of(verdict: Verdict) -> dict[str, Any]:
    """The evidence as the verdict document carries it (the one the commit stage puts in the event)."""
    evidence: dict[str, Any] = verdict.to_dict(extended=True)["evidence"]
    return evidence


def key_paths(value: Any, path: str = "") -> set[str]:
    if not isinstance(value, dict):
        return set()
    return {p for k, v in value.items() for p in {f"{path}{k}", *key_paths(v, f"{path}{k}.")}}


def test_the_checker_reports_an_undocumented_key_at_every_depth() -> None:
    """The guard itself: a key nobody declared, at the top of evidence or deep inside, is reported."""
    verdict = decide_with(peaked(np.random.default_rng(0), p2=0.99), CLIO, op=operating_point())
    evidence = evidence_of(verdict)
    assert undeclared(evidence, EVIDENCE) == []
    assert undeclared({**evidence, "new_key": 1}, EVIDENCE) == ["evidence.new_key"]
    for nested in ("checked", "operating_point"):
        changed = {**evidence, nested: {**evidence[nested], "new_key": 1}}
        assert undeclared(changed, EVIDENCE) == [f"evidence.{nested}.new_key"]
    image = {"crop": {"box": None, "new_key": 1}, "views": {"views": [], "fusion": "none", "other": 2}}
    assert sorted(undeclared({"image": image}, EVIDENCE)) == [
        "evidence.image.crop.new_key",
        "evidence.image.views.other",
    ]
    assert undeclared({"held_flag": {"level": "make", "reason": "r", "why": "x"}}, EVIDENCE) == [
        "evidence.held_flag.why"
    ]


# ---------------------------------------------------------------- (a) real verdicts, key by key


def _case(name: str) -> Verdict:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    op = operating_point()
    cases = {
        "match": lambda: decide_with(peaked(rng, p0=0.9), CLIO, op=op),
        "make_mismatch": lambda: decide_with(peaked(rng, p2=0.99), CLIO, op=op, misread=[EXPRESS]),
        "model_mismatch": lambda: decide_with(peaked(rng, p1=0.992), CLIO, op=op, misread=[]),
        "held_no_operating_point": lambda: decide_with(peaked(rng, p2=0.99), CLIO, op=None),
        "held_operating_point_missed": lambda: decide_with(peaked(rng, p2=0.99), CLIO, op=operating_point(met=False)),
        "held_misread": lambda: decide_with(peaked(rng, p2=0.99), CLIO, op=op, misread=[PEUGEOT]),
        "lookalike": lambda: decide_with(peaked(rng, p4=0.85, p3=0.1), EXPRESS, op=op),
        "genre_veto": lambda: decide_with(peaked(rng, p0=0.9), CLIO_AS_MOTORBIKE, op=op),
        "make_only": lambda: decide_with(peaked(rng, p0=0.9), TWINGO, op=op, taxonomy=TAX_FULL_RANGE),
        "override": lambda: decide_with(
            peaked(rng, p2=0.99), CLIO, op=None, cfg=DecisionConfig(override_operating_point=True)
        ),
        "unsupported": lambda: decide_with(peaked(rng, p0=0.9), G_CLASS, op=op),
        "no_image": lambda: decide_with(None, CLIO, op=op, image_problem="poor image: too dark"),
        "low_top1": lambda: decide_with(peaked(rng, p0=0.4, p1=0.35), CLIO, op=op),
        "no_categories": lambda: decide_with(peaked(rng, p0=0.9), CLIO, op=op, label_categories=None),
        "unknown_plate": lambda: decide_with(peaked(rng, p0=0.9), None, op=op),
        "unreadable_plate": lambda: decide_with(peaked(rng, p0=0.9), CLIO, op=op, plate_problem="radar: no plate"),
    }
    return cases[name]()


EXPECTED = {  # case: (outcome, level, evidence keys that must be there)
    "match": ("match", None, {"checked", "operating_point", "genre_compatible"}),
    "make_mismatch": ("mismatch", "make", {"checked", "misread_check"}),
    "model_mismatch": ("mismatch", "model", {"checked", "misread_check"}),
    "held_no_operating_point": ("inconclusive", None, {"checked", "held_flag"}),
    "held_operating_point_missed": ("inconclusive", None, {"checked", "held_flag"}),
    "held_misread": ("inconclusive", None, {"checked", "misread_check", "held_flag"}),
    "lookalike": ("inconclusive", None, {"checked"}),
    "genre_veto": ("inconclusive", None, {"checked", "genre_compatible"}),
    "make_only": ("unsupported", None, {"checked"}),
    "override": ("mismatch", "make", {"checked", "operating_point"}),
    "unsupported": ("unsupported", None, {"operating_point", "genre"}),
    "no_image": ("inconclusive", None, {"operating_point", "genre"}),
    "low_top1": ("inconclusive", None, {"checked"}),
    "no_categories": ("match", None, {"checked", "top1_category"}),
    "unknown_plate": ("unknown_plate", None, set()),
    "unreadable_plate": ("unreadable_plate", None, set()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_evidence_key_of_a_decided_verdict_is_declared(name: str) -> None:
    verdict = _case(name)
    outcome, level, keys = EXPECTED[name]
    assert (verdict.outcome, verdict.level) == (outcome, level), verdict.reason
    evidence = evidence_of(verdict)
    assert keys <= set(evidence), f"{name}: expected {keys} in {sorted(evidence)}"
    assert undeclared(evidence, EVIDENCE) == []
    for nested in NESTED:  # each nested object has its own declared properties, so the recursion checks them
        assert "properties" in EVIDENCE["properties"][nested]
        if nested in evidence:
            assert set(evidence[nested]) <= set(EVIDENCE["properties"][nested]["properties"])


def test_the_cases_show_what_each_key_carries() -> None:
    """The evidence the named cases write is the one the schema describes (look-alikes, held flag, misread)."""
    twin = evidence_of(_case("lookalike"))["checked"]
    assert twin["lookalikes"] == ["GMC SAVANA"] and twin["p_lookalike"] > 0.8
    held = evidence_of(_case("held_misread"))
    assert held["held_flag"]["level"] == "make" and held["misread_check"] == {"registered_neighbours": 1, "fitting": 1}
    assert evidence_of(_case("held_no_operating_point"))["operating_point"] == {"id": None, "override": False}
    assert evidence_of(_case("override"))["operating_point"] == {"id": None, "override": True}
    assert set(evidence_of(_case("match"))["operating_point"]) == {"id", "target", "upper_bound", "met", "override"}
    assert evidence_of(_case("make_only"))["checked"]["p_model"] is None
    assert evidence_of(_case("genre_veto"))["genre_compatible"] is False
    assert evidence_of(_case("unknown_plate")) == {}


def _sweep(seed: int = 11, n: int = 400) -> list[Verdict]:
    """Random verdicts over records, probabilities, operating points, misread neighbours, problems."""
    rng = np.random.default_rng(seed)
    ops = (operating_point(), operating_point(met=False), None)
    verdicts = []
    for _ in range(n):
        if rng.random() < 0.5:
            probs = rng.dirichlet(np.full(len(LABELS), rng.choice([0.05, 0.3, 1.0])))
        else:
            probs = peaked(rng, **{f"p{int(rng.integers(len(LABELS)))}": float(rng.uniform(0.5, 0.999))})
        neighbours = [RECORDS[int(i)] for i in rng.integers(len(RECORDS), size=int(rng.integers(3)))]
        draw = rng.random(4)
        verdicts.append(
            decide_with(
                None if draw[0] < 0.05 else probs,
                None if draw[0] > 0.97 else RECORDS[int(rng.integers(len(RECORDS)))],
                op=ops[int(rng.integers(len(ops)))],
                cfg=DecisionConfig(override_operating_point=bool(draw[1] < 0.2)),
                taxonomy=TAX_FULL_RANGE if draw[2] < 0.3 else TAX,
                misread=None if draw[3] < 0.3 else neighbours,
                label_categories=None if draw[3] > 0.9 else CATEGORIES,
                plate_problem="radar: no plate" if draw[1] > 0.97 else None,
            )
        )
    return verdicts


def test_generated_verdicts_write_only_declared_keys_and_every_declared_key_is_written() -> None:
    """Over a random sweep: no undeclared key; and no declared key the decision never writes (but image)."""
    seen: set[str] = set()
    for verdict in _sweep():
        evidence = evidence_of(verdict)
        assert undeclared(evidence, EVIDENCE) == [], (verdict.outcome, verdict.reason)
        seen |= key_paths(evidence)
    declared = {k for k in key_paths(_declared_tree(EVIDENCE)) if not k.startswith("image")}
    assert declared - seen == set()


def _declared_tree(node: dict[str, Any]) -> dict[str, Any]:
    """The schema's declared properties as a nested dict (leaves None), ``$ref`` not followed."""
    return {k: _declared_tree(v) if "properties" in v else None for k, v in node.get("properties", {}).items()}


# ---------------------------------------------------------------- (b) the events the agent builds


def _site(tmp_path: Path) -> tuple[Committer, Claimed]:
    doc: dict[str, Any] = {
        "site": {"site_id": "s1", "device_id": "b1"},
        "spool": {"dir": str(tmp_path / "spool")},
        "model": {"bundle": str(tmp_path / "model")},
        "registry": {"db": str(tmp_path / "registry.db"), "hmac_key_file": str(tmp_path / "hmac.key")},
        "outbox": {"db": str(tmp_path / "state.db")},
        "security": {"trust_dir": str(tmp_path / "trust")},
        "mqtt": {"host": "127.0.0.1", "port": 1, "publish": list(OUTCOMES)},
    }
    cfg = parse_config(doc, str(tmp_path / "agent.toml"))
    capture = Capture(
        capture_id="c-1",
        site_id="s1",
        captured_at=datetime(2026, 12, 1, 10, tzinfo=timezone.utc),
        plate="AB123CD",
        plate_confidence=0.99,
        direction="approaching",
        lane=2,
        speed_kmh=92.0,
        limit_kmh=80.0,
        equipment="MESTA-FUSION",
        vehicle_box=(10, 20, 300, 200),
        images=("c-1.jpg",),
    )
    claimed = Claimed(capture, tmp_path / "c-1.json", [tmp_path / "c-1.jpg"], [b""])
    return Committer(cfg, Spool(cfg.spool.dir, cfg.spool)), claimed


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_event_the_commit_stage_builds_for_each_verdict_is_valid(tmp_path: Path, name: str) -> None:
    """Committer._event (what the agent records and publishes), checked again with the schema loader."""
    committer, claimed = _site(tmp_path)
    work = Work(claimed, None, None, 0.0, {"decide": 0.4}, {"vehicle_source": "sidecar", "decode_reduction": 2})
    _, outcome, event, topic = committer._event(Decided(work, _case(name), bytes(32)))
    assert event is not None and topic is not None and topic.endswith(f"/events/{outcome}")
    validator(SCHEMA_FILE).validate(event)
    evidence = event["verdict"]["evidence"]
    assert evidence["image"] == work.evidence
    assert undeclared(evidence, EVIDENCE) == []


def test_the_daemons_published_event_declares_every_image_key(tmp_path: Path) -> None:
    """The whole pipeline on generated captures (colour and infrared): the event's evidence, image included."""
    image, box = scene(7)
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    model = bundle(tmp_path, crop=CropSpec(margin=0.0), tta=TtaSpec(hflip=True), ood=OodSpec(threshold=1e9))
    out = run(tmp_path, model, {"c-colour": (image, box), "c-ir": (grey, box)})
    for capture_id in ("c-colour", "c-ir"):
        _, event = out[capture_id]
        assert event is not None
        validate_event(event)
        validator(SCHEMA_FILE).validate(event)
        evidence = event["verdict"]["evidence"]
        assert undeclared(evidence, EVIDENCE) == []
        assert {"vehicle_source", "vehicle_reason", "vehicles_seen", "decode_reduction", "crop"} <= set(
            evidence["image"]
        )
    colour = out["c-colour"][1]["verdict"]["evidence"]["image"]
    assert {"views", "batch_size"} <= set(colour) and colour["views"]["ood_threshold"] == 1e9


# ---------------------------------------------------------------- the source: keys written in any branch

SOURCES = {  # module: what its evidence dicts are (a ``x["evidence"] = {...}`` is always the verdict's)
    "agent/decision/verdict.py": "evidence",
    "agent/capture/intake.py": "image",
    "agent/pipeline/pipeline.py": "image",
    "agent/pipeline/committer.py": "image",
}


def _is_evidence(node: ast.expr) -> bool:
    return (
        (isinstance(node, ast.Name) and node.id == "evidence")
        or (isinstance(node, ast.Attribute) and node.attr == "evidence")
        or (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "evidence")
    )


def _dict_keys(node: ast.expr, prefix: str) -> set[str]:
    """Literal keys of a dict display, nested dict displays included (``a``, ``a.b``)."""
    if not isinstance(node, ast.Dict):
        return set()
    keys = set()
    for key, value in zip(node.keys, node.values, strict=True):
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            keys |= {f"{prefix}{key.value}", *_dict_keys(value, f"{prefix}{key.value}.")}
    return keys


def _written(target: ast.expr, value: ast.expr, level: str) -> tuple[str, set[str]]:
    """(level, keys) that assigning ``value`` to ``target`` writes into an evidence dict; keys empty: none."""
    if _is_evidence(target):  # evidence = {...}; x.evidence = {...}; doc["evidence"] = {...} (the verdict's)
        return ("evidence" if isinstance(target, ast.Subscript) else level), _dict_keys(value, "")
    if isinstance(target, ast.Subscript) and _is_evidence(target.value):  # evidence["key"] = ...
        key = target.slice
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            return level, {"<a key computed at run time: the scan cannot check it>"}
        return level, {key.value, *_dict_keys(value, f"{key.value}.")}
    return level, set()


def written_keys() -> dict[str, set[str]]:
    """{"evidence": keys, "image": keys} written into evidence dicts by the agent's modules."""
    found: dict[str, set[str]] = {"evidence": set(), "image": set()}
    for module, level in SOURCES.items():
        for node in ast.walk(ast.parse((ROOT / module).read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "evidence":
                found[level] |= _dict_keys(node.value, "")
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                where, keys = _written(target, node.value, level)
                found[where] |= keys
    return found


def test_every_key_the_source_writes_into_evidence_is_declared() -> None:
    """Keys written in branches no generated case reaches are declared too (found in the modules' syntax)."""
    found = written_keys()
    # the scan really sees the writes (a refactor that hides them from it must update it)
    assert {"genre", "operating_point.override", "checked", "held_flag.level", "misread_check.fitting"} <= found[
        "evidence"
    ]
    assert "image" in found["evidence"]
    assert {"vehicle_source", "crop", "second_image", "batch_size", "views.ood_threshold", "reused_capture_id"} <= (
        found["image"]
    )
    declared = key_paths(_declared_tree(EVIDENCE))
    assert found["evidence"] - declared == set()
    assert {f"image.{k}" for k in found["image"]} - key_paths({"image": _declared_tree(IMAGE)}) == set()


# ---------------------------------------------------------------- open, optional, documented


def test_evidence_stays_open_and_its_keys_optional_while_the_verdict_stays_strict() -> None:
    assert "additionalProperties" not in EVIDENCE and "required" not in EVIDENCE
    assert "additionalProperties" not in IMAGE and "required" not in IMAGE
    for nested in NESTED:
        assert "additionalProperties" not in EVIDENCE["properties"][nested]
    assert SCHEMA["additionalProperties"] is False
    assert SCHEMA["$defs"]["verdict"]["additionalProperties"] is False
    assert "evidence" not in SCHEMA["$defs"]["verdict"]["required"]
    for key, node in EVIDENCE["properties"].items():
        assert node.get("description"), f"evidence.{key} has no description"
    for key, node in IMAGE["properties"].items():
        assert node.get("description") or "$ref" in node, f"evidence.image.{key} has no description"


def test_an_unknown_evidence_key_is_accepted_and_an_unknown_verdict_key_refused(tmp_path: Path) -> None:
    committer, claimed = _site(tmp_path)
    work = Work(claimed, None, None, 0.0, {}, {"vehicle_source": "sidecar", "future": {"x": 1}})
    _, _, event, _ = committer._event(Decided(work, _case("make_mismatch"), None))
    assert event is not None
    event["verdict"]["evidence"]["from_a_newer_agent"] = [1, 2]
    validate_event(event)  # consumers must accept it
    event["verdict"]["not_in_v1"] = True
    with pytest.raises(ValueError, match="not_in_v1"):
        validate_event(event)


def test_docs_mqtt_table_names_every_declared_evidence_key() -> None:
    text = (ROOT / "docs" / "MQTT.md").read_text(encoding="utf-8")
    match = re.search(r"\n### `verdict\.evidence` keys\n(.*?)\n## ", text, re.S)
    assert match, "docs/MQTT.md has no '### `verdict.evidence` keys' section"
    section = match.group(1)
    assert "optional and additive within `iaflash.event/1`" in section
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    first_column = {k for row in rows for k in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}
    assert set(EVIDENCE["properties"]) - first_column == set()
    named = set(re.findall(r"`([a-z0-9_]+)`", section))
    for parent in (*NESTED, "image"):
        assert set(EVIDENCE["properties"][parent]["properties"]) - named == set(), parent
