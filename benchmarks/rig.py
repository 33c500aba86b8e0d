"""What the process benchmarks share: a Tansu broker and the simulator as separate processes on
loopback, topic creation, and reading a process's memory from /proc."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from clearbudget.daemon.replay.embedded import (
    free_loopback_port,
    start_embedded_broker,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent
ROLLOUTS = ROOT / "data" / "rollouts.jsonl"


@dataclass(frozen=True)
class Rig:
    bootstrap: str
    simulator_url: str
    pids: dict[str, int]  # broker and simulator, for CPU accounting


@asynccontextmanager
async def broker_and_simulator(simulator_args: Sequence[str] = ()) -> AsyncIterator[Rig]:
    """A Tansu broker and `clearbudget simulate-backend` on free loopback ports."""
    broker = start_embedded_broker()
    port = free_loopback_port()
    simulator = subprocess.Popen(
        [sys.executable, "-m", "clearbudget.daemon.cli", "simulate-backend",
         "--rollouts", str(ROLLOUTS), "--port", str(port), *simulator_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, 60, simulator)
        pids = {"simulator": simulator.pid, "broker": broker.process.pid}
        yield Rig(broker.bootstrap, f"http://127.0.0.1:{port}", pids)
    finally:
        simulator.terminate()
        simulator.wait(30)
        broker.stop()


async def create_topics(bootstrap: str, topics: Sequence[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    await admin.close()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
