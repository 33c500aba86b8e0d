"""In-process replay on the shared trace and rollouts: determinism, accounting, report contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from clearbudget.daemon.replay.config import ReplayConfig, draw_queries
from clearbudget.daemon.replay.inprocess import replay
from clearbudget.daemon.replay.rollouts import load_rollouts, uniform_cap_for_cost
from clearbudget.daemon.replay.traces import read_trace

REPORT_KEYS = [
    "policy", "queries", "answered", "abandoned", "failed", "mean_accuracy", "tokens_total",
    "tokens_probe", "tokens_per_query", "budget_tokens", "windows", "solve_ms_p50",
    "solve_ms_p99", "wall_seconds",
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(shared_data: Path):
    pool = load_rollouts(shared_data / "rollouts.jsonl")
    arrivals = list(read_trace(shared_data / "azure_llm_conv_2023.csv", limit=400))
    return pool, arrivals


def test_draws_are_seeded_and_even(inputs) -> None:
    pool, arrivals = inputs
    first = draw_queries(arrivals, pool, seed=3)
    assert [q.record for q in first] == [q.record for q in draw_queries(arrivals, pool, seed=3)]
    assert [q.record for q in first] != [q.record for q in draw_queries(arrivals, pool, seed=4)]
    counts = [sum(1 for q in first if q.record == i) for i in range(len(pool))]
    assert max(counts) - min(counts) <= 1  # 400 draws over 360 records: each once or twice


@pytest.mark.parametrize("policy", ["clear", "uniform", "oracle"])
async def test_replay_is_deterministic_and_counts_every_token(inputs, policy: str) -> None:
    pool, arrivals = inputs
    queries = draw_queries(arrivals, pool, seed=0)
    config = ReplayConfig(policy=policy, budget_per_query=800)
    first = (await replay(queries, pool, config)).to_dict()
    second = (await replay(queries, pool, config)).to_dict()
    assert list(first) == REPORT_KEYS  # the contract's keys, in its order
    volatile = {"wall_seconds", "solve_ms_p50", "solve_ms_p99"}
    assert {k: v for k, v in first.items() if k not in volatile} == {
        k: v for k, v in second.items() if k not in volatile
    }
    assert first["queries"] == 400
    assert first["answered"] + first["abandoned"] + first["failed"] == 400
    assert first["tokens_per_query"] == pytest.approx(first["tokens_total"] / 400)
    assert 0.0 < first["mean_accuracy"] < 1.0
    if policy == "clear":
        assert first["tokens_probe"] > 0
        # Budget by count: the windows may spend their earned tokens and no more.
        assert first["tokens_total"] <= first["budget_tokens"] + 1e-6
    else:
        assert first["tokens_probe"] == 0


async def test_uniform_replay_matches_the_pool_maths(inputs, shared_data: Path) -> None:
    """Cost-matched uniform: measured spend and accuracy agree with the closed-form curve."""
    pool, _ = inputs
    arrivals = read_trace(shared_data / "azure_llm_conv_2023.csv", limit=360 * 9)
    queries = draw_queries(arrivals, pool, seed=0)  # every record 9 times
    report = await replay(queries, pool, ReplayConfig(policy="uniform", budget_per_query=500))
    cap = uniform_cap_for_cost(pool, 500)
    assert cap > 500
    assert report.tokens_per_query == pytest.approx(500, rel=0.05)
    # Reference table of the shared data: cap 512 gives about 0.20 accuracy.
    assert report.mean_accuracy == pytest.approx(0.20, abs=0.03)


def test_config_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="policy"):
        ReplayConfig(policy="greedy", budget_per_query=100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        ReplayConfig(policy="clear")
    with pytest.raises(ValueError, match="budget_per_query"):
        ReplayConfig(policy="clear", budget_per_query=float("nan"))


@pytest.mark.parametrize("policy", ["clear", "uniform"])
async def test_thinking_mode_answers_chains_it_would_cut_within_the_same_budget(
    inputs, policy: str
) -> None:
    pool, arrivals = inputs
    queries = draw_queries(arrivals, pool, seed=0)
    reports = {
        mode: (await replay(queries, pool, ReplayConfig(
            policy=policy, budget_per_query=500, budget_mode=mode  # type: ignore[arg-type]
        ))).to_dict()
        for mode in ("max_tokens", "thinking")
    }  # fmt: skip
    cut, thinking = reports["max_tokens"], reports["thinking"]
    assert thinking["answered"] > cut["answered"]
    assert thinking["mean_accuracy"] >= cut["mean_accuracy"]
    if policy == "clear":  # every generated token is counted: the budget holds in both modes
        assert thinking["tokens_total"] <= thinking["budget_tokens"] + 1e-6
