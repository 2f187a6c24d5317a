"""``iaflash-provision selftest``: known captures through this box's real pipeline, to its real broker.

What is real: the config, the HMAC key, the model and detector bundles (signatures checked), the
inference backend the agent would pick, the registry cache (opened without creating anything; no
row is written), the daemon's intake, decision and commit code, and an MQTT QoS 1 publish of each
verdict to the configured broker with the box's TLS files and credentials.

What is kept apart, so production is not disturbed: the spool and the outbox are in a temporary
folder (deleted at the end); the MQTT client id ends in ``-selftest``; every topic is under
``<prefix>/<site>/<device>/selftest/`` (events, and the link's own retained status), which the
device's ACL allows and central's subscriptions (``<prefix>/+/+/events/#``) never match.

Each check is a doctor line (ok / warn / FAIL / skip) with its fix; exit 0 when nothing failed, 3 otherwise.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.capture.spool import Spool
from iaflash.agent.config import OUTCOMES, Config, load_config, read_secret
from iaflash.agent.decision.verdict import Verdict
from iaflash.agent.errors import ConfigError, IaflashError
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.link.publisher import Publisher
from iaflash.agent.outbox.store import Outbox
from iaflash.agent.pipeline.pipeline import Pipeline
from iaflash.agent.registry.cache import Registry
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle
from iaflash.engines.errors import EngineError
from iaflash.engines.factory import create_backend
from iaflash.engines.options import BuildOptions
from iaflash.engines.signing import load_trusted_bundle
from iaflash.provisioning.doctor.report import Check, Report, split_fix
from iaflash.provisioning.selftest_captures import KNOWN, write_known

__all__ = ["SelftestConfig", "run_selftest", "selftest_config"]


class SelftestConfig(Config):
    """The box's config with every topic moved under ``<topic root>/selftest``."""

    @property
    def topic_root(self) -> str:
        return f"{super().topic_root}/selftest"


def selftest_config(cfg: Config, workdir: Path) -> SelftestConfig:
    """The box's config, with a temporary spool and outbox and its own client id; every outcome is published."""
    data = cfg.model_dump()
    data["spool"].update(dir=workdir / "spool", poll_interval_s=0.05, intake_threads=1)
    data["outbox"]["db"] = workdir / "state.db"
    data["mqtt"].update(publish=list(OUTCOMES), client_id=f"{cfg.client_id}-selftest", heartbeat_interval_s=3600)
    return SelftestConfig.model_validate(data)


@dataclass
class _Parts:
    """What the selftest loads, closed at the end whatever happened."""

    registry: Registry | None = None
    backend: Backend | None = None
    bundle: Bundle | None = None
    detector: tuple[Backend, Bundle] | None = None
    verdicts: dict[str, tuple[Verdict, dict[str, Any] | None]] = field(default_factory=dict)

    def close(self) -> None:
        for backend in (self.backend, self.detector[0] if self.detector else None):
            if backend is not None:
                backend.close()
        if self.registry is not None:
            self.registry.close()


def _fail(name: str, exc: BaseException, default_fix: str) -> Check:
    finding, fix = split_fix(str(exc), default_fix)
    return Check(name, "fail", finding, fix)


def _load(cfg: Config, key: bytes, parts: _Parts) -> list[Check]:
    """Registry, model and detector as the agent loads them; a FAIL for each that cannot load."""
    checks: list[Check] = []
    reimport = "import a snapshot: iaflash-provision registry import FILE"
    if not cfg.registry.db.is_file():
        checks.append(Check("registry", "fail", f"{cfg.registry.db}: no registry cache", reimport))
    else:
        parts.registry = Registry(cfg.registry.db, key, create=False)
    m = cfg.model
    build = BuildOptions(m.precision, m.workspace_mb, m.max_batch, m.engine_cache_dir)
    bundle_fix = f"reinstall the signed bundle into {m.bundle} and its publisher's .pub into {cfg.security.trust_dir}"
    # As the agent checks them: revocations and the rollback marks of the box's trust state (never recorded here).
    sec, state_file = cfg.security, cfg.trust_state_file
    try:
        parts.bundle = load_trusted_bundle(m.bundle, sec.trust_dir, sec.allow_unsigned, state_file=state_file)
        parts.backend = create_backend(m.backend, threads=m.threads, build=build)
        parts.backend.load(parts.bundle)
        parts.backend.warmup()
    except (EngineError, OSError) as exc:
        checks.append(Check("model", "fail", split_fix(str(exc), bundle_fix)[0], bundle_fix))
    if m.detector_bundle is not None:
        try:
            det = load_trusted_bundle(m.detector_bundle, sec.trust_dir, sec.allow_unsigned, state_file=state_file)
            if det.manifest.task != "detector" or det.manifest.detector is None:
                raise EngineError(f"{m.detector_bundle}: is a {det.manifest.task} bundle, not a detector")
            backend = create_backend(m.backend, threads=m.threads, build=build)
            parts.detector = (backend, det)
            backend.load(det)
            backend.warmup()
        except (EngineError, OSError) as exc:
            checks.append(_fail("detector", exc, f"reinstall the signed detector bundle into {m.detector_bundle}"))
    return checks


