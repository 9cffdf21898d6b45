"""`brute`: exhaustive enumeration, the ground truth for tiny instances.

Algorithm: per unit (or fixed group, or any problem given through callables) every level vector of the search
space, m^n candidates, evaluated through ``Problem.evaluate`` in vectorised chunks. Consecutive grouping with
tables: every composition of the L layers into G <= max_groups consecutive spans times every level per span
(DP semantics, adjacent spans may share a level), sum_G C(L-1, G-1) m^G = m (m+1)^(L-1) candidates, costed from
the span tables. Complexity O(candidates * n). Instances above ``max_candidates`` (2e6) are refused.
Source: plain enumeration, the ground truth the property tests certify ``dp`` and ``milp`` against.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import comb

import numpy as np

from ..registry import register_solver
from .base import Solver, SolveOutput
from ._chain import span_tables
from .options import SolverOptions, integer, option

CHUNK = 65536


@dataclass(frozen=True)
class BruteOptions(SolverOptions):
    """Options of ``brute``."""

    max_candidates: int = option(2_000_000, integer(1), "largest instance enumerated")


def _digits(index: np.ndarray, width: int, base: int) -> np.ndarray:
    """Mixed-radix decode: candidate indices (P,) -> level vectors (P, width)."""
    return (index[:, None] // base ** np.arange(width)[None, :]) % base


@register_solver("brute")
class BruteSolver(Solver):
    exact = True
    needs_additive = False
    side_limits = True
    Options = BruteOptions

    def _solve(self, problem, rng) -> SolveOutput:
        limit = self.options.max_candidates
        partitions = problem.grouping == "consecutive" and problem.is_additive
        size = self.count(problem) if partitions else problem.n_levels ** problem.n_vars
        if size > limit:
            raise ValueError(f"brute refuses this instance: {size:.3g} candidates "
                             f"({problem.n_vars} variables x {problem.n_levels} levels) exceed max_candidates="
                             f"{limit:.3g}; use solver='milp' (exact) or 'dp'")
        best = self._partitions(problem) if partitions else self._vectors(problem)
        history = [{"candidates": int(size), "objective": best["objective"], "min_constrained": best["min_cons"]}]
        if best["x"] is None:
            raise problem.infeasible(best["min_cons"], scope="any allocation (exhaustive)")
        return SolveOutput(best["x"], n_evals=int(size), history=history, groups=best.get("groups"))

    @staticmethod
    def count(problem) -> int:
        L, m = problem.n_layers, problem.n_levels
        top = min(problem.max_groups or L, L)
        return sum(comb(L - 1, g - 1) * m ** g for g in range(1, top + 1))

    def _vectors(self, problem) -> dict:
        n, m = problem.n_vars, problem.n_levels
        best = {"x": None, "objective": np.inf, "min_cons": np.inf}
        for first in range(0, m ** n, CHUNK):
            X = _digits(np.arange(first, min(first + CHUNK, m ** n)), n, m)
            ev = problem.evaluate(X)
            cons = ev.degradation if problem.direction == "min_cost" else ev.cost
            if problem.max_groups is not None:   # the group-count cap is part of every candidate's definition
                runs = np.array([len(problem.runs(lv)) for lv in problem.layer_levels(problem.expand(X))])
                cons = np.where(runs <= problem.max_groups, cons, np.inf)
            best["min_cons"] = min(best["min_cons"], float(cons.min()))
            obj = np.where(ev.feasible, ev.objective, np.inf)
            k = int(np.argmin(obj))
            if obj[k] < best["objective"]:
                best.update(x=problem.expand(X[k:k + 1])[0], objective=float(obj[k]))
        return best

    def _partitions(self, problem) -> dict:
        L, m = problem.n_layers, problem.n_levels
        cost_t, deg_t = span_tables(problem)
        cons_t, obj_t = (deg_t, cost_t) if problem.direction == "min_cost" else (cost_t, deg_t)
        top = min(problem.max_groups or L, L)
        best = {"x": None, "objective": np.inf, "min_cons": np.inf}
        room = problem.limit + problem.tolerance * max(1.0, abs(problem.limit))
        for cuts in itertools.product((False, True), repeat=L - 1):
            edges = [0] + [p + 1 for p, c in enumerate(cuts) if c] + [L]
            spans = [(a, b - 1) for a, b in zip(edges[:-1], edges[1:])]
            if len(spans) > top:
                continue
            G = len(spans)
            for first in range(0, m ** G, CHUNK):
                levels = _digits(np.arange(first, min(first + CHUNK, m ** G)), G, m)
                cons = sum(cons_t[a, b, levels[:, g]] for g, (a, b) in enumerate(spans))
                obj = sum(obj_t[a, b, levels[:, g]] for g, (a, b) in enumerate(spans))
                best["min_cons"] = min(best["min_cons"], float(cons.min()))
                obj = np.where(cons <= room, obj, np.inf)
                k = int(np.argmin(obj))
                if obj[k] < best["objective"]:
                    layer_level = np.repeat(levels[k], [b - a + 1 for a, b in spans])
                    best.update(x=layer_level[problem.unit_layer_pos], objective=float(obj[k]), groups=spans)
        return best
