"""Local MQTT brokers for the demo and the tests, bound to 127.0.0.1 on a free port.

``MosquittoBroker`` runs the real ``mosquitto`` binary (MQTT 5 and 3.1.1).
``AmqttBroker`` is the pure-Python fallback for machines without mosquitto (MQTT 3.1.1 only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
            return
        time.sleep(0.01)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout}s")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH, then /usr/sbin), or None."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class MosquittoBroker:
    """A private mosquitto process: start, SIGKILL, restart on the same port."""

    def __init__(
        self, port: int | None = None, workdir: Path | None = None, extra_conf: str = "", persistence: bool = False
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise FileNotFoundError("mosquitto not found: install it with 'apt-get install -y mosquitto'")
        self.binary = binary
        self.port = port or free_port()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="iaflash-mosq-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]  # set when workdir is None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_conf = extra_conf
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"

    def _write_conf(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "allow_anonymous true",
            # With persistence, sessions and queued QoS 1 messages survive a SIGKILL (saved every second),
            # as on a production broker.
            *(
                ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
                if self.persistence
                else ["persistence false"]
            ),
            "max_queued_messages 100000",
            f"log_dest file {self.log_path}",
        ]
        if os.geteuid() == 0:  # as root mosquitto drops to user 'mosquitto' and cannot read our files
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n" + self.extra_conf)
        return conf

    def start(self) -> MosquittoBroker:
        conf = self._write_conf()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(self.port)
        except TimeoutError:
            self.kill()
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {log[-500:]}") from None
        return self

    def kill(self) -> None:
        """SIGKILL the broker (an outage, not a clean stop)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the broker stops reading and acknowledging, like a hung or unreachable broker."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AmqttBroker:
    """amqtt in a background thread with its own event loop (MQTT 3.1.1 only; demo use)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: object | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    def start(self) -> AmqttBroker:
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise RuntimeError(f"amqtt broker did not start: {self._error}")
        wait_port(self.port)
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker  # noqa: PLC0415  # optional dependency, demo only

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        async def boot() -> None:
            broker = Broker(config)
            await broker.start()
            self._broker = broker

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # noqa: BLE001  # reported to start() then re-raised there
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None:
            return

        async def shutdown() -> None:
            await broker.shutdown()  # type: ignore[attr-defined]  # amqtt Broker

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(timeout=10)
