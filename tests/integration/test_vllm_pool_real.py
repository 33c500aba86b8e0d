"""The vLLM pool against a real vLLM server: probes, token-id continuation, failover."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from clearbudget.daemon.replay.embedded import free_loopback_port
from clearbudget.daemon.vllm.pool import BackendRequestError, BreakerSettings, VllmPool
from tests.support.tiny_llama import VOCAB_SIZE
from tests.support.vllm_server import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "find the sum of one and two then check the answer"


@pytest.fixture
async def make_pool(vllm_server: VllmServer, registry: CollectorRegistry) -> AsyncIterator[Any]:
    pools: list[VllmPool] = []

    def build(endpoints: Sequence[str] | None = None, **options: Any) -> VllmPool:
        pool = VllmPool(
            endpoints or [vllm_server.base_url],
            model=vllm_server.model,
            registry=registry if not pools else CollectorRegistry(),
            request_timeout_s=120.0,
            **options,
        )
        pools.append(pool)
        return pool

    yield build
    for pool in pools:
        await pool.aclose()


async def test_probe_then_censored_continuation_by_token_ids(make_pool: Any) -> None:
    # ignore_eos: the random model may emit EOS at any step; censoring must be certain here.
    pool: VllmPool = make_pool(extra_body={"ignore_eos": True}, temperature=1.0)
    probe = await pool.complete(PROMPT, n=2, max_tokens=8, seed=3)
    assert [s.finish_reason for s in probe.samples] == ["length", "length"]
    assert [s.completion_tokens for s in probe.samples] == [8, 8]
    assert probe.completion_tokens == 16
    assert probe.prompt_token_ids is not None
    assert probe.prompt_tokens == len(probe.prompt_token_ids)

    chain = probe.samples[0]
    assert chain.token_ids is not None
    follow = await pool.complete([*probe.prompt_token_ids, *chain.token_ids], n=1, max_tokens=6)
    assert follow.prompt_tokens == probe.prompt_tokens + 8  # no re-tokenisation drift
    assert follow.prompt_token_ids == (*probe.prompt_token_ids, *chain.token_ids)
    (continued,) = follow.samples
    assert (continued.finish_reason, continued.completion_tokens, follow.completion_tokens) == (
        "length",
        6,
        6,
    )


async def test_natural_stop_reports_stop_and_the_tokens_generated(make_pool: Any) -> None:
    # Every token id of the tiny model (its whole vocabulary) stops the chain after its first token.
    pool: VllmPool = make_pool(extra_body={"stop_token_ids": list(range(VOCAB_SIZE))})
    completion = await pool.complete(PROMPT, n=1, max_tokens=50)
    (sample,) = completion.samples
    assert (sample.finish_reason, sample.completion_tokens) == ("stop", 1)
    assert completion.completion_tokens == 1


async def test_server_rejection_is_not_retried(make_pool: Any, registry: CollectorRegistry) -> None:
    pool: VllmPool = make_pool()
    with pytest.raises(BackendRequestError, match="max_model_len") as info:
        await pool.complete(PROMPT, n=1, max_tokens=5000)
    assert info.value.status_code == 400


async def test_fails_over_from_a_dead_endpoint(
    make_pool: Any, vllm_server: VllmServer, registry: CollectorRegistry
) -> None:
    dead = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there
    pool: VllmPool = make_pool(
        [dead, vllm_server.base_url],
        max_attempts=2,
        breaker=BreakerSettings(failure_threshold=1, cooldown_s=300.0),
    )
    for seed in range(3):
        completion = await pool.complete(PROMPT, n=1, max_tokens=4, seed=seed)
        assert completion.completion_tokens == sum(
            s.completion_tokens or 0 for s in completion.samples
        )
    assert registry.get_sample_value("clear_backend_errors_total", {"endpoint": dead}) == 1
    assert pool.breaker_states() == {dead: "open", vllm_server.base_url: "closed"}
    assert pool.ready()
