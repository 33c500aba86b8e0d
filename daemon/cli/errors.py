"""The one way a `clearbudget` command fails: `error: <message>` on stderr and an exit code."""

from __future__ import annotations

from typing import NoReturn

import typer

__all__ = ["fail"]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr ("error:" in red on a terminal) and exit with `code`.

    Code 2 is a bad option, input file or setting (as click's usage errors); 1 is anything else.
    """
    typer.echo(f"{typer.style('error:', fg=typer.colors.RED)} {message}", err=True)
    raise typer.Exit(code)