@contextlib.contextmanager
def _running(st: SelftestConfig, parts: _Parts, key: bytes) -> Iterator[tuple[Pipeline, MqttLink, Publisher]]:
    spool = Spool(st.spool.dir, st.spool)
    spool.ensure_layout()
    done = threading.Event()

    def on_verdict(capture: Capture, verdict: Verdict, event: dict[str, Any] | None) -> None:
        parts.verdicts[capture.capture_id] = (verdict, event)
        if len(parts.verdicts) >= len(KNOWN):
            done.set()

    assert parts.backend is not None and parts.bundle is not None and parts.registry is not None
    pipeline = Pipeline(
        st, spool, parts.backend, parts.bundle, parts.registry, key, on_verdict=on_verdict, detector=parts.detector
    )
    link = MqttLink(st)
    link.start()
    publisher = Publisher(st.outbox.db, link, st.mqtt)
    publisher.start()
    pipeline.start()
    try:
        yield pipeline, link, publisher
    finally:
        pipeline.stop(timeout=10)
        publisher.stop(timeout=5)
        link.stop(timeout=5)


def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def _unsent(path: Path) -> int:
    with Outbox(path) as outbox:
        return outbox.depth()


def _broker_check(st: SelftestConfig, link: MqttLink, publisher: Publisher, sent: int, timeout_s: float) -> Check:
    where = f"{st.mqtt.host}:{st.mqtt.port}"
    t0 = time.monotonic()
    if sent and _wait(lambda: _unsent(st.outbox.db) == 0 or publisher.stats()["refused"] > 0, timeout_s):
        refused = publisher.stats()["refused"]
        if refused == 0:
            ms = (time.monotonic() - t0) * 1000
            return Check(
                "broker",
                "ok",
                f"{sent} events acknowledged by {where} (MQTT {st.mqtt.protocol}{', TLS' if st.mqtt.tls else ''}) "
                f"under {st.topic_root}/events/ within {ms:.0f} ms",
            )
        return Check(
            "broker",
            "fail",
            f"{where} refused {refused} publish(es) under {st.topic_root}/events/ (ACL)",
            f"let this device publish under {st.mqtt.topic_prefix}/{st.site.site_id}/{st.site.device_id}/# "
            "in the broker's ACL (docs/CENTRAL.md, broker)",
        )
    if not link.connected:
        why = link.last_error or f"no connection to {where} within {timeout_s:.0f} s"
        return Check("broker", "fail", why, link.last_fix or "check mqtt.host, mqtt.port, the link and the broker")
    return Check(
        "broker",
        "fail",
        f"connected to {where} but {_unsent(st.outbox.db)} of {sent} events were not acknowledged "
        f"within {timeout_s:.0f} s",
        "check the broker's log and load; run the selftest again",
    )


def _image(event: dict[str, Any] | None) -> dict[str, Any]:
    if event is None:
        return {}
    image = event["verdict"].get("evidence", {}).get("image", {})
    return image if isinstance(image, dict) else {}


def _verdict_checks(cfg: Config, parts: _Parts, rejected: dict[str, str]) -> list[Check]:
    out: list[Check] = []
    missing = [k.capture_id for k in KNOWN if k.capture_id not in parts.verdicts]
    if missing:
        why = "; ".join(f"{cid}: {rejected[cid]}" for cid in missing if cid in rejected) or "no verdict in time"
        out.append(
            Check(
                "pipeline",
                "fail",
                f"no verdict for {', '.join(missing)} ({why})",
                "read the journal: journalctl -u iaflash-agent -n 50",
            )
        )
    verdicts = parts.verdicts
    if "selftest-model" in verdicts:
        v, _ = verdicts["selftest-model"]
        if not v.top_k:
            out.append(
                Check("model", "fail", f"no scores for selftest-model: {v.reason}", "reinstall the model bundle")
            )
        else:
            top, model = v.top_k[0], v.model
            out.append(
                Check(
                    "model",
                    "ok",
                    f"{model.get('name')} {model.get('version')} on {model.get('backend')} ({model.get('device')}): "
                    f"top-1 {top.make} {top.model} p={top.p:.2f} for the drawn car",
                )
            )
        out.append(_registry_check(cfg, parts, v))
    if "selftest-noplate" in verdicts:
        v, _ = verdicts["selftest-noplate"]
        ok = v.outcome == "unreadable_plate"
        out.append(
            Check(
                "decision",
                "ok" if ok else "fail",
                f"no plate read gave {v.outcome} ({v.reason})" + ("" if ok else ", expected unreadable_plate"),
                "" if ok else "report it with `iaflash-provision selftest --json` (a decision bug)",
            )
        )
    out.append(_detector_check(cfg, verdicts))
    return out


