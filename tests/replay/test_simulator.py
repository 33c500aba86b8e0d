"""The rollout simulator backend: in-process and over real HTTP on a loopback port."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from clearbudget.daemon.cli import app
from clearbudget.daemon.core.ports import Completion, CompletionBackend, Sample
from clearbudget.daemon.replay.rollouts import (
    RolloutPool,
    RolloutRecord,
    RolloutSample,
    load_rollouts,
)
from clearbudget.daemon.replay.sim_server import (
    PodTiming,
    RunningSimulator,
    _DecodeSlots,
    create_app,
    start_simulator,
)
from clearbudget.daemon.replay.simulator import (
    FORCED_ANSWER_TOKENS,
    SimulatedBackend,
    SimulationRequestError,
    find_marker,
    grade,
    prompt_for,
)
from tests.support.waiting import until

# Chains of the toy record, by index: (tokens, correct, answer).
CHAINS = [(100, True, "7"), (300, False, "8"), (500, True, None), (900, True, "7")]


def record(problem: str, model: str = "toy-model", prompt_tokens: int = 40) -> RolloutRecord:
    samples = tuple(RolloutSample(t, c, a) for t, c, a in CHAINS)
    return RolloutRecord(model, "toy", problem, prompt_tokens, "7", samples)


@pytest.fixture
def pool() -> RolloutPool:
    return RolloutPool(
        [record("p1"), record("p2", prompt_tokens=55), record("p1", model="other-model")]
    )


@pytest.fixture
def backend(pool: RolloutPool) -> SimulatedBackend:
    return SimulatedBackend(pool, seed=11)


def chain_end(text: str) -> int:
    """Tokens into its chain where a sample's text stops (its marker's position)."""
    ref = find_marker(text)
    assert ref is not None, text
    return ref.at


def chain_of(text: str) -> int:
    ref = find_marker(text)
    assert ref is not None, text
    return ref.chain


# ------------------------------------------------------------------ in-process


async def test_truncation_rule_finish_reasons_and_usage(backend: SimulatedBackend) -> None:
    port: CompletionBackend = backend  # the pipeline's port
    out = await port.complete("problem: toy-model/p1\nsolve", n=4, max_tokens=300, seed=1)
    by_chain = {chain_of(s.text): s for s in out.samples}
    assert sorted(by_chain) == [0, 1, 2, 3]  # n = 4 draws 4 distinct chains
    for index, (tokens, _, answer) in enumerate(CHAINS):
        sample = by_chain[index]
        if tokens <= 300:
            assert sample.finish_reason == "stop"
            assert sample.completion_tokens == tokens
            assert sample.text.endswith(f"\\boxed{{{answer}}}")
        else:
            assert sample.finish_reason == "length"
            assert sample.completion_tokens == 300
            assert "boxed" not in sample.text
    assert out.completion_tokens == 100 + 300 + 300 + 300
    assert out.prompt_tokens == 40


def test_backend_is_always_ready(backend: SimulatedBackend) -> None:
    assert backend.ready()


async def test_chain_exactly_at_cap_finishes(backend: SimulatedBackend) -> None:
    out = await backend.complete("problem: toy-model/p1", n=4, max_tokens=500, seed=3)
    finished = {chain_of(s.text) for s in out.samples if s.finish_reason == "stop"}
    assert finished == {0, 1, 2}
    # Chain 2 finished without a recorded answer: no \boxed{}, but graded by its record.
    (text,) = [s.text for s in out.samples if chain_of(s.text) == 2]
    assert "boxed" not in text


async def test_n_beyond_the_pool_width_reuses_chains_evenly(backend: SimulatedBackend) -> None:
    out = await backend.complete("problem: toy-model/p2", n=10, max_tokens=50, seed=5)
    chains = [chain_of(s.text) for s in out.samples]
    assert sorted(chains[:4]) == [0, 1, 2, 3]
    assert sorted(chains[4:8]) == [0, 1, 2, 3]
    assert out.completion_tokens == 10 * 50
    assert out.prompt_tokens == 55


async def test_seeded_requests_are_reproducible(pool: RolloutPool) -> None:
    prompt = "problem: toy-model/p1"
    a = await SimulatedBackend(pool, seed=1).complete(prompt, n=3, max_tokens=200, seed=42)
    b = await SimulatedBackend(pool, seed=1).complete(prompt, n=3, max_tokens=200, seed=42)
    again = await SimulatedBackend(pool, seed=1).complete(prompt, n=3, max_tokens=200, seed=42)
    assert a == b == again
    orders = set()
    for seed in range(12):
        out = await SimulatedBackend(pool, seed=1).complete(prompt, n=4, max_tokens=1, seed=seed)
        orders.add(tuple(chain_of(s.text) for s in out.samples))
    assert len(orders) > 1  # the seed matters


async def test_unseeded_draws_vary_per_call_yet_replay_identically(pool: RolloutPool) -> None:
    async def run(backend: SimulatedBackend) -> list[Completion]:
        return [
            await backend.complete("problem: toy-model/p1", n=1, max_tokens=9) for _ in range(8)
        ]

    first = await run(SimulatedBackend(pool, seed=7))
    second = await run(SimulatedBackend(pool, seed=7))
    assert first == second
    assert len({chain_of(c.samples[0].text) for c in first}) > 1


async def test_continuation_charges_only_new_tokens(backend: SimulatedBackend) -> None:
    prompt = "problem: toy-model/p1\nsolve"
    probe = await backend.complete(prompt, n=4, max_tokens=250, seed=9)
    (cut,) = [s for s in probe.samples if chain_of(s.text) == 3]  # the 900-token chain
    assert cut.finish_reason == "length"
    short = await backend.complete(prompt + cut.text, n=1, max_tokens=600, seed=0)
    assert short.samples[0].finish_reason == "length"
    assert short.completion_tokens == 600
    assert find_marker(short.samples[0].text).at == 850  # type: ignore[union-attr]
    # Continue the continuation: 50 tokens remain of 900.
    rest = await backend.complete(prompt + cut.text + short.samples[0].text, n=2, max_tokens=60)
    assert [s.finish_reason for s in rest.samples] == ["stop", "stop"]
    assert [s.completion_tokens for s in rest.samples] == [50, 50]
    assert rest.completion_tokens == 100
    assert rest.prompt_tokens == 40 + 850  # vLLM counts the continued text as prompt
    assert rest.samples[0].text.endswith("\\boxed{7}")


async def test_continuation_on_the_shared_pool(shared_data: Path) -> None:
    pool = load_rollouts(shared_data / "rollouts.jsonl")
    target = pool.get("DS-R1-7B-TLDR/amc23-8")
    assert target is not None
    assert target.samples[0].tokens == 4326
    backend = SimulatedBackend(pool, seed=0)
    prompt = prompt_for(target)
    probe = await backend.complete(prompt, n=8, max_tokens=256, seed=1)
    (cut,) = [s for s in probe.samples if chain_of(s.text) == 0]
    assert (cut.finish_reason, cut.completion_tokens) == ("length", 256)
    assert not grade(cut.text, target)
    done = await backend.complete(prompt + cut.text, n=1, max_tokens=4070)
    sample = done.samples[0]
    assert (sample.finish_reason, sample.completion_tokens) == ("stop", 4070)
    assert done.prompt_tokens == target.prompt_tokens + 256
    assert sample.text.endswith("\\boxed{3}")
    assert grade(sample.text, target)
    assert backend.grade(sample.text)
    short = await backend.complete(prompt + cut.text, n=1, max_tokens=4069)
    assert short.samples[0].finish_reason == "length"


def test_prompt_to_record_mapping(backend: SimulatedBackend, pool: RolloutPool) -> None:
    assert backend.record_index("problem: toy-model/p2\nx") == pool.index_of("toy-model/p2")
    assert backend.record_index("Record = other-model/p1") == pool.index_of("other-model/p1")
    # A bare problem id shared by two models: the requested model decides, else a stable hash.
    assert backend.record_index("problem: p1", model="other-model") == 2
    assert backend.record_index("problem: p1", model="toy-model") == 0
    assert backend.record_index("problem: p2") == 1
    # Free text: a stable hash, the same on every backend instance and process.
    prompts = [f"What is {i} + {i}?" for i in range(60)]
    first = [backend.record_index(p) for p in prompts]
    assert first == [SimulatedBackend(pool, seed=99).record_index(p) for p in prompts]
    assert set(first) == {0, 1, 2}  # spread over the pool


def test_hash_mapping_is_pinned(pool: RolloutPool) -> None:
    # blake2b, not Python's per-process salted hash(): these values never change.
    backend = SimulatedBackend(pool)
    expected = int.from_bytes(
        hashlib.blake2b(b"record\x1fhello\x1f", digest_size=16).digest()[:8], "big"
    ) % len(pool)
    assert backend.record_index("hello") == expected


def test_grade_uses_the_recorded_chain(pool: RolloutPool) -> None:
    rec = pool[0]
    assert grade("<<sim chain=toy-model/p1#0 at=100>>\n\\boxed{7}", rec)
    assert not grade("<<sim chain=toy-model/p1#1 at=300>>\n\\boxed{8}", rec)  # wrong answer
    assert grade("<<sim chain=toy-model/p1#2 at=500>>", rec)  # right, though no \boxed{}
    assert not grade("<<sim chain=toy-model/p1#3 at=250>>", rec)  # cut: no answer
    assert not grade("<<sim chain=toy-model/p2#0 at=100>>", rec)  # another record
    assert not grade("\\boxed{7}", rec)  # not generated by the simulator


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0, "max_tokens": 5}, "n"),
        ({"n": 1, "max_tokens": 0}, "max_tokens"),
        ({"n": True, "max_tokens": 5}, "n"),
        ({"n": 1, "max_tokens": 5, "seed": "x"}, "seed"),
    ],
)
async def test_invalid_in_process_requests(
    backend: SimulatedBackend, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(SimulationRequestError) as info:
        await backend.complete("problem: p1", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


async def test_token_id_prompts_are_refused(backend: SimulatedBackend) -> None:
    with pytest.raises(SimulationRequestError, match="token-id") as info:
        await backend.complete([1, 2, 3], n=1, max_tokens=5)
    assert info.value.field == "prompt"


@pytest.mark.parametrize(
    "marker",
    [
        "<<sim chain=nobody/p9#0 at=3>>",
        "<<sim chain=toy-model/p1#9 at=3>>",
        "<<sim chain=toy-model/p1#0 at=101>>",
    ],
)
async def test_bad_continuation_markers(backend: SimulatedBackend, marker: str) -> None:
    with pytest.raises(SimulationRequestError) as info:
        await backend.complete("q\n" + marker, n=1, max_tokens=5)
    assert info.value.field == "prompt"


# ------------------------------------------------------------------ HTTP


@pytest.fixture
async def server(backend: SimulatedBackend) -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(backend, port=0, model_name="sim-test")
    yield running
    await running.close()


@pytest.fixture
async def client(server: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        yield http


async def test_http_completion_is_openai_shaped(client: httpx.AsyncClient) -> None:
    body = {
        "model": "sim-test",
        "prompt": ["problem: toy-model/p1"],
        "n": 4,
        "max_tokens": 300,
        "seed": 1,
        "temperature": 0.7,
    }
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "text_completion"
    assert data["model"] == "sim-test"
    assert data["id"].startswith("cmpl-")
    assert isinstance(data["created"], int)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert {c["finish_reason"] for c in data["choices"]} == {"stop", "length"}
    assert all(c["logprobs"] is None for c in data["choices"])
    assert data["usage"] == {"prompt_tokens": 40, "completion_tokens": 1000, "total_tokens": 1040}


async def test_http_matches_in_process_and_continues(
    client: httpx.AsyncClient, pool: RolloutPool
) -> None:
    prompt = "problem: toy-model/p1"
    body = {"prompt": prompt, "n": 4, "max_tokens": 250, "seed": 8}
    data = (await client.post("/v1/completions", json=body)).json()
    local = await SimulatedBackend(pool, seed=11).complete(prompt, n=4, max_tokens=250, seed=8)
    assert [c["text"] for c in data["choices"]] == [s.text for s in local.samples]
    cut = next(c["text"] for c in data["choices"] if c["finish_reason"] == "length")
    remaining = CHAINS[chain_of(cut)][0] - 250
    more = await client.post(
        "/v1/completions", json={"prompt": prompt + cut, "max_tokens": remaining}
    )
    usage = more.json()["usage"]
    assert more.json()["choices"][0]["finish_reason"] == "stop"
    assert usage["completion_tokens"] == remaining
    assert usage["prompt_tokens"] == 40 + 250


async def test_http_default_max_tokens_is_16(client: httpx.AsyncClient) -> None:
    data = (await client.post("/v1/completions", json={"prompt": "problem: p2"})).json()
    assert len(data["choices"]) == 1
    assert data["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"n": 1, "max_tokens": 5}, "prompt"),
        ({"prompt": ["a", "b"], "max_tokens": 5}, "prompt"),
        ({"prompt": 5, "max_tokens": 5}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "stream": True}, "stream"),
        ([1, 2], "body"),
    ],
)
async def test_http_rejects_bad_requests(
    client: httpx.AsyncClient, payload: object, param: str
) -> None:
    response = await client.post("/v1/completions", json=payload)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param in error["message"]


async def test_http_rejects_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "body"


async def test_http_models_and_health(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["sim-test", "toy-model", "other-model"]
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["records"] == 3


# ------------------------------------------------------------------ CLI


def test_cli_reports_a_missing_pool(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["simulate-backend", "--rollouts", str(tmp_path / "none.jsonl"), "--port", "0"]
    )
    assert result.exit_code == 2
    assert "none.jsonl" in result.output
    assert "not found" in result.output


def test_cli_reports_a_malformed_pool(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"model": "m"}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["simulate-backend", "--rollouts", str(bad)])
    assert result.exit_code == 2
    assert "line 1" in result.output
    assert "problem_id" in result.output


@pytest.mark.parametrize(("option", "value"), [("--decode-rate", "-1"), ("--max-num-seqs", "0")])
def test_cli_rejects_bad_pod_timing(shared_data: Path, option: str, value: str) -> None:
    rollouts = str(shared_data / "rollouts.jsonl")
    result = CliRunner().invoke(app, ["simulate-backend", "--rollouts", rollouts, option, value])
    assert result.exit_code == 2
    assert option in result.output


# ------------------------------------------------------------------ emulated pod timing


class HeldSleeps:
    """A sleep that returns only when the test releases it; records each requested duration."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._gates: list[asyncio.Event] = []

    async def __call__(self, seconds: float) -> None:
        gate = asyncio.Event()
        self.durations.append(seconds)
        self._gates.append(gate)
        await gate.wait()

    def release(self, i: int) -> None:
        self._gates[i].set()


