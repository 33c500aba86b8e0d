"""`clearbudget` command line: one typer app, one module per sub-command.

Commands fail through `daemon.cli.errors.fail` (`error: ...` on stderr, exit 2); shared replay
options and helpers live in `daemon.cli.inputs`. `python -m clearbudget.daemon.cli` runs the same
app.

The top room: may import everything (`daemon.*`, `solver`, `schemas`, typer, rich); nothing
below it imports it.
"""

from __future__ import annotations

from typing import Annotated

import typer

# Every command module imports only typer and the standard library at the top and defers the
# rest (pydantic, numpy, cvxpy, aiokafka, aiohttp, matplotlib, the daemon) into the command, so
# `clearbudget --help` and each command's `--help` start in a fraction of a second
# (benchmarks/help_bench.py; tests/cli/test_startup.py keeps it so).
from clearbudget.daemon.cli.config import config_command
from clearbudget.daemon.cli.demo import demo_command
from clearbudget.daemon.cli.replay import replay_command
from clearbudget.daemon.cli.results import results_command
from clearbudget.daemon.cli.run import run
from clearbudget.daemon.cli.schema import schema
from clearbudget.daemon.cli.simulate import simulate_backend
from clearbudget.daemon.cli.solve import solve
from clearbudget.daemon.cli.submit import submit_command
from clearbudget.daemon.cli.sweep import sweep_command
from clearbudget.daemon.cli.version import print_version

app = typer.Typer(
    name="clearbudget",
    help=(
        "Spend a reasoning-token budget across streaming LLM queries where it buys the most "
        "correct answers (CLEAR: probe, fit a utility curve, price tokens, abandon the insolvent)."
    ),
    no_args_is_help=True,
    add_completion=False,
    # Markdown: a docstring's paragraphs reflow to the terminal instead of keeping its breaks.
    rich_markup_mode="markdown",
)


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """clearbudget: token-budget allocation for reasoning LLM queries."""


app.command("run")(run)
app.command("config")(config_command)
app.command("submit")(submit_command)
app.command("results")(results_command)
app.command("replay")(replay_command)
app.command("sweep")(sweep_command)
app.command("demo")(demo_command)
app.command("simulate-backend")(simulate_backend)
app.command("schema")(schema)
app.command("solve")(solve)
