"""The review page's HTTP server: waitress in one thread, stopped cleanly from another.

waitress's ``run()`` loops until SystemExit; ``close()`` from another thread races its ``select``.
:class:`WebServer` runs the same loop in short steps and closes from the loop's own thread.
"""

from __future__ import annotations

import threading
from typing import Any

from waitress import create_server

__all__ = ["WebServer"]


class WebServer:
    """Serve a WSGI app on ``host:port`` (0 = a free port) until ``stop()``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, threads: int = 4) -> None:
        self._server = create_server(app, host=host, port=port, threads=threads)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="review-page", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self._server.effective_host}:{self._server.effective_port}/"

    def start(self) -> WebServer:
        self._thread.start()
        return self

    def _loop(self) -> None:
        socket_map = getattr(self._server, "_map", None) or self._server.map
        while not self._stop.is_set():
            self._server.asyncore.loop(timeout=0.2, map=socket_map, count=1)
        self._server.task_dispatcher.shutdown()
        self._server.asyncore.close_all(socket_map)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
