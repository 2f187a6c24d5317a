"""serve's evidence fetch through the real signed ``send_evidence`` command to a real agent's command worker.

The agent side is test_commands_handlers' small real agent (MqttLink + CommandWorker over a real
spool); central's side is serve's own fetcher and the review page's fetch button.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from test_central_store import an_event
from test_central_web import PASSWORD, Browser
from test_commands_handlers import CAPTURE, DEVICE, SITE, Agent, Keys, keys, make_agent  # noqa: F401  # fixtures
from werkzeug.security import generate_password_hash

from iaflash.agent.demo.broker import MosquittoBroker
from iaflash.central.connection import BrokerOptions
from iaflash.central.serve.command import evidence_fetcher
from iaflash.central.serve.store import Store
from iaflash.central.web.app import create_app, jpeg_size
from iaflash.central.web.server import WebServer


def test_fetch_evidence_asks_the_box_with_a_signed_command_and_stores_the_image_at_central(
    broker: MosquittoBroker,
    make_agent: Callable[..., Agent],  # noqa: F811  # the fixture imported above
    keys: Keys,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
) -> None:
    agent = make_agent()
    store = Store(str(tmp_path / "central.db"))
    store.migrate()
    doc = an_event(site=SITE, device=DEVICE, capture=CAPTURE)
    store.ingest(doc, site=SITE, device=DEVICE, topic="t", payload_site=None)
    fetch = evidence_fetcher(BrokerOptions(port=broker.port), keys.central, timeout=15)
    app = create_app(
        Store(str(tmp_path / "central.db")), {"ann": generate_password_hash(PASSWORD)}, fetch_evidence=fetch
    )
    server = WebServer(app).start()
    try:
        b = Browser(server.url.rstrip("/"))
        b.login()
        page = b.get(f"/flags/{doc['event_id']}")[1].decode()
        assert "The evidence image is still on the box." in page
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        status, page_bytes, _ = b.post(f"/flags/{doc['event_id']}/fetch", {"csrf": token})
    finally:
        server.stop()
    assert status == 200 and b'id="vehicle-box"' in page_bytes
    stored = store.evidence(doc["event_id"])
    assert stored is not None
    sidecar, jpeg = stored
    assert jpeg[:2] == b"\xff\xd8" and jpeg_size(jpeg) == jpeg_size(agent.jpeg)
    assert sidecar["capture_id"] == CAPTURE and "plate" not in sidecar
    assert [r["action"] for r in store.audit_log(doc["event_id"])] == ["evidence_fetched"]
    assert agent.worker.counters()["ok"] == 1
