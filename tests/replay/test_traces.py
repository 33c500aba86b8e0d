"""Trace readers on the real shared trace and on small malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clearbudget.daemon.replay.files import InputFileError
from clearbudget.daemon.replay.traces import (
    detect_format,
    read_azure_csv,
    read_mooncake_jsonl,
    read_request_jsonl,
    read_trace,
)

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ the shared Azure trace


def test_reads_the_shared_azure_trace(shared_data: Path) -> None:
    path = shared_data / "azure_llm_conv_2023.csv"
    assert detect_format(path) == "azure"
    arrivals = list(read_trace(path))
    assert len(arrivals) == 19_366
    first, second = arrivals[0], arrivals[1]
    assert first.arrival == 0.0
    assert first.line == 2
    assert first.fields == {
        "TIMESTAMP": "2023-11-16 18:15:46.6805900",
        "ContextTokens": 374,
        "GeneratedTokens": 44,
    }
    # 18:15:50.9951690 - 18:15:46.6805900, to the 7th fractional digit.
    assert second.arrival == pytest.approx(4.3145790, abs=1e-9)
    times = [a.arrival for a in arrivals]
    assert times == sorted(times)
    assert 55 * 60 < times[-1] < 60 * 60  # the README's "58 min"


def test_limit_reads_only_the_head(tmp_path: Path) -> None:
    rows = [AZURE_HEADER, "2023-11-16 18:15:46.0000000,1,2", "2023-11-16 18:15:47.5000000,3,4"]
    path = write(tmp_path, "t.csv", [*rows, "garbage that would fail"])
    assert [a.arrival for a in read_trace(path, limit=2)] == [0.0, 1.5]
    assert list(read_trace(path, limit=0)) == []
    with pytest.raises(InputFileError, match="line 4"):
        list(read_trace(path))


# ------------------------------------------------------------------ Azure CSV errors


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ("2023-11-16 18:15:47,x,2", "ContextTokens", "not an integer"),
        ("2023-11-16 18:15:47,1,-2", "GeneratedTokens", "non-negative"),
        ("16/11/2023 18:15:47,1,2", "TIMESTAMP", "not a timestamp"),
        ("2023-11-16 18:15:47.12ab,1,2", "TIMESTAMP", "not a timestamp"),
        ("2023-11-16 18:15:40,1,2", "TIMESTAMP", "back in time"),
        ("2023-11-16 18:15:47,1", None, "expected 3 cells"),
    ],
)
def test_azure_malformed_rows(tmp_path: Path, row: str, field: str | None, message: str) -> None:
    path = write(tmp_path, "t.csv", [AZURE_HEADER, "2023-11-16 18:15:46.5,1,2", "", row])
    with pytest.raises(InputFileError, match=message) as info:
        list(read_azure_csv(path))
    assert info.value.line == 4
    assert info.value.field == field
    assert str(path) in str(info.value)


def test_azure_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", ["TIMESTAMP,ContextTokens", "2023-11-16 18:15:46,1"])
    with pytest.raises(InputFileError) as info:
        list(read_azure_csv(path))
    assert (info.value.line, info.value.field) == (1, "GeneratedTokens")


# ------------------------------------------------------------------ Mooncake JSONL


def mooncake_row(ts: object, inp: object = 10, out: object = 5) -> str:
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": [1]})


def test_mooncake_arrivals(tmp_path: Path) -> None:
    path = write(tmp_path, "mc.jsonl", [mooncake_row(0), mooncake_row(1500), mooncake_row(1500)])
    assert detect_format(path) == "mooncake"
    arrivals = list(read_trace(path))
    assert [a.arrival for a in arrivals] == [0.0, 1.5, 1.5]
    assert arrivals[1].fields["hash_ids"] == [1]
    assert [a.line for a in arrivals] == [1, 2, 3]


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ('{"timestamp": 5, "input_length": 1', None),
        ("[1, 2]", None),
        (json.dumps({"timestamp": 5, "input_length": 1}), "output_length"),
        (mooncake_row("5"), "timestamp"),
        (mooncake_row(-1), "timestamp"),
        (mooncake_row(5, inp=1.5), "input_length"),
        (mooncake_row(5, out=True), "output_length"),
        (mooncake_row(1), "timestamp"),  # earlier than the row before
    ],
)
def test_mooncake_malformed_rows(tmp_path: Path, row: str, field: str | None) -> None:
    path = write(tmp_path, "mc.jsonl", [mooncake_row(2), row])
    with pytest.raises(InputFileError) as info:
        list(read_mooncake_jsonl(path))
    assert (info.value.line, info.value.field) == (2, field)
    assert f"{path}: line 2" in str(info.value)


# ------------------------------------------------------------------ QueryRequest JSONL


def request_row(arrival: object, **fields: object) -> str:
    return json.dumps({"arrival": arrival, "id": "q-1", "prompt": "problem: amc23-8", **fields})


def test_request_arrivals_are_validated_queries(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "reqs.jsonl",
        [request_row(0.25, tags={"task": "amc"}), "", request_row(2, weight=2.0, id="q-2")],
    )
    assert detect_format(path) == "requests"
    first, second = read_trace(path)
    assert first.arrival == 0.25
    assert first.request is not None
    assert first.request.tags == {"task": "amc"}
    assert first.fields["arrival"] == 0.25  # the raw dict is kept
    assert (second.line, second.arrival) == (3, 2.0)
    assert second.request is not None
    assert second.request.id == "q-2"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (json.dumps({"id": "q", "prompt": "p"}), "arrival"),
        (request_row("soon"), "arrival"),
        (request_row(float("inf")), "arrival"),
        (request_row(1, prompt=""), "prompt"),
        (request_row(1, weight="heavy"), "weight"),
        (request_row(1, colour="red"), "colour"),
        (request_row(0.1), "arrival"),  # earlier than the row before
    ],
)
def test_request_malformed_rows(tmp_path: Path, row: str, field: str) -> None:
    path = write(tmp_path, "reqs.jsonl", [request_row(0.5), row])
    with pytest.raises(InputFileError) as info:
        list(read_request_jsonl(path))
    assert (info.value.line, info.value.field) == (2, field)


# ------------------------------------------------------------------ detection and files


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = write(tmp_path, "odd.txt", [mooncake_row(0, inp=3)])
    assert [a.fields["input_length"] for a in read_trace(path, fmt="mooncake")] == [3]
    with pytest.raises(InputFileError) as info:  # read as requests: no arrival field
        list(read_trace(path, fmt="requests"))
    assert info.value.field == "arrival"


def test_undetectable_and_missing_files(tmp_path: Path) -> None:
    unknown = write(tmp_path, "x.jsonl", ['{"when": 1}'])
    with pytest.raises(InputFileError, match="cannot tell the trace format"):
        detect_format(unknown)
    empty = write(tmp_path, "e.jsonl", [""])
    with pytest.raises(InputFileError, match="empty trace"):
        detect_format(empty)
    with pytest.raises(InputFileError, match="not found"):
        read_trace(tmp_path / "absent.csv")
    with pytest.raises(InputFileError, match="unknown trace format"):
        read_trace(unknown, fmt="parquet")  # type: ignore[arg-type]
