"""`clearbudget demo` and `replay --kafka`: the real daemon path on this machine.

An embedded Tansu broker (demo only), the recorded-rollout simulator served over HTTP as the
"vLLM pod", and the daemon itself (consumer group, windows, pipeline, HTTP pool, results topic).
Errors are exceptions (`BrokerStartError`, `SettingsError`, `ValueError`); progress goes to an
optional callback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence

from clearbudget.daemon.replay.config import ReplayConfig, ReplayQuery, token_rate
from clearbudget.daemon.replay.embedded import free_loopback_port, start_embedded_broker
from clearbudget.daemon.replay.report import ReplayReport
from clearbudget.daemon.replay.rollouts import RolloutPool
from clearbudget.daemon.replay.sim_server import start_simulator
from clearbudget.daemon.replay.simulator import SimulatedBackend
from clearbudget.daemon.replay.via_kafka import replay_via_kafka
from clearbudget.daemon.settings import Settings, load_settings

__all__ = ["daemon_settings", "demo_settings", "replay_with_simulator", "run_demo"]

MIN_WINDOW_SECONDS = 0.5


def daemon_settings(base: Settings, config: ReplayConfig, queries: Sequence[ReplayQuery],
                    speedup: float, endpoint: str) -> Settings:  # fmt: skip
    """The daemon's settings for a replay: budget and windows in wall-clock terms."""
    return base.model_copy(
        update={
            "vllm_endpoints": (endpoint,),
            "tokens_per_second": token_rate(config, queries, speedup),
            "window_seconds": max(config.window_seconds / speedup, MIN_WINDOW_SECONDS),
            "window_max_queries": config.window_max_queries,
            "probe_samples": config.probe.samples,
            "probe_tokens": max(config.probe.tokens, 1),
            "max_tokens_per_query": 1 << 16,
            "budget_mode": config.budget_mode,
            "thinking_answer_tokens": config.thinking_answer_tokens,
            "http_port": free_loopback_port(),
            "http_host": "127.0.0.1",
            # A replay measures the allocator at the budget it is given: no backlog pacing.
            "min_tokens_per_query": 0,
        }
    )


async def replay_with_simulator(
    queries: Sequence[ReplayQuery],
    pool: RolloutPool,
    config: ReplayConfig,
    base: Settings,
    *,
    speedup: float,
) -> ReplayReport:
    """Replay through Kafka at `base`'s broker, the simulator serving as the one vLLM pod."""
    _check_speedup(speedup)
    server = await start_simulator(SimulatedBackend(pool, seed=config.seed), port=0)
    try:
        settings = daemon_settings(base, config, queries, speedup, server.url)
        return await replay_via_kafka(queries, pool, config, settings, speedup=speedup)
    finally:
        await server.close()


def demo_settings(bootstrap: str, run_id: str) -> Settings:
    """Hermetic settings for one demo run: its own topics and consumer group."""
    return load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": bootstrap,
            "CLEAR_INPUT_TOPIC": f"demo.{run_id}.queries",
            "CLEAR_RESULT_TOPIC": f"demo.{run_id}.results",
            "CLEAR_DLQ_TOPIC": f"demo.{run_id}.dlq",
            "CLEAR_WINDOW_TOPIC": "",  # no window reports in a demo
            "CLEAR_CONSUMER_GROUP": f"demo-{run_id}",
            "CLEAR_VLLM_ENDPOINTS": "http://127.0.0.1:1",  # replaced by the simulator's URL
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",  # Tansu has no InitProducerId
            "CLEAR_LOG_LEVEL": "WARNING",
        },
        env_file=None,
    )


def run_demo(
    queries: Sequence[ReplayQuery],
    pool: RolloutPool,
    configs: Sequence[ReplayConfig],
    *,
    speedup: float,
    on_progress: Callable[[str], None] | None = None,
) -> list[ReplayReport]:
    """One report per config, each run through its own topics on one embedded broker.

    Raises `BrokerStartError` when the broker cannot start and `ValueError` for a bad speedup.
    """
    _check_speedup(speedup)
    reports = []
    with start_embedded_broker() as broker:
        for config in configs:
            if on_progress:
                on_progress(
                    f"  {config.policy}: {len(queries)} queries through Kafka "
                    f"at {speedup:g}x pace ..."
                )
            settings = demo_settings(broker.bootstrap, f"{config.policy}-{uuid.uuid4().hex[:6]}")
            started = time.monotonic()
            report = asyncio.run(
                replay_with_simulator(queries, pool, config, settings, speedup=speedup)
            )
            # The demo's wall time includes starting the daemon and the simulator.
            reports.append(dataclasses.replace(report, wall_seconds=time.monotonic() - started))
    return reports


def _check_speedup(speedup: float) -> None:
    if not speedup > 0:
        raise ValueError(f"speedup must be > 0, got {speedup!r}")
