"""Input validation (naming the bad field) and the `clearbudget solve` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clearbudget.daemon.cli import app
from clearbudget.solver import ProblemError, WindowProblem
from clearbudget.solver.contract import problem_from_json

GOOD = {
    "budget": 3000,
    "queries": [
        {"id": "a", "A": 0.9, "tau": 300, "beta": 0.01},
        {"id": "b", "A": 0.5, "tau": 900, "beta": 0.004, "tag": "x", "weight": 2},
        {"id": "c", "A": 0.7, "tau": 100, "beta": 0.02, "cap": 400},
    ],
    "tag_budgets": {"x": 1500},
}


def with_query(**changes: object) -> dict[str, object]:
    doc = json.loads(json.dumps(GOOD))
    doc["queries"][1].update(changes)
    return doc


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (with_query(A=1.5), "queries[1].A"),
        (with_query(A=None), "queries[1].A"),
        (with_query(tau=-1), "queries[1].tau"),
        (with_query(beta=0), "queries[1].beta"),
        (with_query(beta="fast"), "queries[1].beta"),
        (with_query(weight=-0.5), "queries[1].weight"),
        (with_query(cap=-1), "queries[1].cap"),
        (with_query(tag=3), "queries[1].tag"),
        (with_query(id=""), "queries[1].id"),
        (with_query(id="a"), "queries[1].id"),
        ({**GOOD, "budget": -5}, "budget"),
        ({**GOOD, "budget": "lots"}, "budget"),
        ({"queries": []}, "budget"),
        ({**GOOD, "queries": {"a": 1}}, "queries"),
        ({**GOOD, "tag_budgets": {"x": float("nan")}}, "tag_budgets.x"),
        ([1, 2], "(root)"),
    ],
)
def test_bad_input_names_the_field(doc: object, field: str) -> None:
    with pytest.raises(ProblemError) as err:
        problem_from_json(doc)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_arrays_of_the_wrong_length_are_rejected() -> None:
    with pytest.raises(ProblemError, match=r"^beta"):
        WindowProblem.create(["a", "b"], [0.5, 0.5], [1.0, 1.0], [0.1, 0.2, 0.3], 100.0)


def test_cli_solves_a_file(tmp_path: Path) -> None:
    path = tmp_path / "window.json"
    path.write_text(json.dumps(GOOD))
    out = CliRunner().invoke(app, ["solve", "--input", str(path)])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert set(result) >= {"shadow_price", "objective", "allocations", "abandoned", "solver"}
    assert set(result["allocations"]) == {"a", "b", "c"}
    assert sum(result["allocations"].values()) <= 3000
    assert result["allocations"]["c"] <= 400
    assert result["allocations"]["b"] <= 1500
    assert result["solver"].startswith("cvxpy")  # tag budgets go to cvxpy


def test_cli_reads_stdin_and_uses_the_closed_form_without_tags() -> None:
    doc = {**GOOD, "tag_budgets": {}}
    out = CliRunner().invoke(app, ["solve", "--input", "-"], input=json.dumps(doc))
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["solver"] == "closed_form"
    assert result["shadow_price"] > 0


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (json.dumps(with_query(beta=-2)), "queries[1].beta"),
        ("{not json", "not valid JSON"),
    ],
)
def test_cli_rejects_bad_input_with_a_named_field(stdin: str, message: str) -> None:
    out = CliRunner().invoke(app, ["solve", "--input", "-"], input=stdin)
    assert out.exit_code == 2
    assert message in out.output
    assert "Traceback" not in out.output


def test_cli_reports_a_missing_file(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["solve", "--input", str(tmp_path / "nope.json")])
    assert out.exit_code == 2
    assert "--input" in out.output


def test_token_allocations_never_exceed_the_budget() -> None:
    problem = WindowProblem.create(
        [f"q{i}" for i in range(50)], np.full(50, 0.8), np.zeros(50), np.full(50, 0.01), 1000.0
    )
    from clearbudget.solver import solve_window

    tokens = solve_window(problem).token_allocations()
    assert tokens.sum() <= 1000
    assert tokens.sum() >= 1000 - 50
