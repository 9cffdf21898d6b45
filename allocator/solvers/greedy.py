"""`greedy`: TEAL-style marginal allocation, one variable one level at a time.

Algorithm: start from the least compressed allocation (level 0 everywhere). Each step evaluates, for every
variable (a unit, a layer under consecutive grouping, or a fixed group), the move to its next level that lowers
the constrained quantity (or, for ``delta=``, the cost), as one population through ``Problem.evaluate`` (so user
callables work), and applies the best one:

* ``budget=`` / ``sparsity=``: the move with the least added degradation per unit of cost saved, until the cost
  meets the budget;
* ``delta=``: the move with the most cost saved per unit of added degradation among those that keep the
  degradation <= delta, until no move fits.

On multi-dimensional grids (several rho or bits values) a move may go to any level that lowers the constrained
quantity, since the index order is then not the cost order. With ``max_groups`` a move may not create more runs
of equal levels than allowed. Complexity: at most n (m - 1) steps of n evaluations, O(n^2 m) evaluations
(O(n^2 m^2) with any-level moves). No optimality guarantee (the exact solvers are the certificate).
Source: TEAL's greedy block-wise sparsity allocation (Liu et al., "Training-Free Activation Sparsity in Large
Language Models", arXiv 2408.14690), and the classic marginal-analysis heuristic for knapsack allocation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register_solver
from .base import Solver, SolveOutput
from .options import SolverOptions, integer, one_of, option


@dataclass(frozen=True)
class GreedyOptions(SolverOptions):
    """Options of ``greedy``."""

    moves: str = option("auto", one_of("auto", "next", "any"),
                        "'auto': any level on multi-dimensional grids, else the next one")
    max_history: int = option(100, integer(0), "history entries kept (evenly spaced)")


@register_solver("greedy")
class GreedySolver(Solver):
    """TEAL-style marginal greedy; options: ``GreedySolver.Options``."""

    needs_additive = False
    Options = GreedyOptions

    def _split(self, problem, ev):
        cons = ev.degradation if problem.direction == "min_cost" else ev.cost
        obj = ev.cost if problem.direction == "min_cost" else ev.degradation
        return cons, obj

    def _any_level_moves(self, problem) -> bool:
        """Moves to any level (not only the next one) on multi-dimensional grids, e.g. (s, rho): there the index
        order is not the cost order, and a next-level walk crosses every rho of a sparsity (measured: greedy on
        an R-Sparse (s, rho) table landed at 1.29x uniform's perplexity increase on SmolLM2)."""
        moves = self.options.moves
        if moves == "auto":
            levels = problem.tables.levels
            return levels["rho"].nunique() > 1 or levels["bits"].nunique() > 1
        return moves == "any"

    def _candidates(self, problem, x, cur_cons, cur_cost):
        """Per variable, the nearest higher level (or, on multi-dimensional grids, any level) that lowers the
        constrained quantity (budget) or the cost (delta). Returns (variables, population, evaluation, evaluations)."""
        n, m = problem.n_vars, problem.n_levels
        if self._any_level_moves(problem):
            variables, levels = np.repeat(np.arange(n), m), np.tile(np.arange(m), n)
            keep = levels != x[variables]
            variables, levels = variables[keep], levels[keep]
            X = np.repeat(x[None], len(variables), axis=0)
            X[np.arange(len(variables)), variables] = levels
            ev = problem.evaluate(X)
            cons, _ = self._split(problem, ev)
            lowered = (cons < cur_cons) if problem.direction == "min_degradation" else (ev.cost < cur_cost)
            return self._filter_groups(problem, variables[lowered], X[lowered], len(X))
        target = x + 1
        active = np.flatnonzero(target < m)
        found_vars, found_X, evals = [], [], 0
        while active.size:
            X = np.repeat(x[None], active.size, axis=0)
            X[np.arange(active.size), active] = target[active]
            ev = problem.evaluate(X)
            evals += active.size
            cons, _ = self._split(problem, ev)
            lowered = (cons < cur_cons) if problem.direction == "min_degradation" else (ev.cost < cur_cost)
            found_vars.append(active[lowered])
            found_X.append(X[lowered])
            target[active] += 1
            active = active[~lowered & (target[active] < m)]
        X = np.concatenate(found_X) if found_X else np.empty((0, n), int)
        variables = np.concatenate(found_vars) if found_vars else np.empty(0, int)
        return self._filter_groups(problem, variables, X, evals)

    @staticmethod
    def _filter_groups(problem, variables, X, evals):
        """Drop moves that would create more runs of equal levels than ``max_groups`` allows."""
        if problem.max_groups is not None and len(X):
            runs = np.array([len(problem.runs(lv)) for lv in problem.layer_levels(problem.expand(X))])
            keep = runs <= problem.max_groups
            X, variables = X[keep], variables[keep]
        return variables, X, (problem.evaluate(X) if len(X) else None), evals

    def _solve(self, problem, rng) -> SolveOutput:
        x = np.zeros(problem.n_vars, dtype=int)
        ev = problem.evaluate(x[None])
        cons, obj = (float(v[0]) for v in self._split(problem, ev))
        cost = float(ev.cost[0])
        best_cons, evals, steps = cons, 1, []
        budget_mode = problem.direction == "min_degradation"
        if not budget_mode and not problem.is_within_limit(cons):
            raise problem.infeasible(cons, scope="the greedy search (its start, the least compressed allocation)")
        while not (budget_mode and problem.is_within_limit(cons)):
            variables, X, cand, used = self._candidates(problem, x, cons, cost)
            evals += used
            if cand is None:
                break
            c_cons, c_obj = self._split(problem, cand)
            best_cons = min(best_cons, float(c_cons.min()))
            if budget_mode:                                   # least degradation added per cost saved
                score = (c_obj - obj) / np.maximum(cons - c_cons, 1e-300)
            else:                                             # most cost saved per degradation added
                fits = np.array([problem.is_within_limit(v) for v in c_cons])
                if not fits.any():
                    break
                saved, added = cost - cand.cost, c_cons - cons
                score = np.where(added > 0, -saved / np.maximum(added, 1e-300), -np.inf)
                score = np.where(fits, score, np.inf)
            k = int(np.argmin(score))
            x = X[k].copy()
            cons, obj, cost = float(c_cons[k]), float(c_obj[k]), float(cand.cost[k])
            steps.append({"step": len(steps) + 1, "var": int(variables[k]), "level": int(x[variables[k]]),
                          "cost": cost, "degradation": float(cand.degradation[k])})
        if budget_mode and not problem.is_within_limit(cons):
            raise problem.infeasible(min(best_cons, cons), scope="the greedy search")
        keep = self.options.max_history
        history = steps if len(steps) <= keep else [steps[i] for i in
                                                    np.unique(np.linspace(0, len(steps) - 1, keep).astype(int))]
        return SolveOutput(problem.expand(x[None])[0], n_evals=evals, history=history, info={"steps": len(steps)})
