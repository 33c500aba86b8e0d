"""The graded-feedback message: a downstream grader's verdict on an answered query.

Published by the grader on `CLEAR_FEEDBACK_TOPIC` (optional; unset, the daemon reads none);
validated like the other messages (strict types, no unknown fields, `schema_version` 1).
"""

from __future__ import annotations

from pydantic import Field

from clearbudget.schemas.messages import _Message
from clearbudget.schemas.types import SCHEMA_VERSION, Id, SchemaVersion


class Feedback(_Message):
    """Whether the answer the daemon published for query `id` was right.

    The daemon learns from it where it still remembers the query (a bounded number of recent
    queries per replica); a grade for an id it does not hold is counted and ignored.
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    id: Id = Field(description="The graded query's id (as in its QueryRequest and QueryResult).")
    correct: bool = Field(description="Whether the query's published answer was right.")
