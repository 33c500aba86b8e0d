"""The `clearbudget solve` JSON contract: parse a window and name the first bad field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from clearbudget.solver.problem import ProblemError, WindowProblem

_REQUIRED = ("A", "tau", "beta")
_OPTIONAL = ("weight", "cap")
_DEFAULTS = {"weight": 1.0, "cap": math.inf}


def problem_from_json(doc: Any) -> WindowProblem:
    """Parse `{"budget", "queries": [{"id", "A", "tau", "beta", ...}], "tag_budgets"?}`."""
    if not isinstance(doc, Mapping):
        raise ProblemError("(root)", "expected a JSON object")
    if "budget" not in doc:
        raise ProblemError("budget", "is required")
    queries = doc.get("queries")
    if not isinstance(queries, list):
        raise ProblemError("queries", "expected a list of query objects")
    columns: dict[str, list[Any]] = {name: [] for name in ("id", "tag", *_REQUIRED, *_OPTIONAL)}
    for i, query in enumerate(queries):
        _read_query(i, query, columns)
    tag_budgets = doc.get("tag_budgets") or {}
    if not isinstance(tag_budgets, Mapping):
        raise ProblemError("tag_budgets", "expected an object of tag: budget")
    return WindowProblem.create(
        columns["id"],
        columns["A"],
        columns["tau"],
        columns["beta"],
        doc["budget"],
        weight=columns["weight"],
        cap=columns["cap"],
        tags=columns["tag"],
        tag_budgets=tag_budgets,
    )


def _read_query(i: int, query: Any, columns: dict[str, list[Any]]) -> None:
    if not isinstance(query, Mapping):
        raise ProblemError(f"queries[{i}]", "expected an object")
    qid = query.get("id")
    if not isinstance(qid, str) or not qid:
        raise ProblemError(f"queries[{i}].id", f"must be a non-empty string, got {qid!r}")
    columns["id"].append(qid)
    for name in (*_REQUIRED, *_OPTIONAL):
        raw = query.get(name)
        if raw is None and name in _DEFAULTS:
            raw = _DEFAULTS[name]
        elif raw is None:
            raise ProblemError(f"queries[{i}].{name}", f"is required (id {qid!r})")
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ProblemError(
                f"queries[{i}].{name}", f"must be a number, got {raw!r} (id {qid!r})"
            )
        columns[name].append(float(raw))
    tag = query.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise ProblemError(f"queries[{i}].tag", f"must be a string, got {tag!r} (id {qid!r})")
    columns["tag"].append(tag)
