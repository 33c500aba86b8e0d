"""Arrival-trace readers for replay: Azure LLM inference CSV, Mooncake JSONL, QueryRequest JSONL.

Each reader lazily yields `Arrival`s (seconds from the trace start plus the row's original
fields), so a replay with a small `--limit` reads only the head of a large trace. Arrivals must
not go back in time. A malformed row raises `InputFileError` naming the file, line and field.

- Azure (`TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps like `2023-11-16 18:15:46.6805900`):
  arrival = timestamp − first row's timestamp.
- Mooncake (`{"timestamp": ms, "input_length", "output_length", ...}`): arrival = timestamp / 1000
  (Mooncake timestamps are already relative to the trace start).
- Requests (QueryRequest objects plus `"arrival": seconds`): arrival as given; the rest is
  validated as a `schemas.QueryRequest`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from clearbudget.daemon.replay.files import (
    InputFileError,
    json_lines,
    json_object,
    non_negative_int,
    require_file,
)
from clearbudget.schemas import QueryRequest

__all__ = [
    "AZURE_COLUMNS",
    "Arrival",
    "TraceFormat",
    "detect_format",
    "read_azure_csv",
    "read_mooncake_jsonl",
    "read_request_jsonl",
    "read_trace",
]

TraceFormat = Literal["azure", "mooncake", "requests"]
TRACE_FORMATS: tuple[TraceFormat, ...] = ("azure", "mooncake", "requests")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


@dataclass(frozen=True, slots=True)
class Arrival:
    """One recorded arrival: seconds from the trace start and the row as recorded."""

    arrival: float
    line: int
    fields: Mapping[str, Any]
    # Set for QueryRequest traces: the validated request (its `arrival` field removed).
    request: QueryRequest | None = None


def read_trace(
    path: str | Path, *, fmt: TraceFormat | None = None, limit: int | None = None
) -> Iterator[Arrival]:
    """Arrivals of a trace in any supported format (detected when `fmt` is None)."""
    if limit is not None and limit < 0:
        raise ValueError("limit must be non-negative")
    p = Path(path)
    require_file(p, "trace")
    chosen = fmt or detect_format(p)
    if chosen not in TRACE_FORMATS:
        raise InputFileError(p, None, None, f"unknown trace format {chosen!r}; use {TRACE_FORMATS}")
    readers: dict[TraceFormat, Callable[[Path], Iterator[Arrival]]] = {
        "azure": read_azure_csv,
        "mooncake": read_mooncake_jsonl,
        "requests": read_request_jsonl,
    }
    return islice(readers[chosen](p), limit)


def detect_format(path: str | Path) -> TraceFormat:
    """Format from the extension (.csv is Azure) or the first JSON line's keys."""
    p = Path(path)
    require_file(p, "trace")
    if p.suffix.lower() == ".csv":
        return "azure"
    with p.open(encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            if text.startswith("TIMESTAMP,"):
                return "azure"
            obj = json_object(text, p, line_no)
            if "arrival" in obj:
                return "requests"
            if "timestamp" in obj:
                return "mooncake"
            raise InputFileError(
                p,
                line_no,
                None,
                "cannot tell the trace format: expected an 'arrival' (QueryRequest JSONL) or a "
                "'timestamp' (Mooncake JSONL) field, or a .csv Azure trace",
            )
    raise InputFileError(p, None, None, "empty trace")


def read_azure_csv(path: str | Path) -> Iterator[Arrival]:
    """Arrivals of an Azure LLM inference trace (CSV with a header row)."""
    p = Path(path)
    require_file(p, "trace")
    with p.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise InputFileError(p, None, None, "empty trace (no header row)")
        columns = [c.strip() for c in header]
        for name in AZURE_COLUMNS:
            if name not in columns:
                raise InputFileError(p, 1, name, f"missing column; header is {columns}")
        origin: tuple[datetime, float] | None = None
        previous = 0.0
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise InputFileError(
                    p, line, None, f"expected {len(columns)} cells, got {len(row)}"
                )
            fields: dict[str, Any] = dict(zip(columns, (c.strip() for c in row), strict=True))
            stamp = _azure_timestamp(fields["TIMESTAMP"], p, line)
            for name in AZURE_COLUMNS[1:]:
                fields[name] = _count(fields[name], p, line, name)
            origin = origin or stamp
            # Rounded to the trace's 100 ns resolution, dropping float noise.
            arrival = round((stamp[0] - origin[0]).total_seconds() + stamp[1] - origin[1], 7)
            previous = _ordered(arrival, previous, p, line, "TIMESTAMP")
            yield Arrival(arrival=arrival, line=line, fields=fields)


def read_mooncake_jsonl(path: str | Path) -> Iterator[Arrival]:
    """Arrivals of a Mooncake trace (JSONL, `timestamp` in milliseconds)."""
    p = Path(path)
    previous = 0.0
    for line, obj in json_lines(p, "trace"):
        for name in MOONCAKE_FIELDS:
            if name not in obj:
                raise InputFileError(p, line, name, "missing")
        stamp = _number(obj["timestamp"], p, line, "timestamp")
        for name in MOONCAKE_FIELDS[1:]:
            _count(obj[name], p, line, name)
        arrival = stamp / 1000.0
        previous = _ordered(arrival, previous, p, line, "timestamp")
        yield Arrival(arrival=arrival, line=line, fields=obj)


def read_request_jsonl(path: str | Path) -> Iterator[Arrival]:
    """Arrivals of a QueryRequest JSONL trace (each object has an `arrival` in seconds)."""
    p = Path(path)
    previous = 0.0
    for line, obj in json_lines(p, "trace"):
        if "arrival" not in obj:
            raise InputFileError(p, line, "arrival", "missing")
        arrival = _number(obj["arrival"], p, line, "arrival")
        request_fields = {k: v for k, v in obj.items() if k != "arrival"}
        try:
            # Through JSON so the strict models parse timestamps as they would off Kafka.
            request = QueryRequest.model_validate_json(json.dumps(request_fields))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or None
            raise InputFileError(p, line, field, first["msg"]) from None
        previous = _ordered(arrival, previous, p, line, "arrival")
        yield Arrival(arrival=arrival, line=line, fields=obj, request=request)


# --------------------------------------------------------------------------- helpers


def _azure_timestamp(text: str, p: Path, line: int) -> tuple[datetime, float]:
    """Whole seconds and the fraction, kept apart: Azure writes 7 fractional digits (100 ns
    ticks), more than `datetime` holds."""
    base, _, fraction = text.partition(".")
    try:
        if fraction and not fraction.isdigit():
            raise ValueError(fraction)
        stamp = datetime.strptime(base, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise InputFileError(
            p, line, "TIMESTAMP", f"not a timestamp like 2023-11-16 18:15:46.6805900: {text!r}"
        ) from None
    return stamp, int(fraction or "0") / 10 ** len(fraction)


def _count(value: Any, p: Path, line: int, field: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise InputFileError(p, line, field, f"not an integer: {value!r}") from None
    return non_negative_int(value, p, line, field)


def _number(value: Any, p: Path, line: int, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputFileError(p, line, field, f"must be a finite number, got {value!r}")
    if value < 0:
        raise InputFileError(p, line, field, f"must be non-negative, got {value!r}")
    return float(value)


def _ordered(arrival: float, previous: float, p: Path, line: int, field: str) -> float:
    if arrival < previous:
        raise InputFileError(
            p, line, field, f"goes back in time ({arrival:.3f} s after {previous:.3f} s)"
        )
    return arrival
