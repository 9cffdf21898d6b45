"""`dp`: ASAF's two-phase dynamic programme, and the per-unit multiple-choice knapsack (MCKP) DP.

Every mode is one chain DP over *items*: an item covers the consecutive nodes ``start..end-1`` at one level,
and a solution is a chain of items from node 0 to node N. Per-unit (and fixed-group) mode: nodes are units
(groups), items have length 1, i.e. the classic MCKP DP. Consecutive grouping (ASAF): nodes are layers and
items are spans ``i..j`` at a level ``l`` (cost and degradation from ``Problem.group_cost`` / ``group_deg``,
so measured group tables are used), optionally with a group-count index ``g <= max_groups``:

    D[g][j][b] = min over items (i, j, l) of D[g-1][i][b - w(i, j, l)] + v(i, j, l),   D[0][0][0] = 0

with ``w`` the constrained quantity (degradation for ``delta=``, cost for ``budget=``) in integer buckets and
``v`` the objective. Time O(K * I * B), memory O(K * N * B) for I items, B buckets, K group counts (K = 1 when
unconstrained); I = n*m per unit, ~L^2 m / 2 grouped.

ASAF's two phases (Phase 1 "determines the optimal number of layer groups and narrows sparsity rate search
intervals", Phase 2 "determines precise consecutive layer allocation and exact sparsity rates"): Phase 1 solves
on every ``coarse_step``-th level with few buckets, for each group count G <= max_groups, keeps the
``keep_groups`` most promising G and, per chosen group, the levels within one coarse step of its coarse level.
Phase 2 is the exact DP over spans whose levels lie in those intervals; when a chosen level touches an
interval edge the interval is widened and Phase 2 re-run (``max_widen`` times). Finally the answer's partition
(and the next-best partitions of the DP) are re-levelled by a fine per-group MCKP. ``two_phase=False`` runs the
full fine DP. Source: ASAF, "Layer-wise Sensitivity-aware Sparsity Allocation for Efficient LLM Inference"
(ICLR 2026 submission, openreview erGq3kjCmy); the recurrence is our reconstruction (its text is not public).

Discretization bound. Constrained values are shifted to be >= 0 (per unit: minus the row minimum) and divided
into B buckets of width ``w = limit' / B`` (``limit'`` = the limit minus the shifts). Integer-valued tables
whose limit fits ``max_exact_buckets`` use exact integer buckets (answer exactly optimal). Otherwise the DP
first rounds every item *down* (a relaxation: its optimum LB <= the true optimum); if that answer meets the
undiscretized limit it is optimal. Else it is repaired: the rounded-down DP on the limit tightened by n bucket
widths is conservative (every answer it returns is feasible), then DPs rounding to nearest (unbiased) with a
few bisection steps on the effective limit, and a local search of single and paired level moves, keep the best
feasible answer. Bound: the answer is feasible with objective <= OPT(limit - n*w), the optimum of the limit
tightened by n bucket widths (n = items in a solution: units, or groups <= min(L, max_groups));
``info['lower_bound']`` = LB gives an a-posteriori gap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..registry import register_solver
from ._chain import WORK_CELLS, ChainDP, _node_shift, chain_items, chain_solution, solve_chain
from .base import Solver, SolveOutput
from .options import BOOL, NONE, SolverOptions, integer, option


@dataclass(frozen=True)
class DPOptions(SolverOptions):
    """Options of ``dp`` (None = chosen from the instance, as described)."""

    buckets: int | None = option(None, NONE | integer(1), "fine DP buckets; None: adaptive")
    two_phase: bool = option(True, BOOL, "ASAF's coarse-then-fine phases (grouped mode)")
    coarse_step: int | None = option(None, NONE | integer(1), "level stride of phase 1; None: about 6 coarse levels")
    coarse_buckets: int | None = option(None, NONE | integer(1), "phase-1 buckets; None: adaptive, 200..2000")
    keep_groups: int = option(3, integer(1), "group counts kept after phase 1")
    max_widen: int = option(2, integer(0), "interval widenings of phase 2")
    max_exact_buckets: int | None = option(None, NONE | integer(1), "largest exact integer bucket count")
    refine: int | None = option(None, NONE | integer(0), "bisection steps of the repair; None: 4, or 0 with max_groups")
    relevel_candidates: int = option(16, integer(0), "next-best partitions re-levelled at the end")


@register_solver("dp")
class DPSolver(Solver):
    """ASAF's two-phase DP (grouped) and the MCKP DP (per unit); options: ``DPSolver.Options``."""

    Options = DPOptions

    def _coarse_step(self, m: int) -> int:
        return self.options.coarse_step or max(1, round((m - 1) / 5))

    def _refine(self, max_groups) -> int:
        if self.options.refine is not None:
            return self.options.refine
        return 4 if max_groups is None else 0

    def _solve(self, problem, rng) -> SolveOutput:
        start, end, level, cons, obj, n = chain_items(problem)
        if problem.grouping == "consecutive":
            return self._grouped(problem, start, end, level, cons, obj)
        t0 = time.perf_counter()
        items, info = solve_chain(problem, start, end, cons, obj, n, None, self.options.buckets,
                                  self.options.max_exact_buckets, self._refine(None))
        if items is None:
            raise problem.infeasible(info["min_constrained"])
        history = [{"phase": "mckp", "objective": float(obj[items].sum()), **_brief(info),
                    "seconds": time.perf_counter() - t0}]
        unit_levels, _ = chain_solution(problem, start, end, level, items)
        return SolveOutput(unit_levels, n_evals=len(cons), history=history, info=info)

    def _grouped(self, problem, start, end, level, cons, obj) -> SolveOutput:
        L, m = problem.n_layers, problem.n_levels
        K = problem.max_groups
        fine = (self.options.buckets, self.options.max_exact_buckets, self._refine(K))
        history = []
        allowed = self._coarse_phase(problem, start, end, level, cons, obj, history) \
            if self.options.two_phase else None
        widen_left, attempt = self.options.max_widen, 0
        while True:
            t0 = time.perf_counter()
            if allowed is None:
                keep = np.ones(len(cons), bool)
            else:
                count = np.vstack([np.zeros((1, m), int), np.cumsum(allowed, axis=0)])
                keep = (count[end, level] - count[start, level]) == (end - start)
            idx = np.flatnonzero(keep)
            final = allowed is None or widen_left == 0        # widening decisions use the relaxed answer only
            items, info = solve_chain(problem, start[idx], end[idx], cons[idx], obj[idx], L, K, *fine, repair=final,
                                      n_candidates=self.options.relevel_candidates if final else 0)
            history.append({"phase": "fine", "attempt": attempt, "items": int(idx.size), "repaired": final,
                            "objective": None if items is None else float(obj[idx][items].sum()), **_brief(info),
                            "seconds": time.perf_counter() - t0})
            attempt += 1
            if items is None:
                if allowed is None:
                    raise problem.infeasible(info["min_constrained"], scope="a consecutive grouping")
                allowed = None                       # narrowed intervals infeasible: full fine DP
                continue
            items = idx[items]
            if final:
                break
            if self._widen(allowed, [(int(start[k]), int(end[k]) - 1, int(level[k])) for k in items], problem):
                widen_left -= 1
            elif info.get("certified_optimal") or info.get("exact"):
                break
            else:
                widen_left = 0                       # intervals settled: solve once more with the repair
        partitions = [items] + [idx[c].tolist() for c in info.pop("candidates", [])]
        items = self._relevel(problem, start, end, level, cons, obj, partitions, history)
        unit_levels, groups = chain_solution(problem, start, end, level, items)
        if problem.group_degradation is None:          # additive rows: merging equal neighbours changes nothing
            groups = problem.runs(level[sorted(items, key=lambda k: start[k])].repeat(
                [int(end[k] - start[k]) for k in sorted(items, key=lambda k: start[k])]))
        info["groups"] = len(groups)
        return SolveOutput(unit_levels, n_evals=int(len(cons)), history=history, groups=groups, info=info)

    def _relevel(self, problem, start, end, level, cons, obj, partitions, history):
        """Final polish: for the answer's partition and the next-best partitions of the relaxed DP, re-choose every
        group's level by a fine MCKP (per layer when the grouping is unconstrained and additive: then that is
        the per-layer optimum); keep the best feasible answer."""
        t0, L, m = time.perf_counter(), problem.n_layers, problem.n_levels
        limit = problem.limit + problem.tolerance * max(1.0, abs(problem.limit))
        index = np.full((L, L + 1, m), -1)
        index[start, end, level] = np.arange(len(start))
        singletons = problem.max_groups is None and problem.group_degradation is None
        best, seen = list(partitions[0]), set()
        for items in ([partitions[0]] if singletons else partitions):
            spans = [(p, p + 1) for p in range(L)] if singletons else [(int(start[k]), int(end[k])) for k in items]
            if tuple(spans) in seen:
                continue
            seen.add(tuple(spans))
            ids = np.array([index[a, b] for a, b in spans]).ravel()          # (groups x levels) item ids
            node = np.repeat(np.arange(len(spans)), m)
            got, _ = solve_chain(problem, node, node + 1, cons[ids], obj[ids], len(spans), None, None, None, 2)
            if got is None:
                continue
            got = ids[got]
            if cons[got].sum() <= limit and (cons[best].sum() > limit or obj[got].sum() < obj[best].sum()):
                best = got.tolist()
        history.append({"phase": "relevel", "partitions": len(seen), "objective": float(obj[best].sum()),
                        "seconds": time.perf_counter() - t0})
        return best

    def _coarse_phase(self, problem, start, end, level, cons, obj, history):
        """Phase 1: per group count G, a coarse solve; returns allowed[layer, level] for Phase 2 (None = all)."""
        m, L, K = problem.n_levels, problem.n_layers, problem.max_groups
        step = self._coarse_step(m)
        coarse = np.unique(np.append(np.arange(0, m, step), m - 1))
        if len(coarse) == m:
            return None
        t0 = time.perf_counter()
        idx = np.flatnonzero(np.isin(level, coarse))
        room = max(problem.limit - _node_shift(start[idx], end[idx], cons[idx], L).sum(), 1e-300)
        B = self.options.coarse_buckets or int(np.clip(2 * WORK_CELLS / (idx.size * (K or 1)), 200, 2000))
        w = np.round(np.maximum(cons[idx], 0) / (room / B))          # nearest: errors cancel across groups
        keep = idx[w <= B]
        dp = ChainDP(start[keep], end[keep], w[w <= B].astype(np.int64), obj[keep], L, B, K)
        ends = dp.run()
        per_g = ends.min(axis=1)
        if not np.isfinite(per_g).any():
            history.append({"phase": "coarse", "feasible": False, "seconds": time.perf_counter() - t0})
            return None
        kept = [g for g in np.argsort(per_g, kind="stable")[:self.options.keep_groups] if np.isfinite(per_g[g])]
        allowed = np.zeros((L, m), dtype=bool)
        pos = {lv: k for k, lv in enumerate(coarse)}
        for g in kept:
            for k in keep[dp.path(int(np.argmin(ends[g])), g + 1)]:
                c = pos[level[k]]
                lo, hi = coarse[max(c - 1, 0)], coarse[min(c + 1, len(coarse) - 1)]
                allowed[start[k]:end[k], lo:hi + 1] = True
        history.append({"phase": "coarse", "coarse_levels": coarse.tolist(), "kept_groups": [int(g) + 1 for g in kept]
                        if K is not None else None, "objective": float(per_g.min()),
                        "seconds": time.perf_counter() - t0})
        return allowed

    def _widen(self, allowed, spans, problem) -> bool:
        """Widen the interval of every chosen group whose level touches its edge; True when something changed."""
        m = problem.n_levels
        step = self._coarse_step(m)
        changed = False
        for a, b, lv in spans:
            lo, hi = max(lv - step, 0), min(lv + step, m - 1)
            if not allowed[a:b + 1, lo:hi + 1].all():
                allowed[a:b + 1, lo:hi + 1] = True
                changed = True
        return changed


def _brief(info: dict) -> dict:
    return {k: info[k] for k in ("exact", "bucket_width", "buckets", "rounding", "lower_bound") if k in info}
