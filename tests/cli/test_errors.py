"""Every command fails one way: `error: <message>` on stderr, exit 2 (1 if nothing was wrong
with what was asked), never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import clearbudget.daemon.replay.demo
from clearbudget.daemon.cli import app
from clearbudget.daemon.cli.errors import fail
from clearbudget.daemon.replay.embedded import BrokerStartError


def invoke(*args: str) -> tuple[int, str, str]:
    out = CliRunner().invoke(app, list(args))
    return out.exit_code, out.stdout, out.stderr


def test_fail_prints_one_line_on_stderr_and_exits() -> None:
    probe = typer.Typer()

    @probe.command()
    def broken(code: int = 2) -> None:
        fail("something is off", code=code)

    out = CliRunner().invoke(probe, [])
    assert (out.exit_code, out.stdout, out.stderr) == (2, "", "error: something is off\n")
    assert CliRunner().invoke(probe, ["--code", "1"]).exit_code == 1


def test_fail_masks_the_configured_secrets_it_is_given() -> None:
    probe = typer.Typer()

    @probe.command()
    def broken() -> None:
        fail("broker said: bad password hunter2-sasl for user bob", secrets=["hunter2-sasl"])

    out = CliRunner().invoke(probe, [])
    assert out.stderr == "error: broker said: bad password *** for user bob\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--policy", "nope", "--budget-per-query", "5"],
         "error: --policy: must be one of clear, uniform, oracle, got 'nope'"),
        (["replay", "--trace", "/nonexistent", "--budget-per-query", "5"],
         "error: /nonexistent: trace file not found"),
        (["replay", "--budget-per-query", "5", "--tokens-per-second", "4"],
         "error: give exactly one of --budget-per-query or --tokens-per-second"),
        (["replay", "--budget-per-query", "5", "--budget-mode", "thought"],
         "error: --budget-mode: must be one of max_tokens, thinking, got 'thought'"),
        (["replay", "--budget-per-query", "5", "--limit", "0"],
         "error: --limit must be >= 1, got 0"),
        (["replay", "--budget-per-query", "5", "--kafka", "--speedup", "0"],
         "error: --speedup must be > 0, got 0"),
        (["replay", "--window-seconds", "0"],
         "error: --window-seconds: must be a finite number > 0, got 0.0"),
        (["replay", "--window-max-queries", "0"],
         "error: --window-max-queries: must be >= 1, got 0"),
        (["replay", "--seed", "-1"], "error: --seed: must be >= 0, got -1"),
        (["replay", "--policy", "seed"],
         "error: --policy: must be one of clear, uniform, oracle, got 'seed'"),
        (["replay", "--probe-tokens", "0"],
         "error: --probe-tokens: must be >= 1 when probing, got 0"),
        (["replay", "--speedup", "0"], "error: --speedup must be > 0, got 0"),
        (["sweep", "--out", "x", "--budgets", "250", "--window-seconds", "-1"],
         "error: --window-seconds: must be a finite number > 0, got -1.0"),
        (["sweep", "--out", "x", "--budgets", "abc"],
         "error: --budgets must be comma-separated numbers, got 'abc'"),
        (["demo", "--speedup", "-1"], "error: --speedup must be > 0, got -1"),
        (["schema", "query"], "error: unknown schema 'query'; choose one of: query-request"),
        (["solve", "--input", "-", "--method", "foo"],
         "error: --method: expected auto, closed_form or cvxpy, got 'foo'"),
        (["simulate-backend", "--port", "70000"],
         "error: --port must be between 0 and 65535, got 70000"),
    ],
)  # fmt: skip
def test_bad_options_fail_in_one_line(args: list[str], message: str) -> None:
    code, stdout, stderr = invoke(*args)
    assert code == 2
    assert stdout == ""
    assert stderr.startswith(message)
    assert stderr.count("\n") == 1


def test_a_bad_rollouts_file_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "pool.jsonl"
    bad.write_text("{not json\n")
    code, _, stderr = invoke("replay", "--budget-per-query", "5", "--rollouts", str(bad))
    assert code == 2
    assert stderr.startswith(f"error: {bad}: line 1: invalid JSON")


def test_run_names_the_bad_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [n for n in os.environ if n.upper().startswith("CLEAR_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLEAR_TOKENS_PER_SECOND", "-1")
    code, _, stderr = invoke("run")
    assert code == 2
    assert stderr.startswith("error: invalid settings: CLEAR_TOKENS_PER_SECOND")
    assert stderr.count("\n") == 1
    monkeypatch.setenv("CLEAR_HTTP_PORT", "0")  # several: one line each under the heading
    code, _, stderr = invoke("run")
    assert (code, stderr.splitlines()[0]) == (2, "error: invalid settings:")
    assert [line.split(":")[0] for line in stderr.splitlines()[1:]] == [
        "  CLEAR_TOKENS_PER_SECOND", "  CLEAR_HTTP_PORT"
    ]


def test_demo_without_a_broker_fails_with_code_1(
    monkeypatch: pytest.MonkeyPatch, shared_data: Path
) -> None:
    def no_broker() -> None:
        raise BrokerStartError("no tansu here")

    monkeypatch.setattr(clearbudget.daemon.replay.demo, "start_embedded_broker", no_broker)
    code, stdout, stderr = invoke(
        "demo", "--limit", "5", "--trace", str(shared_data / "azure_llm_conv_2023.csv"),
        "--rollouts", str(shared_data / "rollouts.jsonl"),
    )  # fmt: skip
    assert code == 1
    assert stdout == ""
    assert stderr == "error: cannot start the embedded broker: no tansu here\n"


def test_replay_prints_and_writes_the_report(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code, stdout, _ = invoke(
        "replay", "--policy", "uniform", "--budget-per-query", "500", "--limit", "40",
        "--trace", str(shared_data / "azure_llm_conv_2023.csv"),
        "--rollouts", str(shared_data / "rollouts.jsonl"), "--json", str(out),
    )  # fmt: skip
    assert code == 0
    report = json.loads(stdout)
    assert json.loads(out.read_text()) == report
    assert list(report)[:3] == ["policy", "queries", "answered"]
    assert (report["policy"], report["queries"]) == ("uniform", 40)


def test_replay_without_a_budget_replays_at_500_tokens_per_query() -> None:
    import json

    code, stdout, _ = invoke("replay", "--limit", "40", "--policy", "uniform")
    assert code == 0
    report = json.loads(stdout[stdout.index("{") :])
    assert report["queries"] == 40
    assert report["budget_tokens"] == 500 * 40
