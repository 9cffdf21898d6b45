"""evo and bayes: optimality on table problems, warm start, budgets, memoisation, multi-step selection, storage."""
from __future__ import annotations

import numpy as np
import pytest

from allocator import Infeasible, Problem, minimize
from allocator.solvers.options import SolverOptionError
from allocator.solvers._repair import BudgetRepair, level_switch

from .instances import exact_optimum, synthetic_tables

pytest.importorskip("pymoo")
pytest.importorskip("optuna")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _optimum(problem) -> float:
    try:  # the library's certificate when it is there, else our own MILP
        return minimize(problem, "milp").degradation
    except Exception:
        return exact_optimum(problem)


class CountingObjective:
    """A non-additive measured objective (table degradation + neighbour interactions) that counts its calls."""

    def __init__(self, tables):
        self.deg = tables.degradation
        self.calls: list = []

    def __call__(self, unit_levels, fidelity=None):
        self.calls.append((tuple(unit_levels), fidelity))
        d = self.deg[np.arange(len(unit_levels)), unit_levels]
        noise = 0.0 if fidelity is None else 0.05 * np.sin(3.0 * unit_levels.sum() + fidelity)
        return float(d.sum() + 0.5 * (d[1:] * d[:-1]).sum() + noise)


@pytest.fixture(scope="module")
def table_problem():
    return Problem(synthetic_tables(30, 8, seed=0), "bytes_decode", sparsity=0.5)


@pytest.mark.parametrize("solver", ["evo", "bayes"])
def test_within_one_percent_of_optimum_with_default_budget(table_problem, solver):
    opt = _optimum(table_problem)
    result = minimize(table_problem, solver, seed=0, progress=False)
    assert result.feasible
    assert result.degradation <= opt * 1.01 + 1e-12, (result.degradation, opt)
    assert result.n_evals > 0 and result.history
    best = [row["best"] for row in result.history]
    assert all(a >= b for a, b in zip(best, best[1:]))  # best-so-far is monotone
    assert abs(best[-1] - result.degradation) < 1e-9


def test_evo_is_deterministic(table_problem):
    a = minimize(table_problem, "evo", seed=3, n_gen=10, progress=False)
    b = minimize(table_problem, "evo", seed=3, n_gen=10, progress=False)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.n_evals == b.n_evals


@pytest.mark.parametrize("start", ["dp", "uniform"])
def test_warm_started_evo_never_worse_than_its_start_on_measured_objective(start):
    tables = synthetic_tables(30, 8, seed=1)
    fn = CountingObjective(tables)
    problem = Problem(tables, "bytes_decode", sparsity=0.5, measured_objective=fn)
    start_units = minimize(Problem(tables, "bytes_decode", sparsity=0.5), start, seed=0).x
    result = minimize(problem, "evo", seed=0, warm_start=start, max_evals=40, progress=False)
    assert result.feasible and result.info["fitness"] == "measured"
    assert result.info["best_value"] <= fn(start_units) + 1e-12
    assert result.info["warm_start_values"][0] == pytest.approx(fn(start_units))


def test_measured_objective_memoised_counted_and_budgeted():
    tables = synthetic_tables(30, 8, seed=2)
    fn = CountingObjective(tables)
    problem = Problem(tables, "bytes_decode", sparsity=0.5, measured_objective=fn)
    result = minimize(problem, "evo", seed=0, max_evals=50, pop_size=16, progress=False)
    assert result.n_evals == len(fn.calls) <= 50
    assert len(set(fn.calls)) == len(fn.calls)  # never measured twice
    assert result.info["budget_exhausted"]
    evals = [row["eval"] for row in result.history]
    assert evals == sorted(evals) and evals[-1] == result.n_evals
    assert all(np.isfinite(row["time"]) for row in result.history)
    # the answer is the best measured feasible candidate, and it is what the history says
    assert result.info["best_value"] == pytest.approx(fn(result.x)) == pytest.approx(result.history[-1]["best"])


def test_wall_time_budget():
    tables = synthetic_tables(30, 8, seed=2)

    def slow(unit_levels, fidelity=None):
        import time
        time.sleep(0.01)
        return float(tables.degradation[np.arange(30), unit_levels].sum())

    problem = Problem(tables, "bytes_decode", sparsity=0.5, measured_objective=slow)
    result = minimize(problem, "bayes", seed=0, max_time=0.5, sampler="tpe", progress=False)
    assert result.solve_time < 3.0 and result.feasible


