"""Edge validation of one consumed Kafka record, before it joins a window.

`Intake.admit` turns a record's raw value into either a valid `QueryRequest` or a `Rejection`
that carries the `DeadLetter` for the DLQ topic and, when the record's id could be read, a
`QueryResult` with status `rejected`. It never raises on any bytes, so the consumer can always
publish the outcome and commit past the record.

Rules, checked in this order: a value is present; its size is within the limit (checked before
any decoding); it is UTF-8; it is JSON; it is a JSON object without duplicate keys; it validates
as a `QueryRequest` (strict types, finite numbers, no unknown fields, prompt size); its id was
not already admitted in this window. NaN/Infinity literals (which Python's json accepts) and
overflowing numbers such as 1e999 are caught by the models' finite-number rule, so the error
names the field. Error texts start with the bad field (or `message` for the whole record).

`Intake.admit_feedback` applies the same rules to a record of the feedback topic, validated as a
`Feedback`; its `Rejection` never carries a result (a `rejected` result keyed by the graded id
would overwrite that query's own result).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, MutableSet
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from clearbudget.schemas import (
    DEFAULT_MAX_PROMPT_BYTES,
    MAX_PROMPT_BYTES_CONTEXT_KEY,
    DeadLetter,
    Feedback,
    QueryRequest,
    QueryResult,
    Status,
)
from clearbudget.schemas.messages import MAX_REASON_CHARS
from clearbudget.schemas.types import ID_PATTERN, ID_RULE

# Kafka's default max.message.bytes is about 1 MiB; a bigger value cannot be a valid query.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
# Base64 grows by 4/3: 512 KiB of value keeps a DLQ record under Kafka's default 1 MiB.
DEFAULT_MAX_DEAD_LETTER_VALUE_BYTES = 512 * 1024
DEFAULT_PREVIEW_CHARS = 512
MAX_ERRORS_LISTED = 5
DUPLICATE_ID_ERROR = "id: duplicate of an id already received in this window"
MAX_LOCATION_PART_CHARS = 64
# No field takes an integer this long; refusing to convert it also avoids int()'s quadratic cost.
MAX_INTEGER_DIGITS = 100

_ID_RE = re.compile(ID_PATTERN)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_\-\[\]]+")


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    """Size limits of the edge; invalid values fail at start-up naming the field."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    max_dead_letter_value_bytes: int = DEFAULT_MAX_DEAD_LETTER_VALUE_BYTES
    preview_chars: int = DEFAULT_PREVIEW_CHARS

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record refused at the edge: always one DLQ record, plus a result when an id was read."""

    dead_letter: DeadLetter
    result: QueryResult | None

    @property
    def error(self) -> str:
        return self.dead_letter.error


class _OverlongInteger:
    """Stands in for an over-long integer literal so that validation names its field."""

    def __repr__(self) -> str:
        return "<over-long integer>"


def _parse_int(literal: str) -> int | _OverlongInteger:
    return int(literal) if len(literal.lstrip("-")) <= MAX_INTEGER_DIGITS else _OverlongInteger()


class _Invalid(Exception):
    """Internal: why a record is refused, and its id when one could be read."""

    def __init__(self, error: str, query_id: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.query_id = query_id


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Intake:
    """Validates records at the daemon's edge; one instance per consumer, shared by windows."""

    def __init__(
        self, limits: IntakeLimits | None = None, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.limits = limits or IntakeLimits()
        self._clock = clock

    def admit(
        self,
        value: bytes | None,
        *,
        topic: str,
        partition: int,
        offset: int,
        seen_ids: MutableSet[str],
    ) -> QueryRequest | Rejection:
        """Validate one record. `seen_ids` is the current window's set of admitted ids: an
        admitted request's id is added to it, and an id already in it is a duplicate."""
        try:
            request = _parse_request(value, self.limits)
        except _Invalid as invalid:
            return self._reject(value, invalid.error, invalid.query_id, topic, partition, offset)
        except Exception as exc:  # a bug must not stop the consumer; the DLQ keeps the record
            error = f"message: could not be validated ({type(exc).__name__})"
            return self._reject(value, error, None, topic, partition, offset)
        if request.id in seen_ids:
            # The DLQ only: a `rejected` result keyed by this id would read as the outcome of
            # the original query, which gets its own result.
            error = DUPLICATE_ID_ERROR
            rejection = self._reject(value, error, request.id, topic, partition, offset)
            return Rejection(dead_letter=rejection.dead_letter, result=None)
        seen_ids.add(request.id)
        return request

    def admit_feedback(
        self, value: bytes | None, *, topic: str, partition: int, offset: int
    ) -> Feedback | Rejection:
        """Validate one feedback record (the rules of `admit`, as a `Feedback`); a refused one
        is a `Rejection` for the DLQ only. An id the daemon does not know is not an error here."""
        try:
            return _parse_feedback(value, self.limits)
        except _Invalid as invalid:
            rejection = self._reject(
                value, invalid.error, invalid.query_id, topic, partition, offset
            )
        except Exception as exc:  # a bug must not stop the consumer; the DLQ keeps the record
            error = f"message: could not be validated ({type(exc).__name__})"
            rejection = self._reject(value, error, None, topic, partition, offset)
        return Rejection(dead_letter=rejection.dead_letter, result=None)

    def _reject(
        self,
        value: bytes | None,
        error: str,
        query_id: str | None,
        topic: str,
        partition: int,
        offset: int,
    ) -> Rejection:
        error = _clip(error, MAX_REASON_CHARS)
        dead_letter = DeadLetter(
            error=error,
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp=self._clock(),
            query_id=query_id,
            **_value_fields(value, self.limits),
        )
        result = None if query_id is None else QueryResult.unspent(query_id, Status.REJECTED, error)
        return Rejection(dead_letter=dead_letter, result=result)


def _parse_request(value: bytes | None, limits: IntakeLimits) -> QueryRequest:
    """Decode and validate one record value; raises `_Invalid` naming the bad field."""
    payload, query_id = _parse_object(value, limits)
    try:
        return QueryRequest.model_validate(
            payload, context={MAX_PROMPT_BYTES_CONTEXT_KEY: limits.max_prompt_bytes}
        )
    except ValidationError as exc:
        raise _Invalid(describe_validation_error(exc), query_id) from None


def _parse_feedback(value: bytes | None, limits: IntakeLimits) -> Feedback:
    """`_parse_request` for a feedback record."""
    payload, query_id = _parse_object(value, limits)
    try:
        return Feedback.model_validate(payload)
    except ValidationError as exc:
        raise _Invalid(describe_validation_error(exc), query_id) from None


def _parse_object(value: bytes | None, limits: IntakeLimits) -> tuple[dict[str, Any], str | None]:
    """A record value decoded to a JSON object without duplicate keys, and its id if readable;
    raises `_Invalid` naming the bad field."""
    if value is None:
        raise _Invalid("message: record has no value (null or tombstone)")
    if len(value) > limits.max_message_bytes:
        raise _Invalid(
            f"message: {len(value)} bytes exceeds the limit of {limits.max_message_bytes} bytes"
        )
    payload, duplicate_keys = _decode_json(value)
    if not isinstance(payload, dict):
        raise _Invalid(f"message: must be a JSON object, got {_json_type(payload)}")
    query_id = None if "id" in duplicate_keys else readable_id(payload)
    if duplicate_keys:
        raise _Invalid(
            f"{_location((duplicate_keys[0],))}: duplicate key in a JSON object", query_id
        )
    return payload, query_id


def readable_id(payload: dict[str, Any]) -> str | None:
    """The payload's id if it is a valid id (a result can only be keyed by a valid one)."""
    candidate = payload.get("id")
    if isinstance(candidate, str) and _ID_RE.fullmatch(candidate):
        return candidate
    return None


def _decode_json(value: bytes) -> tuple[Any, list[str]]:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(f"message: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    duplicate_keys: list[str] = []

    def object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            duplicate_keys.extend(k for k, _ in pairs if k in seen or seen.add(k))
        return obj

    try:
        return (
            json.loads(text, object_pairs_hook=object_without_duplicates, parse_int=_parse_int),
            duplicate_keys,
        )
    except RecursionError:
        raise _Invalid("message: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError
        raise _Invalid(f"message: not valid JSON ({exc})") from None


def _json_type(payload: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(payload), "a number")


def describe_validation_error(exc: ValidationError) -> str:
    """'field: what is wrong' for each error (the first few), never echoing the input."""
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{_location(e['loc'])}: {_describe(e)}" for e in errors[:MAX_ERRORS_LISTED]]
    if len(errors) > MAX_ERRORS_LISTED:
        parts.append(f"and {len(errors) - MAX_ERRORS_LISTED} more errors")
    return "; ".join(parts)


def _describe(error: ErrorDetails) -> str:
    ctx = error.get("ctx") or {}
    kind = error["type"]
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        return f"must be {bounds[kind]} {_number(next(iter(ctx.values())))}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "field required"
    if kind == "finite_number":
        return "must be a finite number (not NaN or Infinity)"
    if kind == "string_pattern_mismatch":
        return ID_RULE if ctx.get("pattern") == ID_PATTERN else f"must match {ctx.get('pattern')}"
    if kind == "string_unicode":
        return "is not valid Unicode (lone surrogate escape)"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    message = error["msg"]
    return message[:1].lower() + message[1:]


def _number(value: Any) -> str:
    """1.0 -> '1': bounds read as the schema states them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(_printable(str(part)) for part in loc) or "message"


def _printable(text: str) -> str:
    """Plain names as they are; anything else quoted and escaped, so the field stays legible."""
    text = _clip(text, MAX_LOCATION_PART_CHARS)
    return text if _PLAIN_NAME.fullmatch(text) else json.dumps(text)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value_fields(value: bytes | None, limits: IntakeLimits) -> dict[str, Any]:
    if value is None:
        return {"value_b64": None, "value_bytes": 0, "value_truncated": False}
    kept = value[: limits.max_dead_letter_value_bytes]
    preview = value[: limits.preview_chars * 4].decode("utf-8", errors="replace")
    return {
        "value_b64": base64.b64encode(kept).decode("ascii"),
        "value_bytes": len(value),
        "value_truncated": len(kept) < len(value),
        "value_preview": preview[: limits.preview_chars],
    }
