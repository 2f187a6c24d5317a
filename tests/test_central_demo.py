"""The demo fills central's review store (serve's own store and ingester) with its flags and their evidence."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_central_web import Browser

from iaflash.agent.demo.runner import run_demo
from iaflash.central.serve.store import Store
from iaflash.central.web.app import create_app, jpeg_size, load_users
from iaflash.central.web.server import WebServer

pytestmark = pytest.mark.slow


def test_the_demo_leaves_a_review_store_with_every_flag_and_its_evidence_and_a_reviewer(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = run_demo(workdir, broker_kind="mosquitto", count=40, echo=lambda _line: None)
    assert result.ok and result.flags_received == result.expected_flags
    assert result.evidence_stored == result.expected_flags
    assert result.review[0].startswith(f"iaflash-central review --db {workdir / 'central.db'} --users ")
    with Store(str(workdir / "central.db")) as store:
        flags = store.flags(status=None)
        assert len(flags) == result.expected_flags
        assert {f["site_id"] for f in flags} == {"demo-site"}
        for f in flags:
            stored = store.evidence(f["event_id"])
            assert stored is not None and jpeg_size(stored[1]) is not None
        password = (workdir / "secrets" / "reviewer-password").read_text().strip()
        server = WebServer(create_app(store, load_users(workdir / "reviewers"))).start()
        try:
            b = Browser(server.url.rstrip("/"))
            status, body, _ = b.post("/login", {"name": "demo", "password": password, "next": "/"})
            assert status == 200 and f"Flags ({result.expected_flags})".encode() in body
            page = b.get(f"/flags/{flags[0]['event_id']}")[1]
            assert b'id="vehicle-box"' in page
        finally:
            server.stop()
