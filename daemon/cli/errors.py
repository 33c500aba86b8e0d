"""The one way a `clearbudget` command fails: `error: <message>` on stderr and an exit code."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

import typer

__all__ = ["fail"]


def fail(message: str, code: int = 2, *, secrets: Iterable[str] = ()) -> NoReturn:
    """Print `error: message` on stderr ("error:" in red on a terminal) and exit with `code`.

    Code 2 is a bad option, input file or setting (as click's usage errors); 1 is anything else.
    `secrets` (the settings' `secret_values()`, once loaded) are masked in the message: an
    exception's text may carry one that a broker or a pod echoed.
    """
    secrets = tuple(secrets)
    if secrets:
        from clearbudget.daemon.settings import Scrubber  # only on this path: --help stays light

        message = Scrubber(secrets).text(message)
    typer.echo(f"{typer.style('error:', fg=typer.colors.RED)} {message}", err=True)
    raise typer.Exit(code)
