"""The allocation problem: choose one level per unit (or per group of consecutive layers).

Two directions, as in the papers:

* ``delta=...``   minimize cost subject to predicted degradation <= delta (ASAF);
* ``budget=...`` / ``sparsity=...``  minimize degradation subject to cost <= budget, the budget given as an
  absolute cost or as model-level sparsity (0.5 = half of the allocatable dense cost removed).

Grouping: ``None`` (one level per unit), ``"consecutive"`` (units in runs of consecutive layers share a level;
the solver picks the boundaries, at most ``max_groups`` groups; a group's degradation is the sum of its unit
rows or is read from a measured ``group_degradation`` table) or a fixed list of layer groups (fewer search
dimensions for the search solvers).

Every solver evaluates candidates through ``Problem.evaluate``, vectorised over a population.

Three things are called "objective" nearby, and have distinct names: ``measured_objective`` (an optional callable
scoring an allocation on the real model, which the search solvers can minimize instead of the tables), the
search option ``fitness`` ("auto" | "table" | "measured": which of the two a search minimizes) and
``Evaluation.objective`` / ``Result.objective`` (the optimized value: cost for ``delta=``, degradation otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Mapping, Sequence

import numpy as np

from .tables import Tables, TablesError


class Infeasible(ValueError):
    """No allocation satisfies the constraint; the message states the best achievable value."""

    def __init__(self, message: str, best_achievable: float | None = None):
        super().__init__(message)
        self.best_achievable = best_achievable


@dataclass
class Evaluation:
    """Vectorised evaluation of a population: one entry per candidate."""

    cost: np.ndarray
    degradation: np.ndarray
    violation: np.ndarray  # > 0 means infeasible, by how much (in the constrained quantity's units)
    objective: np.ndarray

    @property
    def feasible(self) -> np.ndarray:
        return self.violation <= 0


class Problem:
    """Tables + direction + grouping (+ optional user callables and a measured objective)."""

    def __init__(self, tables: Tables, cost: str = "bytes_decode", *, delta: float | None = None,
                 budget: float | None = None, sparsity: float | None = None, grouping=None,
                 max_groups: int | None = None, group_degradation: Mapping | None = None,
                 cost_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                 degradation_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                 measured_objective: Callable | None = None, tolerance: float = 1e-9,
                 side_limits: Mapping[str, float] | None = None):
        if not isinstance(tables, Tables):
            raise TypeError(f"tables must be an allocator.Tables, got {type(tables).__name__}")
        self.tables = tables
        self.cost_kind = cost
        given = [name for name, v in (("delta", delta), ("budget", budget), ("sparsity", sparsity)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of delta= (min cost s.t. degradation <= delta), budget= or sparsity= "
                             f"(min degradation s.t. cost <= budget); got {given or 'none'}")
        self.cost_matrix = tables.cost(cost) if cost_fn is None or cost in tables.costs else None
        if degradation_fn is None and tables.degradation is None:
            raise TablesError("these tables have no degradation matrix: profile one "
                              "(tables.with_degradation(...)) or pass degradation_fn=")
        self.deg_matrix = tables.degradation
        if measured_objective is not None and not callable(measured_objective):
            raise TypeError(f"measured_objective must be a callable(unit_levels, fidelity=None) -> float, got "
                            f"{type(measured_objective).__name__}")
        self.cost_fn, self.degradation_fn = cost_fn, degradation_fn
        self.measured_objective = measured_objective
        self.tolerance = tolerance
        self.side_limits = self._check_side_limits(side_limits or {})

        for name, value in (("delta", delta), ("budget", budget), ("sparsity", sparsity)):
            number = isinstance(value, Real) and not isinstance(value, bool)
            if value is not None and not (number and np.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if sparsity is not None:
            if not 0 <= sparsity < 1:
                raise ValueError(f"model-level sparsity must be in [0, 1), got {sparsity}")
            budget = (1.0 - sparsity) * float(tables.dense_cost(cost).sum())
        if delta is not None:
            self.direction, self.limit = "min_cost", float(delta)
        else:
            if budget < 0:
                raise ValueError(f"the cost budget must be >= 0, got {budget}")
            self.direction, self.limit = "min_degradation", float(budget)
        self.delta, self.budget, self.sparsity = delta, (budget if delta is None else None), sparsity

        # grouping over the ordered distinct layers
        self.layer_ids = np.unique(tables.layers)
        self.unit_layer_pos = np.searchsorted(self.layer_ids, tables.layers)  # unit -> position among layers
        self.max_groups = max_groups
        self.group_degradation = None
        if grouping in (None, "unit", "units"):
            self.grouping, self.fixed_groups = "unit", None
        elif grouping == "consecutive":
            self.grouping, self.fixed_groups = "consecutive", None
        elif isinstance(grouping, Sequence) and not isinstance(grouping, str):
            self.grouping, self.fixed_groups = "fixed", self._check_fixed_groups(grouping)
        else:
            raise ValueError(f"unknown grouping {grouping!r}; use None, 'consecutive' or a list of layer groups")
        if max_groups is not None and not (isinstance(max_groups, Integral) and not isinstance(max_groups, bool)
                                           and max_groups >= 1):
            raise ValueError(f"max_groups={max_groups!r} is invalid: expected an integer >= 1 (the most groups of "
                             "consecutive layers) or None")
        if max_groups is not None and self.grouping != "consecutive":
            raise ValueError(f"max_groups={max_groups} needs grouping='consecutive' (got grouping={grouping!r})")
        if group_degradation is not None:
            if self.grouping == "unit":
                raise ValueError("a measured group_degradation table needs grouping='consecutive' or fixed groups")
            if self.grouping == "fixed" and any(len(g) != g.max() - g.min() + 1 for g in self.fixed_groups):
                raise ValueError("a measured group_degradation table is keyed by spans of consecutive layers: "
                                 "with fixed groups, every group must be a run of consecutive layers")
            self.group_degradation = self._check_group_table(group_degradation)

    # ------------------------------------------------------------------ basics
    @property
    def n_units(self) -> int:
        return self.tables.n_units

    @property
    def n_levels(self) -> int:
        return self.tables.n_levels

    @property
    def n_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def n_vars(self) -> int:
        """Dimensions a search solver explores: units, layers (consecutive) or fixed groups."""
        return {"unit": self.n_units, "consecutive": self.n_layers, "fixed": len(self.fixed_groups or ())}[self.grouping]

    @property
    def is_additive(self) -> bool:
        """True when cost and degradation are sums of table entries (what dp / milp / greedy need)."""
        return self.cost_fn is None and self.degradation_fn is None and self.cost_matrix is not None

    def require_additive(self, solver: str):
        if not self.is_additive:
            raise TypeError(f"solver '{solver}' needs additive tables; this problem uses user callables "
                            "(cost_fn / degradation_fn): use 'brute', 'uniform', 'greedy', 'evo' or 'bayes'")

    def _check_side_limits(self, limits: Mapping[str, float]) -> dict[str, float]:
        """Extra constraints ``sum cost_kind <= limit`` (e.g. prefill time beside decode bytes), absolute units."""
        out = {}
        for kind, limit in limits.items():
            if kind not in self.tables.costs:
                raise TablesError(f"side limit on '{kind}': the tables have no such cost kind; available: "
                                  f"{sorted(self.tables.costs)}")
            if isinstance(limit, bool) or not isinstance(limit, Real) or not np.isfinite(limit) or limit < 0:
                raise ValueError(f"side limit {kind}={limit!r} must be a finite number >= 0 (absolute units)")
            out[kind] = float(limit)
        return out

    def side_violation(self, U: np.ndarray) -> np.ndarray:
        """Largest excess over the side limits per candidate (<= 0: all met), in each kind's own units."""
        U = np.atleast_2d(U)
        worst = np.full(len(U), -np.inf)
        for kind, limit in self.side_limits.items():
            excess = self.tables.cost(kind)[np.arange(self.n_units), U].sum(axis=1) - limit
            worst = np.maximum(worst, np.where(excess <= self.tolerance * max(1.0, limit), np.minimum(excess, 0.0),
                                               excess))
        return worst

    def _check_fixed_groups(self, groups) -> list[np.ndarray]:
        out = [np.asarray(g, dtype=int) for g in groups]
        flat = np.sort(np.concatenate(out)) if out else np.array([], dtype=int)
        if not np.array_equal(flat, self.layer_ids):
            raise ValueError(f"fixed groups must partition the layers {self.layer_ids.tolist()} exactly once")
        return [np.searchsorted(self.layer_ids, g) for g in out]

    def _check_group_table(self, table) -> dict[tuple[int, int], np.ndarray]:
        out = {}
        for key, row in table.items():
            i, j = int(key[0]), int(key[1])
            row = np.asarray(row, dtype=float)
            if not (0 <= i <= j < self.n_layers) or row.shape != (self.n_levels,):
                raise TablesError(f"group_degradation[{key}] must be indexed by layer positions 0 <= i <= j < "
                                  f"{self.n_layers} and hold {self.n_levels} levels, got shape {row.shape}")
            if not np.isfinite(row).all():
                raise TablesError(f"group_degradation[{key}] holds NaN or inf")
            out[(i, j)] = row
        return out

    # ------------------------------------------------------------------ groups
    def group_cost(self, first: int, last: int) -> np.ndarray:
        """Cost per level of layers first..last (positions) sharing one level."""
        mask = (self.unit_layer_pos >= first) & (self.unit_layer_pos <= last)
        return self.cost_matrix[mask].sum(axis=0)

    def group_deg(self, first: int, last: int) -> np.ndarray:
        """Degradation per level of a group: the measured group row when there is one, else the unit sum."""
        if self.group_degradation is not None and (first, last) in self.group_degradation:
            return self.group_degradation[(first, last)]
        mask = (self.unit_layer_pos >= first) & (self.unit_layer_pos <= last)
        return self.deg_matrix[mask].sum(axis=0)

    def runs(self, layer_levels: np.ndarray) -> list[tuple[int, int]]:
        """Maximal runs of equal level over layer positions: the groups a per-layer vector implies."""
        edges = np.flatnonzero(np.diff(layer_levels)) + 1
        starts = np.concatenate([[0], edges])
        ends = np.concatenate([edges - 1, [len(layer_levels) - 1]])
        return list(zip(starts.tolist(), ends.tolist()))

    # ------------------------------------------------------------------ evaluation
    def expand(self, X) -> np.ndarray:
        """Search-space vectors (P, n_vars) -> per-unit level indices (P, n_units)."""
        X = np.atleast_2d(np.asarray(X)).astype(int)
        if X.shape[1] != self.n_vars:
            raise ValueError(f"candidates have {X.shape[1]} entries, this problem has {self.n_vars} variables")
        if (X < 0).any() or (X >= self.n_levels).any():
            raise ValueError(f"level indices must lie in [0, {self.n_levels - 1}]")
        if self.grouping == "unit":
            return X
        if self.grouping == "consecutive":
            return X[:, self.unit_layer_pos]
        layer_level = np.empty((X.shape[0], self.n_layers), dtype=int)
        for g, members in enumerate(self.fixed_groups):
            layer_level[:, members] = X[:, [g]]
        return layer_level[:, self.unit_layer_pos]

    def layer_levels(self, unit_levels: np.ndarray) -> np.ndarray:
        """Per-unit levels (P, n_units) -> per-layer levels (P, n_layers); requires a shared level per layer."""
        out = np.empty((unit_levels.shape[0], self.n_layers), dtype=int)
        out[:, self.unit_layer_pos] = unit_levels
        return out

    def evaluate_units(self, U) -> Evaluation:
        """Evaluate per-unit level vectors (P, n_units)."""
        U = np.atleast_2d(np.asarray(U)).astype(int)
        rows = np.arange(self.n_units)
        cost = (np.asarray(self.cost_fn(U), dtype=float) if self.cost_fn is not None
                else self.cost_matrix[rows, U].sum(axis=1))
        if self.degradation_fn is not None:
            deg = np.asarray(self.degradation_fn(U), dtype=float)
        elif self.group_degradation is not None:
            deg = np.array([self._grouped_deg(u) for u in U])
        else:
            deg = self.deg_matrix[rows, U].sum(axis=1)
        if cost.shape != (len(U),) or deg.shape != (len(U),) or not (np.isfinite(cost).all() and np.isfinite(deg).all()):
            raise ValueError("cost / degradation callables must return one finite number per candidate")
        if self.direction == "min_cost":
            violation, objective = deg - self.limit, cost
        else:
            violation, objective = cost - self.limit, deg
        violation = np.where(violation <= self.tolerance * max(1.0, abs(self.limit)), np.minimum(violation, 0.0), violation)
        if self.max_groups is not None:
            n_groups = np.array([len(self.runs(lv)) for lv in self.layer_levels(U)])
            violation = np.maximum(violation, np.where(n_groups > self.max_groups, n_groups - self.max_groups, violation))
        if self.side_limits:
            side = self.side_violation(U)
            violation = np.where(side > 0, np.maximum(violation, side), violation)
        return Evaluation(cost, deg, violation, objective)

    def _grouped_deg(self, unit_levels: np.ndarray) -> float:
        layer_level = self.layer_levels(unit_levels[None])[0]
        if self.grouping == "fixed":
            spans = [(int(g.min()), int(g.max())) for g in self.fixed_groups]
        else:
            spans = self.runs(layer_level)
        return float(sum(self.group_deg(i, j)[layer_level[i]] for i, j in spans))

    def evaluate(self, X) -> Evaluation:
        """Evaluate search-space vectors (P, n_vars) (see ``n_vars``)."""
        return self.evaluate_units(self.expand(X))

    def evaluate_partition(self, spans: Sequence[tuple[int, int]], group_levels: Sequence[int]) -> tuple[float, float]:
        """(cost, degradation) of an explicit consecutive partition with one level per group (DP semantics)."""
        cost = sum(float(self.group_cost(i, j)[l]) for (i, j), l in zip(spans, group_levels))
        deg = sum(float(self.group_deg(i, j)[l]) for (i, j), l in zip(spans, group_levels))
        return cost, deg

    # ------------------------------------------------------------------ helpers for solvers
    def constrained_matrix(self) -> np.ndarray:
        return self.deg_matrix if self.direction == "min_cost" else self.cost_matrix

    def objective_matrix(self) -> np.ndarray:
        return self.cost_matrix if self.direction == "min_cost" else self.deg_matrix

    def is_within_limit(self, constrained_value: float) -> bool:
        return constrained_value - self.limit <= self.tolerance * max(1.0, abs(self.limit))

    def infeasible(self, best: float, scope: str = "any allocation") -> Infeasible:
        what = "predicted degradation" if self.direction == "min_cost" else f"cost ({self.cost_kind})"
        limit = f"delta={self.limit:.6g}" if self.direction == "min_cost" else f"budget={self.limit:.6g}"
        extra = f" (model-level sparsity {self.sparsity})" if self.sparsity is not None else ""
        return Infeasible(f"no allocation meets {limit}{extra}: the smallest {what} achievable by {scope} is {best:.6g}; "
                          f"loosen the constraint or add {'less' if self.direction == 'min_cost' else 'more'} "
                          "aggressive levels to the grid", best)

    def check_feasible_bound(self):
        """Raise Infeasible early when even the per-unit best of the constrained quantity exceeds the limit."""
        if not self.is_additive or self.group_degradation is not None:
            return
        best = float(self.constrained_matrix().min(axis=1).sum())
        if not self.is_within_limit(best):
            raise self.infeasible(best)
        for kind, limit in self.side_limits.items():
            least = float(self.tables.cost(kind).min(axis=1).sum())
            if least - limit > self.tolerance * max(1.0, limit):
                raise Infeasible(f"no allocation meets the side limit {kind} <= {limit:.6g}: the least {kind} any "
                                 f"allocation reaches is {least:.6g}; loosen the limit or add cheaper levels", least)

    def describe(self) -> dict:
        return {"direction": self.direction, "cost": self.cost_kind, "limit": self.limit, "delta": self.delta,
                "budget": self.budget, "sparsity": self.sparsity, "grouping": self.grouping,
                "max_groups": self.max_groups, "n_units": self.n_units, "n_levels": self.n_levels,
                "n_layers": self.n_layers, "tables_hash": self.tables.content_hash(),
                **({"side_limits": dict(self.side_limits)} if self.side_limits else {})}
