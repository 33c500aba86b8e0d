"""Versioned message contracts (pydantic v2) exchanged over Kafka.

Regenerate the checked-in JSON Schema files with `python -m schemas.export`.
"""

from schemas.messages import (
    DEFAULT_MAX_PROMPT_BYTES,
    MAX_PROMPT_BYTES_CONTEXT_KEY,
    DeadLetter,
    QueryRequest,
    QueryResult,
    Status,
    StatusCounts,
    WindowReport,
)
from schemas.types import ID_PATTERN, SCHEMA_VERSION

__all__ = [
    "DEFAULT_MAX_PROMPT_BYTES",
    "ID_PATTERN",
    "MAX_PROMPT_BYTES_CONTEXT_KEY",
    "SCHEMA_VERSION",
    "DeadLetter",
    "QueryRequest",
    "QueryResult",
    "Status",
    "StatusCounts",
    "WindowReport",
]
