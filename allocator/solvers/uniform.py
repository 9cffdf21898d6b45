"""Uniform allocation: one level for every unit, the baseline every paper compares with.

Algorithm: evaluate the m uniform allocations (level l everywhere) and return the best feasible one.
Complexity O(m * n) table reads. Source: the uniform baselines of TEAL (arXiv 2408.14690) and R-Sparse
(arXiv 2504.19449). Works with user callables too (it only calls ``Problem.evaluate``).
"""
from __future__ import annotations

import numpy as np

from ..registry import register_solver
from .base import Solver, SolveOutput


@register_solver("uniform")
class UniformSolver(Solver):
    needs_additive = False

    def _solve(self, problem, rng) -> SolveOutput:
        candidates = np.repeat(np.arange(problem.n_levels)[:, None], problem.n_vars, axis=1)
        ev = problem.evaluate(candidates)
        history = [{"level": int(l), "cost": float(c), "degradation": float(d), "feasible": bool(f)}
                   for l, c, d, f in zip(range(problem.n_levels), ev.cost, ev.degradation, ev.feasible)]
        if not ev.feasible.any():
            constrained = ev.degradation if problem.direction == "min_cost" else ev.cost
            raise problem.infeasible(float(constrained.min()), scope="a uniform allocation")
        best = int(np.flatnonzero(ev.feasible)[np.argmin(ev.objective[ev.feasible])])
        return SolveOutput(problem.expand(candidates[best:best + 1])[0], n_evals=problem.n_levels, history=history,
                           info={"level": best})
