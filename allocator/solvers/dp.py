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

import math
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..registry import register_solver
from .base import Solver, SolveOutput


def span_tables(problem) -> tuple[np.ndarray, np.ndarray]:
    """cost[i, j, l] and degradation[i, j, l] of layer positions i..j sharing level l (inf where j < i)."""
    L, m = problem.n_layers, problem.n_levels
    per_layer = []
    for matrix in (problem.cost_matrix, problem.deg_matrix):
        layer = np.zeros((L, m))
        np.add.at(layer, problem.unit_layer_pos, matrix)
        prefix = np.vstack([np.zeros((1, m)), np.cumsum(layer, axis=0)])
        table = prefix[None, 1:, :] - prefix[:-1, None, :]          # (i, j, l) = sum over i..j
        table[np.tril_indices(L, -1)] = np.inf
        per_layer.append(table)
    cost, deg = per_layer
    for (i, j), row in (problem.group_degradation or {}).items():
        deg[i, j] = row
    return cost, deg


def chain_items(problem):
    """The chain formulation of a problem: item arrays (start, end, level, constrained, objective), node count."""
    if problem.grouping == "consecutive":
        cost_t, deg_t = span_tables(problem)
        i, j, level = np.nonzero(np.isfinite(cost_t))
        start, end, cost, deg = i, j + 1, cost_t[i, j, level], deg_t[i, j, level]
        n = problem.n_layers
    else:
        cost_rows, deg_rows = problem.cost_matrix, problem.deg_matrix
        if problem.grouping == "fixed":
            members = [np.isin(problem.unit_layer_pos, g) for g in problem.fixed_groups]
            cost_rows = np.array([cost_rows[mk].sum(0) for mk in members])
            deg_rows = np.array([problem.group_deg(int(g.min()), int(g.max())) if problem.group_degradation
                                 is not None else deg_rows[mk].sum(0) for g, mk in zip(problem.fixed_groups, members)])
        n, m = cost_rows.shape
        start, level = np.divmod(np.arange(n * m), m)
        end, cost, deg = start + 1, cost_rows.ravel(), deg_rows.ravel()
    cons, obj = (deg, cost) if problem.direction == "min_cost" else (cost, deg)
    return start, end, level, cons, obj, n


def chain_solution(problem, start, end, level, items) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
    """Chosen items -> per-unit levels, plus the layer-position spans when grouping is consecutive."""
    x = np.empty(max(int(end[k]) for k in items), dtype=int)
    for k in items:
        x[start[k]:end[k]] = level[k]
    if problem.grouping == "consecutive":
        return x[problem.unit_layer_pos], [(int(start[k]), int(end[k]) - 1) for k in items]
    return (x if problem.grouping == "unit" else problem.expand(x[None])[0]), None


class ChainDP:
    """Bucketed min-sum chain DP over items (start, end, level); see the module docstring."""

    def __init__(self, start, end, weight, value, n_nodes: int, capacity: int, max_groups: int | None = None):
        self.start, self.end, self.weight, self.value = start, end, weight.astype(np.int64), value
        self.n, self.cap, self.K = n_nodes, int(capacity), max_groups
        self.cells = 0

    def run(self) -> np.ndarray:
        """Fill the tables; return best values at node N, shape (G, capacity + 1) (G = 1 unless max_groups)."""
        C, n = self.cap + 1, self.n
        layers = 1 if self.K is None else self.K + 1
        D = np.full((layers, n + 1, 2 * C), np.inf)      # C leading inf cells make every shifted read valid
        D[0, 0, C] = 0.0
        order = np.argsort(self.end, kind="stable")
        self.bounds = np.searchsorted(self.end[order], np.arange(n + 2))
        self.order = order
        for e in range(1, n + 1):
            sel = order[self.bounds[e]:self.bounds[e + 1]]
            for g in range(1, min(e, self.K) + 1) if self.K is not None else (0,):
                src = D[g - 1] if self.K is not None else D[0]
                use = sel if self.K is None else sel[self.start[sel] >= g - 1]
                if use.size == 0:
                    continue
                windows = sliding_window_view(src, C, axis=1)                 # (n+1, C+1, C) view
                cand = windows[self.start[use], C - self.weight[use]]         # (P, C): D[start, b - w]
                cand += self.value[use][:, None]
                D[g, e, C:] = cand.min(axis=0)
                self.cells += cand.size
        self.D = D
        return D[1:, n, C:] if self.K is not None else D[:1, n, C:]

    def path(self, bucket: int, groups: int | None = None) -> list[int]:
        """Item ids of the chain ending at node N in ``bucket`` (with ``groups`` items when max_groups is set),
        recovered by re-evaluating each node's candidates (no argmin table is stored)."""
        C = self.cap + 1
        items, e, b, g = [], self.n, int(bucket), (groups if self.K is not None else 0)
        while e > 0:
            sel = self.order[self.bounds[e]:self.bounds[e + 1]]
            src = self.D[g - 1] if self.K is not None else self.D[0]
            vals = src[self.start[sel], C + b - self.weight[sel]] + self.value[sel]
            item = int(sel[np.argmin(np.abs(vals - self.D[g, e, C + b]))])
            items.append(item)
            b, e = b - int(self.weight[item]), int(self.start[item])
            g = g - 1 if self.K is not None else 0
        return items[::-1]


