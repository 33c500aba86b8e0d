"""Daemon throughput and overhead: the real `clearbudget run` process between a Tansu broker and
the recorded-rollout simulator, all on loopback.

Measures, side by side in one run: sustained queries/second end to end (produce → results read
back), CPU seconds per query of the daemon process alone (from /proc), peak RSS, and window
latency p50/p99 (from the daemon's own clear_window_seconds histogram).

Two modes: `priced-out` (budget so small that every query is abandoned before any backend call:
the daemon's own cost of intake, windowing, solving and publishing) and `full` (probe + dispatch
to the simulator for every funded query: the backend's HTTP cost is then in the loop).

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
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from daemon.embedded import free_loopback_port, start_embedded_broker, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
ROLLOUTS = ROOT.parent / "shared" / "data" / "rollouts.jsonl"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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


async def run_mode(
    mode: str, args: argparse.Namespace, bootstrap: str, sim_url: str, peers: dict[str, int]
) -> dict:
    run_id = f"{mode}-{int(time.time() * 1000)}"
    topics = [f"bench.{run_id}.{t}" for t in ("queries", "results", "dlq")]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(t, args.partitions, 1) for t in topics])
    await admin.close()
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
        "CLEAR_WINDOW_SECONDS": str(args.window_seconds),
        "CLEAR_WINDOW_MAX_QUERIES": str(args.window_max_queries),
        "CLEAR_ENDPOINT_CONCURRENCY": str(args.endpoint_concurrency),
        "CLEAR_HTTP_PORT": str(http_port),
        "CLEAR_LOG_LEVEL": "WARNING",
    }
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run"], env=env,
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
            for value in values:
                await producer.send(topics[0], value)
            await producer.flush()
            produced_s = time.perf_counter() - t0
            seen = 0
            while seen < args.queries:
                batch = await reader.getmany(timeout_ms=200, max_records=10000)
                seen += sum(len(v) for v in batch.values())
                if time.perf_counter() - t0 > args.timeout:
                    raise TimeoutError(f"{mode}: {seen}/{args.queries} results in time")
            elapsed = time.perf_counter() - t0
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in processes.items()}
            await producer.stop()
            await reader.stop()
            metrics = (await client.get("/metrics")).text
        return {
            "mode": mode,
            "queries": args.queries,
            "queries_per_second": args.queries / elapsed,
            "produce_seconds": produced_s,
            "daemon_cpu_ms_per_query": cpu["daemon"] / args.queries * 1e3,
            # Busy share of one core per process: near 100% marks the bottleneck (each process
            # runs one event loop), and 1 / (CPU per query) is what that process could sustain.
            "cpu_busy_percent": {name: 100 * c / elapsed for name, c in cpu.items()},
            "daemon_capacity_queries_per_second": args.queries / cpu["daemon"],
            "daemon_peak_rss_mib": peak_rss_mib(daemon.pid),
            "window_p50_s": histogram_quantile(metrics, "clear_window_seconds", 0.5),
            "window_p99_s": histogram_quantile(metrics, "clear_window_seconds", 0.99),
        }
    finally:
        daemon.terminate()
        daemon.wait(60)


async def main(args: argparse.Namespace) -> list[dict]:
    broker = start_embedded_broker()
    sim_port = free_loopback_port()
    simulator = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "simulate-backend", "--rollouts", str(ROLLOUTS),
         "--port", str(sim_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", sim_port, 60, simulator)
        sim_url = f"http://127.0.0.1:{sim_port}"
        peers = {"simulator": simulator.pid, "broker": broker.process.pid}
        return [await run_mode(m, args, broker.bootstrap, sim_url, peers) for m in args.modes]
    finally:
        simulator.terminate()
        simulator.wait(30)
        broker.stop()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--window-max-queries", type=int, default=1000)
    parser.add_argument("--window-seconds", type=float, default=2.0)
    parser.add_argument("--tokens-per-second", type=float, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--endpoint-concurrency", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--modes", nargs="+", default=["priced-out", "full"])
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    rows = asyncio.run(main(arguments))
    print(
        f"{'mode':<11} {'q/s':>7} {'cpu ms/q':>9} {'capacity':>9} {'rss MiB':>8} "
        f"{'win p50 s':>9} {'p99 s':>6}  busy % of one core (daemon/simulator/broker)"
    )
    for row in rows:
        busy = row["cpu_busy_percent"]
        print(
            f"{row['mode']:<11} {row['queries_per_second']:>7.0f} "
            f"{row['daemon_cpu_ms_per_query']:>9.3f} "
            f"{row['daemon_capacity_queries_per_second']:>9.0f} {row['daemon_peak_rss_mib']:>8.0f} "
            f"{row['window_p50_s']:>9.3g} {row['window_p99_s']:>6.3g}  "
            f"{busy['daemon']:.0f} / {busy['simulator']:.0f} / {busy['broker']:.0f}"
        )
    print(json.dumps(rows, indent=2))
