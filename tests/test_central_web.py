"""The review page over plain HTTP (waitress on a free 127.0.0.1 port): login, queue, flag, decision, exports."""

from __future__ import annotations

import csv
import http.cookiejar
import io
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_central_store import an_event
from werkzeug.security import generate_password_hash

from iaflash.central.serve.store import Store
from iaflash.central.web.app import create_app, jpeg_size, load_users
from iaflash.central.web.server import WebServer

PASSWORD = "correct horse battery"
SITES = {"site-a": (48.8566, 2.3522), "site-b": (43.2965, 5.3698)}  # Paris, Marseille: ~660 km


def a_jpeg(w: int = 640, h: int = 480) -> bytes:
    img = np.full((h, w, 3), 90, np.uint8)
    cv2.rectangle(img, (200, 150), (440, 330), (30, 30, 200), -1)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return bytes(buf)


@dataclass
class Site:
    url: str
    store: Store
    flags: dict[str, dict[str, Any]]
    jpeg: bytes


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    store = Store(str(tmp_path / "central.db"))
    store.migrate()
    docs = {
        "strong": an_event(site="site-a", capture="a1", p_model=0.001),
        "again": an_event(site="site-b", capture="b1", p_model=0.02),  # same plate 20 min later, 660 km away
        "weak": an_event(site="site-a", capture="a2", p_model=0.04),
    }
    docs["again"]["captured_at"] = "2026-11-02T08:20:00+01:00"
    docs["weak"]["plate_key"] = "ef" * 32
    for d in docs.values():
        store.ingest(d, site=d["site_id"], device="box-3", topic="t", payload_site=None)
    jpeg = a_jpeg()
    store.put_evidence(
        docs["strong"]["event_id"], {"vehicle_box": [200, 150, 240, 180], "direction": "approaching"}, jpeg
    )
    users = tmp_path / "reviewers"
    users.write_text(f"# reviewers\nann:{generate_password_hash(PASSWORD)}\n")
    app = create_app(Store(str(tmp_path / "central.db")), load_users(users), coordinates=SITES)
    server = WebServer(app, threads=2).start()
    yield Site(server.url.rstrip("/"), store, docs, jpeg)
    server.stop()
    store.close()


