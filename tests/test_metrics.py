"""The heartbeat's figures and the metrics endpoint: a real agent (in process) with a real broker, real
captures, a real HTTP GET on a free 127.0.0.1 port, and the node_exporter textfile on disk."""

from __future__ import annotations

import logging
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_site import Site, make_site
from waiting import wait_until

from iaflash.agent.demo.broker import MosquittoBroker, free_port
from iaflash.agent.metrics import OPENMETRICS_TYPE, PROMETHEUS_TYPE, TextfileWriter, render
from iaflash.agent.service import Service

pytestmark = pytest.mark.slow

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse(text: str, *, openmetrics: bool) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A strict reader of the exposition text: every sample belongs to a family declared just before it
    (HELP then TYPE), names carry the type's suffix, and OpenMetrics ends with ``# EOF``."""
    lines = text.split("\n")
    assert lines[-1] == "", "the text ends with a newline"
    lines = lines[:-1]
    if openmetrics:
        assert lines[-1] == "# EOF"
        lines = lines[:-1]
    else:
        assert "# EOF" not in lines
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    family, kind = "", ""
    seen: set[str] = set()
    for i, line in enumerate(lines):
        if line.startswith("# HELP "):
            family = line.split(" ")[2]
            assert family not in seen, f"family {family} declared twice"
            seen.add(family)
            assert lines[i + 1].startswith(f"# TYPE {family} ")
            continue
        if line.startswith("# TYPE "):
            kind = line.split(" ")[3]
            assert kind in (("counter", "gauge", "info") if openmetrics else ("counter", "gauge")), line
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match.group(1)
        if openmetrics:
            suffix = {"counter": "_total", "info": "_info"}.get(kind, "")
            assert name == family + suffix, (name, family, kind)
        else:
            assert name == family, (name, family)
        labels = frozenset(LABEL.findall(match.group(2) or ""))
        samples[(name, labels)] = float(match.group(3))
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, **labels: str) -> float:
    hits = [v for (n, ls), v in samples.items() if n == metric and set(labels.items()) <= set(ls)]
    assert len(hits) == 1, (metric, labels, hits)
    return hits[0]


@pytest.fixture
def running(tmp_path: Path, tiny_models: Path, broker: MosquittoBroker) -> Iterator[tuple[Site, Service]]:
    port = free_port()
    site = make_site(
        tmp_path / "site",
        tiny_models,
        broker.port,
        n=8,
        overrides={
            "model": {"backend": "onnxruntime"},
            "metrics": {"port": port, "textfile": str(tmp_path / "textfile" / "iaflash.prom"), "interval_s": 0.2},
            "spool": {"min_free_mb": 1},
        },
    )
    (tmp_path / "textfile").mkdir()
    service = Service(site.cfg)
    service.start()
    try:
        yield site, service
    finally:
        service.stop()


