"""allocator.refine: fine level grids from a coarse profile (PCHIP in s per unit and (rho, fmt) slice), costs priced
on the fine grid by the same provider, the (0, 0) knot of dense formats, clear errors; profile.refine in the config."""
import numpy as np
import pytest

from allocator import analytic_tables, make_levels, minimize
from allocator.config import ConfigError, load_config
from allocator.problem import Problem
from allocator.refine import RefineError, interpolate_degradation, refine_grid, refine_tables


def coarse_tables(s=(0.0, 0.2, 0.4, 0.6, 0.8), rho=(1.0,), fmt=None, curve=lambda s: s ** 2, **provenance):
    levels = make_levels(s=list(s), rho=list(rho), fmt=fmt)
    tables = analytic_tables("smollm2-135m", levels, unit="input")
    scale = 1.0 + np.arange(tables.n_units)[:, None] / 10
    return tables.with_degradation(scale * curve(tables.levels["s"].to_numpy())[None, :],
                                   **{"profile_mode": "isolated", **provenance})


def test_grid_cuts_each_slice_and_keeps_the_coarse_points():
    fine = refine_grid(make_levels(s=[0.3, 0.5, 0.7], rho=[1.0, 0.9]), 0.05)
    assert len(fine) == 2 * 9 and list(fine["rho"][:2]) == [1.0, 0.9]           # make_levels order
    assert np.allclose(sorted(set(fine["s"])), np.arange(0.3, 0.7001, 0.05))
    odd = refine_grid(make_levels(s=[0.0, 0.3, 0.6]), 0.1)
    assert np.allclose(odd["s"], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    mixed = refine_grid(make_levels(s=[0.0, 0.4, 0.8], fmt=["bf16", "w8a8-fp8"]), 0.2)
    assert list(mixed["fmt"].unique()) == ["bf16", "w8a8-fp8"] and len(mixed) == 10


def test_refined_tables_pass_through_the_measured_points_and_stay_bracketed():
    coarse = coarse_tables()
    fine = refine_tables(coarse, 0.05)
    assert fine.n_levels == 17 and fine.provenance["refine"]["coarse_levels"] == 5
    s = fine.levels["s"].to_numpy()
    on = np.isin(np.round(s, 6), np.round(coarse.levels["s"], 6))
    np.testing.assert_allclose(fine.degradation[:, on], coarse.degradation, atol=1e-12)
    assert (np.diff(fine.degradation, axis=1) >= -1e-12).all()                  # monotone data: monotone fit
    scale = 1 + np.arange(fine.n_units)[:, None] / 10
    np.testing.assert_allclose(fine.degradation, fine.degradation[:1] * scale, rtol=1e-9)   # linear in the data
    assert np.abs(fine.degradation[0] - s ** 2).max() < 5e-3                   # a smooth curve is recovered closely


def test_costs_on_the_fine_grid_are_the_providers_not_interpolated():
    coarse = coarse_tables()
    fine = refine_tables(coarse, 0.1)
    direct = analytic_tables("smollm2-135m", fine.levels, unit="input")
    for kind in coarse.costs:
        np.testing.assert_allclose(fine.costs[kind], direct.costs[kind])
    given = refine_tables(coarse, refine_grid(coarse.levels, 0.1), direct)
    np.testing.assert_allclose(given.degradation, fine.degradation)
    assert coarse.refine_levels(0.1).content_hash() == fine.content_hash()


def test_dense_zero_knot_only_for_dense_isolated_tables():
    coarse = coarse_tables(s=(0.2, 0.4, 0.6), curve=lambda s: s)                # no s = 0 level measured
    grid = refine_grid(coarse.levels, 0.1)
    np.testing.assert_allclose(interpolate_degradation(coarse, grid, space="linear")[0], grid["s"], atol=1e-12)
    square = coarse_tables(s=(0.2, 0.4, 0.6), curve=lambda s: s ** 2)
    with_knot, without = (interpolate_degradation(square, grid, dense_zero=z) for z in (True, False))
    assert not np.allclose(with_knot, without)                                 # the (0, 0) knot shapes the end slope
    operating = coarse_tables(s=(0.2, 0.4, 0.6), curve=lambda s: s ** 2, profile_mode="operating_point")
    assert interpolate_degradation(operating, grid) \
        .tolist() == without.tolist()                                          # operating-point entries: no knot
    with pytest.raises(RefineError, match="outside its profiled range"):
        interpolate_degradation(coarse, make_levels(s=[0.1, 0.2]), dense_zero=False)


def test_log_space_follows_a_geometric_curve_where_the_linear_space_overshoots():
    """KL growing x6 per 0.2 of s (as SmolLM2's units do): PCHIP of log(d + eps) is close, PCHIP of d overshoots."""
    def curve(s):
        return 1e-3 * (np.exp(9 * s) - 1)
    coarse = coarse_tables(curve=curve)
    grid = refine_grid(coarse.levels, 0.05)
    truth = curve(grid["s"].to_numpy())
    log, lin = (interpolate_degradation(coarse, grid, space=sp)[0] for sp in ("log", "linear"))
    assert np.abs(log - truth).max() < 0.2 * np.abs(lin - truth).max()
    assert np.abs(log - truth).max() / truth.max() < 0.01
    with pytest.raises(RefineError, match="interpolation space"):
        interpolate_degradation(coarse, grid, space="cubic")
    negative = coarse_tables(curve=lambda s: s - 0.3)                          # entries below -eps: linear space
    np.testing.assert_allclose(interpolate_degradation(negative, grid)[0], grid["s"] - 0.3, atol=1e-12)


def test_non_monotone_data_is_not_overshot():
    coarse = coarse_tables(curve=lambda s: np.where(np.isclose(s, 0.4), 0.5, s))   # a noisy bump at 0.4
    fine = refine_tables(coarse, 0.05).degradation[0]
    knots = coarse.degradation[0]
    for a in range(4):                                                         # each interval inside its ends
        seg = fine[4 * a: 4 * a + 5]
        assert seg.min() >= min(knots[a], knots[a + 1]) - 1e-12 and seg.max() <= max(knots[a], knots[a + 1]) + 1e-12


def test_dp_solves_the_refined_table():
    fine = refine_tables(coarse_tables(), 0.05)
    result = minimize(Problem(fine, cost="bytes_decode", sparsity=0.5), "dp")
    assert result.allocation is not None and result.degradation > 0


def test_errors_name_the_fix():
    coarse = coarse_tables()
    with pytest.raises(RefineError, match=r"does not divide the s range \[0, 0.8\].*e.g. 0.2"):
        refine_grid(coarse.levels, 0.3)
    with pytest.raises(RefineError, match=r"in \(0, 1\)"):
        refine_grid(coarse.levels, 0.0)
    with pytest.raises(RefineError, match="no degradation"):
        refine_tables(analytic_tables("smollm2-135m", make_levels(s=[0, 0.4]), unit="input"), 0.2)
    with pytest.raises(RefineError, match="another level grid"):
        refine_tables(coarse, 0.1, analytic_tables("smollm2-135m", make_levels(s=[0, 0.5]), unit="input"))
    with pytest.raises(RefineError, match="other units"):
        refine_tables(coarse, 0.1, analytic_tables("smollm2-135m", refine_grid(coarse.levels, 0.1), unit="layer"))
    with pytest.raises(RefineError, match="no level of the slice"):
        interpolate_degradation(coarse, make_levels(s=[0.2], rho=[0.9]))


def test_profile_refine_config_option():
    assert load_config({}).profile.refine == 0.05                   # the default since the hybrid (issue 17)
    assert load_config({"profile": {"refine": None}}).profile.refine is None
    assert load_config({"profile": {"refine": 0.05}}).profile.refine == 0.05
    for bad in (0.0, -0.1, 0.7, "fine"):
        with pytest.raises(ConfigError, match="profile.refine"):
            load_config({"profile": {"refine": bad}})
