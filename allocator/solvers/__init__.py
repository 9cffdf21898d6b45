"""Built-in solvers. Each module registers its solver with ``@register_solver`` when imported."""
from .base import Solver, SolveOutput

__all__ = ["Solver", "SolveOutput"]
