"""Export the message models as JSON Schema files next to this module.

The files are the published contract for producers and consumers in other languages; a test
fails when they drift from the models. Regenerate with:

    python -m clearbudget.schemas.export
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from clearbudget.schemas.feedback import Feedback
from clearbudget.schemas.messages import DeadLetter, QueryRequest, QueryResult, WindowReport

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_SUFFIX = ".schema.json"
REGENERATE_COMMAND = "python -m clearbudget.schemas.export"

SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "query_request": QueryRequest,
    "query_result": QueryResult,
    "window_report": WindowReport,
    "dead_letter": DeadLetter,
    "feedback": Feedback,
}


def schema_dir() -> Path:
    return Path(__file__).resolve().parent


def schema_document(name: str) -> dict[str, Any]:
    """The JSON Schema of one model (validation mode: what a valid message looks like)."""
    document = SCHEMA_MODELS[name].model_json_schema(mode="validation")
    return {"$schema": JSON_SCHEMA_DIALECT, **document}


def schema_documents() -> dict[str, dict[str, Any]]:
    return {name: schema_document(name) for name in SCHEMA_MODELS}


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def schema_path(name: str, directory: Path | None = None) -> Path:
    return (directory or schema_dir()) / f"{name}{SCHEMA_SUFFIX}"


def write_schema_files(directory: Path | None = None) -> list[Path]:
    """(Re)write one `<name>.schema.json` per model; return the paths written."""
    written = []
    for name in SCHEMA_MODELS:
        path = schema_path(name, directory)
        path.write_text(render(schema_document(name)), encoding="utf-8")
        written.append(path)
    return written


def drifted_schema_files(directory: Path | None = None) -> list[str]:
    """File names that are missing, stale, or have no model behind them."""
    folder = directory or schema_dir()
    drifted = [
        path.name
        for name in SCHEMA_MODELS
        if not (path := schema_path(name, folder)).is_file()
        or path.read_text(encoding="utf-8") != render(schema_document(name))
    ]
    expected = {schema_path(name, folder).name for name in SCHEMA_MODELS}
    drifted += sorted(p.name for p in folder.glob(f"*{SCHEMA_SUFFIX}") if p.name not in expected)
    return drifted


def main() -> None:
    for path in write_schema_files():
        sys.stdout.write(f"wrote {path}\n")


if __name__ == "__main__":
    main()
