"""`clearbudget --help` stays fast: building the app and rendering every `--help` imports none of
the heavy libraries (they load inside the commands). `benchmarks/help_bench.py` times it."""

from __future__ import annotations

import json
import subprocess
import sys

import clearbudget.daemon.cli.simulate
import clearbudget.daemon.cli.sweep
import clearbudget.daemon.replay.config
import clearbudget.daemon.replay.sim_server

# Each costs from tens of milliseconds (structlog) to about a second (cvxpy). Not pydantic
# itself: typer (0.29) builds its option parsers with it, so every command's --help loads it.
HEAVY = (
    "cvxpy", "numpy", "scipy", "aiokafka", "aiohttp", "matplotlib", "sklearn",
    "pydantic_settings", "structlog", "prometheus_client", "orjson", "clearbudget.solver",
    "clearbudget.schemas",
    "clearbudget.daemon.core", "clearbudget.daemon.kafka", "clearbudget.daemon.vllm",
    "clearbudget.daemon.replay", "clearbudget.daemon.app", "clearbudget.daemon.settings",
)  # fmt: skip

PROBE = """
import json, sys
from typer.main import get_command
from typer.testing import CliRunner
from clearbudget.daemon.cli import app
names = sorted(get_command(app).commands)
runs = [[], *([name] for name in names)]
codes = [CliRunner().invoke(app, [*args, "--help"]).exit_code for args in runs]
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in HEAVY))
print(json.dumps({"names": names, "codes": codes, "heavy": heavy}))
"""


def test_help_of_every_command_imports_no_heavy_module() -> None:
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    found = json.loads(done.stdout)
    assert "config" in found["names"]
    assert set(found["codes"]) == {0}
    assert found["heavy"] == []


def test_help_defaults_spelt_out_in_the_cli_match_their_sources() -> None:
    assert (
        ",".join(clearbudget.daemon.replay.config.POLICIES)
        == clearbudget.daemon.cli.sweep.DEFAULT_POLICIES
    )
    assert (
        clearbudget.daemon.cli.simulate.DEFAULT_MODEL_NAME
        == clearbudget.daemon.replay.sim_server.DEFAULT_MODEL_NAME
    )
