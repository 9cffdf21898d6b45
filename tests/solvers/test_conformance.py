"""The reusable conformance suite (allocator.testing) run over every built-in solver."""
import importlib.util

import pytest

from allocator.registry import BUILTIN_SOLVER_MODULES
from allocator.testing import SolverConformance, check_solver


def _present(name: str) -> bool:
    return importlib.util.find_spec(BUILTIN_SOLVER_MODULES[name]) is not None


def _skip_missing(name: str):
    return pytest.mark.skipif(not _present(name), reason=f"{BUILTIN_SOLVER_MODULES[name]} not built yet")


class TestDP(SolverConformance):
    solver_name = "dp"


class TestDPSinglePhase(SolverConformance):
    solver_name = "dp"
    solver_options = {"two_phase": False}


class TestMILP(SolverConformance):
    solver_name = "milp"


class TestGreedy(SolverConformance):
    solver_name = "greedy"


class TestUniform(SolverConformance):
    solver_name = "uniform"


class TestBrute(SolverConformance):
    solver_name = "brute"


@_skip_missing("evo")
class TestEvo(SolverConformance):
    solver_name = "evo"
    solver_options = {"n_gen": 5, "pop_size": 8, "progress": False}
    seeds = (0,)


@_skip_missing("bayes")
class TestBayes(SolverConformance):
    solver_name = "bayes"
    solver_options = {"n_trials": 25, "n_startup_trials": 10, "progress": False}
    seeds = (0,)


def test_check_solver_function_runs_outside_pytest():
    check_solver("uniform")


def test_conformance_catches_a_broken_solver():
    """The suite must be able to fail: a solver that ignores the budget is rejected."""
    from allocator import register_solver
    from allocator.solvers.base import Solver, SolveOutput
    import numpy as np

    @register_solver("_ignores_budget")
    class IgnoresBudget(Solver):
        def _solve(self, problem, rng):
            return SolveOutput(np.zeros(problem.n_units, dtype=int))

    with pytest.raises(AssertionError):
        check_solver("_ignores_budget")
