"""The message models: what goes over Kafka, in and out of the daemon.

Each model carries `schema_version` (currently 1) and forbids unknown fields. Validation is
strict (see `schemas.types`): a wrong type is an error, never a silent coercion.
"""

from __future__ import annotations

from enum import StrEnum
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

from schemas.types import (
    SCHEMA_VERSION,
    Id,
    NonNegativeFloat,
    NonNegativeInt,
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


class QueryResult(_Message):
    """The one terminal outcome of a query, published on the result topic keyed by `id`.

    `shadow_price` and `window_id` are always present but null when the query never reached
    a solved window (e.g. rejected at the edge). `tokens_used` counts every generated token,
    probes included.
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    id: Id
    # Lax here only: results are read back from JSON, where an enum is a plain string.
    status: Annotated[Status, Strict(False)]
    answer: Text | None = None
    text: Text | None = None
    tokens_used: NonNegativeInt
    tokens_probe: NonNegativeInt
    allocated_tokens: NonNegativeInt
    shadow_price: NonNegativeFloat | None
    window_id: Id | None
    reason: Annotated[Text, Field(min_length=1, max_length=MAX_REASON_CHARS)] | None = None

    @classmethod
    def unspent(
        cls,
        query_id: str,
        status: Status,
        reason: str,
        *,
        window_id: str | None = None,
        shadow_price: float | None = None,
    ) -> QueryResult:
        """The result of a query that generated no tokens (rejected, or never served); the
        reason is clipped to the schema's limit."""
        return cls(
            id=query_id,
            status=status,
            tokens_used=0,
            tokens_probe=0,
            allocated_tokens=0,
            shadow_price=shadow_price,
            window_id=window_id,
            reason=reason[:MAX_REASON_CHARS],
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
        return self


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
