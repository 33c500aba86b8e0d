"""`clearbudget config`: the settings `clearbudget run` would start with, secrets masked."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clearbudget.daemon.cli.errors import fail

if TYPE_CHECKING:
    from clearbudget.daemon.settings import Settings

MASK = "***"


def config_command(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object {variable: value} instead.")
    ] = False,
) -> None:
    """Print the effective settings (CLEAR_* variables), secrets masked.

    Every variable with the value `clearbudget run` would use, and where it came from: the
    environment, a .env file in the current folder, or the default.
    Secrets (CLEAR_KAFKA_SASL_PASSWORD, CLEAR_VLLM_API_KEY) print as *** and credentials inside
    URLs as ***@. Invalid settings exit with status 2 and name the variable, as `run` does.
    """
    from clearbudget.daemon.settings import SettingsError, load_settings  # deferred: pydantic

    try:
        settings = load_settings()
    except SettingsError as exc:
        fail(str(exc))
    values = effective_settings(settings)
    if json_out:
        typer.echo(json.dumps(values, indent=2))
        return
    _print_table(values, _sources(settings))


def effective_settings(settings: Settings) -> dict[str, Any]:
    """`{CLEAR_* variable: JSON value}` for every setting, secrets and URL credentials masked."""
    from clearbudget.daemon.settings import SECRET_FIELDS, _redact, env_var

    values: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json").items():
        if name in SECRET_FIELDS:
            value = None if getattr(settings, name) is None else MASK
        elif isinstance(value, str):
            value = _redact(value)
        elif isinstance(value, list):
            value = [_redact(item) if isinstance(item, str) else item for item in value]
        values[env_var(name)] = value
    return values


def _sources(settings: Settings) -> dict[str, str]:
    """Where each value came from: the environment, the .env file, or the default."""
    from clearbudget.daemon.settings import env_var

    environment = {name.upper() for name in os.environ}
    sources = {}
    for name in type(settings).model_fields:
        variable = env_var(name)
        if name not in settings.model_fields_set:
            sources[variable] = "default"
        else:
            sources[variable] = "environment" if variable in environment else ".env"
    return sources


def _shown(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def _print_table(values: dict[str, Any], sources: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="effective settings (secrets masked)")
    table.add_column("variable", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("source")
    for variable, value in values.items():
        table.add_row(variable, _shown(value), sources[variable])
    Console(width=max(Console().width, 100)).print(table)
