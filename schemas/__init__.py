"""Versioned message contracts (pydantic v2) exchanged over Kafka.

Regenerate the checked-in JSON Schema files with `python -m clearbudget.schemas.export`.
"""

from clearbudget.schemas.feedback import Feedback
from clearbudget.schemas.messages import (
    DEFAULT_MAX_PROMPT_BYTES,
    MAX_PROMPT_BYTES_CONTEXT_KEY,
    REASON_STATUS,
    Curve,
    DeadLetter,
    QueryRequest,
    QueryResult,
    ReasonCode,
    Status,
    StatusCounts,
    WindowReport,
)
from clearbudget.schemas.types import ID_PATTERN, RESULT_SCHEMA_VERSION, SCHEMA_VERSION

__all__ = [
    "DEFAULT_MAX_PROMPT_BYTES",
    "ID_PATTERN",
    "MAX_PROMPT_BYTES_CONTEXT_KEY",
    "REASON_STATUS",
    "RESULT_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "Curve",
    "DeadLetter",
    "Feedback",
    "QueryRequest",
    "QueryResult",
    "ReasonCode",
    "Status",
    "StatusCounts",
    "WindowReport",
]
