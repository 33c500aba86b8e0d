"""`clearbudget demo`: uniform and clear through the real daemon path on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from clearbudget.daemon.cli.errors import fail
from clearbudget.daemon.cli.inputs import (
    DEFAULT_ROLLOUTS,
    DEFAULT_TRACE,
    RolloutsOpt,
    SeedOpt,
    TraceOpt,
    check_speedup,
    load_inputs,
    make_config,
    print_table,
    quiet_logs,
    report_row,
)

DEMO_POLICIES = ("uniform", "clear")


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
    # Deferred (as in every command): `clearbudget --help` must not load the daemon.
    from clearbudget.daemon.replay.demo import run_demo
    from clearbudget.daemon.replay.embedded import BrokerStartError
    from clearbudget.daemon.settings import SettingsError

    check_speedup(speedup)
    pool, queries = load_inputs(trace, rollouts, limit, seed)
    quiet_logs()
    configs = [make_config(policy, budget_per_query, None, seed, 2.0, 256, 1, 256)
               for policy in DEMO_POLICIES]  # fmt: skip
    try:
        reports = run_demo(queries, pool, configs, speedup=speedup, on_progress=_progress)
    except BrokerStartError as exc:
        fail(f"cannot start the embedded broker: {exc}", code=1)
    except SettingsError as exc:
        fail(str(exc))
    rows = [report_row(r, c) for c, r in zip(configs, reports, strict=True)]
    print_table(rows)
    uniform, clear = rows
    if uniform["mean_accuracy"] > 0:
        typer.echo(
            f"clear / uniform accuracy: {clear['mean_accuracy'] / uniform['mean_accuracy']:.2f}x "
            f"at {clear['tokens_per_query']:.0f} vs {uniform['tokens_per_query']:.0f} tokens/query"
        )


def _progress(line: str) -> None:
    typer.echo(line, err=True)
