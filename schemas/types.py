"""Constrained field types shared by the message models.

Every model validates in strict mode: numbers must be JSON numbers (never strings or booleans),
floats must be finite, and text must be valid Unicode (no lone surrogates, which JSON escapes
can smuggle in and which cannot be re-encoded as UTF-8 later).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, WithJsonSchema
from pydantic_core import PydanticCustomError

# Each message type has its own version, bumped when that message changes (docs/contracts.md).
# QueryRequest, WindowReport and DeadLetter are at 1; QueryResult is at 2 and still reads 1.
SCHEMA_VERSION: Literal[1] = 1
RESULT_SCHEMA_VERSION: Literal[2] = 2

ID_PATTERN = r"^[A-Za-z0-9._:@/+=~-]{1,200}$"
ID_RULE = "must be 1-200 characters from A-Z a-z 0-9 . _ : @ / + = ~ -"
TAG_KEY_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"
TAG_VALUE_PATTERN = r"^[^\x00-\x1f\x7f]{1,200}$"
MAX_TAGS = 16
# Epoch seconds of 9999-12-31T23:59:59Z: the last instant a datetime can hold.
MAX_EPOCH_SECONDS = 253_402_300_799


def _plain_int(versions: str) -> Callable[[Any], Any]:
    """Literal[1] alone would accept True and 1.0; a version must be the integer itself."""

    def require_plain_int(value: Any) -> Any:
        if type(value) is not int:
            message = "must be the integer {versions}"
            raise PydanticCustomError("schema_version", message, {"versions": versions})
        return value

    return require_plain_int


def _require_valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unicode",
            "contains a lone surrogate at position {pos} (not valid Unicode)",
            {"pos": exc.start},
        ) from None
    return value


def _timestamp_from_number(value: float) -> datetime:
    # Ints are compared exactly below; math.isfinite would overflow on a huge one.
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("timestamp", "must be a finite number of epoch seconds")
    if not 0 <= value <= MAX_EPOCH_SECONDS:
        raise PydanticCustomError(
            "timestamp", "epoch seconds must be between 0 and {max}", {"max": MAX_EPOCH_SECONDS}
        )
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, ValueError, OSError):  # rounds past year 9999
        raise PydanticCustomError("timestamp", "is out of the representable range") from None


def _timestamp_from_string(value: str) -> datetime:
    if len(value) > 64:
        raise PydanticCustomError("timestamp", "is not an RFC 3339 date-time (too long)")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError(
            "timestamp", "is not an RFC 3339 date-time (e.g. 2025-01-31T12:00:00Z)"
        ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise PydanticCustomError("timestamp", "must include a UTC offset (e.g. Z or +01:00)")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. year 1 with a positive offset falls before year 1 in UTC
        raise PydanticCustomError("timestamp", "is out of the representable range") from None


def _parse_timestamp(value: Any) -> datetime:
    """Accept an aware RFC 3339 string or epoch seconds; normalise to UTC.

    Done by hand because pydantic's lax datetime reads large numbers as milliseconds and
    numeric strings as timestamps, and its strict mode refuses numbers outright.
    """
    if isinstance(value, bool):
        raise PydanticCustomError("timestamp", "must be an RFC 3339 string or epoch seconds")
    if isinstance(value, int | float):
        return _timestamp_from_number(value)
    if isinstance(value, str):
        return _timestamp_from_string(value)
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise PydanticCustomError("timestamp", "must be timezone-aware")
        return value.astimezone(UTC)
    raise PydanticCustomError("timestamp", "must be an RFC 3339 string or epoch seconds")


SchemaVersion = Annotated[Literal[1], BeforeValidator(_plain_int("1"))]
# QueryResult: 2 is written; 1 (results published before reason codes and curves) is still read.
ResultSchemaVersion = Annotated[Literal[1, 2], BeforeValidator(_plain_int("1 or 2"))]

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]

Text = Annotated[str, AfterValidator(_require_valid_unicode)]

TagKey = Annotated[str, StringConstraints(pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, StringConstraints(pattern=TAG_VALUE_PATTERN)]
# additionalProperties: pydantic's schema lists the key pattern but would let other keys pass.
Tags = Annotated[
    dict[TagKey, TagValue],
    Field(max_length=MAX_TAGS, json_schema_extra={"additionalProperties": False}),
]

NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]

Timestamp = Annotated[
    datetime,
    BeforeValidator(_parse_timestamp),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "number", "minimum": 0, "maximum": MAX_EPOCH_SECONDS},
            ],
            "description": "RFC 3339 date-time with a UTC offset, or Unix epoch seconds. "
            "Normalised to UTC; serialised as an RFC 3339 string.",
        }
    ),
]
