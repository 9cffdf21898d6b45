"""Fine level grids from a coarse profile: each unit's degradation interpolated along the sparsity s.

Why: a profiled row costs a partial forward of the model, so a 0.05 grid costs four times the rows of a 0.2 grid,
while a unit's degradation is a smooth, increasing function of s. Profile coarse, interpolate fine: the solver
gets the fine choice of levels for the profiling cost of the coarse grid.

Algorithm. The fine grid (``refine_grid``) takes each (rho, fmt) slice of the coarse grid, with its s range
[lo, hi], to lo, lo + step, ..., hi (plus every coarse s, which such a step keeps on the lattice anyway); a step
that does not divide hi - lo is an error. ``interpolate_degradation`` fits, per unit and per slice, the monotone
piecewise cubic Hermite interpolant (PCHIP: Fritsch & Carlson, "Monotone piecewise cubic interpolation", SIAM J.
Numer. Anal. 17, 1980; ``scipy.interpolate.PchipInterpolator``) through the measured (s, degradation) points and
evaluates it at the fine s. By default (``space="log"``) it interpolates log(d + eps), eps = 1e-3 x the unit
slice's largest |d|, and maps back: a unit's KL grows about geometrically in s (x5-8 per 0.2 on SmolLM2), which a
cubic in d itself overshoots between the steep coarse points (measured: studies/results/refine_levels.md); a unit
slice with an entry <= -eps (operating-point or perplexity tables can hold negative entries) falls back to
``space="linear"``. In either space PCHIP passes through every measured point, is monotone on every interval
where the data are, and never leaves the range of an interval's two end values (no overshoot, unlike a cubic
spline; log is monotone, so this holds for d too), so a refined entry is always bracketed by two measured ones. For a dense format profiled in isolation the point
(s = 0, degradation 0) is exact without measuring; it is added as a knot when the slice lacks it (off in
operating-point tables, whose entries are relative to the operating point). No extrapolation: a fine s outside a
slice's measured range is an error. Costs are never interpolated: ``refine_tables`` takes tables priced on the
fine grid by the same cost provider (``analytic_tables(config, fine_levels)``, ``with_costs``), or re-prices
every cost kind of the coarse tables through its registered provider. Complexity: O(units x slices x (coarse +
fine levels)); no model is run.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .levels import Level, normalize_levels
from .tables import Tables, TablesError

SLICE = ["rho", "bits", "fmt"]
SPACES = ("log", "linear")
LOG_OFFSET = 1e-3  # eps of the log space, relative to the unit slice's largest |degradation|


class RefineError(TablesError):
    """A refinement cannot be made as asked; the message says which slice and what to change."""


def refine_grid(levels, s_step: float) -> pd.DataFrame:
    """The coarse grid with every (rho, fmt) slice's s range cut into steps of ``s_step`` (coarse s kept)."""
    step = _check_step(s_step)
    frame = normalize_levels(levels)
    rows = []
    for key, part in frame.groupby(SLICE, sort=False):
        coarse = sorted(part["s"])
        lo, hi = coarse[0], coarse[-1]
        n = (hi - lo) / step
        if abs(n - round(n)) > 1e-6:
            raise RefineError(f"the refine step {s_step} (profile.refine) does not divide the s range [{lo:g}, "
                              f"{hi:g}] of the slice rho={key[0]:g}, fmt={key[2]} ({hi - lo:g} / {step:g} = {n:.3f}); "
                              f"give a step that does, e.g. {_divisor_near(hi - lo, step):g}")
        fine = {round(lo + k * step, 9) for k in range(int(round(n)) + 1)} | {round(s, 9) for s in coarse}
        rows += [{"s": s, "rho": key[0], "fmt": key[2]} for s in sorted(fine)]
    return _ordered(pd.DataFrame(rows))


def interpolate_degradation(coarse: Tables, levels, *, dense_zero: bool | None = None,
                            space: str = "log") -> np.ndarray:
    """(n_units, n_fine) degradation at ``levels`` by PCHIP in s per unit and (rho, fmt) slice of ``coarse``, of
    log(d + eps) (``space="log"``) or of d (``"linear"``). ``dense_zero`` (default: unless the table is an
    operating-point profile) adds the knot (0, 0) to slices of a dense format that were not measured at s = 0."""
    if space not in SPACES:
        raise RefineError(f"unknown interpolation space {space!r}; use one of {SPACES}")
    if coarse.degradation is None:
        raise RefineError("the coarse tables have no degradation to interpolate; profile them first")
    if dense_zero is None:
        dense_zero = coarse.provenance.get("profile_mode", "isolated") != "operating_point"
    fine = normalize_levels(levels)
    out = np.empty((coarse.n_units, len(fine)))
    for key, part in fine.groupby(SLICE, sort=False):
        s_known, d_known = _knots(coarse, key, dense_zero)
        s_fine = part["s"].to_numpy(dtype=float)
        outside = s_fine[(s_fine < s_known[0] - 1e-9) | (s_fine > s_known[-1] + 1e-9)]
        if outside.size:
            raise RefineError(f"fine s {sorted(set(outside.round(6)))} of the slice rho={key[0]:g}, fmt={key[2]} lie "
                              f"outside its profiled range [{s_known[0]:g}, {s_known[-1]:g}]; refine only inside it "
                              "(no extrapolation)")
        out[:, part.index.to_numpy()] = _pchip(s_known, d_known, np.clip(s_fine, s_known[0], s_known[-1]), space)
    return out


