"""Edge validation of consumed records: one rule per test, then a fuzz test over all of them."""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from clearbudget.daemon.kafka.intake import DUPLICATE_ID_ERROR, Intake, IntakeLimits, Rejection
from clearbudget.schemas import DeadLetter, QueryRequest, QueryResult, ReasonCode, Status
from clearbudget.schemas.types import ID_PATTERN, MAX_EPOCH_SECONDS, TAG_KEY_PATTERN

NOW = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
TOPIC, PARTITION, OFFSET = "clear.queries", 2, 1234


def fixed_clock() -> datetime:
    return NOW


def encode(payload: Any, **dumps_options: Any) -> bytes:
    return json.dumps(payload, **dumps_options).encode("utf-8")


def valid(**fields: Any) -> dict[str, Any]:
    return {"id": "q-1", "prompt": "What is 2+2?", **fields}


def admit(
    value: bytes | None,
    seen: set[str] | None = None,
    limits: IntakeLimits | None = None,
) -> QueryRequest | Rejection:
    intake = Intake(limits, clock=fixed_clock)
    seen = set() if seen is None else seen
    return intake.admit(value, topic=TOPIC, partition=PARTITION, offset=OFFSET, seen_ids=seen)


def rejected(value: bytes | None, **kwargs: Any) -> Rejection:
    outcome = admit(value, **kwargs)
    assert isinstance(outcome, Rejection), f"expected a rejection, got {outcome!r}"
    return outcome


# --- accepted ---------------------------------------------------------------------------


def test_valid_record_is_admitted_and_its_id_remembered() -> None:
    seen: set[str] = set()
    outcome = admit(encode(valid(weight=2, tags={"task": "aime"})), seen)
    assert isinstance(outcome, QueryRequest)
    assert (outcome.id, outcome.weight, outcome.tags) == ("q-1", 2.0, {"task": "aime"})
    assert seen == {"q-1"}


# --- one rule per test ------------------------------------------------------------------


def test_null_value_goes_to_the_dlq_without_a_result() -> None:
    outcome = rejected(None)
    assert outcome.error == "message: record has no value (null or tombstone)"
    assert outcome.result is None
    assert outcome.dead_letter.value_b64 is None


def test_size_is_checked_before_decoding() -> None:
    limits = IntakeLimits(max_message_bytes=64)
    oversize_garbage = b"\xff" * 65
    outcome = rejected(oversize_garbage, limits=limits)
    assert outcome.error == "message: 65 bytes exceeds the limit of 64 bytes"
    assert outcome.result is None
    assert isinstance(admit(b"\xff" * 64, limits=limits), Rejection)  # at the limit: decoded


def test_invalid_utf8_is_rejected_with_its_position() -> None:
    outcome = rejected(b'{"id": "q-1", "prompt": "caf\xe9"}')
    assert outcome.error == "message: not valid UTF-8 (byte 28: invalid continuation byte)"


@pytest.mark.parametrize("text", [b"", b"{", b'{"id": "q-1",}', b"hello", b"\xef\xbb\xbf{}"])
def test_invalid_json_is_rejected(text: bytes) -> None:
    assert rejected(text).error.startswith("message: not valid JSON (")


@pytest.mark.parametrize(
    ("payload", "kind"),
    [([1], "an array"), ("q", "a string"), (3.5, "a number"), (None, "null"), (True, "a boolean")],
)
def test_json_that_is_not_an_object_is_rejected(payload: Any, kind: str) -> None:
    assert rejected(encode(payload)).error == f"message: must be a JSON object, got {kind}"


def test_deeply_nested_json_is_rejected_not_crashing() -> None:
    assert rejected(b"[" * 100_000).error == "message: JSON nested too deeply"


@pytest.mark.parametrize("field", ["weight", "max_tokens", "deadline"])
def test_overlong_integer_literal_is_rejected_naming_the_field(field: str) -> None:
    raw = b'{"id": "q-1", "prompt": "p", "%s": -%s}' % (field.encode(), b"9" * 5000)
    outcome = rejected(raw)
    assert outcome.error.startswith(f"{field}: "), outcome.error
    assert outcome.result is not None


@pytest.mark.parametrize("missing", ["id", "prompt"])
def test_missing_field_is_named(missing: str) -> None:
    payload = valid()
    del payload[missing]
    outcome = rejected(encode(payload))
    assert outcome.error == f"{missing}: field required"
    assert (outcome.result is None) == (missing == "id")


