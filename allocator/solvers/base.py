"""The abstract solver: public ``solve()`` (validation, seeding, timing, packaging) around a protected ``_solve()``.

Options are a frozen dataclass per solver (``Solver.Options``, see ``options.py``), built and checked here, once,
from the constructor's keyword arguments.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..problem import Problem
from ..result import Allocation, Result
from .options import SolverOptions, check_seed

logger = logging.getLogger(__name__)


@dataclass
class SolveOutput:
    """What ``_solve`` hands back: per-unit level indices and bookkeeping."""

    unit_levels: np.ndarray
    n_evals: int = 0
    history: list[dict] = field(default_factory=list)
    groups: list[tuple[int, int]] | None = None  # layer-position spans, when the solver chose a partition
    info: dict = field(default_factory=dict)


def _solvers_with_side_limits() -> list[str]:
    from ..registry import available_solvers, get_solver
    able = []
    for name in available_solvers():
        try:
            able += [name] if get_solver(name).side_limits else []
        except ImportError:     # an optional extra missing: that solver is not offered
            pass
    return able


class Solver(abc.ABC):
    """Base class of every solver. Subclasses implement ``_solve`` and are registered with ``@register_solver``.

    Class attributes: ``exact`` (returns a certified optimum of the table problem), ``needs_additive`` (reads
    the table matrices directly; refuses problems defined through callables), ``groupings`` (the grouping modes
    supported), ``side_limits`` (honours ``Problem(side_limits=...)``, the extra cost constraints), ``Options`` (a
    ``SolverOptions`` dataclass: the accepted options, their defaults and ranges; a solver without options keeps
    the empty base).
    """

    name: str = "abstract"
    exact: bool = False
    needs_additive: bool = True
    groupings: tuple[str, ...] = ("unit", "consecutive", "fixed")
    side_limits: bool = False
    Options: type[SolverOptions] = SolverOptions

    def __init__(self, **options):
        self.options = self.Options.build(self.name, options)

    def solve(self, problem: Problem, *, seed: int | None = 0) -> Result:
        check_seed(seed, self.name)
        if problem.grouping not in self.groupings:
            raise ValueError(f"solver '{self.name}' does not support grouping '{problem.grouping}' "
                             f"(supports {list(self.groupings)})")
        if self.needs_additive:
            problem.require_additive(self.name)
        if problem.side_limits and not self.side_limits:
            able = _solvers_with_side_limits()
            raise ValueError(f"solver '{self.name}' cannot honour side limits {sorted(problem.side_limits)} (a second "
                             f"constraint); use one of {able} or drop the side limits")
        problem.check_feasible_bound()
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        out = self._solve(problem, rng)
        elapsed = time.perf_counter() - start
        unit_levels = np.asarray(out.unit_levels, dtype=int).ravel()
        if out.groups is not None:
            cost, deg = problem.evaluate_partition(out.groups, [problem.layer_levels(unit_levels[None])[0][i]
                                                               for i, _ in out.groups])
            feasible = problem.is_within_limit(deg if problem.direction == "min_cost" else cost)
            if problem.max_groups is not None:
                feasible = feasible and len(out.groups) <= problem.max_groups
            if problem.side_limits:
                feasible = feasible and bool(problem.side_violation(unit_levels[None])[0] <= 0)
        else:
            ev = problem.evaluate_units(unit_levels[None])
            cost, deg, feasible = float(ev.cost[0]), float(ev.degradation[0]), bool(ev.feasible[0])
        groups = None
        if out.groups is not None:
            groups = [[int(problem.layer_ids[i]), int(problem.layer_ids[j])] for i, j in out.groups]
        allocation = Allocation.from_levels(problem.tables, unit_levels, groups=groups, solver=self.name,
                                            problem=problem.describe(), predicted_cost=cost,
                                            predicted_degradation=deg, feasible=feasible)
        result = Result(solver=self.name, allocation=allocation, x=unit_levels, cost=float(cost),
                        degradation=float(deg), feasible=bool(feasible), solve_time=elapsed,
                        n_evals=int(out.n_evals), problem=problem.describe(), history=out.history, info=out.info)
        logger.info(result.summary())
        return result

    @abc.abstractmethod
    def _solve(self, problem: Problem, rng: np.random.Generator) -> SolveOutput:
        """Return the chosen per-unit levels (raise ``problem.infeasible(best)`` when nothing is feasible)."""
