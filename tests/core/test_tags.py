"""Tag budgets (`CLEAR_TAG_BUDGETS`): parsing, the window's rows, and ClearPolicy honouring
the shares (reserves kept under overload, an idle tenant's share absorbed, the pool shared)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import PendingQuery
from clearbudget.daemon.core.policies import ClearPolicy, QueryView
from clearbudget.daemon.core.tag_spend import TagSpendPipeline, tag_spend
from clearbudget.daemon.core.tags import OTHER, TagBudgets, TagShare
from clearbudget.daemon.core.windowing import Window
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.schemas.messages import QueryRequest, QueryResult, ReasonCode, Status
from clearbudget.solver.cvx import CvxpyAllocator
from clearbudget.solver.fit import ProbeOutcome, ProbePlan

PLAN = ProbePlan(samples=1, tokens=256)
CAP = 8192
# Recurring prompts and the chain lengths the policy has seen for them (all answered).
LENGTHS = {"easy": 900, "long": 2500, "mid": 1600}


def test_entries_parse_with_their_keys_and_round_trip() -> None:
    budgets = TagBudgets.parse(" tenant=acme:0.3, tenant=beta:.2 ,team=x=y:0.1,")
    assert budgets.entries == (
        TagShare("tenant", "acme", 0.3),
        TagShare("tenant", "beta", 0.2),
        TagShare("team", "x=y", 0.1),
    )
    assert budgets.keys == ("tenant=acme", "tenant=beta", "team=x=y")
    assert budgets.label_keys == (*budgets.keys, OTHER)
    assert str(budgets) == "tenant=acme:0.3,tenant=beta:0.2,team=x=y:0.1"
    assert TagBudgets.parse(str(budgets)) == budgets
    assert TagBudgets.parse("tenant=acme:0.7,tenant=beta:0.3").keys  # adds up to 1 exactly


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tenant=acme:1.5", "entry 'tenant=acme:1.5': the share must be in (0, 1]"),
        ("tenant=acme:0", "entry 'tenant=acme:0': the share must be in (0, 1]"),
        ("tenant=acme:-0.1", "entry 'tenant=acme:-0.1': the share must be in (0, 1]"),
        ("tenant=acme:nan", "entry 'tenant=acme:nan': the share must be in (0, 1]"),
        ("tenant=acme:x", "entry 'tenant=acme:x': share 'x' is not a number"),
        ("tenant=acme:0.3,beta:0.2", "entry 'beta:0.2' is not TAG=VALUE:SHARE"),
        ("tenant=acme", "entry 'tenant=acme' is not TAG=VALUE:SHARE"),
        ("=acme:0.2", "entry '=acme:0.2' is not TAG=VALUE:SHARE"),
        ("tenant=:0.2", "entry 'tenant=:0.2' is not TAG=VALUE:SHARE"),
        ("tenant=acme:0.3,tenant=acme:0.1", "entry 'tenant=acme:0.1': tenant=acme is listed twice"),
        ("tenant=acme:0.6,tenant=beta:0.5", "the shares add up to 1.1, more than the whole"),
        (" , ", "expected TAG=VALUE:SHARE entries"),
    ],
)
def test_a_bad_entry_is_named(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        TagBudgets.parse(text)


def test_a_query_belongs_to_the_first_entry_it_carries() -> None:
    budgets = TagBudgets.parse("tenant=acme:0.3,team=red:0.2")
    assert budgets.group_of({"tenant": "acme", "team": "red"}) == "tenant=acme"
    assert budgets.group_of({"tenant": "beta", "team": "red"}) == "team=red"
    assert budgets.group_of({"tenant": "beta"}) == OTHER
    assert budgets.group_of({}) == OTHER


def test_rows_reserve_each_share_less_its_probes_and_pool_the_rest() -> None:
    budgets = TagBudgets.parse("tenant=acme:0.3,tenant=beta:0.2,tenant=gone:0.1")
    # 10,000 tokens in the window, 1,000 of them spent on probes (acme 600, other 400).
    rows = budgets.rows(
        ["tenant=acme", "tenant=beta", OTHER], 9000.0, {"tenant=acme": 600, OTHER: 400}
    )
    assert rows is not None
    assert rows.reserves == pytest.approx({"tenant=acme": 2400, "tenant=beta": 2000, OTHER: 0})
    # The rest (40%) and the share of the tenant with no query (10%), less other's probes.
    assert rows.pool == pytest.approx(4600)
    assert rows.budgets == pytest.approx({"tenant=acme": 7000, "tenant=beta": 6600, OTHER: 4600})
    assert budgets.rows([OTHER, OTHER], 9000.0) is None  # no entry present: a plain window


def test_repair_keeps_every_reserve_and_shares_the_pool_among_its_borrowers() -> None:
    rows = TagBudgets.parse("tenant=acme:0.3,tenant=beta:0.2").rows(
        ["tenant=acme", "tenant=beta", OTHER], 10_000.0
    )
    assert rows is not None
    # beta and other both drew on the 5,000-token pool and acme, wanting more, got 1,000.
    allocated = {"tenant=acme": 1000.0, "tenant=beta": 5000.0, OTHER: 4000.0}
    repaired = rows.rebalance(allocated, wants_more={"tenant=acme", "tenant=beta", OTHER})
    assert repaired == pytest.approx(
        {"tenant=acme": 3000, "tenant=beta": 2000 + 5000 * 3 / 7, OTHER: 5000 * 4 / 7}
    )
    assert sum(repaired.values()) == pytest.approx(10_000)
    # Not invaded: acme got its reserve, or wanted no more than it got.
    assert rows.rebalance({**allocated, "tenant=acme": 3000.0}, {"tenant=acme"}) is None
    assert rows.rebalance(allocated, {"tenant=beta", OTHER}) is None


def test_rebalance_lends_an_idle_reserve_to_the_group_that_wants_more() -> None:
    rows = TagBudgets.parse("tenant=acme:0.3,tenant=beta:0.7").rows(
        ["tenant=acme", "tenant=beta"], 20_000.0
    )
    assert rows is not None
    assert rows.pool == 0.0
    # acme's last 1,904 tokens fund none of its queries (each needs more to be worth a token);
    # beta used its whole row and wants more.
    allocated = {"tenant=acme": 4096.0, "tenant=beta": 14_000.0}
    lent = rows.rebalance(allocated, wants_more={"tenant=acme", "tenant=beta"})
    assert lent == pytest.approx({"tenant=acme": 4096, "tenant=beta": 15_904})
    # Nobody to lend to: nothing to do.
    assert rows.rebalance(allocated, wants_more={"tenant=acme"}) is None


# --- ClearPolicy ---------------------------------------------------------------------------


def request(i: int, tenant: str | None, prompt: str) -> QueryRequest:
    tags = {"task": "bench"} | ({"tenant": tenant} if tenant else {})
    return QueryRequest(id=f"q{i}", prompt=f"problem {prompt}", tags=tags)


@pytest.fixture(scope="module")
def allocator() -> CvxpyAllocator:
    """One allocator for the module's policies, as the daemon keeps one per process."""
    return CvxpyAllocator()


