"""`clearbudget submit` and `results` without a broker: every query is validated by the daemon's
edge rules before anything is sent (a bad line names its number and field, nothing goes out),
options are checked, and a broker that is not there is one line naming CLEAR_KAFKA_BOOTSTRAP.
The round trip through a real broker and daemon is tests/integration/test_submit_results.py."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from typer.testing import CliRunner

from clearbudget.daemon.cli import app
from clearbudget.daemon.cli.results import STATUSES, ResultFilter, ResultPrinter, stream_results
from clearbudget.daemon.cli.submit import InvalidInput, parse_lines, prompt_request
from clearbudget.daemon.replay.embedded import free_loopback_port
from clearbudget.schemas.messages import QueryResult, ReasonCode, Status

LIMIT = 256 * 1024


def numbered() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"gen-{next(counter)}"


def test_lines_become_requests_with_ids_given_where_missing() -> None:
    lines = [
        '{"id": "a", "prompt": "one", "tags": {"task": "t"}, "max_tokens": 50}',
        "",
        '  {"prompt": "two", "deadline": "2030-01-01T00:00:00Z"}  ',
        "{ }",
        '{"prompt": "three"}',
    ]
    requests, errors = parse_lines(lines, LIMIT, numbered())
    assert [r.id for r in requests] == ["a", "gen-1", "gen-3"]
    assert (requests[0].tags, requests[0].max_tokens) == ({"task": "t"}, 50)
    assert requests[1].deadline is not None
    assert requests[1].deadline.year == 2030
    # `{ }` got an id too, then failed as the daemon would fail it.
    assert errors == ["line 4: prompt: field required"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("{not json", "line 1: message: not valid JSON"),
        ('["a"]', "line 1: message: must be a JSON object, got an array"),
        ('{"id": "x", "prompt": "p", "max_tokens": 0}', "line 1: max_tokens: must be >= 1"),
        ('{"id": "x", "prompt": "p", "colour": "red"}', "line 1: colour: unknown field"),
        ('{"id": "x", "prompt": "p", "weight": NaN}', "line 1: weight: must be a finite number"),
        ('{"id": "x", "prompt": "p", "weight": "2"}', "line 1: weight: "),
        ('{"id": "x y", "prompt": "p"}', "line 1: id: must be 1-200 characters"),
        ('{"id": "x", "prompt": "p", "prompt": "q"}', "line 1: prompt: duplicate key"),
        ('{"id": "x", "prompt": "\\ud800"}', "line 1: prompt: is not valid Unicode"),
    ],
)  # fmt: skip
def test_a_bad_line_is_named_by_number_and_field(line: str, error: str) -> None:
    requests, errors = parse_lines([line], LIMIT)
    assert requests == []
    assert len(errors) == 1
    assert errors[0].startswith(error), errors[0]


def test_the_daemons_prompt_limit_applies() -> None:
    line = json.dumps({"id": "big", "prompt": "x" * 101})
    assert parse_lines([line], 100)[1] == [
        "line 1: prompt: is 101 bytes of UTF-8; the limit is 100"
    ]
    assert len(parse_lines([line], 101)[0]) == 1


def test_a_repeated_id_is_an_error_of_the_later_line() -> None:
    lines = [
        '{"id": "a", "prompt": "1"}',
        '{"id": "b", "prompt": "2"}',
        '{"id": "a", "prompt": "3"}',
    ]
    requests, errors = parse_lines(lines, LIMIT)
    assert [r.id for r in requests] == ["a", "b"]
    assert errors == ["line 3: id: 'a' is already the id of line 1"]


def test_a_prompt_with_options_is_one_request() -> None:
    request = prompt_request(
        "What is 2+2?", ["task=math", "tenant=a=b"], 64, 30.0, None, LIMIT,
        make_id=lambda: "q-1", now=lambda: 1_700_000_000.0,
    )  # fmt: skip
    assert request.id == "q-1"
    assert request.prompt == "What is 2+2?"
    assert request.tags == {"task": "math", "tenant": "a=b"}
    assert request.max_tokens == 64
    assert request.deadline is not None
    assert request.deadline.timestamp() == 1_700_000_030.0
    assert prompt_request("x", [], None, None, "mine", LIMIT).id == "mine"
    assert prompt_request("x", [], None, None, None, LIMIT).id.startswith("q-")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tags": ["task"]}, "--tag must be KEY=VALUE, got 'task'"),
        ({"tags": ["=x"]}, "--tag must be KEY=VALUE, got '=x'"),
        ({"tags": ["a=1", "a=2"]}, "--tag a is given twice"),
        ({"tags": ["Task=x"]}, "--tag Task: key must match ^[a-z]"),
        ({"max_tokens": 0}, "--max-tokens: must be >= 1"),
        ({"deadline_s": 0}, "--deadline-s must be > 0 (seconds from now, under 1e9), got 0"),
        ({"query_id": "no spaces"}, "--id: must be 1-200 characters"),
        ({"prompt": ""}, "PROMPT: must not be empty"),
    ],
)  # fmt: skip
def test_a_bad_prompt_option_is_named(kwargs: dict, error: str) -> None:
    args = {"prompt": "p", "tags": [], "max_tokens": None, "deadline_s": None, "query_id": None}
    args |= kwargs
    with pytest.raises(InvalidInput) as caught:
        prompt_request(**args, max_prompt_bytes=LIMIT)
    assert str(caught.value).startswith(error), str(caught.value)


@pytest.fixture
def no_broker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """CLEAR_* settings that point at a loopback port where nothing listens (and no .env)."""
    for name in [n for n in os.environ if n.upper().startswith("CLEAR_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    bootstrap = f"127.0.0.1:{free_loopback_port()}"
    monkeypatch.setenv("CLEAR_KAFKA_BOOTSTRAP", bootstrap)
    return bootstrap


def invoke(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    out = CliRunner().invoke(app, list(args), input=stdin)
    return out.exit_code, out.stdout, out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit"], "error: give a PROMPT or --file (see --help)"),
        (["submit", "p", "--file", "q.jsonl"], "error: give one PROMPT or --file, not both"),
        (["submit", "--file", "q.jsonl", "--tag", "a=b"],
         "error: --tag, --max-tokens, --deadline-s and --id go with a PROMPT, not --file"),
        (["submit", "p", "--wait", "--timeout", "0"], "error: --timeout must be > 0, got 0"),
        (["submit", "p", "--max-tokens", "0"], "error: --max-tokens: must be >= 1"),
        (["submit", "--file", "missing.jsonl"], "error: missing.jsonl: file not found"),
        (["results", "--status", "done"],
         "error: --status must be one of answered, abandoned, expired, failed, rejected, "
         "got 'done'"),
        (["results", "--limit", "0"], "error: --limit must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_options_fail_in_one_line_before_any_connection(
    no_broker: str, args: list[str], message: str
) -> None:
    code, stdout, stderr = invoke(*args)
    assert (code, stdout) == (2, "")
    assert stderr == message + "\n"


def test_a_file_with_a_bad_line_sends_nothing(no_broker: str, tmp_path: Path) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"prompt": "fine"}\n{"prompt": "bad", "max_tokens": -1}\n{"x": 1}\n')
    code, stdout, stderr = invoke("submit", "--file", str(queries))
    # The broker is not there, so a validation error proves nothing was even tried.
    assert (code, stdout) == (2, "")
    assert stderr == (f"error: {queries}: line 2: max_tokens: must be >= 1 (and 1 more bad "
                      "lines); nothing was sent\n")  # fmt: skip
    code, _, stderr = invoke("submit", "--file", "-", stdin="\n\n")
    assert (code, stderr) == (2, "error: stdin: holds no queries\n")
    code, _, stderr = invoke("submit", "--file", "-", stdin='{"prompt": 5}\n')
    assert (code, stderr) == (2, "error: stdin: line 1: prompt: input should be a valid string; "
                                 "nothing was sent\n")  # fmt: skip


@pytest.mark.parametrize(
    "args", [["submit", "What is 2+2?"], ["submit", "x", "--wait"], ["results"]]
)
def test_an_unreachable_broker_is_one_line_naming_the_variable(
    no_broker: str, args: list[str]
) -> None:
    start = time.monotonic()
    code, stdout, stderr = invoke(*args)
    assert time.monotonic() - start < 15
    assert (code, stdout) == (2, "")
    assert stderr.startswith(
        f"error: cannot use the Kafka broker at CLEAR_KAFKA_BOOTSTRAP={no_broker}"
    )
    assert stderr.count("\n") == 1


def test_statuses_spelt_out_match_the_schema() -> None:
    assert tuple(s.value for s in Status) == STATUSES


def result(qid: str, status: Status = Status.ANSWERED) -> QueryResult:
    if status is Status.ANSWERED:
        return QueryResult(id=qid, status=status, answer="4", tokens_used=120, tokens_probe=64,
                           allocated_tokens=300, shadow_price=0.0012, window_id="w-1",
                           reason_code=ReasonCode.CHAIN_FINISHED)  # fmt: skip
    return QueryResult.unspent(qid, status, "bad input")


def test_the_filter_takes_ids_and_statuses() -> None:
    both = ResultFilter.of(["a", "b"], ["REJECTED"])
    assert both.matches(result("a", Status.REJECTED))
    assert not both.matches(result("a"))
    assert not both.matches(result("c", Status.REJECTED))
    assert ResultFilter.of(None, None).matches(result("z"))


def test_results_print_as_json_lines_or_table_rows(capsys: pytest.CaptureFixture[str]) -> None:
    printer = ResultPrinter(json_out=True)
    printer.print(result("a"))
    printer.print(result("b", Status.REJECTED))
    lines = capsys.readouterr().out.splitlines()
    assert [QueryResult.model_validate_json(line).id for line in lines] == ["a", "b"]

    table = ResultPrinter(json_out=False)
    table.print(result("q-answered"))
    table.print(result("q-rejected", Status.REJECTED))
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["id", "status", "code", "tokens"]
    assert first.split() == [
        "q-answered", "answered", "chain_finished", "120", "64", "300", "0.0012", "4"
    ]  # fmt: skip
    assert second.split()[:3] == ["q-rejected", "rejected", "invalid_input"]
    assert "bad input" in second
    assert table.printed == 2


def test_table_cells_are_text_not_markup(capsys: pytest.CaptureFixture[str]) -> None:
    printer = ResultPrinter(json_out=False)
    printer.print(QueryResult(id="m", status=Status.ANSWERED, answer="[bold]x[/bold]\nmore",
                              tokens_used=1, tokens_probe=0, allocated_tokens=1,
                              shadow_price=None, window_id=None,
                              reason_code=ReasonCode.CHAIN_FINISHED))  # fmt: skip
    _, row = capsys.readouterr().out.splitlines()
    assert row.split()[-2:] == ["[bold]x[/bold]", "more"]


@dataclass
class Record:
    offset: int
    value: bytes


class FakeReader:
    """The consumer calls `stream_results` makes, over in-memory partitions: two records per
    fetch, and a high watermark only once a partition has been fetched."""

    def __init__(self, partitions: dict[TopicPartition, list[bytes]]) -> None:
        self.data = partitions
        self.positions = dict.fromkeys(partitions, 0)
        self.fetched: set[TopicPartition] = set()

    async def getmany(self, *tps: TopicPartition, timeout_ms: int) -> dict:
        batch = {}
        for tp in tps:
            self.fetched.add(tp)
            start = self.positions[tp]
            records = [Record(o, v) for o, v in enumerate(self.data[tp]) if o >= start][:2]
            if records:
                batch[tp] = records
                self.positions[tp] = records[-1].offset + 1
        return batch

    def highwater(self, tp: TopicPartition) -> int | None:
        return len(self.data[tp]) if tp in self.fetched else None

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


async def collect(reader: FakeReader, **kwargs: object) -> list[str]:
    tps = list(reader.data)
    return [r.id async for r in stream_results(reader, tps, follow=False, **kwargs)]  # type: ignore[arg-type]


async def test_a_finite_read_ends_at_the_high_watermark_and_skips_foreign_records(
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b, empty = (TopicPartition("r", p) for p in range(3))
    values = [result(f"q{i}").model_dump_json().encode() for i in range(5)]
    reader = FakeReader({a: [*values[:3], b"{junk"], b: values[3:], empty: []})
    assert sorted(await collect(reader)) == ["q0", "q1", "q2", "q3", "q4"]
    assert reader.positions == {a: 4, b: 2, empty: 0}
    warning = capsys.readouterr().err
    assert warning.startswith("warning: r partition 0 offset 3: not a QueryResult (")
    assert warning.endswith("), skipped\n")


async def test_a_finite_read_that_never_reaches_the_end_fails() -> None:
    tp = TopicPartition("r", 0)
    reader = FakeReader({tp: []})
    reader.highwater = lambda tp: None  # type: ignore[method-assign]  # no fetch ever answers
    ticks = itertools.count(step=4.0)
    with pytest.raises(TimeoutError, match="no progress towards the end"):
        await collect(reader, clock=lambda: next(ticks))
