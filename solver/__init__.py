"""Pure, synchronous numerics: utility model, fitting and windowed allocation.

Nothing in this package may import asyncio, Kafka or HTTP clients.
"""

from solver.allocate import solve_window
from solver.cvx import CvxpyAllocator, SolverFailure
from solver.problem import AllocationResult, ProblemError, WindowProblem
from solver.utility import envelope, envelope_value, marginal_value, tangent_point, value

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