@pytest.mark.parametrize(
    ("field", "bad", "error"),
    [
        ("weight", "2", "weight: input should be a valid number"),
        ("weight", True, "weight: input should be a valid number"),
        ("weight", -1, "weight: must be >= 0"),
        ("max_tokens", -5, "max_tokens: must be >= 1"),
        ("max_tokens", 1.5, "max_tokens: input should be a valid integer"),
        ("difficulty_hint", 2, "difficulty_hint: must be <= 1"),
        ("prompt", ["x"], "prompt: input should be a valid string"),
        ("prompt", "", "prompt: must not be empty"),
        ("tags", {"task": 1}, "tags.task: input should be a valid string"),
        ("deadline", "soon", "deadline: is not an RFC 3339 date-time"),
        ("schema_version", 2, "schema_version: input should be 1"),
    ],
)
def test_wrong_typed_or_out_of_range_field_is_named(field: str, bad: Any, error: str) -> None:
    outcome = rejected(encode(valid(**{field: bad})))
    assert outcome.error.startswith(error), outcome.error
    assert outcome.result is not None
    assert outcome.result.reason == outcome.error


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
@pytest.mark.parametrize("field", ["weight", "difficulty_hint", "deadline", "max_tokens"])
def test_non_finite_numbers_are_rejected_naming_the_field(field: str, literal: str) -> None:
    raw = b'{"id": "q-1", "prompt": "p", "%s": %s}' % (field.encode(), literal.encode())
    outcome = rejected(raw)
    assert outcome.error.startswith(f"{field}: "), outcome.error


def test_unknown_field_is_named() -> None:
    outcome = rejected(encode(valid(colour="blue")))
    assert outcome.error == "colour: unknown field"


def test_many_errors_are_listed_up_to_a_limit() -> None:
    outcome = rejected(encode(valid(**{f"x{i}": i for i in range(8)})))
    assert outcome.error.count("unknown field") == 5
    assert outcome.error.endswith("and 3 more errors")


def test_duplicate_json_key_is_named() -> None:
    outcome = rejected(b'{"id": "q-1", "prompt": "a", "weight": 1, "weight": -1}')
    assert outcome.error == "weight: duplicate key in a JSON object"
    assert outcome.result is not None


def test_duplicate_id_key_leaves_no_readable_id() -> None:
    assert rejected(b'{"id": "q-1", "id": "q-2", "prompt": "a"}').result is None


def test_unreadable_id_gets_no_result() -> None:
    outcome = rejected(encode(valid(id="not a sane id", weight=-1)))
    assert outcome.result is None
    assert outcome.dead_letter.query_id is None
    assert "id: must be 1-200 characters" in outcome.error


def test_prompt_size_limit_is_configurable() -> None:
    limits = IntakeLimits(max_prompt_bytes=8)
    outcome = rejected(encode(valid(prompt="ééééé")), limits=limits)
    assert outcome.error == "prompt: is 10 bytes of UTF-8; the limit is 8"


def test_duplicate_id_within_a_window_is_rejected_but_not_across_windows() -> None:
    seen: set[str] = set()
    assert isinstance(admit(encode(valid()), seen), QueryRequest)
    outcome = rejected(encode(valid(prompt="another")), seen=seen)
    assert outcome.error == "id: duplicate of an id already received in this window"
    assert outcome.dead_letter.query_id == "q-1"
    assert outcome.result is None  # the original's result is the one result keyed "q-1"
    assert isinstance(admit(encode(valid()), set()), QueryRequest)


def test_rejected_record_does_not_claim_its_id() -> None:
    seen: set[str] = set()
    rejected(encode(valid(weight=-1)), seen=seen)
    assert seen == set()
    assert isinstance(admit(encode(valid()), seen), QueryRequest)


def test_error_never_echoes_the_payload() -> None:
    secret = "sk-very-secret-prompt"
    outcome = rejected(encode(valid(prompt=secret, **{secret: 1})))
    assert secret[:20] not in outcome.error or outcome.error.startswith(secret)
    assert "unknown field" in outcome.error


def test_hostile_field_names_are_escaped_and_clipped() -> None:
    outcome = rejected(encode(valid(**{"evil\nname" + "x" * 500: 1})))
    assert outcome.error.startswith('"evil\\nname')
    assert len(outcome.error) < 120


def test_an_unexpected_validator_failure_still_yields_a_rejection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> QueryRequest:
        raise RuntimeError("bug")

    monkeypatch.setattr(QueryRequest, "model_validate", broken)
    outcome = rejected(encode(valid()))
    assert outcome.error == "message: could not be validated (RuntimeError)"
    assert outcome.result is None


# --- the rejection's records ------------------------------------------------------------


def test_rejection_carries_dlq_record_and_rejected_result() -> None:
    raw = encode(valid(weight=-1))
    outcome = rejected(raw)
    letter = outcome.dead_letter
    assert (letter.topic, letter.partition, letter.offset) == (TOPIC, PARTITION, OFFSET)
    assert letter.timestamp == NOW
    assert letter.query_id == "q-1"
    assert base64.b64decode(letter.value_b64 or "") == raw
    assert (letter.value_bytes, letter.value_truncated) == (len(raw), False)
    assert letter.value_preview == raw.decode()
    assert outcome.result == QueryResult(
        id="q-1",
        status=Status.REJECTED,
        tokens_used=0,
        tokens_probe=0,
        allocated_tokens=0,
        shadow_price=None,
        window_id=None,
        reason="weight: must be >= 0",
        reason_code=ReasonCode.INVALID_INPUT,
    )


