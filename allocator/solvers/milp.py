"""`milp`: the exact optimum of the table problem through ``scipy.optimize.milp`` (HiGHS branch and cut).

Formulation (the chain of ``_chain.chain_items``): one binary y[k] per item k = (start, end, level). Per unit (or
fixed group) the items are (u, u+1, l), i.e. x[u, l] with one level per unit; with consecutive grouping they are
the spans i..j at level l (cost / degradation from the span tables, so measured group rows are used). Flow
conservation over the node boundaries (one unit of flow leaves node 0, in = out at every inner node) makes the
chosen items a partition; one knapsack row ``sum cons[k] y[k] <= limit``; one more row per side limit
(``Problem(side_limits=...)``, e.g. prefill time beside decode bytes); with ``max_groups`` also
``sum y <= max_groups``. Variables: n m per unit, L (L+1) m / 2 grouped. Consecutive grouping *without* a measured
group table uses a compact model instead (the group rows are then sums of layer rows, so at most G groups is at
most G runs of equal levels): x[p, l] per layer, z[p] >= x[p, l] - x[p-1, l] marks a level change,
``sum z <= max_groups - 1``; L m + L variables. Worst case exponential (NP-hard knapsack), in practice under a
second per unit and tens of seconds grouped at L = 80; ``time_limit`` caps it (the result then says
``optimal: False`` and carries HiGHS' gap). Source: the standard MCKP / shortest
path ILP (Kellerer, Pferschy, Pisinger, *Knapsack Problems*, 2004, ch. 11); this is the certificate every
other solver is measured against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from ..problem import Problem
from ..registry import register_solver
from ..tables import Tables, Unit
from .base import Solver, SolveOutput
from ._chain import chain_items, chain_solution, item_values
from .options import BOOL, NONE, SolverOptions, option, real


@dataclass(frozen=True)
class MILPOptions(SolverOptions):
    """Options of ``milp``: HiGHS settings."""

    time_limit: float | None = option(None, NONE | real(0, low_open=True), "seconds; None: no limit")
    mip_rel_gap: float = option(1e-9, real(0), "relative optimality gap at which HiGHS stops")
    presolve: bool = option(True, BOOL, "HiGHS presolve")


def _scale(values: np.ndarray) -> float:
    """Divide by the largest magnitude when it is far from 1 (HiGHS' tolerances are absolute)."""
    top = float(np.abs(values).max()) if values.size else 1.0
    return top if top > 1e4 or 0 < top < 1e-2 else 1.0


@register_solver("milp")
class MILPSolver(Solver):
    """The certificate: HiGHS on the chain ILP; options: ``MILPSolver.Options``."""

    exact = True
    side_limits = True
    Options = MILPOptions

    def _solve(self, problem, rng) -> SolveOutput:
        runs = problem.grouping == "consecutive" and problem.group_degradation is None
        if runs:    # compact per-layer model: x[layer, level] plus level-change indicators (see module docstring)
            start, end, level, cons, obj, n = chain_items(_per_layer(problem))
        else:
            start, end, level, cons, obj, n = chain_items(problem)
        if problem.side_limits and runs:
            raise ValueError("milp honours side limits per unit, fixed group or measured span; with consecutive "
                             "grouping and no group table give grouping=None or use evo")
        side = [(item_values(problem, problem.tables.cost(kind), start, end, level), limit)
                for kind, limit in problem.side_limits.items()]
        model = dict(start=start, end=end, n=n, max_groups=problem.max_groups, runs=runs, m=problem.n_levels,
                     side=side)
        limit = problem.limit + problem.tolerance * max(1.0, abs(problem.limit))
        history = []
        rhs = limit
        for attempt in range(3):
            res = self._model(obj, cons, rhs, **model)
            history.append({"attempt": attempt, "status": int(res.status), "message": res.message,
                            "objective": None if res.x is None else float(obj[res.x[:len(obj)] > 0.5].sum())})
            if res.x is None:
                break
            chosen = np.flatnonzero(res.x[:len(obj)] > 0.5)
            over = cons[chosen].sum() - limit
            if over <= 0:
                break
            rhs -= 2 * over + 1e-9 * max(1.0, abs(limit))   # HiGHS accepted a tolerance-level violation
        if res.status == 2:
            best = self._model(cons, None, None, **model)
            if best.x is None:
                raise RuntimeError(f"HiGHS failed on the relaxed problem: {best.message}")
            raise problem.infeasible(float(cons[best.x[:len(cons)] > 0.5].sum()), scope="any allocation (MILP)")
        if res.x is None:
            raise TimeoutError(f"milp found no feasible allocation (HiGHS: {res.message}; time_limit="
                               f"{self.options.time_limit} s); raise the limit or use 'dp'")
        if runs:
            layer_level = level[chosen]
            unit_levels, groups = layer_level[problem.unit_layer_pos], problem.runs(layer_level)
        else:
            unit_levels, groups = chain_solution(problem, start, end, level, chosen)
        info = {"optimal": res.status == 0, "status": res.message, "variables": int(len(res.x)),
                "formulation": "layers + level changes" if runs else "chain items",
                "mip_gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
                "dual_bound": float(getattr(res, "mip_dual_bound", np.nan) or np.nan) * self._obj_scale}
        return SolveOutput(unit_levels, n_evals=int(getattr(res, "mip_node_count", 0) or 0), history=history,
                           groups=groups, info=info)

    def _model(self, objective, cons, rhs, start, end, n, max_groups, runs, m, side=()):
        """Solve min objective.y over chain partitions (with the knapsack row when ``cons`` is given)."""
        k = len(objective)
        extra = n - 1 if runs and max_groups is not None else 0          # z[p]: the level changes at layer p
        cols = np.arange(k)
        flow = csr_array((np.concatenate([np.ones(k), -np.ones(k)]),
                          (np.concatenate([start, end]), np.concatenate([cols, cols]))), shape=(n + 1, k + extra))[:n]
        target = np.zeros(n)
        target[0] = 1.0
        constraints = [LinearConstraint(flow, target, target)]
        if cons is not None:
            scale = _scale(np.append(cons, rhs))
            constraints.append(LinearConstraint(np.append(cons, np.zeros(extra))[None, :] / scale, -np.inf, rhs / scale))
        for values, limit in side:
            scale = _scale(np.append(values, limit))
            slack = 1e-9 * max(1.0, abs(limit))
            constraints.append(LinearConstraint(np.append(values, np.zeros(extra))[None, :] / scale, -np.inf,
                                                (limit - slack) / scale))
        if max_groups is not None and not runs:
            constraints.append(LinearConstraint(np.ones((1, k)), 0, max_groups))
        if extra:     # z[p-1] >= x[p, l] - x[p-1, l] for every level; sum z <= max_groups - 1
            p, lv = np.divmod(np.arange(extra * m), m)
            rows = np.arange(extra * m)
            change = csr_array((np.concatenate([np.ones(extra * m), -np.ones(extra * m), np.ones(extra * m)]),
                                (np.tile(rows, 3), np.concatenate([k + p, (p + 1) * m + lv, p * m + lv]))),
                               shape=(extra * m, k + extra))
            constraints.append(LinearConstraint(change, 0, np.inf))
            constraints.append(LinearConstraint(np.append(np.zeros(k), np.ones(extra))[None, :], 0, max_groups - 1))
        self._obj_scale = _scale(objective)
        options = {"mip_rel_gap": self.options.mip_rel_gap, "presolve": self.options.presolve}
        if self.options.time_limit is not None:
            options["time_limit"] = float(self.options.time_limit)
        return milp(np.append(objective / self._obj_scale, np.zeros(extra)), integrality=np.ones(k + extra),
                    bounds=Bounds(0, 1), constraints=constraints, options=options)


def _per_layer(problem):
    """The same problem with one unit per layer (rows summed): consecutive grouping without a group table."""
    L, m = problem.n_layers, problem.n_levels
    cost, deg = np.zeros((L, m)), np.zeros((L, m))
    np.add.at(cost, problem.unit_layer_pos, problem.cost_matrix)
    np.add.at(deg, problem.unit_layer_pos, problem.deg_matrix)
    tables = Tables([Unit(f"layer{p}", int(layer)) for p, layer in enumerate(problem.layer_ids)],
                    problem.tables.levels, {"cost": cost}, deg)
    key = "delta" if problem.direction == "min_cost" else "budget"
    return Problem(tables, "cost", tolerance=problem.tolerance, **{key: problem.limit})
