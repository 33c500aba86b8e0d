"""`python -m clearbudget.daemon.cli`: the `clearbudget` command (the integration tests start it
this way)."""

from clearbudget.daemon.cli import app

app(prog_name="clearbudget")
