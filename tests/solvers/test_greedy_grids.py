"""greedy on a two-dimensional (s, rho) grid: the index order is not the cost order there."""
import numpy as np

from allocator import Problem, analytic_tables, make_levels, minimize
from allocator.synthetic import synthetic_tables


def rsparse_like_problem(seed):
    tables = synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=[0, .3, .4, .5, .6, .7],
                                                                          rho=[1, .9, .8, .5])), seed=seed)
    rho = tables.levels["rho"].to_numpy()
    penalty = 0.1 * (1 - rho)[None, :] * np.random.default_rng(seed).random((tables.n_units, 1))
    return Problem(tables.with_degradation(tables.degradation + penalty), sparsity=0.5)


def test_any_level_moves_beat_next_level_walk_and_uniform():
    for seed in range(3):
        problem = rsparse_like_problem(seed)
        walk = minimize(problem, "greedy", moves="next").degradation
        auto = minimize(problem, "greedy").degradation          # auto = any-level moves on this grid
        best = minimize(problem, "milp").degradation
        uniform = minimize(problem, "uniform").degradation
        assert best - 1e-12 <= auto <= walk + 1e-12
        assert auto <= uniform
        assert auto <= best * 1.02
