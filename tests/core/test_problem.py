"""Problem: directions, budgets, grouping semantics, vectorised evaluation, clear errors."""
import numpy as np
import pytest

from allocator import Infeasible, Problem, Tables, TablesError, Unit, analytic_tables, available_solvers, make_levels, minimize
from allocator.registry import UnknownSolver
from allocator.synthetic import synthetic_tables


@pytest.fixture
def smol():
    return synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=np.round(np.arange(0, 1, 0.1), 2))))


def test_sparsity_budget_means_half_the_allocatable_cost(smol):
    p = Problem(smol, cost="bytes_decode", sparsity=0.5)
    assert p.limit == pytest.approx(0.5 * smol.cost("bytes_decode")[:, 0].sum())
    uniform = minimize(p, "uniform")
    assert uniform.feasible and uniform.allocation.levels[0].s == 0.5  # uniform 50% is exactly on budget


def test_vectorised_evaluation_matches_loop(smol):
    p = Problem(smol, sparsity=0.5)
    rng = np.random.default_rng(1)
    X = rng.integers(0, p.n_levels, size=(64, p.n_vars))
    ev = p.evaluate(X)
    for x, c, d in zip(X, ev.cost, ev.degradation):
        assert c == pytest.approx(sum(smol.cost("bytes_decode")[u, l] for u, l in enumerate(x)))
        assert d == pytest.approx(sum(smol.degradation[u, l] for u, l in enumerate(x)))
    assert np.array_equal(ev.feasible, ev.cost <= p.limit * (1 + 1e-9))


def test_consecutive_grouping_and_group_table():
    units = [Unit(f"layers.{i}.{k}", i) for i in range(4) for k in ("attn", "mlp")]
    levels = make_levels(s=[0, 0.5])
    costs = np.tile([[2.0, 1.0]], (8, 1))
    deg = np.tile([[0.0, 1.0]], (8, 1))
    t = Tables(units, levels, {"flops_decode": costs}, deg)
    p = Problem(t, cost="flops_decode", budget=12, grouping="consecutive")
    assert p.n_vars == 4
    U = p.expand([[0, 1, 1, 0]])
    assert U.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0]]
    assert p.runs(np.array([0, 1, 1, 0])) == [(0, 0), (1, 2), (3, 3)]
    # a measured group row replaces the sum of unit rows for that span
    g = Problem(t, cost="flops_decode", budget=12, grouping="consecutive", group_degradation={(1, 2): [0.0, 0.5]})
    assert p.evaluate([[0, 1, 1, 0]]).degradation[0] == 4.0
    assert g.evaluate([[0, 1, 1, 0]]).degradation[0] == 0.5
    assert g.evaluate_partition([(0, 0), (1, 2), (3, 3)], [0, 1, 0]) == (12.0, 0.5)
    mg = Problem(t, cost="flops_decode", budget=16, grouping="consecutive", max_groups=2)
    assert not mg.evaluate([[0, 1, 0, 1]]).feasible[0]
    assert mg.evaluate([[0, 0, 1, 1]]).feasible[0]


def test_fixed_groups_reduce_dimensions(smol):
    groups = [list(range(i, i + 5)) for i in range(0, 30, 5)]
    p = Problem(smol, sparsity=0.5, grouping=groups)
    assert p.n_vars == 6
    U = p.expand(np.arange(6)[None])
    assert U[0].tolist() == [g for g in range(6) for _ in range(5)]
    with pytest.raises(ValueError, match="partition the layers"):
        Problem(smol, sparsity=0.5, grouping=[[0, 1]])


def test_user_callables():
    units = [Unit(f"u{i}", i) for i in range(3)]
    t = Tables(units, make_levels(s=[0, 0.5]), {"flops_decode": np.ones((3, 2))}, np.zeros((3, 2)))
    p = Problem(t, cost="flops_decode", sparsity=0.5, cost_fn=lambda U: U.sum(axis=1) * -1.0 + 3,
                degradation_fn=lambda U: (U ** 2).sum(axis=1) + 0.1 * U[:, 0])
    ev = p.evaluate([[1, 1, 0], [0, 1, 1]])
    assert ev.cost.tolist() == [1.0, 1.0] and ev.degradation.tolist() == pytest.approx([2.1, 2.0])
    assert not p.is_additive
    with pytest.raises(TypeError, match="needs additive tables"):
        minimize(p, "milp")


def test_infeasible_reports_best_achievable(smol):
    with pytest.raises(Infeasible, match="smallest .* is 0;") as err:
        minimize(Problem(smol, delta=-1.0), "uniform")
    assert err.value.best_achievable == 0.0
    tiny = 0.05 * smol.cost("bytes_decode")[:, 0].sum()
    with pytest.raises(Infeasible) as err:
        minimize(Problem(smol, budget=tiny), "uniform")
    assert err.value.best_achievable == pytest.approx(smol.cost("bytes_decode")[:, -1].sum())


def test_bad_problem_input(smol):
    with pytest.raises(ValueError, match="exactly one of"):
        Problem(smol, delta=0.1, sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one of"):
        Problem(smol)
    with pytest.raises(ValueError, match="finite"):
        Problem(smol, delta=float("nan"))
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        Problem(smol, sparsity=1.5)
    with pytest.raises(TablesError, match="no cost kind 'latency_decode'.*bytes_decode"):
        Problem(smol, cost="latency_decode", sparsity=0.5)
    no_deg = analytic_tables("smollm2-135m", make_levels(s=[0, 0.5]))
    with pytest.raises(TablesError, match="no degradation matrix"):
        Problem(no_deg, sparsity=0.5)
    with pytest.raises(ValueError, match="level indices"):
        Problem(smol, sparsity=0.5).evaluate(np.full((1, 30), 99))


def test_unknown_solver_lists_registered(smol):
    with pytest.raises(UnknownSolver, match="registered solvers: .*dp.*greedy.*milp.*uniform"):
        minimize(Problem(smol, sparsity=0.5), "simulated-annealing")
    assert {"dp", "milp", "greedy", "uniform", "brute"} <= set(available_solvers())


def test_group_table_needs_contiguous_fixed_groups(smol):
    with pytest.raises(ValueError, match="run of consecutive layers"):
        Problem(smol, sparsity=0.5, grouping=[[0, 2], [1] + list(range(3, 30))], group_degradation={(0, 2): [0] * 10})
