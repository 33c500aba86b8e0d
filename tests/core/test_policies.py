"""ClearPolicy behind its interface, through the real window pipeline on the simulator: it
knows each query (learns recurring prompts from their earlier chains), starts empty, decides a
query without reading that query's own outcome, and gets the answers it learns from. Also the
replay plumbing that feeds it (hints, the one-lap rule)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import PendingQuery, WindowPipeline
from clearbudget.daemon.core.policies import ClearPolicy, QueryView
from clearbudget.daemon.core.windowing import Window
from clearbudget.daemon.replay.config import draw_queries, one_lap_error, read_extras
from clearbudget.daemon.replay.rollouts import (
    RolloutPool,
    RolloutRecord,
    RolloutSample,
    load_rollouts,
)
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.daemon.replay.traces import Arrival
from clearbudget.schemas.messages import QueryRequest, Status
from clearbudget.solver.fit import ProbeOutcome, ProbePlan
from clearbudget.solver.memory import ANSWER, NO_ANSWER, prompt_key

PLAN = ProbePlan(samples=1, tokens=256)


def record(pid: str, tokens: int, answer: str = "7") -> RolloutRecord:
    samples = tuple(RolloutSample(tokens=tokens, correct=True, answer=answer) for _ in range(4))
    return RolloutRecord("model-a", "bench", pid, 10, "7", samples)


def pool_of(**lengths: int) -> RolloutPool:
    return RolloutPool([record(pid, tokens) for pid, tokens in lengths.items()])


def request(pool: RolloutPool, pid: str, i: int) -> QueryRequest:
    rec = pool.get(f"model-a/{pid}")
    assert rec is not None
    return QueryRequest(id=f"q-{pid}-{i}", prompt=prompt_for(rec),
                        tags={"task": "bench", "model": "model-a"})  # fmt: skip


def pipeline(policy: ClearPolicy, pool: RolloutPool) -> WindowPipeline:
    metrics = PipelineMetrics.create(CollectorRegistry())
    backend = SimulatedBackend(pool, seed=1)
    return WindowPipeline(backend, policy, metrics, max_tokens_per_query=1 << 16)


async def run_window(
    policy: ClearPolicy, pool: RolloutPool, pids: list[str], budget: float, n: int
) -> dict[str, list[Status]]:
    items = tuple(PendingQuery(request(pool, pid, n * 100 + i), 0.0) for i, pid in enumerate(pids))
    outcome = await pipeline(policy, pool).run(Window(f"w-{n}", 0.0, 2.0, items), budget)
    by_pid: dict[str, list[Status]] = {}
    for pid, result in zip(pids, outcome.results, strict=True):
        by_pid.setdefault(pid, []).append(result.status)
    return by_pid


async def test_clear_learns_which_recurring_prompt_is_worth_its_tokens() -> None:
    pool = pool_of(quick=700, slow=6000)
    policy = ClearPolicy(PLAN)
    for n in range(6):  # ample windows: both prompts run to the end and are remembered
        await run_window(policy, pool, ["quick", "slow"] * 4, 1e6, n)
    # Now a window that can pay for the quick prompts only: the slow ones are left unfunded
    # (at most their probe), the quick ones answered.
    statuses = await run_window(policy, pool, ["quick", "slow"] * 4, 4 * 700 + 4 * 256, 99)
    assert statuses["quick"] == [Status.ANSWERED] * 4
    assert set(statuses["slow"]) == {Status.ABANDONED}


async def test_a_fresh_policy_knows_nothing() -> None:
    learned, fresh = ClearPolicy(PLAN), ClearPolicy(PLAN)
    pool = pool_of(quick=700, slow=6000)
    await run_window(learned, pool, ["quick", "slow"], 1e6, 0)
    assert len(fresh.model.memory) == 0
    assert fresh.model.book.keys == 0
    assert len(learned.model.memory) == 2


async def test_a_decision_never_reads_the_querys_own_outcome() -> None:
    """Two worlds that differ only in how long the target's chains run past the probe get the
    same allocation for it: nothing of that chain's future reaches the policy before it decides
    (its own chain is observed only after its dispatch)."""
    allocated = []
    for tail in (300, 9000):
        policy = ClearPolicy(PLAN)
        pool = pool_of(target=tail, other=1200)
        for n in range(3):
            await run_window(policy, pool, ["other"] * 4, 1e6, n)
        item = PendingQuery(request(pool, "target", 0), 0.0)
        outcome = await pipeline(policy, pool).run(Window("w-t", 0.0, 2.0, (item,)), 3000.0)
        (result,) = outcome.results
        assert result.tokens_probe == 256  # censored in both worlds
        allocated.append(result.allocated_tokens)
        assert len(policy.model.memory) == 2  # and learned from it only afterwards
    assert allocated[0] == allocated[1] > 0


async def test_the_pipeline_hands_clear_the_answers_it_learns_agreement_from() -> None:
    policy = ClearPolicy(PLAN)
    pool = pool_of(p=100)  # finishes inside its probe, with \\boxed{7}
    await run_window(policy, pool, ["p", "p"], 1e6, 0)
    req = request(pool, "p", 0)
    remembered = policy.model.memory.chains(prompt_key(req.prompt, req.tags))
    assert remembered.shape[0] == 2
    assert np.all(remembered[:, ANSWER] != NO_ANSWER)  # the extracted answer, not just a flag


def test_hints_reach_requests_and_one_chain_pools_replay_one_lap(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    rows = [
        {"model": "m", "benchmark": "b", "problem_id": f"p{i}", "prompt_tokens": 5, "gold": "1",
         "problem": f"Problem {i}?", "level": level,
         "samples": [{"tokens": 100 * level, "correct": True, "answer": "1"}]}
        for i, level in enumerate((1, 3, 5))
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = load_rollouts(path)
    extras = read_extras(path, pool, "level")
    assert extras.hints == (0.0, 0.5, 1.0)
    queries = draw_queries([Arrival(float(i), i + 1, {}) for i in range(3)], pool, 0, extras)
    by_record = {q.record: q.request for q in queries}
    assert sorted((r.difficulty_hint or 0.0) for r in by_record.values()) == [0.0, 0.5, 1.0]
    assert all("Problem" in r.prompt for r in by_record.values())
    assert one_lap_error(pool, 3) is None
    error = one_lap_error(pool, 4)
    assert error is not None
    assert "--limit 3" in error
    assert "\n" not in error
    assert read_extras(path, pool).hints is None


def test_decisions_spend_no_more_than_the_budget() -> None:
    policy = ClearPolicy(PLAN)
    pool = pool_of(a=900, b=2500, c=400)
    for i in range(30):
        for pid, tokens in (("a", 900), ("b", 2500), ("c", 400)):
            policy.observe(request(pool, pid, i), tokens, finished=True, answered=True)
    views = [QueryView(request(pool, pid, 99 + i), (ProbeOutcome(False, 256),), 256, 1 << 15)
             for i, pid in enumerate("abc" * 5)]  # fmt: skip
    for budget in (0.0, 500.0, 3000.0, 1e5):
        tokens = policy.decide(views, budget).tokens
        assert int(np.sum(tokens)) <= budget


def test_probe_selection_values_a_query_no_further_than_the_daemons_cap() -> None:
    def taught(**options: int) -> ClearPolicy:
        policy = ClearPolicy(PLAN, **options)
        for i in range(200):  # chains of "long" finish at about 6,000 tokens, "short" at 3,000
            for task, tokens in (("long", 6000), ("short", 3000)):
                seen = QueryRequest(id=f"{task}{i}", prompt=f"{task} {i}", tags={"task": task})
                policy.observe(seen, tokens + i, finished=True, answered=True, answer="7")
        return policy

    window = [QueryRequest(id=f"{task}-{i}", prompt=f"{task} new {i}", tags={"task": task})
              for task in ("long", "short") for i in range(10)]  # fmt: skip
    default = taught().probe_plan(window, 100_000).selected
    capped = taught(max_tokens_per_query=4000).probe_plan(window, 100_000).selected
    assert default[:10].sum() >= 5  # long chains are worth a probe when they may run 6,000
    assert capped[:10].sum() == 0  # not when the daemon cuts every query at 4,000
    assert default[10:].all()
    assert capped[10:].all()


async def test_adaptive_probes_fit_each_query_and_a_surprise_is_continued() -> None:
    """Queries of a tag learned to finish at 150 get a probe just over that; one that runs on
    is continued from where its shorter probe stopped (fitted as censored there)."""
    pool = pool_of(easy=150, surprise=3000)
    policy = ClearPolicy(PLAN, adaptive_probes=True)
    for n in range(6):  # the tag's chains finish at 150
        await run_window(policy, pool, ["easy"] * 8, 1e6, n)
    items = tuple(PendingQuery(request(pool, pid, 900 + i), 0.0)
                  for i, pid in enumerate(["easy", "surprise"]))  # fmt: skip
    outcome = await pipeline(policy, pool).run(Window("w-last", 0.0, 2.0, items), 1e6)
    easy, surprise = outcome.results
    assert (easy.status, easy.tokens_probe) == (Status.ANSWERED, 150)
    assert 150 < surprise.tokens_probe < PLAN.tokens  # its own, shorter probe
    assert surprise.status is Status.ANSWERED  # continued past its probe to the end
    assert surprise.tokens_used == 3000


def test_a_cut_chains_next_tokens_are_valued_as_the_chain_stands() -> None:
    policy = ClearPolicy(PLAN)
    for i in range(200):  # this tag's chains end at 1,000-1,200 tokens, answered
        seen = QueryRequest(id=f"s{i}", prompt=f"seen {i}", tags={"task": "t"})
        policy.observe(seen, 1000 + i, finished=True, answered=True, answer="7")
    new = QueryRequest(id="new", prompt="new one", tags={"task": "t"})

    def gain(chain_tokens: int, extra: int) -> float:
        (chance,) = policy.continuation_gain(new, (), -1, chain_tokens, (extra,))
        return chance

    fresh, running, whole = gain(0, 400), gain(900, 400), gain(0, 1600)
    # 400 tokens end almost no fresh chain, but nearly every chain still running at 900: as
    # many as all 1,600 tokens give a fresh one (the chance, scaled by answer agreement).
    assert fresh < 0.01 < 0.9 * whole < running <= whole
    first = policy.decide([QueryView(new, (ProbeOutcome(False, 256),), 256, 1 << 15)], 1e5)
    assert first.continuation == policy.continuation_gain  # clear recycles on this value
