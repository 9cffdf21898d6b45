"""The one-liner: ``allocator.minimize(problem, solver="dp", **options)``."""
from __future__ import annotations

from .problem import Problem
from .registry import get_solver
from .result import Result


def minimize(problem: Problem, solver: str = "dp", *, seed: int | None = 0, **options) -> Result:
    """Solve ``problem`` with the registered solver ``solver``.

    ``options`` build the solver's ``Options`` dataclass (``get_solver(solver).Options``): an unknown option or a
    value of the wrong type or range raises ``SolverOptionError`` before anything is solved; so does a ``seed``
    that is not None or an integer >= 0.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"minimize() takes an allocator.Problem, got {type(problem).__name__}")
    return get_solver(solver)(**options).solve(problem, seed=seed)
