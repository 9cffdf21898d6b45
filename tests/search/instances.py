"""Seeded table instances with a certified optimum (scipy's HiGHS MILP on the multiple-choice knapsack)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from allocator import Problem, Tables, Unit, make_levels


def synthetic_tables(n_units: int = 30, n_levels: int = 8, seed: int = 0) -> Tables:
    """Units of different sizes and sensitivities; convex-ish degradation with noise (not separable by eye)."""
    rng = np.random.default_rng(seed)
    s = np.linspace(0.0, 0.875, n_levels)
    size = rng.uniform(0.5, 2.0, n_units)
    sens = rng.lognormal(0.0, 1.0, n_units)
    power = rng.uniform(1.5, 3.5, n_units)
    cost = size[:, None] * (1.0 - s[None, :])
    deg = sens[:, None] * s[None, :] ** power[:, None] + 0.02 * rng.random((n_units, n_levels)) * s[None, :]
    units = [Unit(name=f"layers.{i}", layer=i, params=int(size[i] * 1e6)) for i in range(n_units)]
    return Tables(units, make_levels(s=s), {"bytes_decode": cost}, deg)


def exact_optimum(problem: Problem) -> float:
    """Minimum table degradation s.t. cost <= budget, one level per unit (MCKP as a 0/1 MILP)."""
    c, d = problem.cost_matrix, problem.deg_matrix
    n, m = c.shape
    choose = np.kron(np.eye(n), np.ones(m))  # one level per unit
    res = milp(d.ravel(), integrality=np.ones(n * m), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(choose, 1, 1), LinearConstraint(c.ravel()[None], -np.inf, problem.limit)])
    assert res.success, res.message
    return float(res.fun)