def _best_path(dp: ChainDP) -> tuple[float, list[int]] | None:
    ends = dp.run()
    if not np.isfinite(ends).any():
        return None
    g, b = np.unravel_index(np.argmin(ends), ends.shape)
    return float(ends[g, b]), dp.path(b, g + 1)


def _node_shift(start, end, cons, n_nodes) -> np.ndarray:
    """Per-node shifts a_p with sum over an item's nodes <= its constrained value, so shifted values are >= 0.
    Per unit, a_p is the row minimum (the room left, limit - sum a_p, is small, so buckets are fine); for spans
    only negative values are lifted. Integral tables get integral shifts (exact buckets stay exact)."""
    if ((end - start) == 1).all():
        shift = np.full(n_nodes, np.inf)
        np.minimum.at(shift, start, cons)
    elif (cons >= 0).all():
        shift = np.zeros(n_nodes)
    else:
        grid = np.full((n_nodes, n_nodes + 1), np.inf)
        np.minimum.at(grid, (start, end), cons / (end - start))
        shift = np.array([min(0.0, grid[:p + 1, p + 1:].min()) for p in range(n_nodes)])
    shift[~np.isfinite(shift)] = 0.0
    return np.floor(shift) if np.allclose(cons, np.round(cons), rtol=0, atol=1e-9) else shift


WORK_CELLS = 6e7   # DP cells (items x buckets x group counts) one pass may fill when buckets are chosen adaptively


