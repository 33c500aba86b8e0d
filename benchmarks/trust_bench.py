"""Can the budget be trusted? The real `clearbudget run` process between a Tansu broker and the
recorded-rollout simulator (all on loopback), under three traffic shapes:

- `burst`: the daemon idles, then a burst of queries arrives at once (windows of 100 queries);
- `steady`: a steady stream at a fixed rate;
- `backlog`: a large batch queued before the daemon starts; measured for a fixed time;
- `rolling`: two replicas share a steady stream and each is restarted in turn (SIGTERM, then a
  fresh process), as a rolling update does: nothing may be lost and no id may get two
  different statuses;
- `outage`: a steady stream whose only vLLM pod (a simulator of its own) is down for
  `--outage-seconds` mid-stream, then back on the same port: nothing may fail or be lost, and
  the pause must show in /readyz and the outage gauge.

For each it reports the tokens generated (every result's `tokens_used`, probes included) against
what the budget allowed over the span (rate × span + one carry cap), the spend rate, the
statuses, how many queries were abandoned on windows that could not pay one probe each, and the
daemon's peak RSS. The spend ratio must stay ≤ 1.01; in a backlog the spend rate should sit at
the configured rate.

    python benchmarks/trust_bench.py --scenarios burst steady backlog rolling outage
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rig import ROLLOUTS, broker_and_simulator, create_topics, peak_rss_mib

from clearbudget.daemon.replay.embedded import free_loopback_port, wait_for_port
from clearbudget.daemon.replay.rollouts import load_rollouts
from clearbudget.daemon.replay.simulator import prompt_for
from clearbudget.schemas.messages import QueryResult


def query_values(run_id: str, count: int, seed: int) -> list[bytes]:
    pool = load_rollouts(ROLLOUTS)
    picks = np.random.default_rng(seed).integers(len(pool), size=count)
    return [
        json.dumps({"id": f"{run_id}-{i}", "prompt": prompt_for(pool.records[int(r)])}).encode()
        for i, r in enumerate(picks)
    ]


def start_daemon(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "clearbudget.daemon.cli", "run"], env=env,
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
    bootstrap: str, topic: str, want: int, until: float, *, unique: bool = False
) -> list[tuple[float, QueryResult]]:
    """Results read from the start until `want` of them (`unique`: of distinct ids) or `until`."""
    reader = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await reader.start()
    seen: list[tuple[float, QueryResult]] = []
    try:
        while time.perf_counter() < until:
            if (len({r.id for _, r in seen}) if unique else len(seen)) >= want:
                break
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


def daemon_env(
    args: argparse.Namespace, bootstrap: str, sim_url: str, run_id: str, topics: list[str],
    port: int, window_queries: int,
) -> dict[str, str]:  # fmt: skip
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
    return env


async def run_scenario(name: str, args: argparse.Namespace, bootstrap: str, sim_url: str) -> dict:
    run_id = f"{name}-{int(time.time() * 1000)}"
    topics = [f"trust.{run_id}.{t}" for t in ("queries", "results", "dlq")]
    if name == "rolling":
        return await run_rolling(args, bootstrap, sim_url, run_id, topics)
    if name == "outage":
        return await run_outage(args, bootstrap, run_id, topics)
    await create_topics(bootstrap, topics, args.partitions)
    port = free_loopback_port()
    window_queries = {"burst": 100}.get(name, args.window_max_queries)
    env = daemon_env(args, bootstrap, sim_url, run_id, topics, port, window_queries)
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


async def run_rolling(
    args: argparse.Namespace, bootstrap: str, sim_url: str, run_id: str, topics: list[str]
) -> dict:
    """Two replicas on a steady stream; each restarted once, a third of the way apart."""
    await create_topics(bootstrap, topics, max(args.partitions, 4))
    count = int(args.steady_rate * args.steady_seconds)
    values = query_values(run_id, count, seed=7)
    ports = [free_loopback_port(), free_loopback_port()]
    envs = [
        daemon_env(args, bootstrap, sim_url, run_id, topics, port, args.window_max_queries)
        for port in ports
    ]
    replicas = [start_daemon(env, port) for env, port in zip(envs, ports, strict=True)]
    restarts: list[float] = []
    try:
        await asyncio.sleep(args.idle_seconds)  # both replicas joined the group
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        producing = loop.create_task(produce(bootstrap, topics[0], values, rate=args.steady_rate))
        collecting = loop.create_task(
            collect(
                bootstrap,
                topics[1],
                count,
                started + args.steady_seconds + args.timeout,
                unique=True,
            )
        )
        for i in range(2):
            await asyncio.sleep(args.steady_seconds / 3)
            replicas[i].terminate()  # SIGTERM: drain, publish, commit, leave the group
            replicas[i].wait(60)
            restarts.append(round(time.perf_counter() - started, 1))
            replicas[i] = start_daemon(envs[i], ports[i])
        await producing
        await collecting
        await asyncio.sleep(5)  # late duplicates, if any, arrive now
        # Everything on the results topic, read afresh (the first reader stops at `count`).
        results = await collect(bootstrap, topics[1], 10**9, time.perf_counter() + 10)
    finally:
        for replica in replicas:
            replica.terminate()
            replica.wait(60)
    statuses: dict[str, set[str]] = {}
    copies = Counter(r.id for _, r in results)
    for _, r in results:
        statuses.setdefault(r.id, set()).add(r.status.value)
    return {
        "scenario": "rolling",
        "queries": count,
        "restarts_at_s": restarts,
        "results": len(results),
        "lost": count - len(statuses),
        "duplicated_ids": sum(1 for n in copies.values() if n > 1),
        "ids_with_two_statuses": sum(1 for s in statuses.values() if len(s) > 1),
        "statuses": dict(Counter(r.status.value for _, r in results)),
    }


def start_pod(port: int) -> subprocess.Popen[bytes]:
    pod = subprocess.Popen(
        [sys.executable, "-m", "clearbudget.daemon.cli", "simulate-backend",
         "--rollouts", str(ROLLOUTS), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port("127.0.0.1", port, 60, pod)
    return pod


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def run_outage(
    args: argparse.Namespace, bootstrap: str, run_id: str, topics: list[str]
) -> dict:
    """The only pod down for `outage_seconds`, a third of the way into a steady stream."""
    await create_topics(bootstrap, topics, args.partitions)
    pod_port, port = free_loopback_port(), free_loopback_port()
    pod = start_pod(pod_port)
    env = daemon_env(
        args, bootstrap, f"http://127.0.0.1:{pod_port}", run_id, topics, port,
        args.window_max_queries,
    )  # fmt: skip
    daemon = start_daemon(env, port)
    count = int(args.steady_rate * args.steady_seconds)
    values = query_values(run_id, count, seed=11)
    seen: dict[str, object] = {}
    try:
        await asyncio.sleep(args.idle_seconds)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        producing = loop.create_task(produce(bootstrap, topics[0], values, rate=args.steady_rate))
        await asyncio.sleep(args.steady_seconds / 3)
        pod.kill()
        pod.wait(10)
        down_at = time.perf_counter()
        while time.perf_counter() - down_at < args.outage_seconds:
            await asyncio.sleep(1.0)
            ready, body = http_get(port, "/readyz")
            if ready != 200 and "readyz_not_ready_after_s" not in seen:
                seen["readyz_not_ready_after_s"] = round(time.perf_counter() - down_at, 1)
                seen["readyz_reason"] = body[:120]
            _, metrics = http_get(port, "/metrics")
            if "clear_backend_outage 1.0" in metrics and "outage_gauge_after_s" not in seen:
                seen["outage_gauge_after_s"] = round(time.perf_counter() - down_at, 1)
        pod = start_pod(pod_port)
        await producing
        results = await collect(
            bootstrap, topics[1], count, started + args.steady_seconds + args.timeout,
            unique=True,
        )  # fmt: skip
        ready_after, _ = http_get(port, "/readyz")
    finally:
        daemon.terminate()
        daemon.wait(60)
        pod.terminate()
        pod.wait(30)
    statuses = Counter(r.status.value for _, r in results)
    return {
        "scenario": "outage",
        "queries": count,
        "outage_s": args.outage_seconds,
        "results": len(results),
        "lost": count - len({r.id for _, r in results}),
        "statuses": dict(statuses),
        **seen,
        "readyz_after": ready_after,
    }


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
    parser.add_argument("--scenarios", nargs="+", default=["burst", "steady", "backlog", "rolling"])
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
    parser.add_argument("--outage-seconds", type=float, default=20.0)
    parser.add_argument(
        "--min-tokens-per-query", type=int, default=None,
        help="CLEAR_MIN_TOKENS_PER_QUERY for the daemon (default: the daemon's own default)",
    )  # fmt: skip
    return parser.parse_args()


if __name__ == "__main__":
    rows = asyncio.run(main(parse()))
    print(json.dumps(rows, indent=2))
