"""Scoring candidates for the search solvers (``evo``, ``bayes``): which fitness, memo, budget, history.

``resolve_fitness`` picks what a search minimizes: the table objective (``Problem.evaluate``) or a *measured
objective* (a callable scoring an allocation on the real model). ``Scorer`` scores search-space vectors
(P, n_vars) on it, memoises repeated candidates, counts evaluations, stops at a budget in count or wall time,
drives a tqdm bar and records the convergence history. The constraint (cost <= budget) always comes from the
tables, so an over-budget candidate is never measured.

The measured-objective protocol (``Problem(measured_objective=...)`` or the option ``fitness=<callable>``)::

    measured(unit_levels: np.ndarray (n_units,) int, fidelity: int | None = None) -> float   # lower is better

``fidelity`` is the number of calibration windows to use (None: all); a callable without a ``fidelity``
parameter is called without it. A callable with attribute ``batched = True`` receives (P, n_units) and returns
(P,). The level indices refer to ``problem.tables.levels``.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .options import SolverOptionError


def _accepts_fidelity(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "fidelity" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def resolve_fitness(problem, fitness, solver: str) -> Callable | None:
    """The measured callable a search should score candidates on, or None for the table objective.

    ``fitness``: "auto" (``problem.measured_objective`` when set, else the tables), "table", "measured"
    (``problem.measured_objective``, required) or a callable.
    """
    if callable(fitness):
        fn = fitness
    elif fitness == "table":
        return None
    elif fitness == "measured" and problem.measured_objective is None:
        raise SolverOptionError(f"solver '{solver}' option fitness='measured' needs a measured objective: build the "
                                "Problem with measured_objective=... (e.g. allocator.evaluators.objective."
                                "TrueObjective) or pass fitness=<callable>", solver, "fitness", fitness)
    else:  # "auto" or "measured"
        fn = problem.measured_objective
    if fn is not None and problem.direction != "min_degradation":
        raise ValueError("a measured objective replaces the degradation: give the Problem a cost budget "
                         "(budget= / sparsity=), not delta=, or use fitness='table'")
    return fn


@dataclass
class Scorer:
    """Scores candidates, memoised, within a budget; keeps the best feasible candidate and the history."""

    problem: object
    measured_objective: Callable | None = None
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
    measurements: list = field(default_factory=list)  # (value, unit_levels): feasible full-fidelity scores

    def __post_init__(self):
        self._memo: dict[tuple, float] = {}
        self._start = time.perf_counter()
        self._fid_kw = self.measured_objective is not None and _accepts_fidelity(self.measured_objective)
        self._batched = bool(getattr(self.measured_objective, "batched", False))
        self._bar = None
        if self.progress:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=self.max_evals, desc=self.desc, unit="eval", leave=False)
            except ImportError:  # tqdm is a core dependency; never fail a solve for a progress bar
                self._bar = None

    @property
    def uses_measured(self) -> bool:
        return self.measured_objective is not None

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

        Only full-fidelity scores enter the history and the best. Infeasible candidates are never measured (the
        constraint is known from the tables): they get +inf. Candidates left when the budget runs out get NaN
        (``stop_on_budget``).
        """
        X = np.atleast_2d(np.asarray(X)).astype(int)
        ev = self.problem.evaluate(X)
        units = self.problem.expand(X)
        values = np.full(len(X), np.nan)
        full = fidelity == self.fidelity or not self.uses_measured
        todo = []
        for i, u in enumerate(units):
            self.n_calls += 1
            if not ev.feasible[i] and self.uses_measured:
                values[i] = np.inf
                continue
            key = (u.tobytes(), fidelity if self.uses_measured else None)
            if key in self._memo:
                values[i] = self._memo[key]
            else:
                todo.append(i)
        if self._batched and self.uses_measured:
            for i in self._measure_batch(X, units, ev, todo, fidelity, stop_on_budget, full):
                values[i] = self._memo[(units[i].tobytes(), fidelity)]
            return values, ev.violation
        for i in todo:  # repeated candidates within X hit the memo after their first measurement
            if stop_on_budget and self.exhausted:
                break
            key = (units[i].tobytes(), fidelity if self.uses_measured else None)
            if key not in self._memo:
                self._memo[key] = self._measure(units[i], ev.objective[i], fidelity)
                self._count(X[i], units[i], self._memo[key], bool(ev.feasible[i]), fidelity, full)
            values[i] = self._memo[key]
        return values, ev.violation

    def _count(self, x_vars, unit_levels, value, feasible, fidelity, full):
        self.n_evals += 1
        self.evals_by_fidelity[str(fidelity)] = self.evals_by_fidelity.get(str(fidelity), 0) + 1
        if self._bar is not None:
            self._bar.update(1)
        if full:
            self._record(x_vars, unit_levels, value, feasible)

    def _measure_batch(self, X, units, ev, todo, fidelity, stop_on_budget, full) -> list[int]:
        """A batched objective (one spread across ranks, say) gets the distinct new candidates in one call, at
        most the evaluations left in ``max_evals``; the time budget is checked before the call. Returns the indices
        of ``todo`` now in the memo (the others, past the budget, stay NaN)."""
        pending, keys = [], set()
        for i in todo:
            key = (units[i].tobytes(), fidelity)
            if key in self._memo or key in keys:
                continue
            left = None if self.max_evals is None else self.max_evals - self.n_evals - len(pending)
            if stop_on_budget and ((left is not None and left <= 0) or
                                   (self.max_time is not None and self.elapsed >= self.max_time)):
                break
            pending.append(i)
            keys.add(key)
        if pending:
            kwargs = {"fidelity": fidelity} if self._fid_kw else {}
            out = np.asarray(self.measured_objective(np.stack([units[i] for i in pending]), **kwargs), dtype=float)
            for i, value in zip(pending, out.ravel()):
                self._memo[(units[i].tobytes(), fidelity)] = float(value)
                self._count(X[i], units[i], float(value), bool(ev.feasible[i]), fidelity, full)
        return [i for i in todo if (units[i].tobytes(), fidelity) in self._memo]

    def _measure(self, unit_levels: np.ndarray, table_value: float, fidelity) -> float:
        if not self.uses_measured:
            return float(table_value)
        kwargs = {"fidelity": fidelity} if self._fid_kw else {}
        if self._batched:
            return float(np.asarray(self.measured_objective(unit_levels[None], **kwargs), dtype=float).ravel()[0])
        return float(self.measured_objective(unit_levels.copy(), **kwargs))

    def _record(self, x_vars, unit_levels, value, feasible):
        if feasible and np.isfinite(value):
            self.measurements.append((float(value), unit_levels.copy()))
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
        return {"fitness": "measured" if self.uses_measured else "table", "best_value": self.best_value,
                "n_calls": self.n_calls, "memo_hits": self.n_calls - self.n_evals,
                "evals_by_fidelity": dict(self.evals_by_fidelity), "search_time": self.elapsed,
                "budget_exhausted": self.exhausted}

    def budget_spent(self, solver: str) -> SolverOptionError:
        """The error for a search whose budget ran out before any feasible candidate was scored: the problem may
        well be feasible, so this names the budget, not an achievable cost."""
        spent = "max_evals" if self.max_evals is not None and self.n_evals >= self.max_evals else "max_time"
        value = getattr(self, spent)
        return SolverOptionError(f"solver '{solver}' option {spent}={value!r} ran out before a feasible candidate "
                                 f"was scored ({self.n_evals} evaluations, {self.elapsed:.3g} s); raise {spent} or "
                                 "start from a table answer (warm_start='dp')", solver, spent, value)

    def top(self, k: int) -> list[tuple[float, np.ndarray]]:
        """The ``k`` best feasible full-fidelity candidates measured (value, unit_levels), best first."""
        return sorted(self.measurements, key=lambda item: item[0])[:k]