def test_large_dlq_value_is_truncated_with_a_replacement_preview() -> None:
    limits = IntakeLimits(max_dead_letter_value_bytes=16, preview_chars=4)
    raw = b"\xff\xfe" + b"x" * 40
    letter = rejected(raw, limits=limits).dead_letter
    assert base64.b64decode(letter.value_b64 or "") == raw[:16]
    assert (letter.value_bytes, letter.value_truncated) == (42, True)
    assert letter.value_preview == "\ufffd\ufffdxx"


@pytest.mark.parametrize("field", IntakeLimits.__slots__)
@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_invalid_limits_fail_naming_the_field(field: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must be a positive integer"):
        IntakeLimits(**{field: bad})


# --- fuzz: every record yields exactly one well-formed outcome --------------------------

FUZZ_LIMITS = IntakeLimits(
    max_message_bytes=4096, max_prompt_bytes=512, max_dead_letter_value_bytes=256, preview_chars=32
)
RECORDS_PER_WINDOW = 50
WINDOWS = 210
ID_POOL = [f"q-{i}" for i in range(40)]  # small, so windows contain duplicate ids
# "location: what is wrong", the location plain (weight, tags.task) or quoted ("odd key")
_PART = r'(?:[A-Za-z0-9_\-\[\]]+|"(?:[^"\\]|\\.)*")'
FIELD_ERROR = re.compile(rf"^{_PART}(?:\.{_PART})*: \S")

safe_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=24)
query_ids = st.one_of(st.sampled_from(ID_POOL), st.from_regex(ID_PATTERN, fullmatch=True))
deadlines = st.one_of(
    st.integers(0, MAX_EPOCH_SECONDS),
    st.floats(0, 4e9),
    st.datetimes(datetime(1971, 1, 1), datetime(9000, 1, 1), timezones=st.just(UTC)).map(
        lambda d: d.isoformat()
    ),
)
valid_payloads = st.fixed_dictionaries(
    {"id": query_ids, "prompt": st.text(min_size=1, max_size=60)},
    optional={
        "schema_version": st.just(1),
        "tags": st.dictionaries(
            st.from_regex(TAG_KEY_PATTERN, fullmatch=True), safe_text, max_size=3
        ),
        "weight": st.one_of(st.floats(0, 1e6), st.integers(0, 10**6)),
        "max_tokens": st.one_of(st.none(), st.integers(1, 1 << 20)),
        "deadline": st.one_of(st.none(), deadlines),
        "difficulty_hint": st.one_of(st.none(), st.floats(0, 1)),
    },
)
# A value every field refuses, per field: wrong type, out of range, or not finite.
BAD_VALUES: dict[str, list[Any]] = {
    "id": ["", "a b", "x" * 201, 5, None, "é", ["q"]],
    "prompt": ["", 5, None, ["x"], "x" * 513, "\ud800"],
    "schema_version": [0, 2, "1", True, 1.0, None],
    "tags": [[], "t", {"BAD": "v"}, {"k": 1}, {"k": ""}, {"k": "a\nb"}, {"k": {"n": "v"}}],
    "weight": [-1, -0.5, "1", True, float("nan"), float("inf"), 1e7, [], None],
    "max_tokens": [0, -3, 1.5, "5", True, float("nan"), 1 << 21, 10**30],
    "deadline": ["soon", "2025-01-01T00:00:00", "1700000000", -1, float("-inf"), True, []],
    "difficulty_hint": [-0.1, 1.5, float("nan"), "0.5", True],
}


@st.composite
def malformed_records(draw: st.DrawFn) -> bytes | None:
    """Records that must be rejected, each broken in one known way."""
    payload = draw(valid_payloads)
    text = json.dumps(payload)
    how = draw(st.sampled_from(["missing", "bad", "unknown", "truncate", "utf8", "size", "dupkey",
                                "not_object", "deep", "null"]))  # fmt: skip
    if how == "missing":
        del payload[draw(st.sampled_from(["id", "prompt"]))]
    elif how == "bad":
        field = draw(st.sampled_from(sorted(BAD_VALUES)))
        payload[field] = draw(st.sampled_from(BAD_VALUES[field]))
    elif how == "unknown":
        payload[draw(safe_text.filter(lambda k: k not in QueryRequest.model_fields))] = 1
    elif how == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    elif how == "utf8":
        return b"\xff" + text.encode()
    elif how == "size":
        return text.encode() + b" " * FUZZ_LIMITS.max_message_bytes
    elif how == "dupkey":
        return ('{"prompt": "p", ' + text[1:]).encode()
    elif how == "deep":  # past the parser's recursion limit when long enough
        return b"[" * draw(st.integers(1, FUZZ_LIMITS.max_message_bytes))
    elif how == "not_object":
        return json.dumps(draw(st.one_of(st.lists(st.integers()), st.text(), st.none()))).encode()
    else:
        return None
    return json.dumps(payload).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from([*QueryRequest.model_fields, "x"]), inner, max_size=6)
    ),
    max_leaves=12,
)