def test_multi_step_selection_and_rsparse_preset():
    tables = synthetic_tables(30, 8, seed=3)
    fn = CountingObjective(tables)
    problem = Problem(tables, "bytes_decode", sparsity=0.5, measured_objective=fn)
    result = minimize(problem, "evo", seed=0, multi_step=[(2, 4)], fidelity=8, pop_size=16, n_gen=4, progress=False)
    by_fid = result.info["evals_by_fidelity"]
    assert by_fid["2"] > by_fid["8"] > 0  # most children screened cheaply, survivors measured in full
    assert {f for _, f in fn.calls} == {2, 8}
    assert all(row.get("value") is not None for row in result.history)

    fn.calls.clear()
    result = minimize(problem, "evo", seed=0, preset="rsparse", progress=False)
    assert result.info["pop_size"] == 32 and result.info["generations"] == 5
    assert result.n_evals <= 32 * 5 and {f for _, f in fn.calls} == {16}


def test_bayes_shares_a_study_through_storage(tmp_path):
    problem = Problem(synthetic_tables(30, 8, seed=4), "bytes_decode", sparsity=0.5)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = minimize(problem, "bayes", seed=0, n_trials=4, storage=url, study_name="shared", progress=False)
    second = minimize(problem, "bayes", seed=1, n_trials=4, storage=url, study_name="shared", progress=False)
    assert second.info["n_trials_in_study"] > first.info["n_trials_in_study"] >= 4
    assert second.degradation <= first.degradation + 1e-12  # the shared best is never lost


def test_bayes_warm_start_is_enqueued(table_problem):
    dp = minimize(table_problem, "dp", seed=0)
    result = minimize(table_problem, "bayes", seed=0, warm_start="dp", n_trials=5, progress=False)
    assert result.degradation <= dp.degradation + 1e-12
    assert result.history[0]["value"] == pytest.approx(dp.degradation)


@pytest.mark.parametrize("solver", ["evo", "bayes"])
def test_fixed_groups_reduce_dimensions(solver):
    tables = synthetic_tables(30, 8, seed=5)
    groups = [list(range(i, i + 5)) for i in range(0, 30, 5)]
    problem = Problem(tables, "bytes_decode", sparsity=0.5, grouping=groups)
    result = minimize(problem, solver, seed=0, progress=False, **({"n_trials": 60} if solver == "bayes" else {"n_gen": 20}))
    assert result.feasible
    levels = result.x.reshape(6, 5)
    assert (levels == levels[:, :1]).all()  # one level per group


def test_repair_and_level_switch():
    rng = np.random.default_rng(0)
    tables = synthetic_tables(30, 8, seed=6)
    problem = Problem(tables, "bytes_decode", sparsity=0.5)
    repair = BudgetRepair(problem)
    X = rng.integers(0, 8, size=(20, 30))
    repaired = repair(X, rng)
    assert problem.evaluate(repaired).feasible.all()
    # level switch: one down, one up per flip -> the level sum is kept
    x = np.full(30, 3)
    for _ in range(20):
        y = level_switch(x, 8, rng)
        assert y.sum() == x.sum() and 1 <= np.abs(y - x).sum() <= 6


def test_errors():
    tables = synthetic_tables(10, 4, seed=0)
    with pytest.raises(SolverOptionError, match="needs a measured objective"):
        minimize(Problem(tables, "bytes_decode", sparsity=0.5), "evo", fitness="measured", progress=False)
    with pytest.raises(SolverOptionError, match="unknown option 'pop_szie' for solver 'evo'; did you mean 'pop_size'"):
        minimize(Problem(tables, "bytes_decode", sparsity=0.5), "evo", pop_szie=3)
    with pytest.raises(Infeasible):
        minimize(Problem(tables, "bytes_decode", sparsity=0.99), "evo", progress=False)


def test_bayes_gp_on_measured_objective_over_fixed_groups():
    pytest.importorskip("torch")
    tables = synthetic_tables(30, 8, seed=7)
    fn = CountingObjective(tables)
    groups = [list(range(i, i + 6)) for i in range(0, 30, 6)]
    problem = Problem(tables, "bytes_decode", sparsity=0.5, grouping=groups, measured_objective=fn)
    result = minimize(problem, "bayes", seed=0, max_evals=14, n_startup_trials=6, warm_start="dp", progress=False)
    assert result.info["sampler"] == "gp" and result.n_evals <= 14 and result.feasible
    assert result.info["best_value"] <= result.history[0]["value"] + 1e-12  # never worse than the queued dp start


