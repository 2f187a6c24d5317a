"""Service wiring: build every part from the config, run, supervise, stop cleanly.

Start order: secrets → registry → bundle + backend (warm-up) → outbox recovery →
MQTT link + publisher → pipeline → READY=1. Stop order is the reverse, so that the
capture in flight is committed before the link goes down.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

from iaflash.agent.capture.spool import Spool
from iaflash.agent.commands.handlers import CommandWorker
from iaflash.agent.config import Config, read_secret
from iaflash.agent.errors import OutboxError, RegistryError
from iaflash.agent.health import InstanceLock, sd_notify, watchdog_interval_s
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.link.publisher import Publisher
from iaflash.agent.outbox.store import Outbox
from iaflash.agent.pipeline.committer import VerdictCallback
from iaflash.agent.pipeline.pipeline import Pipeline
from iaflash.agent.registry.cache import Registry
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle
from iaflash.engines.errors import BundleError
from iaflash.engines.factory import create_backend
from iaflash.engines.options import BuildOptions
from iaflash.engines.signing import load_trusted_bundle

log = logging.getLogger(__name__)

PURGE_EVERY_S = 3600.0
AGENT_VERSION = "0.1.0"


class Service:
    """The running agent. ``start()`` then ``run(stop_event)`` (blocks) or ``stop()``."""

    def __init__(self, cfg: Config, *, on_verdict: VerdictCallback | None = None) -> None:
        self.cfg = cfg
        self.on_verdict = on_verdict
        self.started_at = time.time()
        self.pipeline: Pipeline | None = None
        self.publisher: Publisher | None = None
        self.link: MqttLink | None = None
        self.backend: Backend | None = None
        self.registry: Registry | None = None
        self.detector_backend: Backend | None = None
        self.commands: CommandWorker | None = None
        self.spool = Spool(cfg.spool.dir, cfg.spool)
        self.housekeeping_errors = 0
        # The disk guard watches every file system the agent writes to (docs/RELIABILITY.md).
        self.spool.watched = [cfg.spool.dir, cfg.outbox.db.parent, cfg.registry.db.parent]
        self.lock = InstanceLock(cfg.outbox.db.parent)

    def start(self) -> None:
        cfg = self.cfg
        for path in (cfg.outbox.db.parent, cfg.registry.db.parent):
            path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # InstanceLocked names the other agent; nothing was touched yet
        self.spool.ensure_layout()
        hmac_key = load_hmac_key(
            read_secret("hmac-key", cfg.registry.hmac_key_file, what="HMAC key", config_key="registry.hmac_key_file"),
            cfg.registry.hmac_key_id,
        )
        self.registry = Registry(cfg.registry.db, hmac_key)
        self._check_registry(key_id(hmac_key))
        bundle = load_trusted_bundle(cfg.model.bundle, cfg.security.trust_dir, cfg.security.allow_unsigned)
        self.backend = create_backend(cfg.model.backend, threads=cfg.model.threads, build=self._build_options())
        self.backend.load(bundle)
        self.backend.warmup()
        detector = self._load_detector()
        outbox = Outbox(cfg.outbox.db)
        try:
            finished, requeued = self.spool.recover(outbox.is_processed)
            pending = outbox.depth()
        finally:
            outbox.close()
        log.info("recovery: %d captures finished, %d requeued, %d events to (re)send", finished, requeued, pending)
        self.link = MqttLink(cfg)
        self._start_commands(hmac_key)
        self.link.start()
        self.publisher = Publisher(
            cfg.outbox.db, self.link, cfg.mqtt, heartbeat=self.heartbeat, heartbeat_topic=f"{cfg.topic_root}/heartbeat"
        )
        self.publisher.start()
        self.pipeline = Pipeline(
            cfg,
            self.spool,
            self.backend,
            bundle,
            self.registry,
            hmac_key,
            on_verdict=self.on_verdict,
            detector=detector,
        )
        self.pipeline.start()
        sd_notify("READY=1")
        log.info(
            "agent started: site %s device %s, model %s %s on %s",
            cfg.site.site_id,
            cfg.site.device_id,
            bundle.manifest.name,
            bundle.manifest.version,
            self.backend.info.kind,
        )

    def _start_commands(self, hmac_key: bytes) -> None:
        """Signed commands from central (agent/commands.py): subscribed before the link connects."""
        assert self.link is not None
        self.commands = CommandWorker(
            self.cfg,
            self.link,
            heartbeat=self.heartbeat,
            hmac_key=hmac_key,
            version=AGENT_VERSION,
            done_dir=self.spool.done,
        )
        self.commands.start()

    def _build_options(self) -> BuildOptions:
        m = self.cfg.model
        return BuildOptions(
            precision=m.precision, workspace_mb=m.workspace_mb, max_batch=m.max_batch, cache_dir=m.engine_cache_dir
        )

    def _load_detector(self) -> tuple[Backend, Bundle] | None:
        """The vehicle detector, when configured: a signed bundle of task "detector", warmed up."""
        cfg = self.cfg
        if cfg.model.detector_bundle is None:
            return None
        bundle = load_trusted_bundle(cfg.model.detector_bundle, cfg.security.trust_dir, cfg.security.allow_unsigned)
        if bundle.manifest.task != "detector" or bundle.manifest.detector is None:
            raise BundleError(
                f"{cfg.model.detector_bundle}: model.detector_bundle points at a "
                f"{bundle.manifest.task} bundle; fix: give a bundle packed with --task detector"
            )
        self.detector_backend = create_backend(
            cfg.model.backend, threads=cfg.model.threads, build=self._build_options()
        )
        self.detector_backend.load(bundle)
        self.detector_backend.warmup()
        return self.detector_backend, bundle

    def _check_registry(self, expected_key_id: str) -> None:
        assert self.registry is not None
        try:
            state = self.registry.state()
        except RegistryError:
            return  # unavailable (corrupt, unreadable): logged once by the registry, shown in the heartbeat
        if state is None:
            log.warning(
                "registry cache %s is empty: every plate will be unknown_plate; "
                "import a snapshot with 'iaflash-provision registry import FILE'",
                self.cfg.registry.db,
            )
        elif state.key_id != expected_key_id:
            log.error(
                "registry cache was hashed with key %s but this box's key is %s: no plate will match; "
                "import a snapshot made for this key",
                state.key_id,
                expected_key_id,
            )

    def run(self, stop: threading.Event) -> int:
        """Supervise until ``stop`` is set or a worker dies. Returns the process exit code."""
        wd = watchdog_interval_s()
        tick = min(wd, 1.0) if wd else 1.0
        next_purge = next_orphans = time.monotonic()
        orphan_every = max(1.0, min(self.cfg.spool.orphan_after_s / 2, PURGE_EVERY_S))
        assert self.pipeline is not None
        while not stop.wait(tick):
            if self.pipeline.fatal is not None or not self.pipeline.alive():
                log.error("a pipeline thread stopped (%s); exiting so systemd restarts the agent", self.pipeline.fatal)
                self.stop()
                return 1
            if wd and self.pipeline.healthy():
                sd_notify("WATCHDOG=1")
            if time.monotonic() >= next_purge:
                self._housekeeping("purging old evidence", self._purge)
                next_purge = time.monotonic() + PURGE_EVERY_S
            if time.monotonic() >= next_orphans:
                self._housekeeping("sweeping orphan files", self._sweep_orphans)
                next_orphans = time.monotonic() + orphan_every
        sd_notify("STOPPING=1")
        self.stop()
        return 0

    def _housekeeping(self, what: str, step: Callable[[], None]) -> None:
        """Housekeeping never stops the agent: a failure (disk, database) is logged, counted and retried later."""
        try:
            step()
        except (OSError, OutboxError) as exc:
            self.housekeeping_errors += 1
            log.error("housekeeping failed while %s: %s; retried at the next round", what, exc)

    def _purge(self) -> None:
        """Hourly housekeeping: purge old evidence (never that of an unsent flag) and old rejections."""
        outbox = Outbox(self.cfg.outbox.db)
        try:
            removed = self.spool.purge(older_than_days=self.cfg.spool.retention_days, keep=outbox.has_unsent)
        finally:
            outbox.close()
        if removed:
            log.info("purged %d captures older than %s days from done/", removed, self.cfg.spool.retention_days)
        self.spool.purge_rejected(older_than_days=self.cfg.spool.rejected_retention_days)

    def _sweep_orphans(self) -> None:
        """Files with no sidecar for ``spool.orphan_after_s`` go to rejected/ (swept every half of that)."""
        orphans = self.spool.reject_orphans(older_than_s=self.cfg.spool.orphan_after_s)
        if orphans:
            log.warning(
                "moved %d orphan files (no sidecar after %.0f s) to rejected/", orphans, self.cfg.spool.orphan_after_s
            )

    def stop(self) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()
        if self.commands is not None:  # before the link: the command running may still answer
            self.commands.stop()
            self.commands = None
        if self.publisher is not None:
            self.publisher.stop(timeout=5)
        if self.link is not None:
            self.link.stop(timeout=5)
        for backend in (self.backend, self.detector_backend):
            if backend is not None:
                backend.close()
        if self.registry is not None:
            self.registry.close()
        self.lock.release()
        self.pipeline = self.publisher = self.link = self.backend = self.registry = None  # stop is idempotent
        self.detector_backend = None

    def _errors(self) -> dict[str, int]:
        """Every error counter of the running parts, in one flat dict (heartbeat and doctor)."""
        p = self.pipeline
        if p is None:
            return {}
        out: dict[str, int] = {**p.errors, **p.committer.errors, "detector": p.preparer.detector_errors}
        out["housekeeping"] = self.housekeeping_errors
        if self.link is not None:
            out["mqtt_connect_failures"] = self.link.connect_failures
        return out

    def heartbeat(self) -> dict[str, Any]:
        """Counters, queue depth, latency, versions: the heartbeat payload and `doctor`'s view."""
        p = self.pipeline
        lat = sorted(p.latencies_ms) if p else []
        return {
            "site_id": self.cfg.site.site_id,
            "device_id": self.cfg.site.device_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "outcomes": dict(p.outcomes) if p else {},
            "errors": self._errors(),
            "spool": self.spool.counters(),
            "queue_depth": p.queue_depth() if p else 0,
            "latency_ms_p50": round(lat[len(lat) // 2], 1) if lat else None,
            "versions": {
                "agent": AGENT_VERSION,
                "python": platform.python_version(),
                "backend": self.backend.info.to_dict() if self.backend else None,
            },
            # "auto" serves with ONNX Runtime while a TensorRT plan builds: idle/building/swapped/failed
            "engine_build": getattr(self.backend, "build_state", None),
            "disk_paused": p.disk_paused if p else False,
            "disk_problem": p.disk_problem if p else None,
            "commits_paused": p.committer.paused if p else None,
            "registry": self.registry.health() if self.registry else None,
            "mqtt": self.link.health() if self.link else None,
            "commands": self.commands.counters() if self.commands else {},
            "pid": os.getpid(),
        }
