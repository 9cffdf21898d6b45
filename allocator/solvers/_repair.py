"""Moves in the search space of ``evo`` / ``bayes``: the budget repair and EvoPress's level-switch mutation.

* ``BudgetRepair`` projects a candidate onto the constraint by moving one variable at a time to a level that
  lowers the constrained quantity, picking the move with the smallest predicted objective increase per unit of
  constraint removed (plus a little noise, so a population stays diverse), then spends leftover slack.
  O(moves * n_vars * n_levels) per candidate. It lets the searches run in the feasible region.
* ``level_switch`` is EvoPress's mutation (arXiv 2410.14649, Algorithm 1): one variable down a level, another
  up a level, ``min(randint(1,3), randint(1,3))`` times; on equal-sized units it keeps the cost exactly.
"""
from __future__ import annotations

import numpy as np


def var_matrices(problem) -> tuple[np.ndarray, np.ndarray | None]:
    """(constrained, objective) per search variable x level: unit rows summed over each variable's units.

    The objective matrix is the table's (a heuristic when searching on the true objective); None without one.
    """
    unit_var = unit_to_var(problem)
    n_vars, m = problem.n_vars, problem.n_levels
    if problem.direction == "min_degradation":
        cons_u = problem.cost_matrix
        obj_u = problem.deg_matrix
    else:
        cons_u, obj_u = problem.deg_matrix, problem.cost_matrix
    if cons_u is None:
        raise TypeError("budget repair needs a cost table (the problem has only cost_fn)")
    cons = np.zeros((n_vars, m))
    np.add.at(cons, unit_var, cons_u)
    obj = None
    if obj_u is not None:
        obj = np.zeros((n_vars, m))
        np.add.at(obj, unit_var, obj_u)
    return cons, obj


def unit_to_var(problem) -> np.ndarray:
    """Index of the search variable each unit belongs to."""
    if problem.grouping == "unit":
        return np.arange(problem.n_units)
    if problem.grouping == "consecutive":
        return problem.unit_layer_pos.copy()
    layer_group = np.empty(problem.n_layers, dtype=int)
    for g, members in enumerate(problem.fixed_groups):
        layer_group[members] = g
    return layer_group[problem.unit_layer_pos]


class BudgetRepair:
    """Project candidates onto ``constrained <= limit`` by cheapest-objective moves to lower-constraint levels.

    Then (``fill=True``) spend leftover slack: move variables back to levels with a better objective while the
    constraint still holds, so a repaired candidate does not waste budget. Works on the additive tables; a
    problem with a ``max_groups`` or measured group rows is repaired approximately (the scorer still checks).
    """

    def __init__(self, problem, noise: float = 0.1, fill: bool = True):
        self.problem = problem
        self.cons, obj = var_matrices(problem)
        self.obj = obj if obj is not None else np.zeros_like(self.cons)
        self.limit = problem.limit
        self.tol = problem.tolerance * max(1.0, abs(self.limit))
        self.noise, self.fill = noise, fill

    def __call__(self, X, rng: np.random.Generator) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X)).astype(int).copy()
        return np.stack([self.repair_one(x, rng) for x in X])

    def repair_one(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = x.copy()
        rows = np.arange(len(x))
        total = self.cons[rows, x].sum()
        while total - self.limit > self.tol:
            gain = self.cons[rows, x][:, None] - self.cons[rows]           # (n_vars, m) constraint removed
            loss = self.obj[rows] - self.obj[rows, x][:, None]             # objective added
            ok = gain > 0
            if not ok.any():
                break  # nothing can lower it further: the scorer reports the violation
            ratio = np.where(ok, np.maximum(loss, 0) / np.where(ok, gain, 1), np.inf)
            ratio = ratio * (1 + self.noise * rng.random(ratio.shape))
            v, l = np.unravel_index(np.argmin(ratio), ratio.shape)
            total -= gain[v, l]
            x[v] = l
        if self.fill:
            x = self._fill(x, total)
        return x

    def _fill(self, x, total):
        rows = np.arange(len(x))
        while True:
            slack = self.limit + self.tol - total
            extra = self.cons[rows] - self.cons[rows, x][:, None]           # constraint added by a move
            better = self.obj[rows, x][:, None] - self.obj[rows]            # objective removed by a move
            ok = (extra <= slack) & (better > 0)
            if not ok.any():
                return x
            score = np.where(ok, better / np.maximum(extra, 1e-12), -np.inf)
            v, l = np.unravel_index(np.argmax(score), score.shape)
            total += extra[v, l]
            x[v] = l


def level_switch(x: np.ndarray, n_levels: int, rng: np.random.Generator, n_flips: int | None = None) -> np.ndarray:
    """EvoPress's level-switch mutation: ``n_flips`` times, one variable one level down and another one up."""
    x = x.copy()
    if n_flips is None:
        n_flips = int(min(rng.integers(1, 4), rng.integers(1, 4)))
    for _ in range(n_flips):
        down = np.flatnonzero(x > 0)
        up = np.flatnonzero(x < n_levels - 1)
        if len(down) == 0 or len(up) == 0:
            break
        d = rng.choice(down)
        up = up[up != d]
        if len(up) == 0:
            break
        u = rng.choice(up)
        x[d] -= 1
        x[u] += 1
    return x
