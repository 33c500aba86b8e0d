"""`clearbudget schema [NAME]`: print the message JSON Schemas."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from clearbudget.daemon.cli.errors import fail


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _resolve(name: str) -> str:
    """Accept `query-request`, `query_request` or `QueryRequest`."""
    from clearbudget.schemas.export import SCHEMA_MODELS

    by_key = {_normalise(key): key for key in SCHEMA_MODELS}
    try:
        return by_key[_normalise(name)]
    except KeyError:
        known = ", ".join(key.replace("_", "-") for key in SCHEMA_MODELS)
        fail(f"unknown schema {name!r}; choose one of: {known}")


def schema(
    name: Annotated[
        str | None,
        typer.Argument(
            help="query-request, query-result, window-report, dead-letter or feedback; all "
            "when omitted."
        ),
    ] = None,
) -> None:
    """Print the JSON Schema of one message type, or an object of all of them by name."""
    from clearbudget.schemas.export import (  # deferred: pydantic
        SCHEMA_MODELS,
        render,
        schema_document,
    )

    if name is None:
        documents = {key: schema_document(key) for key in SCHEMA_MODELS}
        typer.echo(json.dumps(documents, indent=2, ensure_ascii=False))
        return
    typer.echo(render(schema_document(_resolve(name))), nl=False)
