"""benchmarks/ceilings.py: one cap per group, in-sample. One group per record is the per-record
oracle; one group for the whole pool is no better than uniform's best hull point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clearbudget.daemon.replay.rollouts import load_rollouts, oracle_allocation, uniform_at_cost

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from ceilings import by_problem, by_tag, group_cap_ceiling


@pytest.mark.parametrize("tokens_per_query", [300.0, 1000.0])
def test_ceilings_sit_between_uniform_and_the_oracle(
    shared_data: Path, tokens_per_query: float
) -> None:
    pool = load_rollouts(shared_data / "rollouts.jsonl")
    oracle = oracle_allocation(pool, tokens_per_query).accuracy
    assert group_cap_ceiling(pool, tokens_per_query, lambda i, _: i) == pytest.approx(oracle)
    one_cap = group_cap_ceiling(pool, tokens_per_query, lambda *_: 0)
    assert one_cap >= uniform_at_cost(pool, tokens_per_query).accuracy - 1e-9
    per_tag = group_cap_ceiling(pool, tokens_per_query, by_tag)
    per_problem = group_cap_ceiling(pool, tokens_per_query, by_problem)
    assert one_cap <= per_tag <= per_problem <= oracle + 1e-9
    assert one_cap < per_problem  # knowing the problem is worth something on this pool
