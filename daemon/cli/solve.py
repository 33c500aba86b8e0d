"""`clearbudget solve`: allocate one window offline (JSON in, JSON out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from clearbudget.daemon.cli.errors import fail


def solve(
    input: str = typer.Option(..., "--input", "-i", help="Window JSON file, or - for stdin."),
    method: str = typer.Option(
        "auto", help="auto (closed form; cvxpy when tag budgets exist), closed_form or cvxpy."
    ),
    solver: str = typer.Option("CLARABEL", help="cvxpy solver: CLARABEL, ECOS, SCS or HIGHS."),
) -> None:
    """Solve one window: shadow price, allocations and abandoned queries, as JSON on stdout.

    Input: {"budget": B, "queries": [{"id", "A", "tau", "beta", "weight"?, "cap"?, "tag"?}],
    "tag_budgets"?: {tag: B}}.
    """
    # Deferred: cvxpy takes about a second to import; `clearbudget --help` must not pay it.
    from clearbudget.solver import CvxpyAllocator, ProblemError, solve_window
    from clearbudget.solver.contract import problem_from_json

    if method not in ("auto", "closed_form", "cvxpy"):
        fail(f"--method: expected auto, closed_form or cvxpy, got {method!r}")
    try:
        # One window per process: built from constants, no DPP compile (it pays off only for
        # the daemon's long-lived allocator, which solves window after window).
        allocator = CvxpyAllocator.one_off(solver)
    except ValueError as exc:
        fail(f"--{exc}")
    doc = _read_json(input)
    try:
        problem = problem_from_json(doc)
    except ProblemError as exc:
        fail(f"invalid input: {exc}")
    result = solve_window(problem, method=method, allocator=allocator)  # type: ignore[arg-type]
    typer.echo(json.dumps(result.to_contract(), indent=2))


def _read_json(source: str) -> object:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"--input: cannot read {source!r}: {exc.strerror or exc}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--input: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})")
