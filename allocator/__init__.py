"""allocator: decide, layer by layer, how far an LLM can be compressed under an accuracy budget.

The core (this package minus ``allocator.evaluators`` / ``allocator.kernels``) imports without torch.
"""
from .api import minimize
from .cost_providers import CostProviderError, available_cost_kinds, cost_provider, register_cost_provider, with_costs
from .costs import ModelShape, analytic_tables, load_model_config, model_shape, rsparse_split, shipped_model_configs
from .levels import Level, LevelError, make_levels, normalize_levels
from .problem import Evaluation, Infeasible, Problem
from .registry import available_solvers, get_solver, register_solver
from .result import Allocation, AllocationError, Result
from .solvers.base import Solver, SolveOutput
from .solvers.options import SolverOptionError
from .tables import Tables, TablesError, Unit

__all__ = [
    "Allocation", "AllocationError", "CostProviderError", "Evaluation", "Infeasible", "Level", "LevelError",
    "ModelShape", "Problem", "Result", "Solver", "SolverOptionError", "SolveOutput", "Tables", "TablesError", "Unit", "analytic_tables",
    "available_cost_kinds", "available_solvers", "cost_provider", "get_solver", "load_model_config", "make_levels",
    "minimize", "model_shape", "normalize_levels", "register_cost_provider", "register_solver", "rsparse_split",
    "shipped_model_configs", "with_costs",
]
__version__ = "0.1.0"
