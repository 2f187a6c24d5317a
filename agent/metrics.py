"""The heartbeat's figures as metrics: OpenMetrics text on 127.0.0.1, or a node_exporter textfile.

:func:`render` turns one heartbeat document (the one the agent publishes on ``<root>/heartbeat``)
into metric families; ``openmetrics=True`` writes the OpenMetrics 1.0 text format (``info`` types,
``# EOF``), ``False`` the Prometheus 0.0.4 text format that node_exporter's textfile collector reads.
:class:`MetricsServer` serves them on ``http://127.0.0.1:<metrics.port>/metrics`` (stdlib
``http.server`` on one thread; it never binds another address) and :class:`TextfileWriter` rewrites
``metrics.textfile`` atomically every ``metrics.interval_s``. Both are off by default. The names are
listed in docs/METRICS.md.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from iaflash.engines.atomic import write_atomic

__all__ = [
    "OPENMETRICS_TYPE",
    "PROMETHEUS_TYPE",
    "Exporter",
    "MetricsServer",
    "TextfileWriter",
    "render",
    "start_exporters",
    "stop_exporters",
]

log = logging.getLogger(__name__)

OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HOST = "127.0.0.1"  # never another address: a remote scraper goes through a local exporter or a tunnel

Source = Callable[[], dict[str, Any]]
Labels = dict[str, str]


class Exporter(Protocol):
    """A started exporter (server or textfile writer)."""

    def stop(self) -> None: ...


@dataclass
class Family:
    """One metric family: its name (without ``_total``), type, help and samples."""

    name: str
    kind: str  # counter, gauge or info
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: Any, **labels: Any) -> None:
        number = _number(value)
        if number is not None:
            self.samples.append(({k: str(v) for k, v in labels.items()}, number))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _value(number: float) -> str:
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


def _timestamp(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _dict(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _families(hb: dict[str, Any]) -> list[Family]:
    """Every family of one heartbeat document, in a stable order (missing parts give no sample)."""
    fams: dict[str, Family] = {}

    def fam(name: str, kind: str, text: str) -> Family:
        return fams.setdefault(name, Family(name, kind, text))

    versions = _dict(hb, "versions")
    fam("iaflash_agent", "info", "The agent: site, device, versions.").add(
        1,
        site_id=hb.get("site_id", ""),
        device_id=hb.get("device_id", ""),
        agent_version=versions.get("agent", ""),
        python=versions.get("python", ""),
    )
    fam("iaflash_uptime_seconds", "gauge", "Seconds since the agent started.").add(hb.get("uptime_s"))
    verdicts = fam("iaflash_verdicts", "counter", "Verdicts since start, by outcome.")
    for outcome, n in sorted(_dict(hb, "outcomes").items()):
        verdicts.add(n, outcome=outcome)
    errors = fam("iaflash_errors", "counter", "Error counters of the running parts, by kind.")
    for kind, n in sorted(_dict(hb, "errors").items()):
        errors.add(n, kind=kind)
    _spool(hb, fam)
    fam("iaflash_queue_depth", "gauge", "Captures prepared and waiting for the classifier.").add(hb.get("queue_depth"))
    fam("iaflash_outbox_depth", "gauge", "Events in the outbox not yet acknowledged by the broker.").add(
        hb.get("depth")
    )
    fam("iaflash_outbox_oldest_age_seconds", "gauge", "Age of the oldest unacknowledged event.").add(
        hb.get("oldest_age_s")
    )
    for key in ("published", "acked", "refused", "republished", "publish_errors", "heartbeats"):
        fam(f"iaflash_mqtt_{key}", "counter", f"Publisher: {key.replace('_', ' ')} since start.").add(hb.get(key))
    latency = _number(hb.get("latency_ms_p50"))
    if latency is not None:
        fam("iaflash_latency_p50_seconds", "gauge", "Median capture latency, claim to verdict.").add(latency / 1e3)
    fam("iaflash_disk_paused", "gauge", "1 while the disk guard pauses intake.").add(bool(hb.get("disk_paused")))
    fam("iaflash_commits_paused", "gauge", "1 while verdict commits are paused.").add(
        hb.get("commits_paused") is not None
    )
    _disk(hb, fam)
    _registry(hb, fam)
    _model(hb, fam)
    mqtt = _dict(hb, "mqtt")
    fam("iaflash_mqtt_connected", "gauge", "1 while connected to the broker.").add(mqtt.get("connected"))
    fam("iaflash_mqtt_connect_failures", "counter", "Failed broker connections since start.").add(
        mqtt.get("connect_failures")
    )
    commands = fam("iaflash_commands", "counter", "Commands from central, by result.")
    for key, n in sorted(_dict(hb, "commands").items()):
        commands.add(n, result=key)
    _last_errors(hb, fam)
    return list(fams.values())


FamilyMaker = Callable[[str, str, str], Family]


def _spool(hb: dict[str, Any], fam: FamilyMaker) -> None:
    spool = fam("iaflash_spool_captures", "counter", "Spool events since start: claimed, finished, requeued, purged.")
    rejected = fam("iaflash_rejected", "counter", "Captures moved to rejected/ since start, by reason.")
    for key, n in sorted(_dict(hb, "spool").items()):
        if key.startswith("rejected."):
            rejected.add(n, reason=key.removeprefix("rejected."))
        elif key != "rejected_total":
            spool.add(n, event=key)


def _disk(hb: dict[str, Any], fam: FamilyMaker) -> None:
    free = fam("iaflash_disk_free_bytes", "gauge", "Free bytes (for the service user) per watched file system.")
    total = fam("iaflash_disk_size_bytes", "gauge", "Size of each watched file system.")
    read_only = fam("iaflash_disk_read_only", "gauge", "1 when a watched file system is mounted read-only.")
    for fs in hb.get("disk") or []:
        if isinstance(fs, dict) and "free_bytes" in fs:
            free.add(fs["free_bytes"], path=fs["path"])
            total.add(fs["total_bytes"], path=fs["path"])
            read_only.add(fs.get("read_only"), path=fs["path"])


def _registry(hb: dict[str, Any], fam: FamilyMaker) -> None:
    reg = _dict(hb, "registry")
    if not reg:
        return
    fam("iaflash_registry", "info", "The registry cache: state, dataset and kind of the last file.").add(
        1, state=reg.get("state", ""), dataset_id=reg.get("dataset_id") or "", kind=reg.get("kind") or ""
    )
    fam("iaflash_registry_seq", "gauge", "Sequence number of the last imported registry file.").add(reg.get("seq"))
    fam("iaflash_registry_vehicles", "gauge", "Vehicles in the registry cache.").add(reg.get("vehicles"))
    age = _number(reg.get("age_hours"))
    if age is not None:
        fam("iaflash_registry_age_seconds", "gauge", "Age of the registry data (since central wrote it).").add(
            age * 3600
        )
    fam("iaflash_registry_stale", "gauge", "1 when the registry is older than registry.max_age_hours.").add(
        reg.get("stale")
    )


def _model(hb: dict[str, Any], fam: FamilyMaker) -> None:
    model = _dict(hb, "model")
    if not model:
        return
    info = fam("iaflash_model", "info", "Loaded models: slot, name, version, backend, device, operating point.")
    op = model.get("operating_point") if isinstance(model.get("operating_point"), dict) else {}
    for slot, doc in (("classifier", model), ("detector", model.get("detector"))):
        if isinstance(doc, dict):
            info.add(
                1,
                slot=slot,
                name=doc.get("name", ""),
                version=doc.get("version", ""),
                backend=doc.get("backend", ""),
                device=doc.get("device", ""),
                precision=doc.get("precision", ""),
                operating_point=(op or {}).get("id", "") if slot == "classifier" else "",
            )
    fam("iaflash_model_generation", "gauge", "Model set in use: 1 at start, +1 per successful reload.").add(
        model.get("generation")
    )
    fam("iaflash_model_flags_allowed", "gauge", "1 when the bundle's operating point allows flags.").add(
        not model.get("no_flag_reason")
    )
    reloads = fam("iaflash_model_reloads", "counter", "Model reloads since start, by result.")
    for result, n in sorted(_dict(hb, "reloads").items()):
        if result in ("ok", "failed"):
            reloads.add(n, result=result)


def _last_errors(hb: dict[str, Any], fam: FamilyMaker) -> None:
    when = fam("iaflash_last_error_timestamp_seconds", "gauge", "When each subsystem last logged an ERROR.")
    lines = fam("iaflash_error_lines", "counter", "ERROR lines logged since start, by subsystem.")
    for subsystem, doc in sorted(_dict(hb, "last_errors").items()):
        if isinstance(doc, dict):
            when.add(_timestamp(doc.get("at")), subsystem=subsystem)
            lines.add(doc.get("count"), subsystem=subsystem)


def render(hb: dict[str, Any], *, openmetrics: bool = True) -> str:
    """The heartbeat document as metrics text (OpenMetrics 1.0, else Prometheus 0.0.4)."""
    out: list[str] = []
    for f in _families(hb):
        if not f.samples:
            continue
        kind = f.kind if openmetrics or f.kind != "info" else "gauge"
        name = f.name if openmetrics or f.kind == "gauge" else f"{f.name}_{'total' if f.kind == 'counter' else 'info'}"
        out += [f"# HELP {name} {f.help}", f"# TYPE {name} {kind}"]
        suffix = {"counter": "_total", "info": "_info"}.get(f.kind, "")
        out += [f"{f.name}{suffix}{_labels(labels)} {_value(v)}" for labels, v in f.samples]
    if openmetrics:
        out.append("# EOF")
    return "\n".join(out) + "\n"


def _wants_openmetrics(accept: str | None) -> bool:
    return bool(accept) and "application/openmetrics-text" in str(accept)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # http.server's name
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        try:
            doc = self.server.source()
        except Exception:  # a broken probe answers 500 and is logged; the agent goes on
            log.exception("metrics: building the heartbeat failed")
            self.send_error(500, "the agent could not build its figures; see its log")
            return
        openmetrics = _wants_openmetrics(self.headers.get("Accept"))
        body = render(doc, openmetrics=openmetrics).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", OPENMETRICS_TYPE if openmetrics else PROMETHEUS_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        log.debug("metrics: %s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, source: Source) -> None:
        self.source = source
        super().__init__((HOST, port), _Handler)


class MetricsServer:
    """``GET http://127.0.0.1:<port>/metrics``: the heartbeat as OpenMetrics (or Prometheus text, by Accept)."""

    def __init__(self, port: int, source: Source) -> None:
        self._server = _Server(port, source)  # binds now: a port in use raises OSError here
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="iaflash-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics: serving http://%s:%d/metrics", HOST, self.port)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