def policy(spec: str, allocator: CvxpyAllocator, metrics: PipelineMetrics | None = None):
    budgets = TagBudgets.parse(spec)
    clear = ClearPolicy(
        PLAN,
        tag_budgets=budgets,
        tag_metrics=metrics.tags if metrics else None,
        allocator=allocator,
    )
    for k in range(40):  # the same history for every prompt, whatever the tenant
        for prompt, tokens in LENGTHS.items():
            clear.observe(request(1000 + k, None, prompt), tokens, finished=True, answered=True)
    return clear


def views(groups: list[tuple[str | None, str]]) -> list[QueryView]:
    return [
        QueryView(request(i, tenant, prompt), (ProbeOutcome(False, 256),), 256, CAP - 256)
        for i, (tenant, prompt) in enumerate(groups)
    ]


def spend_shares(clear: ClearPolicy, queries: list[QueryView], budget: float) -> dict[str, float]:
    """Each group's share of the window (probes included) after `decide`."""
    assert clear.tag_budgets is not None
    decision = clear.decide(queries, budget)
    assert int(np.sum(decision.tokens)) <= budget
    whole = budget + sum(q.probe_tokens for q in queries)
    spend: dict[str, float] = {}
    for query, tokens in zip(queries, decision.tokens, strict=True):
        group = clear.tag_budgets.group_of(query.request.tags)
        spend[group] = spend.get(group, 0.0) + (int(tokens) + query.probe_tokens) / whole
    return spend


