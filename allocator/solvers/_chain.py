"""The chain DP behind `dp` (and the item list `milp` and `brute` share): items, the bucketed recurrence, its
repair and a local polish. The algorithm, its complexity and the discretization bound: see dp.py's docstring."""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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


def item_values(problem, matrix: np.ndarray, start, end, level) -> np.ndarray:
    """Per chain item, the sum of a (units x levels) matrix over its units at its level (side-limit rows)."""
    if problem.grouping == "unit":
        return matrix[start, level]
    L, m = problem.n_layers, problem.n_levels
    layer = np.zeros((L, m))
    np.add.at(layer, problem.unit_layer_pos, matrix)
    if problem.grouping == "fixed":
        rows = np.array([layer[g].sum(0) for g in problem.fixed_groups])
        return rows[start, level]
    prefix = np.vstack([np.zeros((1, m)), np.cumsum(layer, axis=0)])
    return prefix[end, level] - prefix[start, level]


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
