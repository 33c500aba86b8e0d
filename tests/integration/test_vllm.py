"""The real vLLM server serves what the probe/dispatch path relies on.

n samples per request, max_tokens censoring (finish_reason "length"), natural stops,
usage counts that match the generated token ids, and continuation of an earlier chain.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.tiny_llama import VOCAB_SIZE
from tests.support.vllm_server import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = " ".join(["find the sum of one and two then check the answer"] * 30)


def complete(server: VllmServer, **body: object) -> dict:
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": server.model, "temperature": 1.0, "return_token_ids": True, **body},
        timeout=120.0,
    )
    assert response.status_code == 200, response.text
    return response.json()


def prefix_cache_hits(server: VllmServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10.0).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total")
    )


def test_models_endpoint_lists_the_served_model(vllm_server: VllmServer) -> None:
    models = httpx.get(f"{vllm_server.base_url}/v1/models", timeout=10.0).json()
    assert [m["id"] for m in models["data"]] == [vllm_server.model]


def test_n_samples_censored_at_max_tokens(vllm_server: VllmServer) -> None:
    body = complete(vllm_server, prompt="find the sum", n=2, max_tokens=8, seed=1, ignore_eos=True)
    choices = body["choices"]
    assert len(choices) == 2
    assert [c["finish_reason"] for c in choices] == ["length", "length"]
    assert [len(c["token_ids"]) for c in choices] == [8, 8]
    assert body["usage"]["completion_tokens"] == 16
    assert body["usage"]["prompt_tokens"] == len(choices[0]["prompt_token_ids"])


def test_natural_stop_counts_only_generated_tokens(vllm_server: VllmServer) -> None:
    # Every token id of the tiny vocabulary is a stop token: the chain ends at once.
    body = complete(
        vllm_server, prompt="find the sum", n=1, max_tokens=50,
        stop_token_ids=list(range(VOCAB_SIZE)),
    )  # fmt: skip
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 1


def test_continuation_of_a_censored_chain_is_served_from_the_prefix_cache(
    vllm_server: VllmServer,
) -> None:
    probe = complete(vllm_server, prompt=PROMPT, n=1, max_tokens=64, seed=5, ignore_eos=True)
    (chain,) = probe["choices"]
    assert chain["finish_reason"] == "length"
    hits_before = prefix_cache_hits(vllm_server)
    # Continue from token ids so no re-tokenisation drift can change the prefix.
    continued_prompt = chain["prompt_token_ids"] + chain["token_ids"]
    follow = complete(
        vllm_server, prompt=continued_prompt, n=1, max_tokens=8, seed=5, ignore_eos=True
    )
    assert follow["usage"]["prompt_tokens"] == len(continued_prompt)
    assert follow["usage"]["completion_tokens"] == 8
    # The probe's prompt spans at least two full 128-token KV blocks: they must be reused.
    assert prefix_cache_hits(vllm_server) - hits_before >= 128
    # A text continuation (prompt + earlier text) is served as well.
    text_follow = complete(
        vllm_server, prompt=PROMPT + chain["text"], n=1, max_tokens=4, ignore_eos=True
    )
    assert text_follow["choices"][0]["finish_reason"] == "length"
    assert text_follow["usage"]["prompt_tokens"] > probe["usage"]["prompt_tokens"]
