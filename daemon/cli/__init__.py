"""`clearbudget` command line: one typer app, one function per sub-command."""

from __future__ import annotations

import typer

from daemon.cli.replay import demo_command, replay_command, sweep_command
from daemon.cli.run import run
from daemon.cli.schema import schema
from daemon.cli.simulate import simulate_backend
from daemon.cli.solve import solve

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


app.command("run")(run)
app.command("replay")(replay_command)
app.command("sweep")(sweep_command)
app.command("demo")(demo_command)
app.command("simulate-backend")(simulate_backend)
app.command("schema")(schema)
app.command("solve")(solve)


if __name__ == "__main__":  # pragma: no cover
    app()
