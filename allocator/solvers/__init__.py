"""Built-in solvers. Each module registers its solver with ``@register_solver`` when imported.

``SolverOptions`` / ``option`` are what a solver (built-in or plugin) declares its options with;
``SolverOptionError`` is what a bad option raises.
"""
from .base import Solver, SolveOutput
from .options import SolverOptionError, SolverOptions, option

__all__ = ["Solver", "SolveOutput", "SolverOptionError", "SolverOptions", "option"]