class Browser:
    """urllib with a cookie jar; returns (status, body, final url)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> tuple[int, bytes, str]:
        return self._open(urllib.request.Request(self.base + path))

    def post(self, path: str, form: dict[str, str]) -> tuple[int, bytes, str]:
        data = urllib.parse.urlencode(form).encode()
        return self._open(urllib.request.Request(self.base + path, data=data, method="POST"))

    def _open(self, req: urllib.request.Request) -> tuple[int, bytes, str]:
        try:
            with self.opener.open(req, timeout=10) as resp:
                return resp.status, resp.read(), resp.url
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.url

    def login(self, password: str = PASSWORD) -> tuple[int, bytes, str]:
        return self.post("/login", {"name": "ann", "password": password, "next": "/"})

    def csrf(self, path: str) -> str:
        match = re.search(rb'name="csrf" value="([^"]+)"', self.get(path)[1])
        assert match
        return match.group(1).decode()


def test_pages_need_a_login_and_a_wrong_password_is_refused_and_counted(site: Site) -> None:
    b = Browser(site.url)
    status, _, url = b.get("/")
    assert status == 200 and "/login" in url
    assert b.get("/export/flags.csv")[2].split("?")[0].endswith("/login")
    status, body, _ = b.login("wrong password")
    assert status == 401 and b"wrong password" in body
    assert site.store.counters()["login_refused"] == 1
    status, body, url = b.login()
    assert status == 200 and url.endswith("/") and b"Flags (3)" in body


def test_the_queue_ranks_by_evidence_filters_and_ranks_by_plate_with_the_impossible_journey(site: Site) -> None:
    b = Browser(site.url)
    b.login()
    body = b.get("/")[1].decode()
    order = [body.index(f"/flags/{site.flags[k]['event_id']}") for k in ("strong", "again", "weak")]
    assert order == sorted(order)
    assert "impossible journey" in body
    assert b"Flags (2)" in b.get("/?site=site-a")[1]
    assert b"Flags (0)" in b.get("/?level=make")[1]
    assert b"Flags (3)" in b.get("/?since=2026-11-02&until=2026-11-02")[1]
    assert b"Flags (0)" in b.get("/?since=2026-11-03")[1]
    by_plate = b.get("/?rank=plate")[1].decode()
    assert by_plate.index(site.flags["again"]["event_id"]) < by_plate.index(site.flags["weak"]["event_id"])


def test_a_flag_page_shows_top_k_beside_the_registry_and_the_evidence_with_its_box(site: Site) -> None:
    b = Browser(site.url)
    b.login()
    event_id = site.flags["strong"]["event_id"]
    page = b.get(f"/flags/{event_id}")[1].decode()
    assert 'class="registered"' in page and "CLIO" in page and "MEGANE" in page and "0.850" in page
    assert 'viewBox="0 0 640 480"' in page
    assert '<rect id="vehicle-box" x="200.0" y="150.0" width="240.0" height="180.0"' in page
    assert "site-a/box-3" in page and "model" in page and "ort" in page
    assert "impossible journey: site-a → site-b, 660 km in 0.33 h (1982 km/h)" in page
    status, jpeg, _ = b.get(f"/flags/{event_id}/evidence.jpg")
    assert status == 200 and jpeg == site.jpeg and jpeg_size(jpeg) == (640, 480)
    other = b.get(f"/flags/{site.flags['weak']['event_id']}")[1]
    assert b"The evidence image is still on the box." in other and b"fetching is off" in other


def test_a_decision_needs_the_csrf_token_then_is_stored_audited_and_exported(site: Site) -> None:
    b = Browser(site.url)
    b.login()
    event_id = site.flags["strong"]["event_id"]
    form = {"action": "false_flag", "note": "same car, plate misread", "make": "", "model": ""}
    assert b.post(f"/flags/{event_id}/decision", form)[0] == 400
    assert site.store.flag(event_id)["status"] == "open"  # type: ignore[index]
    token = b.csrf(f"/flags/{event_id}")
    assert b.post(f"/flags/{event_id}/decision", {**form, "action": "maybe", "csrf": token})[0] == 400
    status, page, _ = b.post(f"/flags/{event_id}/decision", {**form, "csrf": token})
    assert status == 200 and b'<span id="status">dismissed</span>' in page
    [audit] = site.store.audit_log(event_id)
    assert (audit["reviewer"], audit["action"], audit["note"]) == ("ann", "false_flag", "same car, plate misread")
    assert b"false_flag" in b.get("/audit")[1]

    flags = list(csv.DictReader(io.StringIO(b.get("/export/flags.csv")[1].decode())))
    assert {f["event_id"]: f["status"] for f in flags}[event_id] == "dismissed" and len(flags) == 3
    lines = [json.loads(x) for x in b.get("/export/flags.ndjson")[1].decode().splitlines()]
    assert {x["event_id"] for x in lines} == {d["event_id"] for d in site.flags.values()}
    assert lines[0]["event"]["schema"] == "iaflash.event/1"
    decisions = list(csv.DictReader(io.StringIO(b.get("/export/decisions.csv")[1].decode())))
    assert [(d["event_id"], d["action"]) for d in decisions] == [(event_id, "false_flag")]
    assert json.loads(b.get("/export/decisions.ndjson")[1].decode().splitlines()[0])["action"] == "false_flag"
    labels = list(csv.DictReader(io.StringIO(b.get("/export/labels.csv")[1].decode())))
    assert labels == [
        {"image": f"{event_id}.jpg", "make": "RENAULT", "model": "CLIO", "view": "front",
         "x1": "200", "y1": "150", "x2": "440", "y2": "330"},
    ]  # fmt: skip
    assert [r["action"] for r in site.store.audit_log()][-5:] == [
        "export_flags", "export_flags", "export_decisions", "export_decisions", "export_labels",
    ]  # fmt: skip


def test_a_users_file_line_without_a_hash_is_refused_with_its_line(tmp_path: Path) -> None:
    users = tmp_path / "reviewers"
    users.write_text("ann:hash\nbob\n")
    with pytest.raises(ValueError, match=r"reviewers:2: expected 'name:hash'"):
        load_users(users)
