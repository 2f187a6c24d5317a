"""Service wiring: build every part from the config, run, supervise, stop cleanly.

Start order: secrets → registry → bundle + backend (warm-up) → outbox recovery →
MQTT link + publisher → pipeline → READY=1. Stop order is the reverse, so that the
capture in flight is committed before the link goes down.

:meth:`Service.reload` (SIGHUP, or the signed ``reload`` command) loads the bundles the config's
paths name now, warms them beside the running ones and swaps them between two captures; a bundle
that fails to load leaves the old models running, and says so (docs/BUNDLES.md#reload).

A reload and :meth:`Service.stop` never overlap (``_reload_lock``): stop waits for a reload in
flight (one still loading drops its new models as soon as they are loaded), and a reload asked for
once stop has begun does nothing and says so in the log. A reload never calls stop, and stop is
only called by the thread that runs :meth:`Service.run` (or the CLI after a failed start), never
from a signal handler, so the wait cannot deadlock.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from iaflash.agent.capture.spool import Spool
from iaflash.agent.commands.handlers import CommandWorker
from iaflash.agent.config import Config, read_secret
from iaflash.agent.errors import CommandError, IaflashError, OutboxError, RegistryError, SignatureError
from iaflash.agent.health import (
    InstanceLock,
    LastErrors,
    disk_usage,
    model_report_path,
    registry_summary,
    sd_notify,
    watchdog_interval_s,
    write_model_report,
)
from iaflash.agent.link.mqtt import MqttLink
from iaflash.agent.link.publisher import Publisher
from iaflash.agent.metrics import Exporter, start_exporters, stop_exporters
from iaflash.agent.outbox.salvage import salvage_notes
from iaflash.agent.outbox.startup import open_at_start
from iaflash.agent.outbox.store import Outbox
from iaflash.agent.pipeline.committer import VerdictCallback
from iaflash.agent.pipeline.models import ModelSet, load_model_set, record_model_set
from iaflash.agent.pipeline.pipeline import Pipeline
from iaflash.agent.registry.cache import Registry
from iaflash.agent.registry.plates import key_id, load_hmac_key
from iaflash.engines.base import Backend
from iaflash.engines.signing import TrustState

log = logging.getLogger(__name__)

PURGE_EVERY_S = 3600.0
AGENT_VERSION = "0.1.0"
RETIRE_WAIT_S = 30.0  # how long a reload waits for the captures still on the old models before closing them
STOP_WAIT_LOG_S = 10.0  # while stop() waits for a reload in flight, it says so this often


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
        self.models: ModelSet | None = None
        self._retired: list[ModelSet] = []  # swapped out, still held by a capture when the reload returned
        self._reload_lock = threading.Lock()  # held by a reload from start to end; stop() waits for it
        self._reloading: str | None = None  # the trigger of the reload in flight
        # A seam for tests: called at each step of a reload ("loaded", "swapped") with the new models.
        self.reload_hook: Callable[[str, ModelSet], None] | None = None
        self._reload_wanted: str | None = None  # set by request_reload (a signal handler), run by run()
        self._reload_thread: threading.Thread | None = None
        self._stopping = False
        self.reloads: dict[str, int] = {"ok": 0, "failed": 0}
        self.last_reload: dict[str, Any] | None = None
        self.last_errors = LastErrors()
        self.exporters: list[Exporter] = []
        self.spool = Spool(cfg.spool.dir, cfg.spool)
        self.housekeeping_errors = 0
        self.processed_pruned = 0
        # The disk guard watches every file system the agent writes to (docs/RELIABILITY.md).
        self.spool.watched = [cfg.spool.dir, cfg.outbox.db.parent, cfg.registry.db.parent]
        self.lock = InstanceLock(cfg.outbox.db.parent)

    def start(self, stop: threading.Event | None = None) -> None:
        """Build and start every part; ``stop`` (SIGTERM) ends a wait for disk space (outbox/startup.py)."""
        cfg = self.cfg
        for path in (cfg.outbox.db.parent, cfg.registry.db.parent):
            path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # InstanceLocked names the other agent; nothing was touched yet
        logging.getLogger("iaflash").addHandler(self.last_errors)
        self.spool.ensure_layout()
        hmac_key = load_hmac_key(
            read_secret("hmac-key", cfg.registry.hmac_key_file, what="HMAC key", config_key="registry.hmac_key_file"),
            cfg.registry.hmac_key_id,
        )
        self.registry = Registry(cfg.registry.db, hmac_key)
        self._check_registry(key_id(hmac_key))
        self.models = models = load_model_set(cfg)
        self.backend, bundle = models.backend, models.bundle
        self.detector_backend = models.detector[0] if models.detector else None
        outbox = open_at_start(cfg.outbox.db, stop=stop)  # salvages a corrupt file, waits out a full disk
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
            detector=models.detector,
            models=models,
        )
        self.pipeline.start()
        self._write_model_report()
        m = cfg.metrics
        self.exporters = start_exporters(m.port, m.textfile, m.interval_s, self.metrics_document)
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
        self.commands.register("reload", self._reload_command, slow=True)
        self.commands.start()

    # ----- reload ---------------------------------------------------------------------------
    def request_reload(self, trigger: str = "SIGHUP") -> None:
        """Ask for a reload (safe in a signal handler: it only records the wish; run() starts it)."""
        self._reload_wanted = trigger

    def _start_requested_reload(self) -> None:
        trigger, self._reload_wanted = self._reload_wanted, None
        if trigger is None:
            return
        if self._reload_thread is not None and self._reload_thread.is_alive():
            self._reload_wanted = trigger  # one at a time: taken again once this one ends
            return
        self._reload_thread = threading.Thread(target=self.reload, args=(trigger,), name="iaflash-reload", daemon=True)
        self._reload_thread.start()

    def _reload_command(self, args: dict[str, Any]) -> dict[str, Any]:
        outcome = self.reload("command")
        if not outcome["ok"]:
            raise CommandError("failed", outcome["error"])
        return outcome

    def reload(self, trigger: str) -> dict[str, Any]:
        """Load the bundles the config's paths name now, warm them beside the running ones, swap.

        Captures claimed before the swap finish on the old models (their verdicts name the old
        version); those claimed after it use the new ones. A bundle that fails to load changes
        nothing: the old models keep running and the failure is logged, counted and reported.
        """
        with self._reload_lock:
            try:
                self._reloading = trigger
                return self._reload(trigger)
            finally:
                self._reloading = None

    def _reload(self, trigger: str) -> dict[str, Any]:
        """reload() under ``_reload_lock``: stop() has not begun tearing down, and does not until this returns."""
        started = time.perf_counter()
        if self._stopping:  # stop() began: nothing to reload into (and nothing is recorded or counted)
            return self._not_reloaded(trigger, "the agent is stopping; nothing was loaded", started)
        pipeline = self.pipeline
        if pipeline is None:
            return self._reloaded(trigger, None, None, error="the agent is not running", started=started)
        old = pipeline.models
        log.info("model reload (%s): loading %s", trigger, self.cfg.model.bundle)
        try:
            new = load_model_set(self.cfg, generation=old.generation + 1, record=False)
        except (IaflashError, OSError) as exc:
            return self._reloaded(trigger, old, None, error=str(exc), started=started)
        self._step("loaded", new)
        if self._stopping:  # stop() began while the models loaded: it waits for us; drop them, swap nothing
            new.close()
            return self._not_reloaded(
                trigger, "the agent began to stop while the new models loaded; they were dropped", started, old
            )
        retired = pipeline.swap(new)
        self._step("swapped", new)
        try:  # only now is the new version the one this box runs (a stop before the swap records nothing)
            record_model_set(self.cfg, new)
        except (IaflashError, OSError) as exc:  # running all the same; the next start records it again
            log.error("model reload (%s): the trust state was not updated (%s); fix: check the disk", trigger, exc)
        self.models, self.backend = new, new.backend
        self.detector_backend = new.detector[0] if new.detector else None
        outcome = self._reloaded(trigger, old, new, error=None, started=started)
        if self.commands is not None:
            self.commands.models_reloaded()
        in_flight = retired.users
        if self._stopping:  # stop() waits for us: it stops the pipeline, then closes the old models too
            self._retired.append(retired)
        elif retired.wait_idle(RETIRE_WAIT_S):
            retired.close()
        else:
            log.warning(
                "%d captures still hold the old models after %.0f s; closed at stop", retired.users, RETIRE_WAIT_S
            )
            self._retired.append(retired)
        outcome["in_flight_on_old"] = in_flight
        return outcome

    def _step(self, step: str, new: ModelSet) -> None:
        if self.reload_hook is not None:
            self.reload_hook(step, new)

    def _not_reloaded(self, trigger: str, why: str, started: float, old: ModelSet | None = None) -> dict[str, Any]:
        """A reload that stop() made moot: logged (WARNING), answered, but neither counted nor recorded."""
        log.warning("model reload (%s) not done: %s", trigger, why)
        return {
            "ok": False,
            "trigger": trigger,
            "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "seconds": round(time.perf_counter() - started, 3),
            "error": f"model reload not done: {why}",
            "previous": _brief(old),
            "running": _brief(old),
        }

    def _reloaded(
        self, trigger: str, old: ModelSet | None, new: ModelSet | None, *, error: str | None, started: float
    ) -> dict[str, Any]:
        """Count, log and report one reload's outcome; returns the document the command answers."""
        running = new or old
        outcome: dict[str, Any] = {
            "ok": error is None,
            "trigger": trigger,
            "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "seconds": round(time.perf_counter() - started, 3),
            "error": error,
            "previous": _brief(old),
            "running": _brief(running),
        }
        self.reloads["ok" if error is None else "failed"] += 1
        self.last_reload = outcome
        if error is not None:
            what = f"{old.bundle.manifest.name} {old.bundle.manifest.version}" if old else "nothing"
            outcome["error"] = f"model reload failed, still running {what}: {error}"
            log.error("model reload (%s) failed; the old models keep running (%s): %s", trigger, what, error)
        else:
            assert old is not None and new is not None
            log.info(
                "model reload (%s): switched from %s to %s on %s (%s) in %.1f s",
                trigger,
                _brief_text(old),
                _brief_text(new),
                new.backend.info.kind,
                new.backend.info.device,
                outcome["seconds"],
                extra={"model_version": new.bundle.manifest.version, "generation": new.generation},
            )
        self._write_model_report()
        return outcome

    def _write_model_report(self) -> None:
        """``<state dir>/models.json``: what runs now and the last reload, for `iaflash-provision model`."""
        models = self.models
        doc = {
            "pid": os.getpid(),
            "started_at": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds"),
            "generation": models.generation if models else None,
            "classifier": _brief(models),
            "detector": _brief_detector(models),
            "reloads": dict(self.reloads),
            "last_reload": self.last_reload,
        }
        try:
            write_model_report(model_report_path(self.cfg.outbox.db.parent), doc)
        except OSError as exc:
            log.error("cannot write the model report in %s: %s", self.cfg.outbox.db.parent, exc)

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
            self._start_requested_reload()
            if self.pipeline.fatal is not None or not self.pipeline.alive():
                log.error("a pipeline thread stopped (%s); exiting so systemd restarts the agent", self.pipeline.fatal)
                self.stop()
                return 1
            if self.publisher is not None and self.publisher.error is not None:
                log.error("the publisher stopped (%s); exiting so systemd restarts the agent", self.publisher.error)
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
            keep_days = max(self.cfg.outbox.processed_retention_days, self.cfg.spool.retention_days)
            pruned = outbox.prune_processed(older_than_days=keep_days)
        finally:
            outbox.close()
        self.processed_pruned += pruned
        if pruned:
            log.info(
                "forgot %d processed captures older than %g days (outbox.processed_retention_days)", pruned, keep_days
            )
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
        """Stop every part, in the reverse order of start (idempotent).

        A reload in flight (SIGHUP thread or ``reload`` command) is waited for first, so nothing is
        torn down under it and it cannot swap models in afterwards; one still loading drops its new
        models as soon as they are loaded. A reload asked for from now on does nothing (see reload).
        """
        self._stopping = True  # before the wait: a reload loading now gives up at its next step
        self._wait_for_reload()
        stop_exporters(self.exporters)
        self.exporters = []
        if self.pipeline is not None:
            self.pipeline.stop()
        if self.commands is not None:  # before the link: the command running may still answer
            self.commands.stop()
            self.commands = None
        if self.publisher is not None:
            self.publisher.stop(timeout=5)
        if self.link is not None:
            self.link.stop(timeout=5)
        for models in (*self._retired, self.models):
            if models is not None:
                models.close()
        self._retired = []
        if self.registry is not None:
            self.registry.close()
        logging.getLogger("iaflash").removeHandler(self.last_errors)
        self.lock.release()
        self.pipeline = self.publisher = self.link = self.backend = self.registry = None  # stop is idempotent
        self.detector_backend = self.models = None

    def _wait_for_reload(self) -> None:
        """Until no reload holds ``_reload_lock``; any reload that takes it afterwards sees ``_stopping``."""
        if not self._reload_lock.acquire(blocking=False):
            log.info("stop: waiting for the model reload in progress (%s) to finish", self._reloading)
            waited = 0.0
            while not self._reload_lock.acquire(timeout=STOP_WAIT_LOG_S):
                waited += STOP_WAIT_LOG_S
                log.warning("stop: still waiting for the model reload (%s) after %.0f s", self._reloading, waited)
        self._reload_lock.release()

    def _errors(self) -> dict[str, int]:
        """Every error counter of the running parts, in one flat dict (heartbeat and doctor)."""
        p = self.pipeline
        if p is None:
            return {}
        out: dict[str, int] = {**p.errors, **p.committer.errors, "detector": p.detector_errors}
        out["housekeeping"] = self.housekeeping_errors
        if self.link is not None:
            out["mqtt_connect_failures"] = self.link.connect_failures
        return out

    def heartbeat(self) -> dict[str, Any]:
        """Counters, queue depth, latency, versions: the heartbeat payload and `doctor`'s view."""
        p = self.pipeline
        lat = sorted(p.latencies_ms) if p else []
        spool = self.spool.counters()
        models = p.models if p else None
        return {
            "site_id": self.cfg.site.site_id,
            "device_id": self.cfg.site.device_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "outcomes": dict(p.outcomes) if p else {},
            "errors": self._errors(),
            "spool": spool,
            "rejected": {k.removeprefix("rejected."): v for k, v in spool.items() if k.startswith("rejected.")},
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
            "outbox": {"processed_pruned": self.processed_pruned, "salvaged": salvage_notes(self.cfg.outbox.db)},
            "registry": registry_summary(self.registry, self.cfg.registry.max_age_hours) if self.registry else None,
            "model": models.describe() if models else None,
            "reloads": {**self.reloads, "last": self.last_reload},
            "disk": disk_usage(self.spool.watched),
            "last_errors": self.last_errors.snapshot(),
            "mqtt": self.link.health() if self.link else None,
            "commands": self.commands.counters() if self.commands else {},
            "trust": _trust_summary(self.cfg),
            "pid": os.getpid(),
        }

    def metrics_document(self) -> dict[str, Any]:
        """What the metrics exporters render: the heartbeat plus the publisher's figures (as on MQTT)."""
        doc = self.heartbeat()
        if self.publisher is not None:
            doc.update(self.publisher.stats())
        return doc


def _brief(models: ModelSet | None) -> dict[str, Any] | None:
    if models is None:
        return None
    m = models.bundle.manifest
    return {"name": m.name, "version": m.version, "path": str(models.bundle.path), "sha256": models.bundle.model_sha256}


def _brief_detector(models: ModelSet | None) -> dict[str, Any] | None:
    if models is None or models.detector is None:
        return None
    bundle = models.detector[1]
    m = bundle.manifest
    return {"name": m.name, "version": m.version, "path": str(bundle.path), "sha256": bundle.model_sha256}


def _trust_summary(cfg: Config) -> dict[str, Any]:
    """The trust state for the heartbeat: revocation list seq, bundle and registry marks, refusals by kind."""
    try:
        return TrustState(cfg.trust_state_file).summary()
    except (SignatureError, OSError) as exc:  # the heartbeat carries the problem instead
        return {"problem": str(exc)}


def _brief_text(models: ModelSet) -> str:
    m = models.bundle.manifest
    text = f"{m.name} {m.version}"
    if models.detector is not None:
        d = models.detector[1].manifest
        text += f" (detector {d.name} {d.version})"
    return text