def solve_chain(problem, start, end, cons, obj, n_nodes, max_groups, buckets=None, max_exact_buckets=None,
                refine: int = 4, repair: bool = True, n_candidates: int = 0):
    """Optimal chain of items under ``sum(cons) <= limit``; None when no chain of these items is feasible.

    ``buckets=None`` picks B = WORK_CELLS / (items x group counts), clipped to [2000 (1000 with max_groups: few
    groups, so n*w stays small), 16000]; integer tables use
    exact buckets when their capacity is <= ``max_exact_buckets`` (default max(B, 4 x that budget))."""
    per_bucket = len(cons) * (max_groups or 1)
    if buckets is None:
        buckets = int(np.clip(WORK_CELLS / per_bucket, 2000 if max_groups is None else 1000, 16000))
    if max_exact_buckets is None:
        max_exact_buckets = max(buckets, int(4 * WORK_CELLS / per_bucket))
    limit = problem.limit + problem.tolerance * max(1.0, abs(problem.limit))
    args = (start, end)
    floor = _best_path(ChainDP(*args, np.zeros(len(cons), int), cons, n_nodes, 0, max_groups))
    if floor is None or floor[0] > limit:
        return None, {"min_constrained": None if floor is None else floor[0]}
    shift = _node_shift(start, end, cons, n_nodes)
    prefix = np.concatenate([[0.0], np.cumsum(shift)])
    shifted = np.maximum(cons - (prefix[end] - prefix[start]), 0.0)
    room = max(limit - prefix[-1], 0.0)
    info, cells = {"min_constrained": floor[0]}, 0

    def attempt(weights, capacity):
        nonlocal cells
        keep = weights <= capacity
        weights = np.where(keep, weights, 0).astype(np.int64)
        idx = np.flatnonzero(keep)
        dp = ChainDP(start[idx], end[idx], weights[idx], obj[idx], n_nodes, capacity, max_groups)
        found = _best_path(dp)
        cells += dp.cells
        if found is not None and n_candidates and "candidates" not in info:   # partitions for re-levelling
            ends = dp.D[1:, n_nodes, capacity + 1:] if max_groups is not None else dp.D[:1, n_nodes, capacity + 1:]
            top = np.argsort(ends, axis=None)[:n_candidates]
            info["candidates"] = [idx[dp.path(b, g + 1)].tolist() for g, b in zip(*np.unravel_index(top, ends.shape))
                                  if np.isfinite(ends[g, b])]
        return None if found is None else (found[0], idx[found[1]].tolist())

    rounded = np.round(shifted)
    if np.allclose(shifted, rounded, rtol=0, atol=1e-9) and np.allclose(shift, np.round(shift), rtol=0, atol=1e-9):
        ints = rounded[rounded > 0]
        unit = int(np.gcd.reduce(ints.astype(np.int64))) if ints.size and ints.max() < 2**62 else 1
        capacity = int(math.floor(room / unit + 1e-9))
        if capacity <= max_exact_buckets:
            value, items = attempt(rounded / unit, capacity)
            info.update(exact=True, bucket_width=float(unit), buckets=capacity, dp_cells=cells, lower_bound=value)
            return items, info
    width = room / buckets if room > 0 else 1.0
    capacity = buckets if room > 0 else 0

    def down(room_eff):   # the relaxed (rounded-down) DP for an effective room
        return attempt(np.floor(shifted / (room_eff / buckets) + 1e-12), capacity) if room_eff > 0 else None
    low = attempt(np.floor(shifted / width + 1e-12), capacity)
    info.update(exact=False, bucket_width=width, buckets=capacity, lower_bound=low[0], rounding="down")
    if cons[low[1]].sum() <= limit or not repair:
        info.update(dp_cells=cells, certified_optimal=bool(cons[low[1]].sum() <= limit))
        return low[1], info
    # Repair. Rounded down with the room tightened by n widths, every answer is feasible (the bound). Then
    # rounded-to-nearest DPs (unbiased: error ~ sqrt(n) w instead of n w) on the full room and, by bisection,
    # on slightly tightened rooms; the best feasible answer wins.
    n_items = min(n_nodes, max_groups or n_nodes)
    safe_room = room - n_items * width
    safe = down(safe_room) if safe_room > 0 else attempt(np.ceil(shifted / width - 1e-12), capacity)
    options = [floor[1]] + ([safe[1]] if safe is not None else [])

    def nearest(room_eff):
        found = attempt(np.round(shifted / (room_eff / buckets)), capacity) if room_eff > 0 else None
        ok = found is not None and cons[found[1]].sum() <= limit
        if ok:
            options.append(found[1])
        return ok

    if refine and not nearest(room):
        lo, hi = max(room - 2 * math.sqrt(n_items) * width, safe_room, 0.0), room
        if not nearest(lo):
            lo, hi = max(safe_room, 0.0), lo
        for _ in range(refine):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if nearest(mid) else (lo, mid)
    best = min(options, key=lambda items: obj[items].sum() if cons[items].sum() <= limit else np.inf)
    info.update(rounding="down, repaired (tightened room, nearest-rounding bisection)" if best is not floor[1]
                else "min-constrained fallback", certified_optimal=False, dp_cells=cells)
    best, info["polish_moves"] = polish(list(best), start, end, cons, obj, limit)
    return best, info


def polish(items, start, end, cons, obj, limit, max_moves: int = 2_000, reach: int = 2):
    """Local search on the repaired answer: the best single or paired re-levelling (each chosen item moves at
    most ``reach`` levels; a pair trades slack between two items) while the exact constraint holds."""
    key = start.astype(np.int64) * (int(end.max()) + 1) + end
    order = np.argsort(key, kind="stable")
    first = np.searchsorted(key[order], key[items])
    last = np.searchsorted(key[order], key[items], side="right")
    alts = [order[a:b] for a, b in zip(first, last)]          # same span, every level
    width = max(len(a) for a in alts)
    table = np.stack([np.pad(a, (0, width - len(a)), constant_values=a[0]) for a in alts])   # (chosen, levels)
    owner = np.repeat(np.arange(len(items)), 2 * reach + 1)
    moves = 0
    while moves < max_moves:
        chosen = np.asarray(items)
        at = np.array([np.flatnonzero(row == k)[0] for row, k in zip(table, chosen)])
        cols = np.clip(at[:, None] + np.arange(-reach, reach + 1)[None, :], 0, width - 1)
        cand = np.take_along_axis(table, cols, axis=1).ravel()            # moves, "stay" included
        d_cons, d_obj = cons[cand] - cons[chosen][owner], obj[cand] - obj[chosen][owner]
        slack = limit - cons[chosen].sum()
        total = d_obj[:, None] + d_obj[None, :]
        bad = (d_cons[:, None] + d_cons[None, :] > slack) | (owner[:, None] == owner[None, :])
        total[bad] = np.inf
        i, j = np.unravel_index(np.argmin(total), total.shape)
        if not total[i, j] < -1e-12 * max(1.0, abs(obj[chosen].sum())):
            break
        items[owner[i]], items[owner[j]] = int(cand[i]), int(cand[j])
        moves += 1
    return items, moves


