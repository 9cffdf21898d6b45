"""Shared machinery of the search solvers (``evo``, ``bayes``): scoring, budgets, repair, warm starts.

* ``Scorer`` scores search-space vectors (P, n_vars) either on the tables (``Problem.evaluate``) or on a
  *true objective* (a callable measured on the model), memoises repeated candidates, counts evaluations,
  enforces a budget in count and wall time, drives a tqdm bar and records the convergence history.
  The constraint (cost <= budget) always comes from the tables.
* ``BudgetRepair`` projects a candidate onto the constraint by moving one variable at a time to the next
  level that lowers the constrained quantity (cost), picking the move with the smallest predicted objective
  increase per unit of constraint removed (plus a little noise, so a population stays diverse).
  O(moves * n_vars) per candidate.
* ``level_switch`` is EvoPress's mutation (arXiv 2410.14649, Algorithm 1): one variable down a level, another
  up a level, ``min(randint(1,3), randint(1,3))`` times; on equal-sized units it keeps the cost exactly.
* ``warm_start_vectors`` turns ``"dp"`` / ``"greedy"`` / ``"uniform"`` / explicit vectors into feasible
  search-space vectors.
* ``choose_by_validation`` guards against overfitting the fitness windows: the best few measured candidates and
  the warm start are scored on a *validation* callable (other windows); the start is kept unless a candidate
  beats it there (by more than ``validation_z`` standard errors when the callable returns per-window values).

The true-objective protocol (what ``problem.objective`` or ``objective=callable`` must be)::

    objective(unit_levels: np.ndarray (n_units,) int, fidelity: int | None = None) -> float   # lower is better

``fidelity`` is the number of calibration windows to use (None: all); a callable without a ``fidelity``
parameter is called without it. A callable with attribute ``batched = True`` receives (P, n_units) and returns
(P,). An ``Allocation`` is not needed: the level indices refer to ``problem.tables.levels``.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- objective
def _accepts_fidelity(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "fidelity" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def resolve_true_objective(problem, objective) -> Callable | None:
    """The true-objective callable a search solver should use, or None for the tables.

    ``objective``: None / "auto" (``problem.objective`` when set, else the tables), "tables", "true"
    (``problem.objective``, required) or a callable.
    """
    if isinstance(objective, bool):  # YAML reads `objective: true` as a boolean
        objective = "true" if objective else "tables"
    if callable(objective):
        fn = objective
    elif objective in (None, "auto"):
        fn = problem.objective
    elif objective == "tables":
        return None
    elif objective == "true":
        if problem.objective is None:
            raise ValueError("objective='true' needs a true objective: build the Problem with objective=... "
                             "(e.g. allocator.evaluators.objective.TrueObjective) or pass objective=<callable>")
        fn = problem.objective
    else:
        raise ValueError(f"objective must be 'auto', 'tables', 'true' or a callable, got {objective!r}")
    if fn is not None and problem.direction != "min_degradation":
        raise ValueError("a true objective replaces the degradation: use a cost budget (budget= / sparsity=), "
                         "not delta=")
    return fn


class BudgetExhausted(RuntimeError):
    """Raised inside a scoring call when the evaluation budget (count or wall time) is spent."""


@dataclass
class Scorer:
    """Scores candidates, memoised, within a budget; keeps the best feasible candidate and the history."""

    problem: object
    true_objective: Callable | None = None
    max_evals: int | None = None
    max_time: float | None = None
    progress: bool = True
    desc: str = "search"
    fidelity: int | None = None         # fidelity of a full evaluation (lower ones only screen candidates)
    n_evals: int = 0                    # objective computations (memo hits excluded), any fidelity
    n_calls: int = 0                    # candidates scored, memo hits included
    evals_by_fidelity: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    best_value: float = np.inf
    best_units: np.ndarray | None = None
    best_vars: np.ndarray | None = None
    measured: list = field(default_factory=list)   # (value, unit_levels) of feasible full-fidelity measurements

    def __post_init__(self):
        self._memo: dict[tuple, float] = {}
        self._start = time.perf_counter()
        self._fid_kw = self.true_objective is not None and _accepts_fidelity(self.true_objective)
        self._batched = bool(getattr(self.true_objective, "batched", False))
        self._bar = None
        if self.progress:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=self.max_evals, desc=self.desc, unit="eval", leave=False)
            except ImportError:  # tqdm is a core dependency; never fail a solve for a progress bar
                self._bar = None

    @property
    def uses_true_objective(self) -> bool:
        return self.true_objective is not None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    @property
    def exhausted(self) -> bool:
        return ((self.max_evals is not None and self.n_evals >= self.max_evals)
                or (self.max_time is not None and self.elapsed >= self.max_time))

    def close(self):
        if self._bar is not None:
            self._bar.close()

    def violation(self, X) -> np.ndarray:
        return self.problem.evaluate(X).violation

    def score(self, X, fidelity: int | None = None, stop_on_budget: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(objective, violation) for search-space vectors X (P, n_vars).

        Only full-fidelity scores enter the history and the best. Infeasible candidates are never measured on the true objective (the constraint is known from the
        tables): they get +inf. Candidates left when the budget runs out get NaN (``stop_on_budget``).
        """
        X = np.atleast_2d(np.asarray(X)).astype(int)
        ev = self.problem.evaluate(X)
        units = self.problem.expand(X)
        values = np.full(len(X), np.nan)
        full = fidelity == self.fidelity or not self.uses_true_objective
        todo = []
        for i, u in enumerate(units):
            self.n_calls += 1
            if not ev.feasible[i] and self.uses_true_objective:
                values[i] = np.inf
                continue
            key = (u.tobytes(), fidelity if self.uses_true_objective else None)
            if key in self._memo:
                values[i] = self._memo[key]
            else:
                todo.append(i)
        for i in todo:  # repeated candidates within X hit the memo after their first measurement
            if stop_on_budget and self.exhausted:
                break
            key = (units[i].tobytes(), fidelity if self.uses_true_objective else None)
            if key not in self._memo:
                self._memo[key] = self._measure(units[i], ev.objective[i], fidelity)
                self.n_evals += 1
                self.evals_by_fidelity[str(fidelity)] = self.evals_by_fidelity.get(str(fidelity), 0) + 1
                if self._bar is not None:
                    self._bar.update(1)
                if full:
                    self._record(X[i], units[i], self._memo[key], bool(ev.feasible[i]))
            values[i] = self._memo[key]
        return values, ev.violation

    def _measure(self, unit_levels: np.ndarray, table_value: float, fidelity) -> float:
        if not self.uses_true_objective:
            return float(table_value)
        kwargs = {"fidelity": fidelity} if self._fid_kw else {}
        if self._batched:
            return float(np.asarray(self.true_objective(unit_levels[None], **kwargs), dtype=float).ravel()[0])
        return float(self.true_objective(unit_levels.copy(), **kwargs))

    def _record(self, x_vars, unit_levels, value, feasible):
        if feasible and np.isfinite(value):
            self.measured.append((float(value), unit_levels.copy()))
        improved = feasible and value < self.best_value
        if improved:
            self.best_value, self.best_units, self.best_vars = float(value), unit_levels.copy(), x_vars.copy()
            if self._bar is not None:
                self._bar.set_postfix(best=f"{value:.5g}")
        row = {"eval": self.n_evals, "value": float(value), "best": float(self.best_value),
               "time": self.elapsed, "feasible": feasible, "improved": improved}
        if improved:
            row["x"] = unit_levels.tolist()
        self.history.append(row)

    def info(self) -> dict:
        return {"objective": "true" if self.uses_true_objective else "tables", "best_value": self.best_value,
                "n_calls": self.n_calls, "memo_hits": self.n_calls - self.n_evals,
                "evals_by_fidelity": dict(self.evals_by_fidelity), "search_time": self.elapsed,
                "budget_exhausted": self.exhausted}


    def top(self, k: int) -> list[tuple[float, np.ndarray]]:
        """The ``k`` best feasible full-fidelity candidates measured (value, unit_levels), best first."""
        return sorted(self.measured, key=lambda item: item[0])[:k]


