"""The message models: what goes over Kafka, in and out of the daemon.

Each model carries its own `schema_version` (QueryResult 2, the others 1; docs/contracts.md has
every field and the version history) and forbids unknown fields. Validation is strict (see
`schemas.types`): a wrong type is an error, never a silent coercion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from clearbudget.schemas.types import (
    RESULT_SCHEMA_VERSION,
    SCHEMA_VERSION,
    Id,
    NonNegativeFloat,
    NonNegativeInt,
    ResultSchemaVersion,
    SchemaVersion,
    Tags,
    Text,
    Timestamp,
)

DEFAULT_MAX_PROMPT_BYTES = 256 * 1024
# Key in the pydantic validation context that overrides the prompt size limit.
MAX_PROMPT_BYTES_CONTEXT_KEY = "max_prompt_bytes"
MAX_WEIGHT = 1e6
MAX_TOKENS_CAP = 1 << 20
MAX_REASON_CHARS = 2000
MAX_TOPIC_CHARS = 249  # Kafka's own limit on topic names
# expected_accuracy must be the curve's value at allocated_tokens, to float rounding.
EXPECTED_ACCURACY_TOLERANCE = 1e-9


class _Message(BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        use_enum_values=False,
    )


class Status(StrEnum):
    """The terminal outcome of one consumed query message."""

    ANSWERED = "answered"
    ABANDONED = "abandoned"
    EXPIRED = "expired"
    FAILED = "failed"
    REJECTED = "rejected"


class ReasonCode(StrEnum):
    """Why a query ended as it did: one code per way a query can end. Each code belongs to
    exactly one status (`REASON_STATUS`); docs/contracts.md says where each is produced."""

    # answered
    CHAIN_FINISHED = "chain_finished"  # the dispatched chain finished within its allocation
    PROBE_ANSWERED = "probe_answered"  # answered from the probe alone; nothing dispatched
    CUT_WITH_PROBE_ANSWER = "cut_with_probe_answer"  # the chain ran out at its allocation;
    # answered with what the finished probes agreed on
    THINKING_ENDED = "thinking_ended"  # CLEAR_BUDGET_MODE=thinking: vLLM ended the chain's
    # thinking at its allocation and the model answered
    # abandoned
    INSOLVENT = "insolvent"  # priced out by the window's solve: no continuation allocated
    INSOLVENT_BEFORE_PROBE = "insolvent_before_probe"  # priced out on its predicted curve
    # before a probe: nothing spent
    CUT_AT_ALLOCATION = "cut_at_allocation"  # funded; the chain ran out at its allocation
    CAP_SPENT_IN_PROBE = "cap_spent_in_probe"  # its own max_tokens ran out during the probe
    SHUTDOWN = "shutdown"  # the daemon stopped before the query's window finished
    HANDOVER = "handover"  # its partition moved to another replica before it finished
    # expired
    DEADLINE = "deadline"  # its deadline passed (before its window ran, or during a request)
    # failed
    BACKEND_FAILED = "backend_failed"  # its backend request failed after retries
    BACKEND_INCONSISTENT = "backend_inconsistent"  # the backend's response broke the protocol
    WINDOW_ERROR = "window_error"  # its window raised an internal error
    # rejected
    INVALID_INPUT = "invalid_input"  # the input record failed validation (also in the DLQ)

    @property
    def status(self) -> Status:
        """The one status this code goes with."""
        return REASON_STATUS[self]


REASON_STATUS: Mapping[ReasonCode, Status] = MappingProxyType(
    {
        ReasonCode.CHAIN_FINISHED: Status.ANSWERED,
        ReasonCode.PROBE_ANSWERED: Status.ANSWERED,
        ReasonCode.CUT_WITH_PROBE_ANSWER: Status.ANSWERED,
        ReasonCode.THINKING_ENDED: Status.ANSWERED,
        ReasonCode.INSOLVENT: Status.ABANDONED,
        ReasonCode.INSOLVENT_BEFORE_PROBE: Status.ABANDONED,
        ReasonCode.CUT_AT_ALLOCATION: Status.ABANDONED,
        ReasonCode.CAP_SPENT_IN_PROBE: Status.ABANDONED,
        ReasonCode.SHUTDOWN: Status.ABANDONED,
        ReasonCode.HANDOVER: Status.ABANDONED,
        ReasonCode.DEADLINE: Status.EXPIRED,
        ReasonCode.BACKEND_FAILED: Status.FAILED,
        ReasonCode.BACKEND_INCONSISTENT: Status.FAILED,
        ReasonCode.WINDOW_ERROR: Status.FAILED,
        ReasonCode.INVALID_INPUT: Status.REJECTED,
    }
)

# The code `QueryResult.unspent` gives a query that generated nothing, when not told one.
UNSPENT_REASON_CODES: Mapping[Status, ReasonCode] = MappingProxyType(
    {
        Status.REJECTED: ReasonCode.INVALID_INPUT,
        Status.FAILED: ReasonCode.WINDOW_ERROR,
        Status.ABANDONED: ReasonCode.SHUTDOWN,
        Status.EXPIRED: ReasonCode.DEADLINE,
    }
)


def reason_codes_of(status: Status) -> tuple[ReasonCode, ...]:
    """The codes a result of `status` may carry."""
    return tuple(code for code, owner in REASON_STATUS.items() if owner is status)


class QueryRequest(_Message):
    """One query on the input topic.

    `tags` is a flat string-to-string mapping used to pool fitted priors and to charge per-tag
    budgets; well-known keys are `task` (e.g. "aime"), `tenant` (e.g. "acme") and `model`
    (e.g. "r1-7b"). The prompt's size limit (UTF-8 bytes) defaults to 256 KiB and can be
    changed per validation with context `{"max_prompt_bytes": N}`.
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    id: Id = Field(description="Caller-chosen query id; results are keyed by it.")
    prompt: Text = Field(
        min_length=1,
        description=f"Prompt text; at most {DEFAULT_MAX_PROMPT_BYTES} bytes of UTF-8 by default "
        "(the daemon's limit is configurable).",
    )
    tags: Tags = Field(
        default_factory=dict,
        description="Flat string mapping, e.g. {task, tenant, model}; pools priors and "
        "per-tag budgets.",
    )
    weight: float = Field(
        default=1.0, ge=0, le=MAX_WEIGHT, description="Priority v >= 0: value is v * accuracy."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS_CAP, description="Cap on tokens spent on this query."
    )
    deadline: Timestamp | None = Field(
        default=None, description="Answer by this instant or the query expires."
    )
    difficulty_hint: float | None = Field(
        default=None, ge=0, le=1, description="Upstream estimate: 0 easy .. 1 hard."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_within_byte_limit(cls, prompt: str, info: ValidationInfo) -> str:
        limit = _max_prompt_bytes(info.context)
        size = len(prompt.encode("utf-8"))
        if size > limit:
            raise PydanticCustomError(
                "prompt_too_large",
                "is {size} bytes of UTF-8; the limit is {limit}",
                {"size": size, "limit": limit},
            )
        return prompt


def _max_prompt_bytes(context: Any) -> int:
    if isinstance(context, dict) and MAX_PROMPT_BYTES_CONTEXT_KEY in context:
        return int(context[MAX_PROMPT_BYTES_CONTEXT_KEY])
    return DEFAULT_MAX_PROMPT_BYTES


class Curve(_Message):
    """A query's shifted-surge curve as the allocator used it: the expected accuracy of
    continuing the query by b tokens (after its probe) is U(b) = A·(1 − exp(−β·(b − τ))) for
    b > τ and 0 before. `A`, `tau`, `beta` as in `clearbudget solve`."""

    A: float = Field(
        ge=0, le=1, description="Solvable mass: the accuracy with unlimited continuation tokens."
    )
    tau: NonNegativeFloat = Field(
        description="Emergence threshold: continuation tokens before any answer appears."
    )
    beta: float = Field(gt=0, description="Surge rate (1/tokens) once past tau.")

    def value(self, tokens: float) -> float:
        """U(tokens): the expected accuracy of `tokens` continuation tokens."""
        past = max(tokens - self.tau, 0.0)
        return self.A * -math.expm1(-self.beta * past)


def _result_json_schema(schema: dict[str, Any]) -> None:
    """What the pydantic schema cannot say: v2 needs a reason code that fits the status, v1
    (older daemons) has none of the v2 fields, and expected_accuracy comes with a curve."""
    v1_nulls = {"type": "null"}
    by_status = [
        {
            "if": {
                "properties": {
                    "status": {"const": status.value},
                    "reason_code": {"type": "string"},
                },
                "required": ["status", "reason_code"],
            },
            "then": {"properties": {"reason_code": {"enum": list(reason_codes_of(status))}}},
        }
        for status in Status
    ]
    schema["allOf"] = [
        {
            "if": {"properties": {"schema_version": {"const": 1}}, "required": ["schema_version"]},
            "then": {
                "properties": dict.fromkeys(("reason_code", "curve", "expected_accuracy"), v1_nulls)
            },
            "else": {
                "required": ["reason_code"],
                "properties": {"reason_code": {"type": "string"}},
            },
        },
        {
            "if": {"properties": {"curve": {"type": "object"}}, "required": ["curve"]},
            "then": {
                "required": ["expected_accuracy"],
                "properties": {"expected_accuracy": {"type": "number"}},
            },
            "else": {"properties": {"expected_accuracy": v1_nulls}},
        },
        *by_status,
    ]


class QueryResult(_Message):
    """The one terminal outcome of a query, published on the result topic keyed by `id`.

    `shadow_price` and `window_id` are always present but null when the query never reached
    a solved window (e.g. rejected at the edge). Tokens: `tokens_used` = `tokens_probe` + the
    continuation's tokens; `allocated_tokens` is the continuation's budget only, so
    `tokens_used` may exceed it by the probe (and by attempts a backend retried, which are
    charged too). Version 2 added `reason_code`, `curve` and `expected_accuracy`; a version 1
    result (an older daemon's) has none of them.
    """

    model_config = ConfigDict(json_schema_extra=_result_json_schema)

    schema_version: ResultSchemaVersion = Field(
        default=RESULT_SCHEMA_VERSION,
        description="2 (this version). 1: written by daemons before reason codes; still read.",
    )
    id: Id = Field(description="The query's id (also the record key).")
    # Lax here only: results are read back from JSON, where an enum is a plain string.
    status: Annotated[Status, Strict(False)] = Field(
        description="The terminal outcome; `reason_code` says which way it was reached."
    )
    answer: Text | None = Field(
        default=None, description="The final answer extracted from the text, if any."
    )
    text: Text | None = Field(
        default=None, description="The generated chain the answer came from (may be cut)."
    )
    tokens_used: NonNegativeInt = Field(
        description="Every token generated for this query and charged to the budget: "
        "tokens_probe plus the continuation's tokens (attempts a backend retried included). "
        "May exceed allocated_tokens by the probe."
    )
    tokens_probe: NonNegativeInt = Field(
        description="Tokens of the probe (all its samples); part of tokens_used."
    )
    allocated_tokens: NonNegativeInt = Field(
        description="The continuation budget the allocator gave this query (the dispatch "
        "request's max_tokens), probe not included; 0 when nothing was dispatched."
    )
    shadow_price: NonNegativeFloat | None = Field(
        description="λ of the query's window (value per token at the margin); null when the "
        "query never reached a solved window."
    )
    window_id: Id | None = Field(description="The window that served the query; null if none.")
    reason: Annotated[Text, Field(min_length=1, max_length=MAX_REASON_CHARS)] | None = Field(
        default=None,
        description="Human-readable detail of the outcome; required when failed or rejected.",
    )
    reason_code: Annotated[ReasonCode, Strict(False)] | None = Field(
        default=None,
        description="Which way the query ended (one of its status's codes); required from "
        "version 2, absent in version 1.",
    )
    curve: Curve | None = Field(
        default=None,
        description="The curve the allocator priced this query on; null when it was not "
        "priced on one (a baseline policy, answered or ended before the solve, rejected).",
    )
    expected_accuracy: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None,
        description="curve's value at allocated_tokens: the accuracy the allocator expected "
        "of this allocation; null exactly when curve is null.",
    )

    @classmethod
    def unspent(
        cls,
        query_id: str,
        status: Status,
        reason: str,
        *,
        window_id: str | None = None,
        shadow_price: float | None = None,
        reason_code: ReasonCode | None = None,
    ) -> QueryResult:
        """The result of a query that generated no tokens (rejected, or never served); the
        reason is clipped to the schema's limit. `reason_code` defaults by status
        (`UNSPENT_REASON_CODES`: rejected → invalid_input, failed → window_error, abandoned →
        shutdown, expired → deadline)."""
        return cls(
            id=query_id,
            status=status,
            tokens_used=0,
            tokens_probe=0,
            allocated_tokens=0,
            shadow_price=shadow_price,
            window_id=window_id,
            reason=reason[:MAX_REASON_CHARS],
            reason_code=reason_code or UNSPENT_REASON_CODES[status],
        )

    @model_validator(mode="after")
    def _consistent_with_status(self) -> Self:
        if self.tokens_probe > self.tokens_used:
            raise PydanticCustomError("tokens", "tokens_probe must not exceed tokens_used")
        if self.status in (Status.REJECTED, Status.FAILED) and self.reason is None:
            raise PydanticCustomError(
                "reason",
                "reason is required when status is {status}",
                {"status": self.status.value},
            )
        if self.status is Status.REJECTED and self.tokens_used != 0:
            raise PydanticCustomError("tokens", "a rejected query cannot have used tokens")
        if self.status is Status.ABANDONED and self.shadow_price is None:
            raise PydanticCustomError("shadow_price", "an abandoned query needs its shadow_price")
        self._check_reason_code()
        self._check_curve()
        return self

    def _check_reason_code(self) -> None:
        if self.schema_version == 1:
            if (self.reason_code, self.curve, self.expected_accuracy) != (None, None, None):
                raise PydanticCustomError(
                    "schema_version",
                    "a version 1 result has no reason_code, curve or expected_accuracy",
                )
            return
        if self.reason_code is None:
            raise PydanticCustomError("reason_code", "reason_code is required (version 2)")
        if self.reason_code.status is not self.status:
            raise PydanticCustomError(
                "reason_code",
                "reason_code {code} belongs to status {owner}, not {status}",
                {
                    "code": self.reason_code.value,
                    "owner": self.reason_code.status.value,
                    "status": self.status.value,
                },
            )

    def _check_curve(self) -> None:
        if self.curve is None:
            if self.expected_accuracy is not None:
                raise PydanticCustomError("curve", "expected_accuracy needs the curve it is of")
            return
        if self.expected_accuracy is None:
            raise PydanticCustomError("curve", "a result with a curve needs expected_accuracy")
        expected = self.curve.value(self.allocated_tokens)
        if not math.isclose(
            self.expected_accuracy, expected, rel_tol=0.0, abs_tol=EXPECTED_ACCURACY_TOLERANCE
        ):
            raise PydanticCustomError(
                "curve",
                "expected_accuracy {got} is not the curve's value {want} at allocated_tokens",
                {"got": self.expected_accuracy, "want": expected},
            )