@register_solver("dp")
class DPSolver(Solver):
    """Options: ``buckets`` (fine buckets, default adaptive), ``two_phase`` (True), ``coarse_step`` (auto: about
    6 coarse levels), ``coarse_buckets`` (adaptive, 200..2000), ``keep_groups`` (3), ``max_widen`` (2), ``max_exact_buckets``,
    ``refine`` (bisection steps of the repair; 4, or 0 with max_groups)."""

    def _opt(self, key, default):
        return self.options.get(key, default)

    def _solve(self, problem, rng) -> SolveOutput:
        start, end, level, cons, obj, n = chain_items(problem)
        if problem.grouping == "consecutive":
            return self._grouped(problem, start, end, level, cons, obj)
        t0 = time.perf_counter()
        items, info = solve_chain(problem, start, end, cons, obj, n, None, self._opt("buckets", None),
                                  self._opt("max_exact_buckets", None), self._opt("refine", 4))
        if items is None:
            raise problem.infeasible(info["min_constrained"])
        history = [{"phase": "mckp", "objective": float(obj[items].sum()), **_brief(info),
                    "seconds": time.perf_counter() - t0}]
        unit_levels, _ = chain_solution(problem, start, end, level, items)
        return SolveOutput(unit_levels, n_evals=len(cons), history=history, info=info)

    def _grouped(self, problem, start, end, level, cons, obj) -> SolveOutput:
        L, m = problem.n_layers, problem.n_levels
        K = problem.max_groups
        fine = (self._opt("buckets", None), self._opt("max_exact_buckets", None),
                self._opt("refine", 4 if K is None else 0))
        history = []
        allowed = self._coarse_phase(problem, start, end, level, cons, obj, history) \
            if self._opt("two_phase", True) else None
        widen_left, attempt = self._opt("max_widen", 2), 0
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
                                      n_candidates=self._opt("relevel_candidates", 16) if final else 0)
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
        step = self._opt("coarse_step", max(1, round((m - 1) / 5)))
        coarse = np.unique(np.append(np.arange(0, m, step), m - 1))
        if len(coarse) == m:
            return None
        t0 = time.perf_counter()
        idx = np.flatnonzero(np.isin(level, coarse))
        room = max(problem.limit - _node_shift(start[idx], end[idx], cons[idx], L).sum(), 1e-300)
        B = self._opt("coarse_buckets", int(np.clip(2 * WORK_CELLS / (idx.size * (K or 1)), 200, 2000)))
        w = np.round(np.maximum(cons[idx], 0) / (room / B))          # nearest: errors cancel across groups
        keep = idx[w <= B]
        dp = ChainDP(start[keep], end[keep], w[w <= B].astype(np.int64), obj[keep], L, B, K)
        ends = dp.run()
        per_g = ends.min(axis=1)
        if not np.isfinite(per_g).any():
            history.append({"phase": "coarse", "feasible": False, "seconds": time.perf_counter() - t0})
            return None
        kept = [g for g in np.argsort(per_g, kind="stable")[:self._opt("keep_groups", 3)] if np.isfinite(per_g[g])]
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
        step = self._opt("coarse_step", max(1, round((m - 1) / 5)))
        changed = False
        for a, b, lv in spans:
            lo, hi = max(lv - step, 0), min(lv + step, m - 1)
            if not allowed[a:b + 1, lo:hi + 1].all():
                allowed[a:b + 1, lo:hi + 1] = True
                changed = True
        return changed


def _brief(info: dict) -> dict:
    return {k: info[k] for k in ("exact", "bucket_width", "buckets", "rounding", "lower_bound") if k in info}
