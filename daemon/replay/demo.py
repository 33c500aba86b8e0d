"""`clearbudget demo` and `replay --kafka`: the real daemon path on this machine.

An embedded Tansu broker (demo only), the recorded-rollout simulator served over HTTP as the
"vLLM pod", and the daemon itself (consumer group, windows, pipeline, HTTP pool, results topic).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import typer

from daemon.replay.embedded import BrokerStartError, free_loopback_port, start_embedded_broker
from daemon.replay.inprocess import ReplayConfig, ReplayQuery
from daemon.replay.rollouts import RolloutPool
from daemon.replay.sim_server import start_simulator
from daemon.replay.simulator import SimulatedBackend
from daemon.replay.via_kafka import replay_via_kafka
from daemon.settings import Settings, SettingsError, load_settings

MIN_WINDOW_SECONDS = 0.5


def daemon_settings(base: Settings, config: ReplayConfig, queries: Sequence[ReplayQuery],
                    speedup: float, endpoint: str) -> Settings:  # fmt: skip
    """The daemon's settings for a replay: budget and windows in wall-clock terms."""
    span = max(queries[-1].arrival - queries[0].arrival, config.window_seconds) if queries else 1.0
    if config.tokens_per_second is not None:
        rate = config.tokens_per_second * speedup
    else:
        rate = float(config.budget_per_query or 0.0) * len(queries) / span * speedup
    return base.model_copy(
        update={
            "vllm_endpoints": (endpoint,),
            "tokens_per_second": rate,
            "window_seconds": max(config.window_seconds / speedup, MIN_WINDOW_SECONDS),
            "window_max_queries": config.window_max_queries,
            "probe_samples": config.probe.samples,
            "probe_tokens": max(config.probe.tokens, 1),
            "max_tokens_per_query": 1 << 16,
            "http_port": free_loopback_port(),
        }
    )


async def replay_with_simulator(
    queries: Sequence[ReplayQuery],
    pool: RolloutPool,
    config: ReplayConfig,
    base: Settings,
    *,
    speedup: float,
) -> dict[str, Any]:
    server = await start_simulator(SimulatedBackend(pool, seed=config.seed), port=0)
    try:
        settings = daemon_settings(base, config, queries, speedup, server.url)
        return await replay_via_kafka(queries, pool, config, settings, speedup=speedup)
    finally:
        await server.close()


def replay_on_kafka_from_env(
    queries: Sequence[ReplayQuery], pool: RolloutPool, config: ReplayConfig, *, speedup: float
) -> dict[str, Any]:
    """`replay --kafka`: the broker and topics come from CLEAR_* settings."""
    if not speedup > 0:
        raise typer.BadParameter("--speedup must be > 0")
    try:
        base = load_settings()
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    return asyncio.run(replay_with_simulator(queries, pool, config, base, speedup=speedup))


def demo_settings(bootstrap: str, run_id: str) -> Settings:
    """Hermetic settings for one demo run: its own topics and consumer group."""
    return load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": bootstrap,
            "CLEAR_INPUT_TOPIC": f"demo.{run_id}.queries",
            "CLEAR_RESULT_TOPIC": f"demo.{run_id}.results",
            "CLEAR_DLQ_TOPIC": f"demo.{run_id}.dlq",
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
) -> list[dict[str, Any]]:
    try:
        broker = start_embedded_broker()
    except BrokerStartError as exc:
        typer.echo(f"error: cannot start the embedded broker: {exc}", err=True)
        raise typer.Exit(1) from exc
    rows = []
    with broker:
        for config in configs:
            run_id = f"{config.policy}-{uuid.uuid4().hex[:6]}"
            typer.echo(
                f"  {config.policy}: {len(queries)} queries through Kafka at {speedup:g}x pace ...",
                err=True,
            )
            started = time.monotonic()
            report = asyncio.run(
                replay_with_simulator(
                    queries, pool, config, demo_settings(broker.bootstrap, run_id), speedup=speedup
                )
            )
            report["wall_seconds"] = time.monotonic() - started
            rows.append({"budget_per_query": config.budget_per_query, **report})
    return rows