class StatusCounts(_Message):
    """How many queries of a window ended in each status."""

    answered: NonNegativeInt = 0
    abandoned: NonNegativeInt = 0
    expired: NonNegativeInt = 0
    failed: NonNegativeInt = 0
    rejected: NonNegativeInt = 0


class WindowReport(_Message):
    """What one window did: price, budget, spend, outcomes and solver timing."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    window_id: Id
    shadow_price: NonNegativeFloat = Field(description="λ, tokens' marginal value in the window.")
    budget_tokens: NonNegativeFloat = Field(description="Window budget including carry-over.")
    spent_tokens: NonNegativeInt = Field(description="Tokens generated, probes included.")
    probe_tokens: NonNegativeInt
    counts: StatusCounts
    solver: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:+-]{1,64}$")]
    solve_ms: NonNegativeFloat
    started_at: Timestamp
    ended_at: Timestamp

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.probe_tokens > self.spent_tokens:
            raise PydanticCustomError("tokens", "probe_tokens must not exceed spent_tokens")
        if self.ended_at < self.started_at:
            raise PydanticCustomError("window", "ended_at must not be before started_at")
        return self


class DeadLetter(_Message):
    """A rejected input record, copied to the DLQ topic with the error and where it came from.

    `value_b64` holds the record's bytes (base64), cut to the daemon's DLQ size limit when
    `value_truncated` is true; topic/partition/offset locate the full original. `value_b64`
    is null when the record had no value (a tombstone).
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    error: Annotated[Text, Field(min_length=1, max_length=MAX_REASON_CHARS)]
    topic: Annotated[Text, Field(min_length=1, max_length=MAX_TOPIC_CHARS)]
    partition: NonNegativeInt
    offset: NonNegativeInt
    timestamp: Timestamp = Field(description="When the record was rejected.")
    query_id: Id | None = Field(default=None, description="The record's id, when readable.")
    value_b64: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$")] | None
    value_bytes: NonNegativeInt = Field(description="Size of the original value in bytes.")
    value_truncated: bool = False
    value_preview: Text | None = Field(
        default=None, description="Best-effort UTF-8 decoding of the value's start."
    )

    @model_validator(mode="after")
    def _value_fields_agree(self) -> Self:
        if self.value_b64 is None:
            if self.value_bytes != 0 or self.value_truncated:
                raise PydanticCustomError("value", "a null value has no bytes")
            return self
        kept = _decoded_length(self.value_b64)
        if kept > self.value_bytes or (kept < self.value_bytes) != self.value_truncated:
            raise PydanticCustomError(
                "value",
                "value_b64 ({kept} bytes) disagrees with value_bytes/value_truncated",
                {"kept": kept},
            )
        return self


def _decoded_length(b64: str) -> int:
    if len(b64) % 4:
        raise PydanticCustomError("value", "value_b64 length must be a multiple of 4")
    return len(b64) // 4 * 3 - b64[-2:].count("=")
