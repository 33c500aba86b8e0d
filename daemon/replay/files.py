"""What the trace and rollout readers share: one error for a bad input file, naming the file,
line and field, and the JSON-lines and count checks both formats use."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["InputFileError", "json_lines", "json_object", "non_negative_int", "require_file"]


class InputFileError(ValueError):
    """An input file (trace or rollout pool) is missing or malformed; names file, line, field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str) -> None:
        where = str(path) if line is None else f"{path}: line {line}"
        what = f": field '{field}'" if field else ""
        super().__init__(f"{where}{what}: {message}")
        self.path = str(path)
        self.line = line
        self.field = field


def require_file(p: Path, kind: str) -> None:
    """InputFileError unless `p` is a file (`kind` names it: "trace", "rollouts")."""
    if not p.is_file():
        raise InputFileError(p, None, None, f"{kind} file not found")


def json_lines(p: Path, kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSON-lines file."""
    require_file(p, kind)
    with p.open(encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if text.strip():
                yield line_no, json_object(text, p, line_no)


def json_object(text: str, p: str | Path, line: int) -> dict[str, Any]:
    """One line parsed as a JSON object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            p, line, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    if not isinstance(obj, dict):
        raise InputFileError(p, line, None, "expected a JSON object")
    return obj


def non_negative_int(value: Any, p: str | Path, line: int, field: str) -> int:
    """`value` itself, if it is a JSON integer >= 0 (booleans and strings are not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputFileError(p, line, field, f"must be a non-negative integer, got {value!r}")
    return value
