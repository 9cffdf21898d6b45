"""Reusable conformance checks for solver plugins (optuna's ``testing`` idea).

A third-party solver proves it honours the contract with one class::

    from allocator.testing import SolverConformance

    class TestMySolver(SolverConformance):
        solver_name = "my-solver"
        solver_options = {"iterations": 50}     # a field of the plugin's own ``Options`` dataclass

or, outside pytest, ``check_solver("my-solver")`` (raises AssertionError on the first broken rule).
Checks: registration, feasible answers in both directions and every supported grouping, ``Infeasible`` with the
best achievable value, determinism under a seed, ``Result`` fields and ``to_dataframe()``, and that a feasible
answer never beats the exact ``milp`` certificate.
"""
from __future__ import annotations

import json

import numpy as np

from .api import minimize
from .problem import Infeasible, Problem
from .registry import available_solvers, get_solver
from .result import Allocation, Result
from .solvers.base import Solver
from .tables import Tables, Unit, make_levels


def random_tables(seed: int, n_units: int = 4, n_levels: int = 3, integer: bool = False,
                  units_per_layer: int = 1) -> Tables:
    """A small random instance: cost falls and degradation rises with the level index (up to noise)."""
    rng = np.random.default_rng(seed)
    units = [Unit(f"u{k}", k // units_per_layer) for k in range(n_units)]
    levels = make_levels(s=np.linspace(0.0, 0.9, n_levels))
    if integer:
        cost = -np.sort(-rng.integers(1, 30, (n_units, n_levels)), axis=1).astype(float)
        deg = np.sort(rng.integers(0, 12, (n_units, n_levels)), axis=1).astype(float)
    else:
        cost = -np.sort(-rng.random((n_units, n_levels)), axis=1)
        deg = np.sort(rng.random((n_units, n_levels)), axis=1) + rng.normal(0, 0.05, (n_units, n_levels))
    return Tables(units, levels, {"cost": cost}, deg)


def random_problem(seed: int, direction: str = "budget", grouping=None, slack: float = 0.5, **table_args) -> Problem:
    """A random problem whose limit lies ``slack`` of the way between the tightest and the loosest value."""
    tables = random_tables(seed, **table_args)
    matrix = tables.degradation if direction == "delta" else tables.costs["cost"]
    low, high = matrix.min(axis=1).sum(), matrix.max(axis=1).sum()
    limit = float(low + slack * (high - low))
    if direction == "budget":
        limit = max(limit, 0.0)
    return Problem(tables, "cost", grouping=grouping, **{direction: limit})


def _assert_result(result: Result, problem: Problem, name: str):
    assert isinstance(result, Result), f"{name} must return an allocator.Result"
    assert result.solver == name
    assert result.x.shape == (problem.n_units,) and result.x.dtype.kind == "i"
    assert ((result.x >= 0) & (result.x < problem.n_levels)).all()
    assert result.solve_time >= 0 and int(result.n_evals) >= 0
    assert isinstance(result.history, list)
    assert np.isfinite(result.cost) and np.isfinite(result.degradation)
    frame = result.to_dataframe()
    assert len(frame) == problem.n_units
    assert {"solver", "unit", "level", "total_cost", "feasible"} <= set(frame.columns)
    payload = json.loads(json.dumps(result.allocation.to_dict()))
    assert Allocation.from_dict(payload).level_index == result.x.tolist()


class SolverConformance:
    """Pytest base class: set ``solver_name`` (and ``solver_options``) in a subclass named ``Test...``."""

    solver_name: str = ""
    solver_options: dict = {}
    seeds = (0, 1, 2)

    def _solve(self, problem, seed=0):
        return minimize(problem, self.solver_name, seed=seed, **self.solver_options)

    def _groupings(self):
        return [g for g in (None, "consecutive") if (g or "unit") in get_solver(self.solver_name).groupings]

    def test_registered(self):
        assert self.solver_name in available_solvers()
        cls = get_solver(self.solver_name)
        assert issubclass(cls, Solver) and cls.name == self.solver_name

    def test_feasible_answers(self):
        for seed in self.seeds:
            for direction in ("budget", "delta"):
                for grouping in self._groupings():
                    problem = random_problem(seed, direction, grouping, n_units=4, n_levels=3)
                    result = self._solve(problem, seed)
                    assert result.feasible, f"{self.solver_name} returned an infeasible answer: {result.summary()}"
                    _assert_result(result, problem, self.solver_name)

    def test_infeasible_names_best_value(self):
        tables = random_tables(7, n_units=4, n_levels=3)
        best = float(tables.costs["cost"].min(axis=1).sum())
        problem = Problem(tables, "cost", budget=0.5 * best)
        try:
            self._solve(problem)
        except Infeasible as exc:
            assert exc.best_achievable is not None and exc.best_achievable >= best - 1e-9
            assert f"{exc.best_achievable:.6g}" in str(exc)
        else:
            raise AssertionError(f"{self.solver_name} returned an answer to an infeasible problem")

    def test_deterministic_with_seed(self):
        problem = random_problem(3, "budget", n_units=5, n_levels=4)
        first, second = self._solve(problem, seed=11), self._solve(problem, seed=11)
        assert first.x.tolist() == second.x.tolist() and first.objective == second.objective

    def test_never_beats_certificate(self):
        for seed in self.seeds:
            for direction in ("budget", "delta"):
                problem = random_problem(seed, direction, n_units=4, n_levels=3)
                certificate = minimize(problem, "milp").objective
                result = self._solve(problem, seed)
                assert result.objective >= certificate - 1e-7 * max(1.0, abs(certificate))


def check_solver(name: str, **options) -> None:
    """Run every conformance check on solver ``name`` outside pytest; raises AssertionError on failure."""
    suite = type("Conformance", (SolverConformance,), {"solver_name": name, "solver_options": options})()
    for attr in sorted(dir(suite)):
        if attr.startswith("test_"):
            getattr(suite, attr)()
