"""`python -m daemon.cli`: the `clearbudget` command (the integration tests start it this way)."""

from daemon.cli import app

app(prog_name="clearbudget")