def get(port: int, path: str = "/metrics", accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode("utf-8", "replace")


def feed(site: Site) -> int:
    """Every capture of the scenario and one sidecar that is not JSON; returns the verdicts expected."""
    (site.incoming / "bad-json.jpg").write_bytes(b"\xff\xd8\xff")
    (site.incoming / "bad-json.json").write_text("{not json")
    site.drop(site.scenario)
    return site.expected_verdicts()


def test_the_heartbeat_carries_registry_model_backend_disk_queue_rejections_and_last_errors(
    running: tuple[Site, Service],
) -> None:
    site, service = running
    expected = feed(site)
    wait_until(lambda: sum(service.heartbeat()["outcomes"].values()) == expected, 60, "every verdict")
    wait_until(lambda: service.heartbeat()["rejected"].get("sidecar_not_json") == 1, 10, "the rejection")
    logging.getLogger("iaflash.agent.link.mqtt").error("a broker failure for the test (%s)", "no plate here")
    hb = service.heartbeat()
    reg = hb["registry"]
    assert (reg["state"], reg["dataset_id"], reg["kind"], reg["seq"], reg["stale"]) == (
        "ok",
        "test-siv",
        "snapshot",
        1,
        False,
    )
    assert 0 <= reg["age_hours"] < 1 and reg["max_age_hours"] == site.cfg.registry.max_age_hours
    model = hb["model"]
    assert (model["name"], model["version"], model["backend"], model["generation"]) == (
        "tiny",
        "1.0.0",
        "onnxruntime",
        1,
    )
    assert model["backend_reason"] == "model.backend = onnxruntime: onnxruntime as configured"
    assert model["operating_point"] is None and "never flags" in model["no_flag_reason"]
    assert model["detector"]["name"] == "iaflash-demo-detector" and model["detector"]["backend"] == "onnxruntime"
    assert hb["reloads"] == {"ok": 0, "failed": 0, "last": None}
    disks = {d["path"]: d for d in hb["disk"]}
    assert str(site.cfg.spool.dir) in disks and disks[str(site.cfg.spool.dir)]["free_mb"] > 0
    assert disks[str(site.cfg.spool.dir)]["read_only"] is False
    assert hb["queue_depth"] == 0 and hb["rejected"] == {"sidecar_not_json": 1}
    link_error = hb["last_errors"]["link"]
    assert link_error["message"] == "a broker failure for the test (no plate here)" and link_error["count"] == 1
    assert link_error["logger"] == "iaflash.agent.link.mqtt" and link_error["at"].endswith("+00:00")


def test_the_endpoint_serves_the_same_figures_as_openmetrics_on_127_0_0_1_and_as_text_without_accept(
    running: tuple[Site, Service],
) -> None:
    site, service = running
    expected = feed(site)
    wait_until(lambda: sum(service.heartbeat()["outcomes"].values()) == expected, 60, "every verdict")
    wait_until(lambda: service.heartbeat()["rejected"].get("sidecar_not_json") == 1, 10, "the rejection")
    port = site.cfg.metrics.port
    status, ctype, text = get(port, accept="application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert status == 200 and ctype == OPENMETRICS_TYPE
    om = parse(text, openmetrics=True)
    hb = service.heartbeat()
    for outcome, n in hb["outcomes"].items():
        assert value(om, "iaflash_verdicts_total", outcome=outcome) == n
    assert sum(v for (n, _), v in om.items() if n == "iaflash_verdicts_total") == expected
    assert value(om, "iaflash_rejected_total", reason="sidecar_not_json") == 1
    assert value(om, "iaflash_model_info", slot="classifier", name="tiny", version="1.0.0", backend="onnxruntime") == 1
    assert value(om, "iaflash_model_info", slot="detector", name="iaflash-demo-detector") == 1
    assert value(om, "iaflash_registry_seq") == 1 and value(om, "iaflash_registry_stale") == 0
    assert value(om, "iaflash_registry_info", dataset_id="test-siv", state="ok") == 1
    assert 0 <= value(om, "iaflash_registry_age_seconds") < 3600
    assert value(om, "iaflash_disk_free_bytes", path=str(site.cfg.spool.dir)) > 0
    assert value(om, "iaflash_queue_depth") == 0 and value(om, "iaflash_outbox_depth") >= 0
    assert value(om, "iaflash_agent_info", site_id="demo-site", device_id="box-01") == 1
    status, ctype, plain = get(port)
    assert status == 200 and ctype == PROMETHEUS_TYPE
    prom = parse(plain, openmetrics=False)
    assert value(prom, "iaflash_rejected_total", reason="sidecar_not_json") == 1
    assert value(prom, "iaflash_model_info", slot="classifier", version="1.0.0") == 1
    assert get(port, "/other")[0] == 404
    textfile = site.cfg.metrics.textfile
    assert textfile is not None
    wait_until(lambda: "sidecar_not_json" in textfile.read_text(), 10, "the textfile to catch up")
    assert (
        value(parse(textfile.read_text(), openmetrics=False), "iaflash_rejected_total", reason="sidecar_not_json") == 1
    )
    assert oct(textfile.stat().st_mode & 0o777) == "0o644"


def test_metrics_are_off_by_default_and_listen_only_on_the_loopback(
    tmp_path: Path, tiny_models: Path, broker: MosquittoBroker
) -> None:
    site = make_site(tmp_path / "plain", tiny_models, broker.port, n=1, overrides={"model": {"backend": "onnxruntime"}})
    assert site.cfg.metrics.port == 0 and site.cfg.metrics.textfile is None
    service = Service(site.cfg)
    service.start()
    try:
        assert service.exporters == []
    finally:
        service.stop()


def test_a_port_in_use_is_an_error_in_the_log_and_the_heartbeat_never_a_stopped_agent(
    tmp_path: Path, tiny_models: Path, broker: MosquittoBroker
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        site = make_site(
            tmp_path / "site",
            tiny_models,
            broker.port,
            n=2,
            overrides={"model": {"backend": "onnxruntime"}, "metrics": {"port": port}},
        )
        service = Service(site.cfg)
        service.start()
        try:
            error = service.heartbeat()["last_errors"]["metrics"]
            assert f"cannot listen on 127.0.0.1:{port}" in error["message"] and "metrics.port" in error["message"]
            site.drop(site.scenario)
            wait_until(lambda: site.processed_count() == site.expected_verdicts(), 60, "verdicts all the same")
        finally:
            service.stop()


def test_label_values_are_escaped_and_missing_parts_give_no_sample() -> None:
    hb: dict[str, Any] = {
        "site_id": 'site "A"\\north\n',
        "device_id": "box",
        "outcomes": {"match": 2},
        "latency_ms_p50": None,
        "registry": None,
    }
    text = render(hb)
    assert 'site_id="site \\"A\\"\\\\north\\n"' in text
    samples = parse(text, openmetrics=True)
    assert value(samples, "iaflash_verdicts_total", outcome="match") == 2
    assert not [n for n, _ in samples if n.startswith(("iaflash_registry", "iaflash_latency", "iaflash_model"))]


def test_the_textfile_writer_says_once_that_it_cannot_write_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "missing" / "iaflash.prom"
    writer = TextfileWriter(target, 60, lambda: {"outcomes": {"match": 1}})
    with caplog.at_level(logging.ERROR, logger="iaflash.agent.metrics"):
        assert writer.write_once() is False and writer.write_once() is False
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "metrics.textfile" in errors[0].getMessage() and writer.failures == 2
    target.parent.mkdir()
    assert writer.write_once() is True
    assert 'iaflash_verdicts_total{outcome="match"} 1' in target.read_text()
    assert writer.writes == 1
