"""The message models: strict validation rules, exported JSON Schema files, `schema` command."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from clearbudget.daemon.cli import app
from clearbudget.schemas import (
    DEFAULT_MAX_PROMPT_BYTES,
    REASON_STATUS,
    RESULT_SCHEMA_VERSION,
    Curve,
    DeadLetter,
    QueryRequest,
    QueryResult,
    ReasonCode,
    Status,
    WindowReport,
)
from clearbudget.schemas.export import (
    REGENERATE_COMMAND,
    SCHEMA_MODELS,
    drifted_schema_files,
    render,
    schema_document,
    write_schema_files,
)

NAN = float("nan")
INF = float("inf")


def request(**fields: Any) -> dict[str, Any]:
    return {"id": "q-1", "prompt": "What is 2+2?", **fields}


def result(**fields: Any) -> dict[str, Any]:
    base = {
        "id": "q-1",
        "status": "answered",
        "answer": "4",
        "tokens_used": 900,
        "tokens_probe": 256,
        "allocated_tokens": 1200,
        "shadow_price": 0.0004,
        "window_id": "w-17",
        "reason_code": "chain_finished",
    }
    return {**base, **fields}


def result_v1(**fields: Any) -> dict[str, Any]:
    """A result as daemons before schema version 2 wrote it (no reason code, no curve)."""
    payload = {**result(), "schema_version": 1, "reason": None}
    del payload["reason_code"]
    return {**payload, **fields}


def window(**fields: Any) -> dict[str, Any]:
    base = {
        "window_id": "w-17",
        "shadow_price": 0.0004,
        "budget_tokens": 50_000.0,
        "spent_tokens": 41_000,
        "probe_tokens": 6_400,
        "counts": {"answered": 20, "abandoned": 4, "rejected": 1},
        "solver": "closed-form",
        "solve_ms": 1.7,
        "started_at": "2025-01-31T12:00:00Z",
        "ended_at": "2025-01-31T12:00:05Z",
    }
    return {**base, **fields}


def dead_letter(**fields: Any) -> dict[str, Any]:
    base = {
        "error": "weight: must be >= 0",
        "topic": "clear.queries",
        "partition": 3,
        "offset": 42,
        "timestamp": "2025-01-31T12:00:00Z",
        "query_id": "q-1",
        "value_b64": "e30=",
        "value_bytes": 2,
    }
    return {**base, **fields}


def error_locations(exc: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    return {".".join(map(str, e["loc"])) for e in exc.value.errors()}


# --- QueryRequest -----------------------------------------------------------------------


def test_minimal_request_gets_documented_defaults() -> None:
    parsed = QueryRequest.model_validate(request())
    assert (parsed.schema_version, parsed.weight, parsed.tags) == (1, 1.0, {})
    assert parsed.max_tokens is None
    assert parsed.deadline is None
    assert parsed.difficulty_hint is None


def test_full_request_round_trips_through_json() -> None:
    parsed = QueryRequest.model_validate(
        request(
            tags={"task": "aime", "tenant": "acme", "model": "r1-7b"},
            weight=2,
            max_tokens=4096,
            deadline="2025-01-31T13:00:00+01:00",
            difficulty_hint=0.8,
            schema_version=1,
        )
    )
    assert parsed.deadline == datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    assert QueryRequest.model_validate_json(parsed.model_dump_json()) == parsed


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("weight", -0.5),
        ("weight", NAN),
        ("weight", INF),
        ("weight", -INF),
        ("weight", "1.0"),
        ("weight", True),
        ("weight", 1e7),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 12.0),
        ("max_tokens", "12"),
        ("max_tokens", (1 << 20) + 1),
        ("difficulty_hint", -0.01),
        ("difficulty_hint", 1.01),
        ("difficulty_hint", NAN),
        ("schema_version", 2),
        ("schema_version", True),
        ("schema_version", 1.0),
        ("schema_version", "1"),
        ("prompt", ""),
        ("prompt", 7),
        ("prompt", None),
        ("prompt", "bad \ud800 surrogate"),
        ("tags", ["task", "aime"]),
        ("tags", {"Task": "aime"}),
        ("tags", {"task": 3}),
        ("tags", {"task": ""}),
        ("tags", {"task": "line\nbreak"}),
        ("tags", {"task": {"nested": "x"}}),
        ("tags", {f"k{i}": "v" for i in range(17)}),
    ],
)
def test_request_rejects_bad_value_naming_the_field(field: str, bad: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        QueryRequest.model_validate(request(**{field: bad}))
    assert all(loc.split(".")[0] == field for loc in error_locations(exc))


@pytest.mark.parametrize(
    "bad_id",
    ["", "x" * 201, "has space", "tab\there", "trailing-newline\n", "é", 17, None, ["q"]],
)
def test_request_rejects_bad_ids(bad_id: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        QueryRequest.model_validate(request(id=bad_id))
    assert error_locations(exc) == {"id"}


@pytest.mark.parametrize(
    "good_id", ["a", "x" * 200, "0190c7e2-5a4b-7c1d-9e8f-1234567890ab", "acme/q:17@eu+1=~_."]
)
def test_request_accepts_sane_ids(good_id: str) -> None:
    assert QueryRequest.model_validate(request(id=good_id)).id == good_id


@pytest.mark.parametrize("missing", ["id", "prompt"])
def test_request_requires_id_and_prompt(missing: str) -> None:
    payload = request()
    del payload[missing]
    with pytest.raises(ValidationError) as exc:
        QueryRequest.model_validate(payload)
    assert error_locations(exc) == {missing}


def test_request_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError) as exc:
        QueryRequest.model_validate(request(priority=3))
    assert error_locations(exc) == {"priority"}


def test_prompt_limit_counts_utf8_bytes_not_characters() -> None:
    at_limit = "é" * (DEFAULT_MAX_PROMPT_BYTES // 2)  # two bytes each
    assert QueryRequest.model_validate(request(prompt=at_limit)).prompt == at_limit
    with pytest.raises(ValidationError, match="262146 bytes of UTF-8; the limit is 262144"):
        QueryRequest.model_validate(request(prompt=at_limit + "é"))


def test_prompt_limit_comes_from_validation_context() -> None:
    payload = request(prompt="x" * 11)
    with pytest.raises(ValidationError, match="the limit is 10"):
        QueryRequest.model_validate(payload, context={"max_prompt_bytes": 10})
    assert QueryRequest.model_validate(payload, context={"max_prompt_bytes": 11})


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T07:00:00-05:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        (1738324800, datetime(2025, 1, 31, 12, tzinfo=UTC)),
        (1738324800.5, datetime(2025, 1, 31, 12, 0, 0, 500000, tzinfo=UTC)),
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_deadline_is_aware_string_or_epoch_seconds_in_utc(
    deadline: Any, expected: datetime
) -> None:
    parsed = QueryRequest.model_validate(request(deadline=deadline)).deadline
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "deadline",
    [
        "2025-01-31T12:00:00",  # naive: ambiguous
        "1738324800",  # numbers must be JSON numbers
        "tomorrow",
        "0001-01-01T00:00:00+05:00",  # before year 1 in UTC
        "x" * 65,
        -1,
        10**400,
        NAN,
        INF,
        True,
        [2025, 1, 31],
        1738324800000,  # milliseconds are out of range, never silently reinterpreted
    ],
)
def test_deadline_rejects_ambiguous_or_invalid_values(deadline: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        QueryRequest.model_validate(request(deadline=deadline))
    assert error_locations(exc) == {"deadline"}


# --- QueryResult ------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(ReasonCode))
def test_result_accepts_every_status_with_each_of_its_codes_from_json(code: ReasonCode) -> None:
    status = REASON_STATUS[code]
    payload = result(status=status.value, reason="backend timed out", reason_code=code.value)
    if status is Status.REJECTED:  # refused at the edge: nothing was generated
        payload.update(tokens_used=0, tokens_probe=0)
    parsed = QueryResult.model_validate_json(json.dumps(payload))
    assert (parsed.status, parsed.reason_code, code.status) == (status, code, status)
    assert parsed.schema_version == RESULT_SCHEMA_VERSION == 2
    assert QueryResult.model_validate_json(parsed.model_dump_json()) == parsed


def test_rejected_result_has_null_price_and_window() -> None:
    payload = result(
        status="rejected",
        answer=None,
        tokens_used=0,
        tokens_probe=0,
        allocated_tokens=0,
        shadow_price=None,
        window_id=None,
        reason="weight: must be >= 0",
        reason_code="invalid_input",
    )
    assert QueryResult.model_validate(payload).status is Status.REJECTED


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"status": "done"}, "status"),
        ({"status": "rejected", "tokens_used": 0, "tokens_probe": 0}, "reason is required"),
        ({"status": "failed"}, "reason is required"),
        ({"status": "rejected", "reason": "x"}, "cannot have used tokens"),
        ({"status": "abandoned", "shadow_price": None}, "needs its shadow_price"),
        ({"tokens_probe": 901}, "tokens_probe must not exceed tokens_used"),
        ({"shadow_price": NAN}, "finite"),
        ({"shadow_price": -1e-9}, "greater than or equal"),
        ({"tokens_used": 1.0}, "valid integer"),
        ({"allocated_tokens": -5}, "greater than or equal"),
        ({"window_id": "w 17"}, "pattern"),
        ({"extra": 1}, "Extra inputs"),
        ({"reason_code": None}, "reason_code is required"),
        ({"reason_code": "done"}, "reason_code"),
        ({"reason_code": "insolvent"}, "belongs to status abandoned, not answered"),
        ({"schema_version": 3}, "schema_version"),
        ({"schema_version": True}, "must be the integer 1 or 2"),
        ({"schema_version": "2"}, "must be the integer 1 or 2"),
        ({"expected_accuracy": 0.5}, "needs the curve"),
        ({"curve": {"A": 0.9, "tau": 100, "beta": 0.01}}, "needs expected_accuracy"),
        (
            {"curve": {"A": 0.9, "tau": 100, "beta": 0.01}, "expected_accuracy": 0.1},
            "not the curve",
        ),
        ({"curve": {"A": 1.1, "tau": 0, "beta": 0.01}, "expected_accuracy": 1}, "curve.A"),
        ({"curve": {"A": 0.5, "tau": -1, "beta": 0.01}, "expected_accuracy": 0.5}, "curve.tau"),
        ({"curve": {"A": 0.5, "tau": 0, "beta": 0}, "expected_accuracy": 0}, "curve.beta"),
        ({"curve": {"A": 0.5, "tau": 0, "beta": INF}, "expected_accuracy": 0.5}, "curve.beta"),
        ({"curve": {"A": 0.5, "tau": 0}, "expected_accuracy": 0.5}, "curve.beta"),
        ({"curve": {"A": 0.5, "tau": 0, "beta": 1, "w": 3}, "expected_accuracy": 0.5}, "curve.w"),
        ({"curve": [0.5, 0, 1], "expected_accuracy": 0.5}, "curve"),
    ],
)
def test_result_rejects_inconsistent_or_invalid_fields(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        QueryResult.model_validate(result(**fields))


def test_result_requires_the_contract_keys_even_when_null() -> None:
    payload = result()
    del payload["shadow_price"]
    with pytest.raises(ValidationError, match="shadow_price"):
        QueryResult.model_validate(payload)


def test_every_reason_code_has_one_status_and_every_status_has_codes() -> None:
    assert set(REASON_STATUS) == set(ReasonCode)
    assert set(REASON_STATUS.values()) == set(Status)
    assert all(code.status is REASON_STATUS[code] for code in ReasonCode)


def test_a_version_1_result_from_an_older_daemon_still_reads() -> None:
    parsed = QueryResult.model_validate_json(json.dumps(result_v1()))
    assert (parsed.schema_version, parsed.reason_code, parsed.curve) == (1, None, None)
    assert parsed.expected_accuracy is None
    assert QueryResult.model_validate_json(parsed.model_dump_json()) == parsed


@pytest.mark.parametrize(
    "fields",
    [
        {"reason_code": "chain_finished"},
        {"curve": {"A": 0.5, "tau": 0, "beta": 1}, "expected_accuracy": 0.5},
        {"expected_accuracy": 0.5},
    ],
)
def test_a_version_1_result_has_none_of_the_version_2_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="version 1 result has no reason_code"):
        QueryResult.model_validate(result_v1(**fields))


def test_result_curve_and_expected_accuracy_agree_at_the_allocation() -> None:
    curve = {"A": 0.8, "tau": 200, "beta": 0.004}  # JSON integers are numbers too
    expected = 0.8 * (1 - math.exp(-0.004 * (1200 - 200)))
    payload = result(curve=curve, expected_accuracy=expected)
    parsed = QueryResult.model_validate_json(json.dumps(payload))
    assert parsed.curve == Curve(A=0.8, tau=200.0, beta=0.004)
    assert parsed.expected_accuracy == pytest.approx(expected)
    assert parsed.curve.value(parsed.allocated_tokens) == pytest.approx(expected)
    assert QueryResult.model_validate_json(parsed.model_dump_json()) == parsed


@pytest.mark.parametrize(
    ("tokens", "value"), [(0, 0.0), (200, 0.0), (201, 0.8 * (1 - math.exp(-0.004))), (1e9, 0.8)]
)
def test_curve_value_is_the_shifted_surge(tokens: float, value: float) -> None:
    assert Curve(A=0.8, tau=200, beta=0.004).value(tokens) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (Status.REJECTED, ReasonCode.INVALID_INPUT),
        (Status.FAILED, ReasonCode.WINDOW_ERROR),
        (Status.ABANDONED, ReasonCode.SHUTDOWN),
        (Status.EXPIRED, ReasonCode.DEADLINE),
    ],
)
def test_an_unspent_result_gets_its_status_default_code(status: Status, code: ReasonCode) -> None:
    unspent = QueryResult.unspent("q-1", status, "why", shadow_price=0.0)
    assert (unspent.reason_code, unspent.tokens_used, unspent.curve) == (code, 0, None)
    told = QueryResult.unspent("q-1", Status.ABANDONED, "why", shadow_price=0.0,
                               reason_code=ReasonCode.HANDOVER)  # fmt: skip
    assert told.reason_code is ReasonCode.HANDOVER


# --- WindowReport -----------------------------------------------------------------------


def test_window_report_round_trips_and_counts_default_to_zero() -> None:
    parsed = WindowReport.model_validate(window())
    assert (parsed.counts.answered, parsed.counts.expired) == (20, 0)
    assert WindowReport.model_validate_json(parsed.model_dump_json()) == parsed


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ended_at": "2025-01-31T11:59:59Z"}, "ended_at must not be before started_at"),
        ({"probe_tokens": 41_001}, "probe_tokens must not exceed spent_tokens"),
        ({"budget_tokens": -1}, "budget_tokens"),
        ({"budget_tokens": INF}, "budget_tokens"),
        ({"shadow_price": NAN}, "shadow_price"),
        ({"solve_ms": -0.1}, "solve_ms"),
        ({"counts": {"answered": -1}}, "counts.answered"),
        ({"counts": {"answred": 1}}, "counts.answred"),
        ({"solver": ""}, "solver"),
    ],
)
def test_window_report_rejects_invalid_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WindowReport.model_validate(window(**fields))


# --- DeadLetter -------------------------------------------------------------------------


def test_dead_letter_accepts_complete_and_tombstone_records() -> None:
    assert DeadLetter.model_validate(dead_letter()).value_bytes == 2
    tombstone = dead_letter(value_b64=None, value_bytes=0, query_id=None)
    assert DeadLetter.model_validate(tombstone).value_b64 is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"value_bytes": 3}, "disagrees"),  # shorter than the original but not marked truncated
        ({"value_bytes": 3, "value_truncated": False}, "disagrees"),
        ({"value_bytes": 1}, "disagrees"),  # longer than the original
        ({"value_b64": "e30"}, "multiple of 4"),
        ({"value_b64": "e3$="}, "pattern"),
        ({"value_b64": None}, "null value has no bytes"),
        ({"error": ""}, "error"),
        ({"offset": -1}, "offset"),
        ({"topic": "t" * 250}, "topic"),
    ],
)
def test_dead_letter_rejects_inconsistent_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DeadLetter.model_validate(dead_letter(**fields))


def test_truncated_dead_letter_is_consistent() -> None:
    parsed = DeadLetter.model_validate(dead_letter(value_bytes=10, value_truncated=True))
    assert parsed.value_truncated


# --- JSON Schema files ------------------------------------------------------------------


def test_checked_in_schema_files_match_the_models() -> None:
    drifted = drifted_schema_files()
    assert not drifted, (
        f"schemas/ JSON Schema files drifted from the models: {drifted}. "
        f"Regenerate them with `{REGENERATE_COMMAND}` and commit the result."
    )


def test_drift_check_notices_stale_missing_and_orphan_files(tmp_path: Path) -> None:
    write_schema_files(tmp_path)
    assert drifted_schema_files(tmp_path) == []
    (tmp_path / "query_result.schema.json").write_text("{}\n")
    (tmp_path / "window_report.schema.json").unlink()
    (tmp_path / "old_thing.schema.json").write_text("{}\n")
    assert drifted_schema_files(tmp_path) == [
        "query_result.schema.json",
        "window_report.schema.json",
        "old_thing.schema.json",
    ]


def test_every_schema_has_a_version_const_and_forbids_unknown_fields() -> None:
    for name in SCHEMA_MODELS:
        document = schema_document(name)
        version = document["properties"]["schema_version"]
        if name == "query_result":  # version 2, still reading 1 (docs/contracts.md)
            assert (version["enum"], version["default"]) == ([1, 2], 2)
        else:
            assert version["const"] == 1, name
        assert document["additionalProperties"] is False, name


def test_result_json_schema_agrees_with_the_model_on_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema_document("query_result"))
    curve = {"A": 0.5, "tau": 0, "beta": 1}
    rejected = {"status": "rejected", "tokens_used": 0, "tokens_probe": 0, "reason": "bad"}
    good = [
        result(),
        result_v1(),
        result(status="abandoned", reason_code="insolvent", curve=curve, expected_accuracy=0.5),
        result(**rejected, reason_code="invalid_input", shadow_price=None, window_id=None),
    ]
    bad = [
        result(reason_code=None),
        {k: v for k, v in result().items() if k != "reason_code"},
        result(reason_code="insolvent"),  # an abandoned code on an answered result
        result(**rejected, reason_code="window_error"),
        result(expected_accuracy=0.5),
        result(curve=curve),
        result_v1(reason_code="chain_finished"),
        result(schema_version=3),
    ]
    for payload in good:
        QueryResult.model_validate(payload)
        assert validator.is_valid(payload), payload
    for payload in bad:
        with pytest.raises(ValidationError):
            QueryResult.model_validate(payload)
        assert not validator.is_valid(payload), payload


def test_json_schema_agrees_with_the_model_on_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema_document("query_request"))
    good = [request(), request(tags={"task": "aime"}, deadline=1738324800, weight=0)]
    bad = [
        request(weight=-1),
        request(id="has space"),
        request(extra=1),
        request(tags={"Task": "x"}),
        request(max_tokens=0),
        {"id": "q"},
    ]
    for payload in good:
        QueryRequest.model_validate(payload)
        assert validator.is_valid(payload), payload
    for payload in bad:
        with pytest.raises(ValidationError):
            QueryRequest.model_validate(payload)
        assert not validator.is_valid(payload), payload


# --- `clearbudget schema` ---------------------------------------------------------------


def test_schema_command_prints_one_schema_exactly_as_the_file() -> None:
    outcome = CliRunner().invoke(app, ["schema", "query-request"])
    assert outcome.exit_code == 0, outcome.output
    assert outcome.output == render(schema_document("query_request"))


def test_schema_command_prints_all_schemas_by_name() -> None:
    outcome = CliRunner().invoke(app, ["schema"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.output) == {name: schema_document(name) for name in SCHEMA_MODELS}


def test_schema_command_accepts_class_names() -> None:
    outcome = CliRunner().invoke(app, ["schema", "DeadLetter"])
    assert json.loads(outcome.output)["title"] == "DeadLetter"


def test_schema_command_names_the_choices_for_an_unknown_schema() -> None:
    outcome = CliRunner().invoke(app, ["schema", "query"])
    assert outcome.exit_code == 2
    assert "unknown schema 'query'" in outcome.output
    assert "query-request" in outcome.output


# --- docs/contracts.md ------------------------------------------------------------------

CONTRACTS = Path(__file__).resolve().parents[2] / "docs" / "contracts.md"


def _section(doc: str, title: str) -> str:
    start = doc.index(f"## {title}")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end >= 0 else None]


@pytest.mark.parametrize(
    ("model", "title"),
    [
        (QueryRequest, "QueryRequest"),
        (QueryResult, "QueryResult"),
        (DeadLetter, "DeadLetter"),
        (WindowReport, "WindowReport"),
    ],
)
def test_contracts_doc_describes_every_field(model: type[Any], title: str) -> None:
    section = _section(CONTRACTS.read_text(encoding="utf-8"), title)
    fields = set(model.model_fields) | (set(Curve.model_fields) if model is QueryResult else set())
    missing = sorted(f for f in fields if f"`{f}`" not in section)
    assert not missing, f"docs/contracts.md, {title}: no row for {missing}"


def test_contracts_doc_names_every_reason_code_with_its_status() -> None:
    doc = CONTRACTS.read_text(encoding="utf-8")
    for code in ReasonCode:
        assert f"| {code.status.value} | `{code.value}` |" in doc, code