def _registry_check(cfg: Config, parts: _Parts, v: Verdict) -> Check:
    assert parts.registry is not None
    if v.reason.startswith("registry_unavailable"):
        finding, fix = split_fix(v.reason, "import a snapshot: iaflash-provision registry import FILE")
        return Check("registry", "fail", finding, fix)
    state = parts.registry.state()
    where = "empty (never imported)" if state is None else f"{state.dataset_id} seq {state.seq}, {state.count} vehicles"
    finding = f"{cfg.registry.db}: {where}; the test plate was looked up: {v.outcome}"
    if state is None or state.count == 0:
        return Check("registry", "warn", finding, "import a snapshot that holds this site's plates")
    if v.registry_stale:
        return Check("registry", "warn", f"{finding}, marked registry_stale", "import the latest delta or snapshot")
    return Check("registry", "ok", finding)


def _detector_check(cfg: Config, verdicts: dict[str, tuple[Verdict, dict[str, Any] | None]]) -> Check:
    """The detector ran on the capture without a sidecar box (its timing is there) and did not fail."""
    if cfg.model.detector_bundle is None:
        return Check("detector", "skip", "no detector configured (model.detector_bundle)")
    fix = f"reinstall the signed detector bundle into {cfg.model.detector_bundle}"
    if "selftest-detector" not in verdicts:
        return Check("detector", "fail", "no verdict for selftest-detector", fix)
    verdict, event = verdicts["selftest-detector"]
    image = _image(event)
    reason = str(image.get("vehicle_reason", verdict.reason))
    ms = (event or {}).get("timings_ms", {}).get("detect")
    if reason.startswith("detector failed") or ms is None:
        return Check("detector", "fail", f"selftest-detector: {reason}", fix)
    seen = image.get("vehicles_seen", 0)
    found = "it found the drawn car" if image.get("vehicle_source") == "detector" else f"{reason} in the drawing"
    return Check("detector", "ok", f"ran in {ms:.0f} ms on a frame without a sidecar box: {seen} vehicle(s), {found}")


def _rejections(spool_dir: Path) -> dict[str, str]:
    out = {}
    for path in (spool_dir / "rejected").glob("*.error.json"):
        out[path.name.removesuffix(".error.json")] = path.read_text(encoding="utf-8")[:300]
    return out


def run_selftest(
    config_path: Path, *, timeout_s: float = 30.0, broker_timeout_s: float = 10.0, hmac_key: bytes | None = None
) -> Report:
    """Every check of the selftest; ``hmac_key`` when the caller read it already (before dropping privileges)."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        return Report(
            str(config_path), [Check("config", "fail", str(exc), "iaflash-agent check-config " + str(config_path))]
        )
    checks = [Check("config", "ok", f"{config_path}: site {cfg.site.site_id}, device {cfg.site.device_id}")]
    try:
        raw = (
            hmac_key
            if hmac_key is not None
            else read_secret(
                "hmac-key", cfg.registry.hmac_key_file, what="HMAC key", config_key="registry.hmac_key_file"
            )
        )
        key = load_hmac_key(raw, cfg.registry.hmac_key_id)  # another site's key is refused, as by the agent
    except IaflashError as exc:
        return Report(
            str(config_path), [*checks, _fail("hmac key", exc, "install the key from the provisioning bundle")]
        )
    checks.append(Check("hmac key", "ok", f"key id {key_id(key)}"))
    parts = _Parts()
    with tempfile.TemporaryDirectory(prefix="iaflash-selftest-") as tmp:
        try:
            failed = _load(cfg, key, parts)
            if failed:
                skipped = Check(
                    "pipeline", "skip", "the known captures need the model and the registry", "fix the FAIL lines first"
                )
                return Report(str(config_path), [*checks, *failed, skipped])
            st = selftest_config(cfg, Path(tmp))
            with _running(st, parts, key) as (_, link, publisher):
                write_known(st.spool.dir / "incoming", cfg.site.site_id)
                _wait(lambda: len(parts.verdicts) + len(_rejections(st.spool.dir)) >= len(KNOWN), timeout_s)
                checks += _verdict_checks(cfg, parts, _rejections(st.spool.dir))
                sent = sum(event is not None for _, event in parts.verdicts.values())
                checks.append(_broker_check(st, link, publisher, sent, broker_timeout_s))
        finally:
            parts.close()
    return Report(str(config_path), checks)
