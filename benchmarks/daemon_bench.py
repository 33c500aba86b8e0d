"""Daemon throughput and overhead: the real `clearbudget run` process between a Tansu broker and
the recorded-rollout simulator, all on loopback.

Measures, side by side in one run: queries/second end to end (produce → results read back),
per-query latency produce → result (p50/p99), CPU seconds per query of the daemon process (from
/proc) and what one core could sustain at that cost, peak RSS, window latency p50/p99 (the
daemon's own clear_window_seconds histogram), and how busy each process was (share of one core).

Two modes: `priced-out` (budget so small that every query is abandoned before any backend call:
the daemon's own cost of intake, windowing, solving and publishing) and `full` (probe + dispatch
to the simulator for every funded query: the backend's HTTP cost is then in the loop). Each runs
once per offered rate: 0 sends as fast as the producer can (the daemon's ceiling), a number paces
the producer at that many queries/second (does the daemon keep up, and how busy is it).
With `--pod-decode-rate` the simulator takes the time a GPU pod would (sequence slots, tokens/s
per sequence), so the backend, not the daemon, sets the pace.

    python benchmarks/daemon_bench.py --queries 20000 --window-max-queries 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rig import broker_and_simulator, create_topics, peak_rss_mib

from clearbudget.daemon.replay.embedded import free_loopback_port, wait_for_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def sustained_rate(arrivals: list[float]) -> float:
    """Results per second between the 10th and the 90th percentile arrival: the steady rate,
    without the start-up (first window filling) and the tail (last windows draining)."""
    first, last = np.percentile(arrivals, [10, 90])
    return 0.8 * len(arrivals) / max(last - first, 1e-9)


def counter_total(metrics: str, name: str) -> float:
    """Sum of a counter over all its label sets, from a Prometheus text page."""
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))


def histogram_quantile(metrics: str, name: str, q: float) -> float:
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


async def produce(
    producer: AIOKafkaProducer, topic: str, values: list[bytes], rate: float, sent_at: list[float]
) -> None:
    """Send every value at `rate` per second (0: as fast as possible), noting each send time."""
    start = time.perf_counter()
    for i, value in enumerate(values):
        if rate and i % 50 == 0:  # pace in small bursts: one sleep per 50 sends
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        sent_at[i] = time.perf_counter()
        await producer.send(topic, value)
    await producer.flush()


async def run_mode(
    mode: str,
    rate: float,
    args: argparse.Namespace,
    bootstrap: str,
    sim_url: str,
    peers: dict[str, int],
) -> dict:
    run_id = f"{mode}-{int(time.time() * 1000)}"
    topics = [f"bench.{run_id}.{t}" for t in ("queries", "results", "dlq")]
    await create_topics(bootstrap, topics, args.partitions)
    http_port = free_loopback_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLEAR_")},
        "CLEAR_KAFKA_BOOTSTRAP": bootstrap,
        "CLEAR_INPUT_TOPIC": topics[0],
        "CLEAR_RESULT_TOPIC": topics[1],
        "CLEAR_DLQ_TOPIC": topics[2],
        "CLEAR_CONSUMER_GROUP": run_id,
        "CLEAR_VLLM_ENDPOINTS": sim_url,
        "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
        "CLEAR_TOKENS_PER_SECOND": "1" if mode == "priced-out" else str(args.tokens_per_second),
        # Priced out means abandoned at once: no backlog pacing (it would hold them for budget).
        "CLEAR_MIN_TOKENS_PER_QUERY": "0" if mode == "priced-out" else "",
        "CLEAR_WINDOW_SECONDS": str(args.window_seconds),
        "CLEAR_WINDOW_MAX_QUERIES": str(args.window_max_queries),
        "CLEAR_ENDPOINT_CONCURRENCY": str(args.endpoint_concurrency),
        "CLEAR_HTTP_PORT": str(http_port),
        "CLEAR_LOG_LEVEL": "WARNING",
    }
    daemon = subprocess.Popen(
        [sys.executable, "-m", "clearbudget.daemon.cli", "run"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", http_port, 60, daemon)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
            while (await client.get("/metrics")).text.find("clear_budget_share 0.0") >= 0:
                await asyncio.sleep(0.1)  # wait for the partition assignment
            values = [
                json.dumps({"id": f"{run_id}-{i}", "prompt": f"problem: bench {i}"}).encode()
                for i in range(args.queries)
            ]
            reader = AIOKafkaConsumer(
                topics[1], bootstrap_servers=bootstrap, auto_offset_reset="earliest"
            )
            await reader.start()
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)
            await producer.start()
            processes = {"daemon": daemon.pid, **peers}
            cpu0 = {name: cpu_seconds(pid) for name, pid in processes.items()}
            t0 = time.perf_counter()
            sent_at = [0.0] * args.queries
            sending = asyncio.create_task(produce(producer, topics[0], values, rate, sent_at))
            latencies: list[float] = []  # produce → result read back, per query
            arrivals: list[float] = []
            prefix = len(run_id) + 1
            while len(latencies) < args.queries:
                batch = await reader.getmany(timeout_ms=200, max_records=10000)
                now = time.perf_counter()
                for records in batch.values():
                    latencies += [now - sent_at[int(r.key[prefix:])] for r in records]
                    arrivals += [now] * len(records)
                if now - t0 > args.timeout:
                    raise TimeoutError(f"{mode}: {len(latencies)}/{args.queries} results in time")
            await sending
            produced_s = sent_at[-1] - t0
            elapsed = time.perf_counter() - t0
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in processes.items()}
            await producer.stop()
            await reader.stop()
            metrics = (await client.get("/metrics")).text
        return {
            "mode": mode,
            "offered_rate": rate or None,
            "queries": args.queries,
            "queries_per_second": args.queries / elapsed,
            "sustained_queries_per_second": sustained_rate(arrivals),
            "produce_seconds": produced_s,
            "daemon_cpu_ms_per_query": cpu["daemon"] / args.queries * 1e3,
            # Busy share of one core per process: near 100% marks the bottleneck (each process
            # runs one event loop), and 1 / (CPU per query) is what that process could sustain.
            "cpu_busy_percent": {name: 100 * c / elapsed for name, c in cpu.items()},
            "daemon_capacity_queries_per_second": args.queries / cpu["daemon"],
            "daemon_peak_rss_mib": peak_rss_mib(daemon.pid),
            "backend_requests_per_query": counter_total(metrics, "clear_backend_requests_total")
            / args.queries,
            "generated_tokens_per_query": counter_total(metrics, "clear_tokens_total")
            / args.queries,
            "latency_p50_s": float(np.percentile(latencies, 50)),
            "latency_p99_s": float(np.percentile(latencies, 99)),
            "window_p50_s": histogram_quantile(metrics, "clear_window_seconds", 0.5),
            "window_p99_s": histogram_quantile(metrics, "clear_window_seconds", 0.99),
        }
    finally:
        daemon.terminate()
        daemon.wait(60)


async def main(args: argparse.Namespace) -> list[dict]:
    pod = ["--decode-rate", str(args.pod_decode_rate), "--max-num-seqs", str(args.pod_max_num_seqs)]
    async with broker_and_simulator(pod) as rig:
        return [
            await run_mode(mode, rate, args, rig.bootstrap, rig.simulator_url, rig.pids)
            for rate in args.rates
            for mode in args.modes
        ]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--window-max-queries", type=int, default=1000)
    parser.add_argument("--window-seconds", type=float, default=2.0)
    parser.add_argument("--tokens-per-second", type=float, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--endpoint-concurrency", type=int, default=256)
    parser.add_argument(
        "--pod-decode-rate",
        type=float,
        default=0,
        help="emulate a GPU pod: tokens/s per sequence (0: the simulator answers at once)",
    )
    parser.add_argument(
        "--pod-max-num-seqs", type=int, default=256, help="emulated pod: sequences at once"
    )
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--modes", nargs="+", default=["priced-out", "full"])
    parser.add_argument(
        "--rates",
        nargs="+",
        type=float,
        default=[0, 2000],
        help="offered queries/second per run (0: as fast as the producer can send)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    rows = asyncio.run(main(arguments))
    print(
        f"{'mode':<11} {'offered':>7} {'q/s':>7} {'steady':>7} {'e2e p50/p99 s':>13} "
        f"{'cpu ms/q':>9} {'capacity':>9} {'req/q':>5} {'tok/q':>5} {'rss MiB':>8} "
        f"{'win p50 s':>9} {'p99 s':>6}  "
        "busy % of one core (daemon/simulator/broker)"
    )
    for row in rows:
        busy = row["cpu_busy_percent"]
        offered = f"{row['offered_rate']:.0f}" if row["offered_rate"] else "max"
        latency = f"{row['latency_p50_s']:.2f}/{row['latency_p99_s']:.2f}"
        print(
            f"{row['mode']:<11} {offered:>7} {row['queries_per_second']:>7.0f} "
            f"{row['sustained_queries_per_second']:>7.0f} {latency:>13} "
            f"{row['daemon_cpu_ms_per_query']:>9.3f} "
            f"{row['daemon_capacity_queries_per_second']:>9.0f} "
            f"{row['backend_requests_per_query']:>5.2f} {row['generated_tokens_per_query']:>5.0f} "
            f"{row['daemon_peak_rss_mib']:>8.0f} "
            f"{row['window_p50_s']:>9.3g} {row['window_p99_s']:>6.3g}  "
            f"{busy['daemon']:.0f} / {busy['simulator']:.0f} / {busy['broker']:.0f}"
        )
    print(json.dumps(rows, indent=2))
