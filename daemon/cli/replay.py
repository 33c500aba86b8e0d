"""`clearbudget replay`, `sweep` and `demo`: pick a budget on recorded traffic before deploying."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import structlog
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from daemon.replay.inprocess import POLICIES, ReplayConfig, ReplayQuery, draw_queries, replay
from daemon.replay.rollouts import RolloutError, RolloutPool, load_rollouts
from daemon.replay.traces import TraceError, read_trace
from solver.fit import ProbePlan

DEFAULT_TRACE = Path("../shared/data/azure_llm_conv_2023.csv")
DEFAULT_ROLLOUTS = Path("../shared/data/rollouts.jsonl")
DEFAULT_GRID = "250,500,750,1000,1500,2000"

TraceOpt = Annotated[
    Path, typer.Option(help="Arrivals: Azure CSV, Mooncake JSONL or QueryRequest JSONL.")
]
RolloutsOpt = Annotated[Path, typer.Option(help="Recorded rollouts pool (rollouts.jsonl).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for drawing pool records and chains.")]
LimitOpt = Annotated[int | None, typer.Option(help="Replay only the first N arrivals.")]
WindowSecondsOpt = Annotated[float, typer.Option(help="Window length (trace seconds).")]
WindowMaxOpt = Annotated[int, typer.Option(help="Close a window at this many queries.")]
ProbeTokensOpt = Annotated[int, typer.Option(help="Tokens per probe sample (clear only).")]
ProbeSamplesOpt = Annotated[int, typer.Option(help="Probe samples per query; 0 disables.")]

err_console = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def load_inputs(trace: Path, rollouts: Path, limit: int | None, seed: int) -> tuple[
    RolloutPool, list[ReplayQuery]
]:  # fmt: skip
    if limit is not None and limit < 1:
        _fail(f"--limit must be >= 1, got {limit}")
    try:
        pool = load_rollouts(rollouts)
        queries = draw_queries(read_trace(trace, limit=limit), pool, seed)
    except (RolloutError, TraceError) as exc:
        _fail(str(exc))
    if not queries:
        _fail(f"--trace {trace} holds no arrivals")
    return pool, queries


def make_config(policy: str, budget_per_query: float | None, tokens_per_second: float | None,
                seed: int, window_seconds: float, window_max_queries: int, probe_samples: int,
                probe_tokens: int) -> ReplayConfig:  # fmt: skip
    try:
        return ReplayConfig(
            policy=policy,  # type: ignore[arg-type]  # validated by ReplayConfig
            budget_per_query=budget_per_query,
            tokens_per_second=tokens_per_second,
            seed=seed,
            window_seconds=window_seconds,
            window_max_queries=window_max_queries,
            probe=ProbePlan(samples=probe_samples, tokens=probe_tokens),
        )
    except ValueError as exc:
        message = str(exc).replace("budget_per_query", "--budget-per-query")
        _fail(message.replace("tokens_per_second", "--tokens-per-second"))


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Any]:
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def run_replay(queries: Sequence[ReplayQuery], pool: RolloutPool, config: ReplayConfig) -> dict:
    label = f"replay {config.policy}"
    with progress_bar(label, len(queries)) as advance:
        return asyncio.run(replay(queries, pool, config, on_window=advance))


def replay_command(
    policy: Annotated[str, typer.Option(help="clear | uniform | oracle")] = "clear",
    budget_per_query: Annotated[
        float | None, typer.Option(help="Tokens per query, all generated tokens counted.")
    ] = None,
    tokens_per_second: Annotated[
        float | None, typer.Option(help="Global token rate (the daemon's budget).")
    ] = None,
    trace: TraceOpt = DEFAULT_TRACE,
    rollouts: RolloutsOpt = DEFAULT_ROLLOUTS,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    kafka: Annotated[
        bool, typer.Option(help="Produce into CLEAR_KAFKA_BOOTSTRAP and run the real daemon.")
    ] = False,
    speedup: Annotated[float, typer.Option(help="--kafka: replay this many times faster.")] = 1.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    window_seconds: WindowSecondsOpt = 2.0,
    window_max_queries: WindowMaxOpt = 256,
    probe_samples: ProbeSamplesOpt = 1,
    probe_tokens: ProbeTokensOpt = 256,
) -> None:
    """Replay recorded arrivals, each a query drawn from the rollout pool, under one policy.

    By default the real window pipeline runs in-process on a virtual clock with the
    recorded-rollout simulator as backend (an hour of trace in seconds). Every generated token
    counts, probes included. Prints the report as JSON (keys as in DESIGN.md).
    """
    config = make_config(policy, budget_per_query, tokens_per_second, seed, window_seconds,
                         window_max_queries, probe_samples, probe_tokens)  # fmt: skip
    pool, queries = load_inputs(trace, rollouts, limit, seed)
    _quiet_logs()
    if kafka:
        from daemon.replay.demo import replay_on_kafka_from_env

        report = replay_on_kafka_from_env(queries, pool, config, speedup=speedup)
    else:
        report = run_replay(queries, pool, config)
    text = json.dumps(report, indent=2)
    if json_out:
        json_out.write_text(text + "\n")
    typer.echo(text)


def sweep_command(
    out: Annotated[Path, typer.Option(help="Folder for pareto.json and pareto.png.")],
    budgets: Annotated[str, typer.Option(help="Tokens per query, comma-separated.")] = DEFAULT_GRID,
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = ",".join(POLICIES),
    trace: TraceOpt = DEFAULT_TRACE,
    rollouts: RolloutsOpt = DEFAULT_ROLLOUTS,
    seed: SeedOpt = 0,
    limit: LimitOpt = 4000,
    window_seconds: WindowSecondsOpt = 2.0,
    window_max_queries: WindowMaxOpt = 256,
    probe_samples: ProbeSamplesOpt = 1,
    probe_tokens: ProbeTokensOpt = 256,
) -> None:
    """Replay every policy over a grid of budgets; write pareto.json and a pareto.png plot of
    accuracy against tokens per query (the oracle is the ceiling)."""
    from daemon.replay.pareto import plot_pareto

    grid = _parse_grid(budgets)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    pool, queries = load_inputs(trace, rollouts, limit, seed)
    _quiet_logs()
    rows = []
    for name in names:
        for budget in grid:
            config = make_config(name, budget, None, seed, window_seconds, window_max_queries,
                                 probe_samples, probe_tokens)  # fmt: skip
            rows.append({"budget_per_query": budget, **run_replay(queries, pool, config)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_pareto(rows, out / "pareto.png", title=f"{len(queries)} queries from {trace.name}")
    print_table(rows)
    typer.echo(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}")


def _parse_grid(text: str) -> list[float]:
    try:
        grid = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(f"--budgets must be comma-separated numbers, got {text!r}")
    if not grid or any(not b > 0 for b in grid):
        _fail(f"--budgets must be positive numbers, got {text!r}")
    return grid


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    table = Table(title="accuracy vs tokens per query (all generated tokens, probes included)")
    for column in ("policy", "budget/q", "tokens/q", "probe/q", "accuracy", "answered",
                   "abandoned", "failed"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        n = max(row["queries"], 1)
        table.add_row(
            row["policy"], f"{row.get('budget_per_query', 0):.0f}",
            f"{row['tokens_per_query']:.0f}", f"{row['tokens_probe'] / n:.0f}",
            f"{row['mean_accuracy']:.3f}", str(row["answered"]), str(row["abandoned"]),
            str(row["failed"]),
        )  # fmt: skip
    Console(width=max(Console().width, 100)).print(table)


def demo_command(
    limit: Annotated[int, typer.Option(help="Arrivals of the trace to replay.")] = 1200,
    budget_per_query: Annotated[float, typer.Option(help="Tokens per query.")] = 500.0,
    speedup: Annotated[float, typer.Option(help="Replay this many times faster.")] = 10.0,
    trace: TraceOpt = DEFAULT_TRACE,
    rollouts: RolloutsOpt = DEFAULT_ROLLOUTS,
    seed: SeedOpt = 0,
) -> None:
    """One-command demo: an embedded Kafka broker (Tansu) and the recorded-rollout simulator as
    the vLLM pod; a slice of the recorded Azure trace goes through the real daemon path (Kafka →
    windows → probe → fit → solve → HTTP dispatch → results topic) for uniform and clear."""
    from daemon.replay.demo import run_demo

    pool, queries = load_inputs(trace, rollouts, limit, seed)
    _quiet_logs()
    configs = [
        make_config(policy, budget_per_query, None, seed, 2.0, 256, 1, 256)
        for policy in ("uniform", "clear")
    ]
    rows = run_demo(queries, pool, configs, speedup=speedup)
    print_table(rows)
    uniform, clear = rows
    if uniform["mean_accuracy"] > 0:
        typer.echo(
            f"clear / uniform accuracy: {clear['mean_accuracy'] / uniform['mean_accuracy']:.2f}x "
            f"at {clear['tokens_per_query']:.0f} vs {uniform['tokens_per_query']:.0f} tokens/query"
        )
