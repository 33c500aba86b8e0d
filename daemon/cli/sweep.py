"""`clearbudget sweep`: every policy over a grid of budgets, written as a Pareto table and plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clearbudget.daemon.cli.errors import fail
from clearbudget.daemon.cli.inputs import (
    DEFAULT_ROLLOUTS,
    DEFAULT_TRACE,
    BudgetModeOpt,
    FeedbackDelayOpt,
    FeedbackOpt,
    HintFieldOpt,
    LimitOpt,
    ProbeSamplesOpt,
    ProbeTokensOpt,
    RolloutsOpt,
    SeedOpt,
    TraceOpt,
    WindowMaxOpt,
    WindowSecondsOpt,
    load_inputs,
    make_config,
    print_table,
    quiet_logs,
    report_row,
    run_replay,
)

DEFAULT_GRID = "250,500,750,1000,1500,2000"
# ",".join(daemon.replay.config.POLICIES), spelt out so `--help` need not import the replay rig
# (tests/cli/test_startup.py keeps the two equal).
DEFAULT_POLICIES = "clear,uniform,oracle"


def sweep_command(
    out: Annotated[Path, typer.Option(help="Folder for pareto.json and pareto.png.")],
    budgets: Annotated[str, typer.Option(help="Tokens per query, comma-separated.")] = DEFAULT_GRID,
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = DEFAULT_POLICIES,
    trace: TraceOpt = DEFAULT_TRACE,
    rollouts: RolloutsOpt = DEFAULT_ROLLOUTS,
    seed: SeedOpt = 0,
    limit: LimitOpt = 4000,
    window_seconds: WindowSecondsOpt = 2.0,
    window_max_queries: WindowMaxOpt = 256,
    probe_samples: ProbeSamplesOpt = 1,
    probe_tokens: ProbeTokensOpt = 256,
    hint_field: HintFieldOpt = None,
    feedback: FeedbackOpt = False,
    feedback_delay: FeedbackDelayOpt = 0.0,
    budget_mode: BudgetModeOpt = "max_tokens",
) -> None:
    """Replay every policy over a grid of budgets; write pareto.json and a pareto.png plot of
    accuracy against tokens per query (the oracle is the ceiling). `--feedback`: graded
    feedback from the recorded grades (only clear learns from it)."""
    from clearbudget.daemon.replay.pareto import (
        plot_pareto,  # deferred: matplotlib is slow to import
    )

    grid = parse_grid(budgets)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    pool, queries = load_inputs(trace, rollouts, limit, seed, hint_field)
    quiet_logs()
    rows = []
    for name in names:
        for budget in grid:
            config = make_config(name, budget, None, seed, window_seconds, window_max_queries,
                                 probe_samples, probe_tokens, hint_field, feedback,
                                 feedback_delay, budget_mode)  # fmt: skip
            rows.append(report_row(run_replay(queries, pool, config), config))
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_pareto(rows, out / "pareto.png", title=f"{len(queries)} queries from {trace.name}")
    print_table(rows)
    typer.echo(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}")


def parse_grid(text: str) -> list[float]:
    """`--budgets`: comma-separated positive numbers."""
    try:
        grid = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"--budgets must be comma-separated numbers, got {text!r}")
    if not grid or any(not b > 0 for b in grid):
        fail(f"--budgets must be positive numbers, got {text!r}")
    return grid
