"""Pure, synchronous numerics: utility model, fitting and windowed allocation.

Nothing in this package may import asyncio, Kafka or HTTP clients, or log: what a caller
should hear of (a solver fallback) comes back in the results.

The names below are exported lazily (PEP 562): `import solver.fit` or `from solver import
ProblemError` loads only the submodules it needs, so importing one light submodule does not
pull in cvxpy (about a second) with `solver.allocate` and `solver.cvx`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clearbudget.solver.allocate import solve_window
    from clearbudget.solver.cvx import CvxpyAllocator, SolverFailure
    from clearbudget.solver.problem import AllocationResult, ProblemError, WindowProblem
    from clearbudget.solver.utility import (
        envelope,
        envelope_value,
        marginal_value,
        tangent_point,
        value,
    )

# Exported name → the submodule defining it.
_EXPORTS = {
    "AllocationResult": "clearbudget.solver.problem",
    "CvxpyAllocator": "clearbudget.solver.cvx",
    "ProblemError": "clearbudget.solver.problem",
    "SolverFailure": "clearbudget.solver.cvx",
    "WindowProblem": "clearbudget.solver.problem",
    "envelope": "clearbudget.solver.utility",
    "envelope_value": "clearbudget.solver.utility",
    "marginal_value": "clearbudget.solver.utility",
    "solve_window": "clearbudget.solver.allocate",
    "tangent_point": "clearbudget.solver.utility",
    "value": "clearbudget.solver.utility",
}

__all__ = [
    "AllocationResult",
    "CvxpyAllocator",
    "ProblemError",
    "SolverFailure",
    "WindowProblem",
    "envelope",
    "envelope_value",
    "marginal_value",
    "solve_window",
    "tangent_point",
    "value",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    attribute = getattr(import_module(module), name)
    globals()[name] = attribute  # later look-ups skip this function
    return attribute


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