def choose_by_validation(candidates, starts, validation: Callable, z: float = 2.0) -> tuple[np.ndarray, dict]:
    """Pick the answer on held-aside windows: a start unless a search candidate beats every start there.

    ``candidates``: the search's best few per-unit level vectors (best fitness first); ``starts``: the warm-start
    vectors (may be empty: then the best candidate on validation wins). Each distinct vector costs one
    ``validation`` call. A float-valued ``validation`` compares means. One that returns a value per validation
    window (an array) makes it a paired test: the best candidate (by mean) replaces the best start only if its
    mean improvement exceeds ``z`` standard errors of the per-window differences, so validation noise alone does
    not move the answer away from the start. Returns the chosen vector and a record of the decision.
    """
    t0 = time.perf_counter()
    scored: dict[bytes, np.ndarray] = {}

    def value(x):
        key = np.asarray(x, dtype=int).tobytes()
        if key not in scored:
            scored[key] = np.atleast_1d(np.asarray(validation(np.asarray(x, dtype=int).copy()), dtype=float))
        return scored[key]

    cand_vals = [value(x) for x in candidates]
    start_vals = [value(x) for x in starts]
    cand_values, start_values = [float(v.mean()) for v in cand_vals], [float(v.mean()) for v in start_vals]
    best_start = int(np.argmin(start_values)) if starts else None
    best_cand = int(np.argmin(cand_values)) if candidates else None
    margin = 0.0
    if best_start is not None and best_cand is not None and cand_vals[best_cand].size > 1:
        diff = start_vals[best_start] - cand_vals[best_cand]  # > 0 where the candidate is better
        margin = float(z * diff.std(ddof=1) / np.sqrt(diff.size))
    keep_start = best_start is not None and (
        best_cand is None or start_values[best_start] - cand_values[best_cand] <= margin)
    chosen = np.asarray(starts[best_start] if keep_start else candidates[best_cand], dtype=int)
    record = {"candidate_values": cand_values, "start_values": start_values, "margin": margin,
              "chosen": "start" if keep_start else f"candidate {best_cand}", "evals": len(scored),
              "seconds": time.perf_counter() - t0}
    logger.info("validation: candidates %s, starts %s, margin %.5f -> %s", np.round(cand_values, 5),
                np.round(start_values, 5), margin, record["chosen"])
    return chosen, record


