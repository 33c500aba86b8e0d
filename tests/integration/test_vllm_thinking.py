"""CLEAR_BUDGET_MODE=thinking against the real vLLM server (served with --reasoning-parser
deepseek_r1; the tiny model's tokenizer has whole <think> and </think> tokens): a request with
thinking_token_budget B never thinks past B, where vLLM forces the end of thinking, and the
chain goes on to answer within max_tokens."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.ports import Sample
from clearbudget.daemon.vllm.pool import VllmPool
from tests.support.tiny_llama import THINK_END, THINK_END_ID
from tests.support.vllm_server import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "find the sum of one and two then check the answer <think>"
BUDGET, ANSWER = 12, 10
CHAINS = 6


def thought(sample: Sample) -> int:
    """Tokens the chain thought before its first </think> (all of them if none)."""
    assert sample.token_ids is not None
    ids = list(sample.token_ids)
    return ids.index(THINK_END_ID) if THINK_END_ID in ids else len(ids)


async def test_a_thinking_budget_ends_the_thinking_and_the_chain_goes_on(
    vllm_server: VllmServer,
) -> None:
    # ignore_eos: the random model may stop at any step; every chain must run to max_tokens.
    pool = VllmPool([vllm_server.base_url], model=vllm_server.model,
                    registry=CollectorRegistry(), request_timeout_s=120.0, temperature=1.0,
                    extra_body={"ignore_eos": True})  # fmt: skip
    try:
        budgeted = await pool.complete(
            PROMPT, n=CHAINS, max_tokens=BUDGET + ANSWER, seed=7, thinking_token_budget=BUDGET
        )
        plain = await pool.complete(PROMPT, n=CHAINS, max_tokens=BUDGET + ANSWER, seed=7)
    finally:
        await pool.aclose()
    assert all(s.completion_tokens == BUDGET + ANSWER for s in budgeted.samples)
    # No chain thinks past its budget; those that did not end it themselves end exactly there.
    thinking = [thought(s) for s in budgeted.samples]
    assert max(thinking) <= BUDGET, thinking
    assert BUDGET in thinking, thinking
    assert all(THINK_END in s.text for s in budgeted.samples)
    # Without the budget the same sampling thinks on past it: the budget did the ending.
    assert max(thought(s) for s in plain.samples) > BUDGET