def refine_tables(coarse: Tables, levels, costs: Tables | None = None, space: str = "log") -> Tables:
    """``coarse`` on a fine grid: ``levels`` (a level frame, or an s step for ``refine_grid``), the degradation
    interpolated (``interpolate_degradation`` in ``space``), the costs from ``costs`` (tables of the same units
    priced on that grid by the same provider) or, without them, re-priced kind by kind by the registered
    providers (with the coarse provenance's ``tokens``)."""
    fine = refine_grid(coarse.levels, levels) if isinstance(levels, (int, float)) else normalize_levels(levels)
    costs = _price(coarse, fine) if costs is None else costs
    _check_costs(coarse, fine, costs)
    record = {"method": f"pchip-{space}", "coarse_s": sorted(set(coarse.levels["s"].round(6))), "levels": len(fine),
              "coarse_levels": coarse.n_levels}
    return Tables(coarse.units, fine, dict(costs.costs), interpolate_degradation(coarse, fine, space=space),
                  {**costs.provenance, **coarse.provenance, "refine": record})


# ---------------------------------------------------------------------------------------------- helpers
def _check_step(s_step) -> float:
    if isinstance(s_step, bool) or not isinstance(s_step, (int, float)) or not math.isfinite(s_step) \
            or not 0 < s_step < 1:
        raise RefineError(f"refine step {s_step!r} must be a number in (0, 1), e.g. 0.05")
    return float(s_step)


def _divisor_near(span: float, step: float) -> float:
    """A round step at most ``step`` that divides ``span`` (else span / ceil(span / step))."""
    for c in (0.2, 0.1, 0.05, 0.025, 0.02, 0.01):
        if c <= step + 1e-12 and abs(span / c - round(span / c)) < 1e-6:
            return c
    return span / math.ceil(span / step)


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """``make_levels``' order (format by width descending, then s ascending, rho descending), normalized."""
    frame = normalize_levels(frame)
    key = frame.assign(neg_bits=-frame["bits"], neg_rho=-frame["rho"])
    return frame.loc[key.sort_values(["neg_bits", "fmt", "s", "neg_rho"]).index].reset_index(drop=True)


def _knots(coarse: Tables, key, dense_zero: bool) -> tuple[np.ndarray, np.ndarray]:
    """The measured s of one slice (ascending) and the units' degradation there, with (0, 0) for a dense format."""
    lv = coarse.levels
    hit = np.flatnonzero((lv["rho"].sub(key[0]).abs() < 1e-9) & (lv["bits"] == key[1]) & (lv["fmt"] == key[2]))
    if hit.size == 0:
        raise RefineError(f"the coarse tables have no level of the slice rho={key[0]:g}, fmt={key[2]}; refine "
                          "only the slices that were profiled")
    hit = hit[np.argsort(lv["s"].to_numpy()[hit])]
    s, d = lv["s"].to_numpy(dtype=float)[hit], coarse.degradation[:, hit]
    if dense_zero and s[0] > 0 and Level(0.0, float(key[0]), fmt=key[2]).is_dense:
        s, d = np.concatenate([[0.0], s]), np.hstack([np.zeros((coarse.n_units, 1)), d])
    return s, d


def _pchip(s: np.ndarray, d: np.ndarray, s_new: np.ndarray, space: str) -> np.ndarray:
    """PCHIP of each row of d (units x knots) at s_new, in ``space``; one knot: that value; two: a straight line
    (in that space). Log-space rows need every d > -eps (else, and for all-zero rows, the linear space)."""
    if s.size == 1:
        return np.repeat(d, s_new.size, axis=1)
    from scipy.interpolate import PchipInterpolator
    out = PchipInterpolator(s, d, axis=1)(s_new)
    if space == "log":
        eps = LOG_OFFSET * np.abs(d).max(axis=1, keepdims=True)
        ok = (eps[:, 0] > 0) & (d + eps > 0).all(axis=1)
        if ok.any():
            out[ok] = np.exp(PchipInterpolator(s, np.log(d[ok] + eps[ok]), axis=1)(s_new)) - eps[ok]
    at = np.minimum(np.searchsorted(s, s_new), s.size - 1)
    knot = np.isclose(s[at], s_new, rtol=0, atol=1e-9)
    out[:, knot] = d[:, at[knot]]                      # the measured entries exactly (no exp / log rounding)
    return out


def _price(coarse: Tables, fine: pd.DataFrame) -> Tables:
    from .cost_providers import with_costs

    priced = Tables(coarse.units, fine, {}, None, coarse.provenance)
    for kind in coarse.costs:
        priced = with_costs(priced, kind)
    return priced


def _check_costs(coarse: Tables, fine: pd.DataFrame, costs: Tables) -> None:
    if costs.unit_names != coarse.unit_names:
        raise RefineError("the fine cost tables have other units than the coarse tables; price the fine grid with "
                          "the same unit granularity (analytic_tables(config, levels, unit=...))")
    if not costs.levels[["s", "rho", "bits", "fmt"]].equals(fine[["s", "rho", "bits", "fmt"]]):
        raise RefineError("the fine cost tables are priced on another level grid; build them on refine_grid(...)")
    missing = sorted(set(coarse.costs) - set(costs.costs))
    if missing:
        raise RefineError(f"the fine cost tables lack the cost kinds {missing} of the coarse tables; price them "
                          "with allocator.cost_providers.with_costs")


__all__ = ["RefineError", "interpolate_degradation", "refine_grid", "refine_tables"]