class TextfileWriter:
    """Rewrites ``path`` (a node_exporter textfile, Prometheus text) atomically every ``interval_s``."""

    def __init__(self, path: Path, interval_s: float, source: Source) -> None:
        self.path, self.interval_s, self.source = Path(path), interval_s, source
        self.writes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="iaflash-metrics-textfile", daemon=True)
        self._failing = False

    def start(self) -> TextfileWriter:
        self._thread.start()
        return self

    def write_once(self) -> bool:
        """One rewrite; a failure is logged once per streak (with the fix) and counted."""
        try:
            write_atomic(self.path, render(self.source(), openmetrics=False).encode("utf-8"), mode=0o644)
        except Exception as exc:  # noqa: BLE001  # metrics must never stop the agent
            self.failures += 1
            if not self._failing:
                log.error(
                    "metrics: cannot write %s (%s); fix: create its folder and let the service user write there "
                    "(metrics.textfile)",
                    self.path,
                    exc,
                )
            self._failing = True
            return False
        if self._failing:
            log.warning("metrics: %s written again", self.path)
        self._failing = False
        self.writes += 1
        return True

    def _run(self) -> None:
        while True:
            self.write_once()
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def start_exporters(port: int, textfile: Path | None, interval_s: float, source: Source) -> list[Exporter]:
    """The configured exporters, started; a port that cannot be bound is logged, never fatal."""
    started: list[Exporter] = []
    if port:
        try:
            started.append(MetricsServer(port, source).start())
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s:%d (%s); fix: choose a free port for metrics.port, or 0 to turn it off",
                HOST,
                port,
                exc.strerror or exc,
            )
    if textfile is not None:
        started.append(TextfileWriter(textfile, interval_s, source).start())
    return started


def stop_exporters(exporters: Iterable[Exporter]) -> None:
    for exporter in exporters:
        exporter.stop()
