"""The review page in a real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol.

Marked ``browser``: skipped cleanly when no chromium binary is installed (CI covers the same pages
over plain HTTP in test_central_web.py). A reviewer logs in, sees the flag's evidence image decoded
by the browser with the vehicle box drawn, records a decision; it is stored and audited.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from central_pg import wait_until
from test_central_web import PASSWORD, Site, site  # noqa: F401  # site is a fixture

from iaflash.agent.demo.broker import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)"),
]


class Page:
    """One tab over the DevTools websocket: evaluate JavaScript, navigate, screenshot."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=50_000_000, open_timeout=10)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=20))
            if msg.get("id") == n:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return dict(msg["result"])

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.settle()

    def settle(self) -> None:
        wait_until(lambda: self.js("document.readyState") == "complete", 20, "the page to load")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def page() -> Iterator[Page]:
    assert CHROMIUM is not None
    port, profile = free_port(), tempfile.mkdtemp(prefix="iaflash-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    targets: list[dict[str, Any]] = []

    def listed() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                targets[:] = [t for t in json.load(resp) if t.get("type") == "page"]
        except OSError:
            return False
        return bool(targets)

    try:
        wait_until(listed, 30, "chromium's DevTools endpoint")
        p = Page(targets[0]["webSocketDebuggerUrl"])
        yield p
        p.close()
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(profile, ignore_errors=True)


def test_a_reviewer_sees_the_evidence_with_its_box_in_chromium_and_records_a_decision(
    site: Site,  # noqa: F811  # the fixture imported above
    page: Page,
    tmp_path: Path,
) -> None:
    page.open(site.url + "/")
    assert page.js("location.pathname") == "/login"
    page.js(f"document.getElementById('name').value='ann'; document.getElementById('password').value={PASSWORD!r};"
            "document.getElementById('login').click(); true")  # fmt: skip
    wait_until(lambda: page.js("location.pathname") == "/", 20, "the queue after login")
    page.settle()
    assert page.js("document.querySelectorAll('#queue tr').length") == 4  # header + 3 flags

    event_id = site.flags["strong"]["event_id"]
    page.open(f"{site.url}/flags/{event_id}")
    width = page.js(
        "new Promise(r => { const i = new Image(); i.onload = () => r(i.naturalWidth); i.onerror = () => r(-1);"
        f" i.src = '/flags/{event_id}/evidence.jpg'; }})"
    )
    assert width == 640  # the browser decoded the stored evidence JPEG
    box = page.js(
        "(() => { const b = document.getElementById('vehicle-box').getBBox();"
        " return [b.x, b.y, b.width, b.height]; })()"
    )
    assert box == [200, 150, 240, 180]
    shot = page.call("Page.captureScreenshot", format="png")["data"]
    (tmp_path / "flag.png").write_bytes(base64.b64decode(shot))
    assert (tmp_path / "flag.png").stat().st_size > 10_000

    page.js("document.getElementById('action-confirmed_clone').click();"
            "document.getElementById('note').value='other car: a Peugeot 308';"
            "document.getElementById('decide').click(); true")  # fmt: skip
    wait_until(lambda: page.js("document.getElementById('status')?.textContent") == "closed", 20, "the decision")
    [audit] = site.store.audit_log(event_id)
    assert (audit["reviewer"], audit["action"], audit["note"]) == ("ann", "confirmed_clone", "other car: a Peugeot 308")
    assert site.store.flag(event_id)["status"] == "closed"  # type: ignore[index]
