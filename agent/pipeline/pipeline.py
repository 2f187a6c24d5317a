"""The capture pipeline: intake thread(s) → bounded queue → inference thread → commit thread.

intake (claim → JPEG checks → reduced decode → vehicle → crop → quality → preprocess) overlaps
inference (micro-batch → infer → calibrate → registry → decide), which hands each verdict to the
commit thread (agent/committer.py). OpenCV and ONNX Runtime release the GIL, so stages overlap.

The models are one :class:`~iaflash.agent.pipeline.models.ModelSet`, swapped whole by :meth:`Pipeline.swap`
(a reload): a capture keeps the set it was claimed with until its verdict is decided, so no capture
is dropped, judged twice, or preprocessed for one model and classified by another.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import Counter

import numpy as np

from iaflash.agent.capture.intake import Preparer, Work
from iaflash.agent.capture.sidecar import Capture
from iaflash.agent.capture.spool import Spool
from iaflash.agent.config import Config
from iaflash.agent.decision.operating import Policy
from iaflash.agent.decision.taxonomy import Taxonomy
from iaflash.agent.decision.verdict import Verdict, decide
from iaflash.agent.errors import CaptureRejected, EngineError, PlateError, RegistryUnavailable
from iaflash.agent.health import Liveness
from iaflash.agent.pipeline.committer import Committer, Decided, VerdictCallback
from iaflash.agent.pipeline.models import ModelSet
from iaflash.agent.registry.cache import Registry
from iaflash.agent.registry.plates import confusable_neighbours, normalise_plate, plate_key
from iaflash.agent.registry.record import RegistryRecord
from iaflash.engines.base import Backend
from iaflash.engines.bundle import Bundle
from iaflash.engines.scores import OOD_REASON, score_views

log = logging.getLogger(__name__)

QUEUE_DEPTH = 8

Item = tuple[ModelSet, Work]  # a prepared capture and the models it was prepared for


class Pipeline:
    """Owns the worker threads. The service owns everything they use."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        backend: Backend,
        bundle: Bundle,
        registry: Registry,
        hmac_key: bytes,
        on_verdict: VerdictCallback | None = None,
        detector: tuple[Backend, Bundle] | None = None,
        models: ModelSet | None = None,
    ) -> None:
        """``models``: the loaded set (the service's, which it owns); else one is made of backend/bundle/detector."""
        self.cfg, self.spool = cfg, spool
        self.registry, self.hmac_key = registry, hmac_key
        self._models = models or ModelSet.from_parts(cfg, backend, bundle, detector)
        self._models_lock = threading.Lock()
        self._retired_detector_errors = 0
        self.liveness = Liveness(stuck_after_s=60.0)  # inference thread
        self.committer = Committer(cfg, spool, on_verdict)
        self.errors: Counter[str] = Counter()
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._stop = threading.Event()
        self.disk_paused = False
        self.disk_problem: str | None = None
        n_intake = cfg.spool.intake_threads
        self._intake_running = n_intake
        self._intake_lock = threading.Lock()
        self._intake_done = threading.Event()
        self._fatal: BaseException | None = None
        self._inference_done = threading.Event()  # the inference thread has ended: nothing queued is taken
        self.intake_liveness = [Liveness(stuck_after_s=60.0) for _ in range(n_intake)]  # decode + detector
        self._threads = [
            threading.Thread(target=self._intake_loop, args=(i,), name=f"intake-{i}", daemon=True)
            for i in range(n_intake)
        ]
        self._threads.append(threading.Thread(target=self._infer_loop, name="inference", daemon=True))
        self._threads.append(self.committer.thread)

    # -- the models ------------------------------------------------------------------------
    @property
    def models(self) -> ModelSet:
        """The set new captures are taken with."""
        with self._models_lock:
            return self._models

    def swap(self, new: ModelSet) -> ModelSet:
        """Take captures with ``new`` from now on; returns the old set, retired (captures holding it finish on it)."""
        with self._models_lock:
            old, self._models = self._models, new
            old.retire()
            self._retired_detector_errors += old.preparer.detector_errors
        return old

    def _take_models(self) -> ModelSet:
        with self._models_lock:  # under the lock: a set is never taken after swap() retired it
            models = self._models
            models.acquire()
            return models

    @property
    def backend(self) -> Backend:
        return self.models.backend

    @property
    def bundle(self) -> Bundle:
        return self.models.bundle

    @property
    def preparer(self) -> Preparer:
        return self.models.preparer

    @property
    def taxonomy(self) -> Taxonomy:
        return self.models.taxonomy

    @property
    def policy(self) -> Policy:
        return self.models.policy

    @property
    def detector_errors(self) -> int:
        """Detector failures since start, across reloads."""
        with self._models_lock:
            return self._retired_detector_errors + self._models.preparer.detector_errors

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; classify and commit what was already claimed; join every thread."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    @property
    def fatal(self) -> BaseException | None:
        """The error that stopped a worker thread, if any (the service exits on it)."""
        return self._fatal or self.committer.fatal

    @property
    def outcomes(self) -> Counter[str]:
        return self.committer.outcomes

    @property
    def latencies_ms(self) -> list[float]:
        return self.committer.latencies_ms

    @property
    def stage_samples(self) -> dict[str, list[float]]:
        """Recent per-stage ms, for the heartbeat and the benchmarks."""
        return self.committer.stage_samples

    def healthy(self) -> bool:
        """Neither worker is stuck on one capture (the watchdog is fed only while this holds)."""
        return (
            self.liveness.healthy()
            and self.committer.liveness.healthy()
            and all(lv.healthy() for lv in self.intake_liveness)
        )

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- intake ----------------------------------------------------------------------------
    def _intake_loop(self, index: int) -> None:
        """One intake worker. Several may run: a claim is an atomic rename, so each capture is taken once."""
        try:
            while not self._stop.is_set():
                if not self._disk_ok():
                    self._stop.wait(5.0)
                    continue
                ids = self.spool.ready(limit=32)
                if not ids:
                    self._stop.wait(self.cfg.spool.poll_interval_s)
                    continue
                for capture_id in ids:
                    if self._stop.is_set() or not self._disk_ok():
                        break
                    try:
                        item = self._intake_one(capture_id, self.intake_liveness[index])
                    except Exception as exc:  # noqa: BLE001  # one capture never stops the site (RELIABILITY.md)
                        self._intake_failed(capture_id, exc)
                        continue
                    if item is not None:
                        self._put(item)
        except BaseException as exc:  # a bug or a disk failure: stop the service, loudly
            log.exception("intake thread failed")
            self._fatal = exc
            self._stop.set()
        finally:
            with self._intake_lock:
                self._intake_running -= 1
                if self._intake_running == 0:
                    self._intake_done.set()

    def _disk_ok(self) -> bool:
        """The disk guard: pause intake (never delete anything) while a watched file system is
        read-only or low on space (Spool.disk_problem); one ERROR on pause, one line on resume."""
        problem = self.spool.disk_problem(self.cfg.spool.min_free_mb)
        if problem is None and self.committer.paused is not None:
            problem = f"verdicts cannot be committed ({self.committer.paused})"
        if problem is not None and not self.disk_paused:
            self.errors["disk_low_pauses"] += 1
            log.error("intake paused: %s; captures wait in incoming/ and intake resumes by itself", problem)
        elif problem is None and self.disk_paused:
            log.warning("intake resumed: every watched file system is writable with enough free space")
        self.disk_problem = problem
        self.disk_paused = problem is not None
        return problem is None

    def _intake_failed(self, capture_id: str, exc: Exception) -> None:
        """An unexpected error on one capture: a disk failure pauses intake; anything else rejects it."""
        if isinstance(exc, OSError) and not self._disk_ok():
            self.errors["intake_io"] += 1  # the capture stays where it is; recovery requeues it
            return
        self.errors["internal_error"] += 1
        self.spool.reject_internal(capture_id, "taking it in (claim, sidecar, decode, detector)", exc)

    def _put(self, item: Item) -> None:
        """Queue a prepared capture, waiting for room even while stopping (a claimed capture is never dropped).

        Once a worker thread has died, a capture that finds no room, or that is queued after inference
        has ended, lets go of its models (they would be held for ever) and stays in processing/,
        where the next start requeues it (Spool.recover).
        """
        while True:
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                if self.fatal is not None:
                    item[0].release()
                    return
                continue
            if self._inference_done.is_set():  # inference ended (and drained) before it could take this one
                self._release_queued()
            return

    def _release_queued(self) -> None:
        """Let go of the models of every capture still queued (inference has ended; they wait in processing/)."""
        while True:
            try:
                models, _ = self._queue.get_nowait()
            except queue.Empty:
                return
            models.release()

    def _intake_one(self, capture_id: str, liveness: Liveness) -> Item | None:
        started = time.perf_counter()
        try:
            claimed = self.spool.claim(capture_id)
        except CaptureRejected:
            return None  # the spool moved it to rejected/, counted and logged it
        if claimed is None:
            return None
        models = self._take_models()  # held until inference has decided this capture
        liveness.begin()
        try:
            return models, models.preparer.prepare(claimed, started)
        except CaptureRejected as exc:
            models.release()
            self.spool.reject(capture_id, exc)
            return None
        except BaseException:
            models.release()
            raise
        finally:
            liveness.end()

    # -- inference -------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    if self._intake_done.is_set() and self._queue.empty():
                        return
                    continue
                self.liveness.begin()
                try:
                    self._classify_and_decide(batch)
                finally:
                    self.liveness.end()
        except BaseException as exc:
            log.exception("inference thread failed")
            self._fatal = exc
            self._stop.set()
        finally:
            self._inference_done.set()  # before the drain: an intake worker queueing after it drains too
            self._release_queued()
            self.committer.inputs_done()

    def _classify_and_decide(self, batch: list[Item]) -> None:
        """Each capture gets a verdict or a rejection, on the models it was taken with (a batch that
        straddles a reload is split); then it lets go of them, even when a group's error stops inference."""
        groups: list[tuple[ModelSet, list[Work]]] = []
        for models, work in batch:
            if groups and groups[-1][0] is models:
                groups[-1][1].append(work)
            else:
                groups.append((models, [work]))
        try:
            while groups:
                (models, works), groups = groups[0], groups[1:]
                try:
                    self._decide_group(models, works)
                finally:
                    models.release(len(works))
        finally:  # the groups an error left undecided: their captures wait in processing/ for the next start
            for models, works in groups:
                models.release(len(works))

    def _decide_group(self, models: ModelSet, batch: list[Work]) -> None:
        """Each capture of the batch gets a verdict or a rejection; an error on one never stops the others."""
        try:
            probs = self._classify(models, batch)
        except Exception as exc:  # noqa: BLE001  # a bug on this batch: reject it, keep the site up
            for work in batch:
                self.errors["internal_error"] += 1
                self.spool.reject_internal(work.claimed.capture.capture_id, "classifying it", exc)
            return
        for work, (p, problem) in zip(batch, probs, strict=True):
            try:
                self._process(models, work, p, problem)
            except RegistryUnavailable as exc:
                self.errors["registry_unavailable"] += 1
                verdict = Verdict(
                    "inconclusive", f"registry_unavailable: {exc}", registry_stale=True, model=models.verdict_model()
                )
                self.committer.put(Decided(work, verdict, None))
            except Exception as exc:  # noqa: BLE001  # as above, for one capture
                self.errors["internal_error"] += 1
                self.spool.reject_internal(work.claimed.capture.capture_id, "deciding its verdict", exc)

    def _next_batch(self) -> list[Item] | None:
        """Micro-batching: one item (waiting ≤ 0.1 s), then whatever else is queued, up to
        ``max_batch``, waiting at most ``max_wait_ms`` for more."""
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return None
        deadline = time.perf_counter() + self.cfg.model.max_wait_ms / 1e3
        while len(batch) < self.cfg.model.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _classify(self, models: ModelSet, batch: list[Work]) -> list[tuple[np.ndarray | None, str | None]]:
        """Calibrated probabilities for each item with a tensor, its views fused (engines/scores.py).

        The rows of every item (crop, flip, second image) go through the backend in calls of at most
        ``model.max_batch`` rows (the engine's profile). An item whose mean energy is above the
        bundle's ``ood.threshold`` gets the problem ``out_of_distribution`` (the verdict abstains).
        """
        results: list[tuple[np.ndarray | None, str | None]] = [(None, w.image_problem) for w in batch]
        ready = [(i, w.tensor) for i, w in enumerate(batch) if w.tensor is not None]
        if not ready:
            return results
        t = time.perf_counter()
        try:
            out = self._infer_rows(models.backend, np.concatenate([tensor for _, tensor in ready]))
        except EngineError as exc:
            self.errors["inference"] += 1
            log.error("inference failed for %d capture(s): %s", len(ready), exc)
            failed = f"inference failed: {exc}"
            return [(None, failed) if w.tensor is not None else r for w, r in zip(batch, results, strict=True)]
        finally:
            ms = (time.perf_counter() - t) * 1e3
            for i, _ in ready:
                batch[i].timings["infer"] = ms
                batch[i].evidence["batch_size"] = len(ready)
        row = 0
        for i, tensor in ready:
            work, rows = batch[i], len(tensor)
            results[i] = self._fuse(models, work, out[row : row + rows], work.views or ("original",) * rows)
            row += rows
        return results

    def _infer_rows(self, backend: Backend, rows: np.ndarray) -> np.ndarray:
        """Backend outputs for ``rows``, in calls the engine takes (≤ max_batch rows, or its fixed batch, padded)."""
        spec = backend.input_spec
        fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
        size = self.cfg.model.max_batch if fixed is None else fixed
        outputs = []
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            n = len(chunk)
            if fixed is not None and n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            outputs.append(np.asarray(backend.infer(chunk))[:n])
        return np.concatenate(outputs)

    def _fuse(
        self, models: ModelSet, work: Work, outputs: np.ndarray, views: tuple[str, ...]
    ) -> tuple[np.ndarray, str | None]:
        """One capture's views fused into calibrated probabilities, and the OOD gate's problem if any."""
        manifest = models.bundle.manifest
        ood = manifest.ood
        fused, problem = score_views(outputs, views, manifest)
        work.evidence["views"] = {**fused.evidence(), "ood_threshold": None if ood is None else ood.threshold}
        if problem is not None:
            self.errors[OOD_REASON] += 1
        return fused.probs, problem

    def _plate(self, capture: Capture) -> tuple[str | None, bytes | None, RegistryRecord | None, tuple[bytes, ...]]:
        """(plate problem, HMAC key, registry record, keys of the confusable neighbours).

        The plate itself never leaves this function: the neighbours (one confusable character away,
        registry.plates.confusable_neighbours) leave as HMAC keys, looked up only for a would-be flag.
        """
        if not capture.plate:
            return "radar could not read the plate", None, None, ()
        conf = capture.plate_confidence
        if conf is not None and conf < self.cfg.decision.min_plate_confidence:
            return f"radar plate confidence {conf:.2f} < {self.cfg.decision.min_plate_confidence}", None, None, ()
        try:
            plate = normalise_plate(capture.plate)
        except PlateError as exc:
            return str(exc), None, None, ()
        key = plate_key(self.hmac_key, plate)
        neighbours = tuple(plate_key(self.hmac_key, p) for p in confusable_neighbours(plate))
        return None, key, self.registry.lookup_key(key), neighbours

    def _process(self, models: ModelSet, work: Work, probs: np.ndarray | None, image_problem: str | None) -> None:
        capture = work.claimed.capture
        t = time.perf_counter()
        plate_problem, key, record, neighbours = self._plate(capture)
        stale = self.registry.is_stale(self.cfg.registry.max_age_hours)
        decide_this = functools.partial(
            decide,
            probs=probs,
            taxonomy=models.taxonomy,
            record=record,
            plate_problem=plate_problem,
            cfg=models.policy.cfg,
            registry_stale=stale,
            model_info=models.verdict_model(),
            image_problem=image_problem,
            label_categories=models.label_categories,
            operating_point=models.policy.operating_point,
            no_flag_reason=models.policy.no_flag_reason,
        )
        verdict = decide_this()
        if verdict.is_flag:  # the misread check: only a would-be flag pays for the neighbours' lookups
            verdict = decide_this(misread=[r for r in map(self.registry.lookup_key, neighbours) if r is not None])
        work.timings["decide"] = (time.perf_counter() - t) * 1e3
        self.committer.put(Decided(work, verdict, key))
