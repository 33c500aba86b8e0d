"""`clearbudget replay`: one policy on recorded traffic, in-process or through the real daemon."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
    check_speedup,
    load_inputs,
    make_config,
    quiet_logs,
    report_dict,
    run_replay,
)

DEFAULT_BUDGET_PER_QUERY = 500.0

if TYPE_CHECKING:
    from clearbudget.daemon.replay.config import ReplayConfig, ReplayQuery
    from clearbudget.daemon.replay.report import ReplayReport
    from clearbudget.daemon.replay.rollouts import RolloutPool


def replay_command(
    policy: Annotated[str, typer.Option(help="clear | uniform | oracle")] = "clear",
    budget_per_query: Annotated[
        float | None,
        typer.Option(help="Tokens per query, all generated tokens counted (default: 500, "
                          "unless --tokens-per-second is given)."),
    ] = None,
    tokens_per_second: Annotated[
        float | None,
        typer.Option(help="Global token rate (the daemon's budget), instead of "
                          "--budget-per-query."),
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
    hint_field: HintFieldOpt = None,
    feedback: FeedbackOpt = False,
    feedback_delay: FeedbackDelayOpt = 0.0,
    budget_mode: BudgetModeOpt = "max_tokens",
) -> None:
    """Replay recorded arrivals, each a query drawn from the rollout pool, under one policy.

    By default the real window pipeline runs in-process on a virtual clock with the
    recorded-rollout simulator as backend (an hour of trace in seconds). Every generated token
    counts, probes included. Prints the report as JSON (its keys: docs/contracts.md, "Replay
    report"). A pool holding one chain per record replays at most one lap. `--feedback`
    grades every answered query from the recorded `correct` and hands the grade to the
    policy `--feedback-delay` trace seconds after its answer. `--budget-mode thinking` ends a
    chain's thinking at its allocation instead of cutting it (vLLM's thinking_token_budget;
    the simulator's rule is in docs/utility-model.md).
    """
    if budget_per_query is None and tokens_per_second is None:
        budget_per_query = DEFAULT_BUDGET_PER_QUERY
    check_speedup(speedup)
    config = make_config(policy, budget_per_query, tokens_per_second, seed, window_seconds,
                         window_max_queries, probe_samples, probe_tokens, hint_field, feedback,
                         feedback_delay, budget_mode)  # fmt: skip
    if kafka and feedback:
        fail("--feedback runs in-process only; leave out --kafka (or publish Feedback "
             "messages to CLEAR_FEEDBACK_TOPIC yourself)")  # fmt: skip
    pool, queries = load_inputs(trace, rollouts, limit, seed, hint_field)
    quiet_logs()
    if kafka:
        report = replay_on_kafka_from_env(queries, pool, config, speedup=speedup)
    else:
        report = run_replay(queries, pool, config)
    text = json.dumps(report_dict(report, config), indent=2)
    if json_out:
        json_out.write_text(text + "\n")
    typer.echo(text)


def replay_on_kafka_from_env(
    queries: Sequence[ReplayQuery], pool: RolloutPool, config: ReplayConfig, *, speedup: float
) -> ReplayReport:
    """`replay --kafka`: the broker and topics come from CLEAR_* settings."""
    import asyncio

    from clearbudget.daemon.replay.demo import replay_with_simulator  # deferred: pulls in aiokafka
    from clearbudget.daemon.settings import SettingsError, load_settings

    try:
        base = load_settings()
    except SettingsError as exc:
        fail(str(exc))
    return asyncio.run(replay_with_simulator(queries, pool, config, base, speedup=speedup))
