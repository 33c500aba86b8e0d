"""The budget ledger: reserve at window start, settle at the end, never spend a token twice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearbudget.daemon.core.budget import BudgetLedger


def test_budget_earns_at_share_of_rate_and_caps_carry_over() -> None:
    ledger = BudgetLedger(tokens_per_second=1000.0, carry_over_cap_tokens=1500.0, share=0.5)
    budget = ledger.reserve(2.0)
    assert budget == 1000.0
    assert ledger.settle(budget, spent=400.0) == 600.0
    assert ledger.reserve(2.0) == 1600.0
    assert ledger.settle(1600.0, spent=0.0) == 750.0  # cap scales with the share
    ledger.set_share(1.0)
    assert ledger.reserve(1.0) == 1750.0
    with pytest.raises(ValueError, match="share"):
        ledger.set_share(1.5)
    with pytest.raises(ValueError, match="tokens_per_second"):
        BudgetLedger(tokens_per_second=0.0, carry_over_cap_tokens=0.0)


def test_overlapping_windows_share_one_carry_not_one_each() -> None:
    ledger = BudgetLedger(tokens_per_second=100.0, carry_over_cap_tokens=1000.0)
    ledger.settle(ledger.reserve(10.0), spent=0.0)  # an idle spell leaves the full carry
    budgets = [ledger.reserve(1.0) for _ in range(9)]  # nine windows start before any settles
    assert budgets[0] == 1100.0
    assert budgets[1:] == [100.0] * 8
    assert sum(budgets) == 1000.0 + 9 * 100.0


# One step of a random interleaving: start a window spanning some seconds, or settle the k-th
# running window having spent a fraction of what it reserved.
Step = tuple[str, float]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.floats(0.0, 5.0)),
        st.tuples(st.just("settle"), st.floats(0.0, 1.2)),  # past 1: it overspent
        st.tuples(st.just("share"), st.floats(0.0, 1.0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(0, 7))
def test_spend_never_exceeds_what_was_earned_in_any_interleaving(
    plan: list[Step], pick: int
) -> None:
    ledger = BudgetLedger(tokens_per_second=50.0, carry_over_cap_tokens=80.0)
    running: list[float] = []
    spent = 0.0
    for kind, value in plan:
        if kind == "start":
            running.append(ledger.reserve(value))
        elif kind == "share":
            ledger.set_share(value)
        elif running:
            reserved = running.pop(pick % len(running))
            spent += reserved * value
            ledger.settle(reserved, spent=reserved * value)
        # Tokens reserved and not given back never exceed the tokens earned ...
        assert ledger.outstanding <= ledger.earned_total + 1e-6
        # ... so what windows spent plus what running windows may still spend is covered too,
        # but for an overspend not yet repaid.
        assert spent + sum(running) <= ledger.earned_total + ledger.debt + 1e-6
        assert ledger.debt >= 0.0
        assert 0.0 <= ledger.carry <= ledger.carry_cap + 1e-9


def test_carry_room_is_what_the_carry_can_still_take() -> None:
    ledger = BudgetLedger(tokens_per_second=100.0, carry_over_cap_tokens=300.0)
    assert ledger.carry_room() == 300.0
    budget = ledger.reserve(2.0)
    ledger.settle(budget, 0.0)  # 200 unspent
    assert ledger.carry_room() == 100.0
    ledger.settle(ledger.reserve(5.0), 0.0)  # 700 unspent: the carry is full
    assert ledger.carry_room() == 0.0


def test_an_overspent_window_is_repaid_by_the_next_ones() -> None:
    ledger = BudgetLedger(tokens_per_second=100.0, carry_over_cap_tokens=300.0)
    first = ledger.reserve(2.0)
    ledger.settle(first, first + 250.0)  # garbled attempts retried on top of its allocations
    assert (ledger.carry, ledger.debt) == (0.0, 250.0)
    assert ledger.seconds_until(100.0, 0.0) == 3.5  # the debt first, then 100 more
    assert ledger.reserve(2.0) == 0.0  # 200 earned, all of it repays
    assert ledger.reserve(2.0) == 150.0  # the last 50, then the rest is this window's
    assert ledger.debt == 0.0


def test_a_window_that_spends_less_repays_a_debt_before_it_carries_anything() -> None:
    ledger = BudgetLedger(tokens_per_second=100.0, carry_over_cap_tokens=300.0)
    first, second = ledger.reserve(2.0), ledger.reserve(10.0)  # 200 and 1,000, overlapping
    ledger.settle(first, first + 250.0)
    assert ledger.carry_room() == 300.0 + 250.0  # the debt's repayment is not lost
    ledger.settle(second, 0.0)  # 1,000 unspent: 250 repay the debt, 300 carry
    assert (ledger.debt, ledger.carry) == (0.0, 300.0)
    assert ledger.reserve(1.0) == 400.0