class Validation:
    """A validation callable: ``distance`` to a preferred vector (the start wins) or the fitness itself."""

    def __init__(self, fn=None, prefer=None):
        self.fn, self.prefer, self.calls = fn, prefer, []

    def __call__(self, unit_levels):
        self.calls.append(tuple(unit_levels))
        if self.prefer is not None:
            return float(np.abs(unit_levels - self.prefer).sum())
        return self.fn(unit_levels)


@pytest.mark.parametrize("solver", ["evo", "bayes"])
def test_validation_keeps_the_start_unless_a_candidate_beats_it_there(solver):
    tables = synthetic_tables(30, 8, seed=8)
    fn = CountingObjective(tables)
    problem = Problem(tables, "bytes_decode", sparsity=0.5, measured_objective=fn)
    start = minimize(Problem(tables, "bytes_decode", sparsity=0.5), "uniform", seed=0).x  # room to improve
    budget = {"max_evals": 40, "progress": False, **({"sampler": "tpe"} if solver == "bayes" else {})}
    # validation prefers the start: the search improves the fitness, yet the start is returned
    prefers_start = Validation(prefer=start)
    kept = minimize(problem, solver, seed=0, warm_start=start, validation=prefers_start, validation_top=4, **budget)
    assert kept.info["best_value"] < fn(start)           # the search did find a better fitness ...
    np.testing.assert_array_equal(kept.x, start)          # ... which validation did not confirm
    assert kept.info["validation"]["chosen"] == "start"
    assert len(prefers_start.calls) == len(set(prefers_start.calls)) <= 4 + 1
    # validation agrees with the fitness: the best candidate replaces the start
    agrees = Validation(fn=fn)
    moved = minimize(problem, solver, seed=0, warm_start=start, validation=agrees, **budget)
    assert moved.info["validation"]["chosen"] == "candidate 0"
    assert fn(moved.x) == pytest.approx(moved.info["best_value"]) and fn(moved.x) < fn(start)


def test_choose_by_validation_without_a_start_takes_the_best_on_validation():
    from allocator.solvers._validation import choose_by_validation
    candidates = [np.array([0, 1]), np.array([1, 1]), np.array([2, 0])]

    def validation(x):
        return float(abs(x[0] - 2) + x[1])  # 3, 2, 0 on the candidates

    chosen, record = choose_by_validation(candidates, [], validation)
    np.testing.assert_array_equal(chosen, [2, 0])
    assert record["chosen"] == "candidate 2" and record["evals"] == 3
    # a start that ties with the best candidate is kept (a candidate must beat it) ...
    chosen, record = choose_by_validation(candidates[:2], [np.array([3, 1])], validation)
    np.testing.assert_array_equal(chosen, [3, 1])
    assert record["chosen"] == "start" and record["start_values"] == [2.0]
    # ... and one that loses is not
    chosen, record = choose_by_validation(candidates, [np.array([3, 1])], validation)
    np.testing.assert_array_equal(chosen, [2, 0])


def test_choose_by_validation_paired_test_needs_a_win_beyond_the_noise():
    """Per-window validation values: a candidate replaces the start only if its mean gain exceeds z standard
    errors of the per-window differences (brute-checked against the definition)."""
    from allocator.solvers._validation import choose_by_validation
    rng = np.random.default_rng(0)
    start, cand = np.array([0]), np.array([1])
    base = rng.normal(1.0, 0.1, 16)
    for gain, noise in ((0.05, 0.01), (0.005, 0.05), (0.02, 0.02), (-0.01, 0.01)):
        diff = gain + rng.normal(0, noise, 16)
        values = {0: base, 1: base - diff}
        chosen, record = choose_by_validation([cand], [start], lambda x: values[int(x[0])], z=2.0)
        wins = diff.mean() > 2.0 * diff.std(ddof=1) / 4.0
        assert record["chosen"] == ("candidate 0" if wins else "start")
        assert record["margin"] == pytest.approx(2.0 * diff.std(ddof=1) / 4.0)
    # clear win: taken; a win within the noise: the start stays, though the candidate's mean is lower
    assert choose_by_validation([cand], [start], lambda x: base - 0.05 * int(x[0]))[1]["chosen"] == "candidate 0"
    noise = rng.normal(0, 0.2, 16)
    noisy = base - 0.01 + noise - noise.mean()  # lower on average by exactly 0.01, per-window spread 0.2
    chosen, record = choose_by_validation([cand], [start], lambda x: noisy if x[0] else base)
    assert record["candidate_values"][0] < record["start_values"][0] and record["chosen"] == "start"