def test_pod_timing_is_validated() -> None:
    with pytest.raises(ValueError, match="decode_tokens_per_second"):
        PodTiming(0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        PodTiming(100, max_num_seqs=0)


async def test_pod_holds_a_slot_per_sample_for_its_longest_sample(
    backend: SimulatedBackend, pool: RolloutPool
) -> None:
    sleeps = HeldSleeps()
    app = create_app(backend, timing=PodTiming(100.0, max_num_seqs=2), sleep=sleeps)
    server = TestServer(app)
    async with TestClient(server) as http:
        prompt = "problem: toy-model/p1\nsolve"
        both = asyncio.create_task(
            http.post("/v1/completions", json={"prompt": prompt, "n": 2, "max_tokens": 300})
        )
        await until(lambda: len(sleeps.durations) == 1)
        single = asyncio.create_task(
            http.post("/v1/completions", json={"prompt": prompt, "n": 1, "max_tokens": 50})
        )
        await asyncio.sleep(0.05)
        assert len(sleeps.durations) == 1  # both slots are taken: the second request waits
        sleeps.release(0)
        first = await (await both).json()
        longest = max(chain_end(choice["text"]) for choice in first["choices"])
        assert sleeps.durations[0] == pytest.approx(longest / 100.0)
        await until(lambda: len(sleeps.durations) == 2)
        assert sleeps.durations[1] == pytest.approx(50 / 100.0)  # cut at its max_tokens
        sleeps.release(1)
        assert (await single).status == 200


async def test_a_request_cancelled_while_waiting_for_slots_gives_them_back() -> None:
    def completion(samples: int) -> Completion:
        sample = Sample(text="x", finish_reason="stop", completion_tokens=100)
        return Completion(samples=(sample,) * samples, prompt_tokens=1, completion_tokens=100)

    sleeps = HeldSleeps()
    slots = _DecodeSlots(PodTiming(100.0, max_num_seqs=2), sleep=sleeps)
    running = asyncio.create_task(slots.generate(completion(1)))
    await until(lambda: len(sleeps.durations) == 1)
    waiting = asyncio.create_task(slots.generate(completion(2)))  # gets one slot, waits for two
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    sleeps.release(0)
    await running
    both = asyncio.create_task(slots.generate(completion(2)))
    await until(lambda: len(sleeps.durations) == 2)  # both slots are free again
    sleeps.release(1)
    await both


# ------------------------------------------------------------------ thinking budget


def long_chain_pool(records: int = 1, tokens: int = 1000) -> RolloutPool:
    return RolloutPool(
        [RolloutRecord("m", "toy", f"p{i}", 10, "7", (RolloutSample(tokens, True, "7"),))
         for i in range(records)]
    )  # fmt: skip


async def test_a_thinking_budget_ends_the_chain_and_it_answers() -> None:
    backend = SimulatedBackend(long_chain_pool(), seed=3)
    prompt = "problem: m/p0"
    done = await backend.complete(prompt, n=1, max_tokens=500, thinking_token_budget=400)
    (sample,) = done.samples
    assert (sample.finish_reason, sample.completion_tokens) == ("stop", 400 + FORCED_ANSWER_TOKENS)
    ref = find_marker(sample.text)
    assert ref is not None
    assert (ref.at, ref.forced in {"hit", "miss"}) == (400, True)
    # A continuation: the budget counts the chain's earlier tokens, as vLLM counts an open
    # think block in the prompt.
    cut = (await backend.complete(prompt, n=1, max_tokens=200)).samples[0]
    more = await backend.complete(prompt + cut.text, n=1, max_tokens=500,
                                  thinking_token_budget=450)  # fmt: skip
    assert more.samples[0].completion_tokens == 250 + FORCED_ANSWER_TOKENS
    with pytest.raises(SimulationRequestError, match="has answered"):
        await backend.complete(prompt + sample.text.split("\n")[0], n=1, max_tokens=10)


async def test_a_thinking_budget_changes_nothing_for_a_chain_that_ends_within_it() -> None:
    backend = SimulatedBackend(long_chain_pool(), seed=3)
    plain = await backend.complete("problem: m/p0", n=1, max_tokens=2000)
    budgeted = await backend.complete(
        "problem: m/p0", n=1, max_tokens=2000, thinking_token_budget=1000
    )
    assert budgeted == plain


async def test_no_room_to_answer_is_a_plain_cut() -> None:
    backend = SimulatedBackend(long_chain_pool(), seed=3)
    done = await backend.complete(
        "problem: m/p0", n=1, max_tokens=500, thinking_token_budget=500 - FORCED_ANSWER_TOKENS + 1
    )
    (sample,) = done.samples
    assert (sample.finish_reason, sample.completion_tokens) == ("length", 500)


async def test_a_forced_answer_is_the_recorded_one_as_often_as_the_share_thought() -> None:
    pool = long_chain_pool(records=600)
    backend = SimulatedBackend(pool, seed=5)
    hits = 0
    for rec in pool.records:
        done = await backend.complete(
            f"problem: {rec.key}", n=1, max_tokens=400, thinking_token_budget=250
        )
        text = done.samples[0].text
        hit = "boxed{7}" in text
        assert grade(text, rec) == hit  # a hit is graded as recorded (every chain is correct)
        hits += hit
    assert 0.19 < hits / len(pool.records) < 0.31  # 250 of 1,000 tokens thought: 25%


async def test_http_passes_the_thinking_budget(client: httpx.AsyncClient) -> None:
    body = {"prompt": "problem: toy-model/p1", "n": 4, "max_tokens": 300, "seed": 1,
            "thinking_token_budget": 200}  # fmt: skip
    data = (await client.post("/v1/completions", json=body)).json()
    # Chains of 100 finish; those of 300, 500 and 900 are ended at 200 and answer.
    assert sorted(c["finish_reason"] for c in data["choices"]) == ["stop"] * 4
    assert data["usage"]["completion_tokens"] == 100 + 3 * (200 + FORCED_ANSWER_TOKENS)
    bad = await client.post("/v1/completions", json={**body, "thinking_token_budget": "x"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "thinking_token_budget"