@st.composite
def mutated_valid_records(draw: st.DrawFn) -> bytes:
    raw = bytearray(json.dumps(draw(valid_payloads), ensure_ascii=draw(st.booleans())).encode())
    raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


# (expectation, value): "valid" must be admitted unless its id is a duplicate, "invalid" must be
# rejected, "any" may go either way but must still yield one well-formed outcome.
records = st.one_of(
    st.tuples(st.just("valid"), valid_payloads.map(lambda p: json.dumps(p).encode())),
    st.tuples(st.just("invalid"), malformed_records()),
    st.tuples(st.just("any"), st.binary(max_size=200)),
    st.tuples(st.just("any"), json_values.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("any"), mutated_valid_records()),
)


def check_rejection(outcome: Rejection, value: bytes | None, offset: int) -> None:
    letter = outcome.dead_letter
    assert (letter.topic, letter.partition, letter.offset) == (TOPIC, PARTITION, offset)
    assert FIELD_ERROR.match(letter.error), letter.error
    assert "could not be validated" not in letter.error, letter.error  # the never-raise guard
    if value is None:
        assert letter.value_b64 is None
    else:
        kept = base64.b64decode(letter.value_b64 or "")
        assert value.startswith(kept)
        assert letter.value_bytes == len(value)
    assert DeadLetter.model_validate_json(letter.model_dump_json()) == letter
    if letter.query_id is None or letter.error == DUPLICATE_ID_ERROR:
        assert outcome.result is None
        return
    assert outcome.result is not None
    assert (outcome.result.id, outcome.result.status) == (letter.query_id, Status.REJECTED)
    assert outcome.result.reason == letter.error
    assert QueryResult.model_validate_json(outcome.result.model_dump_json()) == outcome.result


def admit_window(window: list[tuple[str, bytes | None]], tally: Counter[str]) -> None:
    """Admit one window's records and check every outcome; tally outcomes by rule."""
    intake = Intake(FUZZ_LIMITS, clock=fixed_clock)
    seen: set[str] = set()
    admitted: list[str] = []
    for offset, (expectation, value) in enumerate(window):
        seen_before = set(seen)
        outcome = intake.admit(
            value, topic=TOPIC, partition=PARTITION, offset=offset, seen_ids=seen
        )
        if isinstance(outcome, QueryRequest):
            assert expectation != "invalid", value
            assert outcome.id not in seen_before, value
            assert seen == seen_before | {outcome.id}
            assert QueryRequest.model_validate_json(outcome.model_dump_json()) == outcome
            admitted.append(outcome.id)
            tally["admitted"] += 1
        else:
            assert isinstance(outcome, Rejection)
            assert seen == seen_before
            if expectation == "valid":
                assert outcome.error.startswith("id: duplicate"), outcome.error
                assert json.loads(value or b"")["id"] in seen_before
            check_rejection(outcome, value, offset)
            tally[rule_of(outcome.error)] += 1
    assert len(admitted) == len(set(admitted))


RULES = ("no value", "exceeds the limit", "UTF-8", "JSON nested", "not valid JSON",
         "JSON object, got", "duplicate key", "unknown field", "id: duplicate")  # fmt: skip


def rule_of(error: str) -> str:
    """The rule a rejection's error text belongs to (the first one when several)."""
    return next((rule for rule in RULES if rule in error), "field value")


def test_fuzz_every_record_yields_exactly_one_well_formed_outcome() -> None:
    tally: Counter[str] = Counter()

    @settings(
        max_examples=WINDOWS,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        # Shrinking 50-record windows takes minutes; the assertion messages name the record.
        phases=[Phase.explicit, Phase.generate],
    )
    @given(st.lists(records, min_size=RECORDS_PER_WINDOW, max_size=RECORDS_PER_WINDOW))
    def one_window(window: list[tuple[str, bytes | None]]) -> None:
        admit_window(window, tally)

    one_window()
    assert tally.total() >= 10_000
    # The generator must exercise every rule, and admit plenty, or the test proves little.
    assert tally["admitted"] >= 1_000, tally
    assert all(tally[rule] > 0 for rule in (*RULES, "field value")), tally
