"""Warm starts of the search solvers: ``"dp"`` / ``"greedy"`` / ``"uniform"`` / ``"milp"`` or explicit vectors
turned into feasible search-space vectors, so a search starts from (and, by elitism, never ends worse than) a
table solver's answer.
"""
from __future__ import annotations

import logging

import numpy as np

from ._repair import BudgetRepair, unit_to_var
from .options import SolverOptionError

logger = logging.getLogger(__name__)

TABLE_STARTS = ("dp", "greedy", "uniform", "milp")


def units_to_vars(problem, unit_levels: np.ndarray) -> np.ndarray:
    """Per-unit levels -> one search vector (the rounded mean level of each variable's units)."""
    unit_levels = np.asarray(unit_levels, dtype=float).ravel()
    uv = unit_to_var(problem)
    sums = np.bincount(uv, weights=unit_levels, minlength=problem.n_vars)
    counts = np.bincount(uv, minlength=problem.n_vars)
    return np.rint(sums / np.maximum(counts, 1)).astype(int)


def warm_start_vectors(problem, spec, rng: np.random.Generator, repair: BudgetRepair | None = None,
                       solver: str = "search") -> np.ndarray:
    """Search-space vectors (k, n_vars) from ``spec``: None, "dp" / "greedy" / "uniform" / "milp" (solved on the
    tables), an array of shape (n_vars,) / (n_units,) / (k, n_vars), or a list mixing these. A vector of the
    wrong length or with a level outside the grid is an option error (never clipped)."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "")):
        return np.zeros((0, problem.n_vars), dtype=int)
    specs = spec if isinstance(spec, (list, tuple)) and (not spec or not np.isscalar(spec[0])) else [spec]
    out = []
    for s in specs:
        if isinstance(s, str):
            if s not in TABLE_STARTS:
                raise SolverOptionError(f"solver '{solver}' option warm_start={s!r} is invalid: expected None, one of "
                                        f"{list(TABLE_STARTS)} or level-index vectors", solver, "warm_start", s)
            out.append(units_to_vars(problem, _table_solution(problem, s)))
            continue
        for row in np.atleast_2d(np.asarray(s)):
            row = _checked_row(problem, row, solver)
            out.append(row if len(row) == problem.n_vars else units_to_vars(problem, row))
    X = np.stack(out)
    if repair is not None:
        ev = problem.evaluate(X)
        X = np.stack([x if f else repair.repair_one(x, rng) for x, f in zip(X, ev.feasible)])
    return X


def _checked_row(problem, row: np.ndarray, solver: str) -> np.ndarray:
    """One explicit warm-start vector as integers, after checking its length and that its levels are on the grid."""
    top = problem.n_levels - 1
    sizes = sorted({problem.n_vars, problem.n_units})
    problem_with = f"expected level-index vectors of length {' or '.join(map(str, sizes))} with integers in [0, {top}]"
    numeric = row.dtype.kind in "iuf" and np.isfinite(row).all()
    if len(row) not in sizes or not numeric or (row != np.rint(row)).any() or (row < 0).any() or (row > top).any():
        raise SolverOptionError(f"solver '{solver}' option warm_start={row.tolist()!r} is invalid: {problem_with}",
                                solver, "warm_start", row.tolist())
    return row.astype(int)


def _table_solution(problem, name: str) -> np.ndarray:
    """The per-unit answer of a table solver on this problem's tables (measured objective ignored)."""
    from ..registry import get_solver

    cls = get_solver(name)
    table_problem = problem if problem.grouping in cls.groupings else _ungrouped(problem)
    result = cls().solve(table_problem, seed=0)
    logger.info("warm start from %s: %s", name, result.summary())
    return result.x


def _ungrouped(problem):
    """The same constraint, one level per unit (for a table solver that does not support the grouping)."""
    from ..problem import Problem
    return Problem(problem.tables, problem.cost_kind, budget=problem.budget, delta=problem.delta,
                   cost_fn=problem.cost_fn, degradation_fn=problem.degradation_fn, tolerance=problem.tolerance)