def overload(tenants: list[str | None], n: int) -> list[tuple[str | None, str]]:
    """`n` queries per tenant, every tenant with the same prompts (equally worth it)."""
    prompts = list(LENGTHS)
    return [(t, prompts[i % len(prompts)]) for i in range(n) for t in tenants]


def test_under_overload_each_tenant_spends_its_share(allocator: CvxpyAllocator) -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, ("tenant=acme", "tenant=beta", OTHER))
    clear = policy("tenant=acme:0.3,tenant=beta:0.7", allocator, metrics)
    queries = views(overload(["acme", "beta"], 15))  # 30 queries; the budget funds ~8
    shares = spend_shares(clear, queries, 20_000.0)
    assert shares["tenant=acme"] == pytest.approx(0.3, rel=0.02)
    assert shares["tenant=beta"] == pytest.approx(0.7, rel=0.02)
    # The scarcer share costs more per token; both prices are exported per tag.
    acme = registry.get_sample_value("clear_tag_shadow_price", {"tag": "tenant=acme"})
    beta = registry.get_sample_value("clear_tag_shadow_price", {"tag": "tenant=beta"})
    assert acme is not None
    assert beta is not None
    assert acme > beta > 0


def test_a_tenant_with_no_queries_leaves_its_share_to_the_others(
    allocator: CvxpyAllocator,
) -> None:
    clear = policy("tenant=acme:0.3,tenant=beta:0.7", allocator)
    shares = spend_shares(clear, views(overload(["beta"], 30)), 20_000.0)
    assert shares == {"tenant=beta": pytest.approx(1.0, abs=0.01)}
    # The same with queries of no tenant beside beta: acme's 30% is not held idle.
    shares = spend_shares(clear, views(overload(["beta", None], 15)), 20_000.0)
    assert shares["tenant=beta"] >= 0.7 * 0.98
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)


def test_the_pool_is_shared_and_no_reserve_is_invaded(allocator: CvxpyAllocator) -> None:
    clear = policy("tenant=acme:0.3,tenant=beta:0.2", allocator)
    # Only acme asks for the long, costly prompt: beta and the untagged queries would outbid it
    # for every token were it not for its reserve.
    queries = views([("acme", "long"), ("beta", "easy"), (None, "easy")] * 12)
    shares = spend_shares(clear, queries, 20_000.0)
    assert shares["tenant=acme"] == pytest.approx(0.3, rel=0.02)
    assert shares["tenant=beta"] >= 0.2 * 0.98
    assert shares[OTHER] > 0.2  # the 50% pool went to whoever was worth it
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)


def test_without_entries_in_the_window_it_is_a_plain_clear_window(
    allocator: CvxpyAllocator,
) -> None:
    clear = policy("tenant=acme:0.3", allocator)
    decision = clear.decide(views(overload(["beta", None], 10)), 20_000.0)
    assert decision.tag_budgets == {}
    assert decision.solver == "closed_form"


