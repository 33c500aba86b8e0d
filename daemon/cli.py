"""`clearbudget` command line: one typer app, one function per sub-command."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="clearbudget",
    help=(
        "Spend a reasoning-token budget across streaming LLM queries where it buys the most "
        "correct answers (CLEAR: probe, fit a utility curve, price tokens, abandon the insolvent)."
    ),
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """clearbudget: token-budget allocation for reasoning LLM queries."""


if __name__ == "__main__":  # pragma: no cover
    app()
