"""What the replay, sweep and demo commands share: option types, loading the trace and pool,
the replay config, the progress bar, the results table and quiet logs."""

from __future__ import annotations

import site
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clearbudget.daemon.cli.errors import fail

# Only what the option types need is imported here: `clearbudget --help` imports this module,
# so the replay rig, structlog and rich's widgets load inside the helpers that use them.
if TYPE_CHECKING:
    from clearbudget.daemon.replay.config import ReplayConfig, ReplayQuery
    from clearbudget.daemon.replay.report import ReplayReport
    from clearbudget.daemon.replay.rollouts import RolloutPool


def _data_dir() -> Path:
    """The recorded trace and pools (see data/README.md): the checkout's data/ folder, else
    where a wheel install put them (`<prefix>/share/clearbudget/data`, pip's data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "data"
    installed = [Path(base) / "share" / "clearbudget" / "data"
                 for base in (sys.prefix, site.USER_BASE or "")]  # fmt: skip
    for folder in (checkout, *installed):
        if (folder / "rollouts.jsonl").is_file():
            return folder
    return checkout  # missing: the commands then name the file they could not read


DATA_DIR = _data_dir()
DEFAULT_TRACE = DATA_DIR / "azure_llm_conv_2023.csv"
DEFAULT_ROLLOUTS = DATA_DIR / "rollouts.jsonl"

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
HintFieldOpt = Annotated[
    str | None,
    typer.Option(help="Rollout record field replayed as difficulty_hint, e.g. level (default: "
                      "no hint)."),
]  # fmt: skip

BudgetModeOpt = Annotated[
    str,
    typer.Option(help="max_tokens: a chain is cut at its allocation; thinking: its thinking "
                      "is ended there and it answers (the simulator's rule: "
                      "docs/utility-model.md)."),
]  # fmt: skip
FeedbackOpt = Annotated[
    bool,
    typer.Option("--feedback", help="Play the downstream grader: each answered query's recorded "
                                    "grade reaches the policy as graded feedback (in-process)."),
]  # fmt: skip
FeedbackDelayOpt = Annotated[
    float, typer.Option(help="--feedback: trace seconds from a query's answer to its grade.")
]


def quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def load_inputs(
    trace: Path, rollouts: Path, limit: int | None, seed: int, hint_field: str | None = None
) -> tuple[RolloutPool, list[ReplayQuery]]:
    """The pool and one query per arrival of the trace's first `limit` arrivals (prompts carry
    the records' problem texts; `hint_field`, if given, becomes their difficulty_hint)."""
    from clearbudget.daemon.replay.config import draw_queries, one_lap_error, read_extras
    from clearbudget.daemon.replay.files import InputFileError
    from clearbudget.daemon.replay.rollouts import load_rollouts
    from clearbudget.daemon.replay.traces import read_trace

    if limit is not None and limit < 1:
        fail(f"--limit must be >= 1, got {limit}")
    try:
        pool = load_rollouts(rollouts)
        extras = read_extras(rollouts, pool, hint_field)
        arrivals = list(read_trace(trace, limit=limit))
        lap_error = one_lap_error(pool, len(arrivals))
        if lap_error is not None:
            fail(f"--rollouts {lap_error}")
        queries = draw_queries(arrivals, pool, seed, extras)
    except InputFileError as exc:
        fail(str(exc))
    if not queries:
        fail(f"--trace {trace} holds no arrivals")
    return pool, queries


def make_config(policy: str, budget_per_query: float | None, tokens_per_second: float | None,
                seed: int, window_seconds: float, window_max_queries: int, probe_samples: int,
                probe_tokens: int, hint_field: str | None = None, feedback: bool = False,
                feedback_delay: float = 0.0, budget_mode: str = "max_tokens",
                ) -> ReplayConfig:  # fmt: skip
    """The replay config; a bad value fails naming the command-line option."""
    from clearbudget.daemon.replay.config import ReplayConfig
    from clearbudget.solver.fit import ProbePlan

    try:
        probe = ProbePlan(samples=probe_samples, tokens=probe_tokens)
    except ValueError as exc:
        fail(_with_options(str(exc), {"samples": "--probe-samples", "tokens": "--probe-tokens"}))
    try:
        return ReplayConfig(
            policy=policy,  # type: ignore[arg-type]  # validated by ReplayConfig
            budget_per_query=budget_per_query,
            tokens_per_second=tokens_per_second,
            seed=seed,
            window_seconds=window_seconds,
            window_max_queries=window_max_queries,
            probe=probe,
            hint_field=hint_field,
            feedback=feedback,
            feedback_delay=feedback_delay,
            budget_mode=budget_mode,  # type: ignore[arg-type]  # validated by ReplayConfig
        )
    except ValueError as exc:
        fields = ("policy", "budget_per_query", "tokens_per_second", "seed", "window_seconds",
                  "window_max_queries", "feedback_delay", "budget_mode")  # fmt: skip
        fail(_with_options(str(exc), {f: "--" + f.replace("_", "-") for f in fields}))


def _with_options(message: str, options: dict[str, str]) -> str:
    """`message` with the config's field names written as the options that set them (not
    inside the value quoted after "got")."""
    import re

    text, got, value = message.partition(", got ")
    for field, option in options.items():
        text = re.sub(rf"(?<![\w-]){field}\b", option, text)
    return text + got + value


def check_speedup(speedup: float) -> None:
    if not speedup > 0:
        fail(f"--speedup must be > 0, got {speedup:g}")


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient bar on stderr; the context yields `advance(n)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def run_replay(
    queries: Sequence[ReplayQuery], pool: RolloutPool, config: ReplayConfig
) -> ReplayReport:
    """In-process replay with a progress bar."""
    import asyncio

    from clearbudget.daemon.replay.inprocess import replay

    with progress_bar(f"replay {config.policy}", len(queries)) as advance:
        return asyncio.run(replay(queries, pool, config, on_window=advance))


def report_row(report: ReplayReport, config: ReplayConfig) -> dict[str, Any]:
    """A sweep or demo row: the budget asked for, then `report_dict`."""
    return {"budget_per_query": config.budget_per_query, **report_dict(report, config)}


def report_dict(report: ReplayReport, config: ReplayConfig) -> dict[str, Any]:
    """The report's keys, then what the replay ran with: `hint_field`, the record field
    replayed as difficulty_hint (null without hints); `feedback`, whether graded feedback
    reached the policy; `feedback_delay`, its delay in trace seconds (null without feedback);
    `budget_mode`, how allocations bounded the chains."""
    return {
        **report.to_dict(),
        "hint_field": config.hint_field,
        "feedback": config.feedback,
        "feedback_delay": config.feedback_delay if config.feedback else None,
        "budget_mode": config.budget_mode,
    }


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="accuracy vs tokens per query (all generated tokens, probes included)",
        caption="accuracy: queries answered correctly, over all queries; abandoned: priced out, "
        "or cut at its allocation (a uniform chain cut at its cap) without an answer",
    )
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