def test_spend_is_counted_per_entry_and_other() -> None:
    budgets = TagBudgets.parse("tenant=acme:0.5")
    items = [PendingQuery(request(i, t, "easy"), 0.0) for i, t in enumerate(["acme", "x", None])]
    results = [
        QueryResult(id=item.request.id, status=Status.ANSWERED, tokens_used=100 * (i + 1),
                    tokens_probe=0, allocated_tokens=0, shadow_price=0.0, window_id="w",
                    reason_code=ReasonCode.CHAIN_FINISHED)
        for i, item in enumerate(items)
    ]  # fmt: skip
    spend = tag_spend(budgets, items, results)
    assert spend == {"tenant=acme": 100, OTHER: 500}
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, budgets.label_keys)
    metrics.tags.record_spend({**spend, "tenant=unknown": 7})  # outside the label set: other
    assert registry.get_sample_value("clear_tag_tokens_total", {"tag": "tenant=acme"}) == 100
    assert registry.get_sample_value("clear_tag_tokens_total", {"tag": OTHER}) == 507
    labels = {s.labels["tag"] for m in registry.collect() for s in m.samples if "tag" in s.labels}
    assert labels == {"tenant=acme", OTHER}


async def test_through_the_pipeline_with_probes_each_tenant_gets_its_share(
    allocator: CvxpyAllocator,
) -> None:
    """The real window pipeline on the simulator, probes on: a probe counts against its
    tenant's share, each tenant is allotted its share (to within one query's cap: what is left
    of a share below a query's threshold is lent), the window never overspends, and the per-tag
    counter is what the results report."""
    lengths = (700, 1300, 1900, 2600)
    pool = RolloutPool(
        [
            RolloutRecord("m", "bench", f"p{k}", 10, "7", tuple(
                RolloutSample(tokens=length + 40 * k, correct=True, answer="7")
                for length in lengths
            ))
            for k in range(12)
        ]
    )  # fmt: skip
    budgets = TagBudgets.parse("tenant=acme:0.3,tenant=beta:0.7")
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, budgets.label_keys)
    clear = ClearPolicy(PLAN, tag_budgets=budgets, tag_metrics=metrics.tags, allocator=allocator)
    pipeline = TagSpendPipeline(
        SimulatedBackend(pool, seed=3), clear, metrics, tag_budgets=budgets,
        max_tokens_per_query=2048,
    )  # fmt: skip
    spend = dict.fromkeys(budgets.keys, 0)
    budget = 12_000.0
    for n in range(6):
        items = tuple(
            PendingQuery(
                QueryRequest(
                    id=f"w{n}-{tenant}-{k}", prompt=prompt_for(record), tags={"tenant": tenant},
                    max_tokens=2048,
                ),
                0.0,
            )
            for k, record in enumerate(pool.records)
            for tenant in ("acme", "beta")
        )  # fmt: skip
        outcome = await pipeline.run(Window(f"w-{n}", 0.0, 2.0, items), budget)
        assert outcome.report.spent_tokens <= budget
        assert outcome.report.probe_tokens > 0
        # Allotted: probes and allocations, what early finishers left to cut chains included
        # (so together they may pass the budget the window's spend stays within).
        planned = dict.fromkeys(budgets.keys, 0)
        for result in outcome.results:
            key = "tenant=" + result.id.split("-")[1]
            planned[key] += result.tokens_probe + result.allocated_tokens
            spend[key] += result.tokens_used
        for entry in budgets.entries:
            assert planned[entry.key] >= entry.share * budget - 2048, (n, planned)
    for key, tokens in spend.items():
        assert registry.get_sample_value("clear_tag_tokens_total", {"tag": key}) == tokens


def test_prepare_loads_the_tagged_solver_before_any_window() -> None:
    from clearbudget.solver.fit import ProbePlan

    budgets = TagBudgets.parse("tenant=a:0.3,tenant=b:0.2")
    policy = ClearPolicy(ProbePlan(1, 256), tag_budgets=budgets)
    policy.prepare()
    assert policy.allocator.compiled_buckets() == [(16, 2)]