# ---------------------------------------------------------------------------------------------- variables
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


# ---------------------------------------------------------------------------------------------- warm start
def units_to_vars(problem, unit_levels: np.ndarray) -> np.ndarray:
    """Per-unit levels -> one search vector (the rounded mean level of each variable's units)."""
    unit_levels = np.asarray(unit_levels, dtype=float).ravel()
    if len(unit_levels) != problem.n_units:
        raise ValueError(f"a warm-start vector has {len(unit_levels)} entries; give n_vars={problem.n_vars} "
                         f"or n_units={problem.n_units}")
    uv = unit_to_var(problem)
    sums = np.bincount(uv, weights=unit_levels, minlength=problem.n_vars)
    counts = np.bincount(uv, minlength=problem.n_vars)
    return np.rint(sums / np.maximum(counts, 1)).astype(int)


def warm_start_vectors(problem, spec, rng: np.random.Generator, repair: BudgetRepair | None = None) -> np.ndarray:
    """Search-space vectors (k, n_vars) from ``spec``: None, "dp" / "greedy" / "uniform" / "milp" (solved on the
    tables), an array of shape (n_vars,) / (n_units,) / (k, n_vars), or a list mixing these."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "")):
        return np.zeros((0, problem.n_vars), dtype=int)
    specs = spec if isinstance(spec, (list, tuple)) and (not spec or not np.isscalar(spec[0])) else [spec]
    out = []
    for s in specs:
        if isinstance(s, str):
            out.append(units_to_vars(problem, _table_solution(problem, s)))
            continue
        arr = np.atleast_2d(np.asarray(s))
        for row in arr:
            out.append(row.astype(int) if len(row) == problem.n_vars else units_to_vars(problem, row))
    X = np.clip(np.stack(out), 0, problem.n_levels - 1)
    if repair is not None:
        ev = problem.evaluate(X)
        X = np.stack([x if f else repair.repair_one(x, rng) for x, f in zip(X, ev.feasible)])
    return X


def _table_solution(problem, name: str) -> np.ndarray:
    """The per-unit answer of a table solver on this problem's tables (true objective ignored)."""
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
