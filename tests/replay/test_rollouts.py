"""Rollout pool loading and the uniform / oracle policy maths."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearbudget.daemon.replay.files import InputFileError
from clearbudget.daemon.replay.rollouts import (
    RolloutPool,
    RolloutRecord,
    RolloutSample,
    draw_counts,
    expected_accuracy,
    expected_cost,
    load_rollouts,
    oracle_allocation,
    uniform_at_cost,
    uniform_cap_for_cost,
    uniform_curve,
    uniform_point,
)


def make_record(problem: str, samples: list[tuple[int, bool]], model: str = "m") -> RolloutRecord:
    return RolloutRecord(
        model=model,
        benchmark="toy",
        problem_id=problem,
        prompt_tokens=10,
        gold="1",
        samples=tuple(RolloutSample(t, c, "1" if c else "2") for t, c in samples),
    )


@pytest.fixture
def tiny_pool() -> RolloutPool:
    # Hand-checkable: q1 is easy and short, q2 needs long chains, q3 is never right.
    return RolloutPool(
        [
            make_record("q1", [(100, True), (200, True), (300, False), (400, True)]),
            make_record("q2", [(1000, True), (2000, True), (3000, True), (4000, False)]),
            make_record("q3", [(50, False), (60, False), (70, False), (80, False)]),
        ]
    )


@pytest.fixture(scope="module")
def shared_pool(shared_data: Path) -> RolloutPool:
    return load_rollouts(shared_data / "rollouts.jsonl")


# ------------------------------------------------------------------ loading


def test_loads_the_shared_pool(shared_pool: RolloutPool) -> None:
    assert len(shared_pool) == 360
    assert shared_pool.tokens.shape == (360, 8)
    record = shared_pool.get("DS-R1-7B-TLDR/amc23-8")
    assert record is not None
    assert record.samples[0] == RolloutSample(4326, True, "3")
    assert shared_pool.tokens[shared_pool.index_of(record.key), 0] == 4326
    assert len(shared_pool.indices_for_problem("amc23-8")) == 6  # six models answered it


GOOD = {
    "model": "M",
    "benchmark": "b",
    "problem_id": "p-1",
    "prompt_tokens": 5,
    "gold": "1",
    "samples": [{"tokens": 3, "correct": True, "answer": "1"}],
}


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def variant(**changes: object) -> str:
    return json.dumps({**GOOD, **changes})


@pytest.mark.parametrize(
    ("bad_line", "field"),
    [
        ("{not json", None),
        ("[1, 2]", None),
        (variant(model=None), "model"),
        (variant(problem_id="a b"), "problem_id"),
        (variant(problem_id="a/b"), "problem_id"),
        (variant(prompt_tokens=-1), "prompt_tokens"),
        (variant(prompt_tokens=True), "prompt_tokens"),
        (variant(gold=3), "gold"),
        (variant(samples=[]), "samples"),
        (variant(samples=[{"tokens": "9", "correct": True, "answer": None}]), "samples[0].tokens"),
        (variant(samples=[{"tokens": 9, "correct": 1, "answer": None}]), "samples[0].correct"),
        (variant(samples=[{"tokens": 9, "correct": True, "answer": 3}]), "samples[0].answer"),
        (variant(problem_id="p-1"), "problem_id"),  # duplicate of line 1
    ],
)
def test_malformed_line_names_line_and_field(
    tmp_path: Path, bad_line: str, field: str | None
) -> None:
    path = write_lines(tmp_path, [json.dumps(GOOD), "", bad_line])
    with pytest.raises(InputFileError) as info:
        load_rollouts(path)
    assert info.value.line == 3
    assert info.value.field == field
    assert f"{path}: line 3" in str(info.value)


def test_ragged_sample_counts_are_rejected(tmp_path: Path) -> None:
    two = [{"tokens": 1, "correct": True, "answer": "1"}] * 2
    path = write_lines(tmp_path, [json.dumps(GOOD), variant(problem_id="p-2", samples=two)])
    with pytest.raises(InputFileError, match="same number") as info:
        load_rollouts(path)
    assert (info.value.line, info.value.field) == (2, "samples")


def test_in_memory_pool_rejects_ragged_records() -> None:
    with pytest.raises(InputFileError, match="m/b"):
        RolloutPool([make_record("a", [(1, True)] * 2), make_record("b", [(1, True)])])


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="not found"):
        load_rollouts(tmp_path / "absent.jsonl")


# ------------------------------------------------------------------ uniform


def test_per_record_expectations_by_hand(tiny_pool: RolloutPool) -> None:
    acc = expected_accuracy(tiny_pool.tokens, tiny_pool.correct, 250)
    cost = expected_cost(tiny_pool.tokens, 250)
    np.testing.assert_allclose(acc, [2 / 4, 0, 0])
    np.testing.assert_allclose(cost, [(100 + 200 + 250 + 250) / 4, 250, (50 + 60 + 70 + 80) / 4])
    # Per-record caps broadcast too: a chain exactly at its cap finishes.
    np.testing.assert_allclose(
        expected_accuracy(tiny_pool.tokens, tiny_pool.correct, [400, 3000, 0]), [3 / 4, 3 / 4, 0]
    )


def test_uniform_point_and_curve_agree(tiny_pool: RolloutPool) -> None:
    point = uniform_point(tiny_pool, 1000)
    assert point.tokens_per_query == pytest.approx((250 + 1000 + 65) / 3)
    assert point.accuracy == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    costs, accs = uniform_curve(tiny_pool, [250, 1000])
    assert costs[1] == pytest.approx(point.tokens_per_query)
    assert accs[1] == pytest.approx(point.accuracy)
    assert accs[0] == pytest.approx((2 / 4) / 3)


@settings(max_examples=40, deadline=None)
@given(target=st.floats(min_value=0, max_value=2000))
def test_cost_matched_cap_inverts_the_cost(target: float) -> None:
    pool = RolloutPool(
        [
            make_record("q1", [(100, True), (200, True), (300, False), (400, True)]),
            make_record("q2", [(1000, True), (2000, True), (3000, True), (4000, False)]),
        ]
    )
    cap = uniform_cap_for_cost(pool, target)
    full_cost = float(pool.tokens.mean())
    expected = min(target, full_cost)
    assert uniform_point(pool, cap).tokens_per_query == pytest.approx(expected, abs=1e-6)


def test_cost_matched_uniform_on_hand_values(tiny_pool: RolloutPool) -> None:
    # Caps up to 50: every chain is cut, cost = cap.
    assert uniform_cap_for_cost(tiny_pool, 40) == pytest.approx(40)
    assert uniform_at_cost(tiny_pool, 40).accuracy == 0


# ------------------------------------------------------------------ oracle


def brute_force_oracle(pool: RolloutPool, budget_per_query: float) -> float:
    """Best mean accuracy over every integral choice of per-record caps (tiny pools only)."""
    choices = [[0, *sorted(set(row))] for row in pool.tokens.tolist()]
    best = 0.0
    for caps in itertools.product(*choices):
        cost = expected_cost(pool.tokens, caps).mean()
        if cost <= budget_per_query + 1e-9:
            best = max(best, float(expected_accuracy(pool.tokens, pool.correct, caps).mean()))
    return best


def test_oracle_on_hand_computed_tiny_pool(tiny_pool: RolloutPool) -> None:
    # q1 at caps 100/200/300/400 costs 100/175/225/250 for accuracy 1/4, 1/2, 1/2, 3/4: its hull
    # is one segment (0,0) -> (250, 3/4). q2 at 1000/2000/3000/4000 costs 1000/1750/2250/2500
    # for 1/4, 1/2, 3/4, 3/4: one segment (0,0) -> (2250, 3/4). q3 never pays.
    # A mean budget of 250/3 buys q1's segment exactly; the price is then q2's slope.
    result = oracle_allocation(tiny_pool, 250 / 3)
    assert result.caps.tolist() == [400, 0, 0]
    assert result.accuracy == pytest.approx((3 / 4) / 3)
    assert result.caps_accuracy == pytest.approx((3 / 4) / 3)
    assert result.price == pytest.approx((3 / 4) / 2250)  # next: q2's only segment
    # Half of q2's segment more: the LP value interpolates, the integral caps do not move.
    half = oracle_allocation(tiny_pool, (250 + 2250 / 2) / 3)
    assert half.accuracy == pytest.approx((3 / 4 + 3 / 8) / 3)
    assert half.caps.tolist() == [400, 0, 0]
    # Everything worth buying: q3 stays at 0, the spend stops at the useful maximum.
    rich = oracle_allocation(tiny_pool, 10_000)
    assert rich.caps.tolist() == [400, 3000, 0]
    assert rich.tokens_per_query == pytest.approx((250 + 2250) / 3)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.tuples(st.integers(1, 400), st.booleans()), min_size=3, max_size=3),
        min_size=1,
        max_size=3,
    ),
    budget=st.floats(min_value=0, max_value=400),
)
def test_oracle_brackets_the_integral_optimum(
    rows: list[list[tuple[int, bool]]], budget: float
) -> None:
    pool = RolloutPool([make_record(f"q{i}", row) for i, row in enumerate(rows)])
    result = oracle_allocation(pool, budget)
    best = brute_force_oracle(pool, budget)
    # Integral caps are feasible and no better than the best; the LP value is an upper bound.
    caps_cost = expected_cost(pool.tokens, result.caps).mean()
    assert caps_cost <= budget + 1e-9
    assert result.caps_accuracy == pytest.approx(
        expected_accuracy(pool.tokens, pool.correct, result.caps).mean()
    )
    assert result.caps_accuracy <= best + 1e-9
    assert result.accuracy >= best - 1e-9


def test_oracle_weights_count_repeated_draws(tiny_pool: RolloutPool) -> None:
    weights = draw_counts(tiny_pool, ["m/q2", "m/q2", "m/q1"])
    assert weights.tolist() == [1, 2, 0]
    doubled = oracle_allocation(tiny_pool, 10_000, weights=weights)
    assert doubled.accuracy == pytest.approx((3 / 4 + 2 * 3 / 4) / 3)
    with pytest.raises(ValueError, match="weights"):
        oracle_allocation(tiny_pool, 100, weights=[1, 2])


# The table in data/README.md: (uniform cap, tokens/query, uniform acc, oracle acc).
# Exact recomputation gives slightly lower uniform figures (e.g. 463 tok / 0.198 at cap 512),
# hence the tolerances: 1% on tokens, 0.005 on accuracy.
README_TABLE = [
    (512, 467, 0.202, 0.464),
    (1024, 770, 0.340, 0.540),
    (2048, 1161, 0.452, 0.568),
    (4096, 1605, 0.548, 0.568),
]


@pytest.mark.parametrize(("cap", "tokens", "uniform_acc", "oracle_acc"), README_TABLE)
def test_reference_table(
    shared_pool: RolloutPool, cap: int, tokens: float, uniform_acc: float, oracle_acc: float
) -> None:
    uniform = uniform_point(shared_pool, cap)
    assert uniform.tokens_per_query == pytest.approx(tokens, rel=0.01)
    assert uniform.accuracy == pytest.approx(uniform_acc, abs=0.005)
    assert oracle_allocation(shared_pool, tokens).accuracy == pytest.approx(oracle_acc, abs=0.005)
    matched = oracle_allocation(shared_pool, uniform.tokens_per_query)
    assert matched.accuracy == pytest.approx(oracle_acc, abs=0.005)
    assert matched.caps_accuracy <= matched.accuracy
    assert matched.caps_accuracy == pytest.approx(matched.accuracy, abs=1 / len(shared_pool))
