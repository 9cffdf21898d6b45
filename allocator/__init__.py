"""allocator: decide, layer by layer, how far an LLM can be compressed under an accuracy budget.

The core (this package minus ``allocator.evaluators`` / ``allocator.kernels``) imports without torch.
"""
from .api import minimize
from .costs import analytic_tables, load_model_config, model_shape, shipped_model_configs
from .problem import Evaluation, Infeasible, Problem
from .registry import available_solvers, get_solver, register_solver
from .result import Allocation, Result
from .solvers.base import Solver, SolveOutput
from .tables import Tables, TablesError, Unit, make_levels

__all__ = [
    "Allocation", "Evaluation", "Infeasible", "Problem", "Result", "Solver", "SolveOutput", "Tables",
    "TablesError", "Unit", "analytic_tables", "available_solvers", "get_solver", "load_model_config",
    "make_levels", "minimize", "model_shape", "register_solver", "shipped_model_configs",
]
__version__ = "0.1.0"
