"""Can the budget be trusted? The real `clearbudget run` process between a Tansu broker and the
recorded-rollout simulator (all on loopback), under three traffic shapes:

- `burst`: the daemon idles, then a burst of queries arrives at once (windows of 100 queries);
- `steady`: a steady stream at a fixed rate;
- `backlog`: a large batch queued before the daemon starts; measured for a fixed time.

For each it reports the tokens generated (every result's `tokens_used`, probes included) against
what the budget allowed over the span (rate × span + one carry cap), the spend rate, the
statuses, how many queries were abandoned on windows that could not pay one probe each, and the
daemon's peak RSS. The spend ratio must stay ≤ 1.01; in a backlog the spend rate should sit at
the configured rate.

    python benchmarks/trust_bench.py --scenarios burst steady backlog
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rig import ROLLOUTS, broker_and_simulator, create_topics, peak_rss_mib

from daemon.replay.embedded import free_loopback_port, wait_for_port
from daemon.replay.rollouts import load_rollouts
from daemon.replay.simulator import prompt_for
from schemas.messages import QueryResult


def query_values(run_id: str, count: int, seed: int) -> list[bytes]:
    pool = load_rollouts(ROLLOUTS)
    picks = np.random.default_rng(seed).integers(len(pool), size=count)
    return [
        json.dumps({"id": f"{run_id}-{i}", "prompt": prompt_for(pool.records[int(r)])}).encode()
        for i, r in enumerate(picks)
    ]


def start_daemon(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port("127.0.0.1", port, 60, daemon)
    return daemon


async def produce(bootstrap: str, topic: str, values: list[bytes], rate: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)
    await producer.start()
    start = time.perf_counter()
    for i, value in enumerate(values):
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        await producer.send(topic, value)
    await producer.flush()
    await producer.stop()


async def collect(
    bootstrap: str, topic: str, want: int, until: float
) -> list[tuple[float, QueryResult]]:
    reader = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await reader.start()
    seen: list[tuple[float, QueryResult]] = []
    try:
        while len(seen) < want and time.perf_counter() < until:
            batch = await reader.getmany(timeout_ms=200, max_records=10000)
            now = time.perf_counter()
            seen += [
                (now, QueryResult.model_validate_json(r.value))
                for records in batch.values()
                for r in records
            ]
    finally:
        await reader.stop()
    return seen


async def run_scenario(name: str, args: argparse.Namespace, bootstrap: str, sim_url: str) -> dict:
    run_id = f"{name}-{int(time.time() * 1000)}"
    topics = [f"trust.{run_id}.{t}" for t in ("queries", "results", "dlq")]
    await create_topics(bootstrap, topics, args.partitions)
    port = free_loopback_port()
    window_queries = {"burst": 100}.get(name, args.window_max_queries)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLEAR_")},
        "CLEAR_KAFKA_BOOTSTRAP": bootstrap,
        "CLEAR_INPUT_TOPIC": topics[0],
        "CLEAR_RESULT_TOPIC": topics[1],
        "CLEAR_DLQ_TOPIC": topics[2],
        "CLEAR_WINDOW_TOPIC": "",
        "CLEAR_CONSUMER_GROUP": run_id,
        "CLEAR_VLLM_ENDPOINTS": sim_url,
        "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
        "CLEAR_TOKENS_PER_SECOND": str(args.tokens_per_second),
        "CLEAR_WINDOW_SECONDS": str(args.window_seconds),
        "CLEAR_WINDOW_MAX_QUERIES": str(window_queries),
        "CLEAR_HTTP_PORT": str(port),
        "CLEAR_HTTP_HOST": "127.0.0.1",
        "CLEAR_LOG_LEVEL": "WARNING",
    }
    if args.min_tokens_per_query is not None:
        env["CLEAR_MIN_TOKENS_PER_QUERY"] = str(args.min_tokens_per_query)
    count = {"burst": args.burst, "steady": int(args.steady_rate * args.steady_seconds)}.get(
        name, args.backlog
    )
    values = query_values(run_id, count, seed=len(name))
    if name == "backlog":  # queued before the daemon starts
        await produce(bootstrap, topics[0], values, rate=0)
    daemon = start_daemon(env, port)
    try:
        started = time.perf_counter()  # a queued backlog is served from the start
        await asyncio.sleep(args.idle_seconds)  # partitions assigned; the carry fills up
        if name != "backlog":
            started = time.perf_counter()
        if name == "burst":
            await produce(bootstrap, topics[0], values, rate=0)
        elif name == "steady":
            asyncio.get_running_loop().create_task(
                produce(bootstrap, topics[0], values, rate=args.steady_rate)
            )
        limit = time.perf_counter() + (
            args.backlog_seconds - args.idle_seconds if name == "backlog" else args.timeout
        )
        results = await collect(bootstrap, topics[1], count, limit)
        rss = peak_rss_mib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(60)
    return summarise(name, args, results, started, count, rss)


def summarise(
    name: str,
    args: argparse.Namespace,
    results: list[tuple[float, QueryResult]],
    started: float,
    count: int,
    rss: float,
) -> dict:
    last = max((t for t, _ in results), default=started)
    span = last - started
    tokens = sum(r.tokens_used for _, r in results)
    cap = args.tokens_per_second * args.window_seconds  # one window's worth (the default)
    allowed = args.tokens_per_second * span + cap
    statuses = Counter(r.status.value for _, r in results)
    # The spend rate over the middle of the run (start-up and the tail left out).
    times = np.array([t for t, _ in results]) - started
    spent = np.array([r.tokens_used for _, r in results], dtype=float)
    middle = (times >= 0.2 * span) & (times <= 0.8 * span)
    rate = spent[middle].sum() / (0.6 * span) if span > 0 and middle.any() else float("nan")
    return {
        "scenario": name,
        "queries": count,
        "results": len(results),
        "statuses": dict(statuses),
        "span_s": round(span, 2),
        "tokens": tokens,
        "allowed_tokens": round(allowed),
        "spend_ratio": round(tokens / allowed, 4) if allowed else None,
        "spend_rate_tokens_per_s": round(rate, 1),
        "configured_rate": args.tokens_per_second,
        "abandoned_unprobed": sum(
            1 for _, r in results if r.status.value == "abandoned" and r.tokens_used == 0
        ),
        "daemon_peak_rss_mib": round(rss, 1),
    }


async def main(args: argparse.Namespace) -> list[dict]:
    async with broker_and_simulator() as rig:
        return [
            await run_scenario(s, args, rig.bootstrap, rig.simulator_url) for s in args.scenarios
        ]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["burst", "steady", "backlog"])
    parser.add_argument("--tokens-per-second", type=float, default=4000)
    parser.add_argument("--window-seconds", type=float, default=2.0)
    parser.add_argument("--window-max-queries", type=int, default=256)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--idle-seconds", type=float, default=6.0)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--steady-rate", type=float, default=25.0)
    parser.add_argument("--steady-seconds", type=float, default=40.0)
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--backlog-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--min-tokens-per-query", type=int, default=None,
        help="CLEAR_MIN_TOKENS_PER_QUERY for the daemon (default: the daemon's own default)",
    )  # fmt: skip
    return parser.parse_args()


if __name__ == "__main__":
    rows = asyncio.run(main(parse()))
    print(json.dumps(rows, indent=2))
