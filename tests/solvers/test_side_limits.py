"""A second constraint (side limits): milp and the search solvers against brute force; clear errors elsewhere."""
import numpy as np
import pytest

from allocator import Problem, Tables, Unit, make_levels, minimize
from allocator.problem import Infeasible


def _tables(seed: int, n_units: int = 5, n_levels: int = 4) -> Tables:
    rng = np.random.default_rng(seed)
    units = [Unit(f"u{i}", i) for i in range(n_units)]
    cost = rng.uniform(1, 10, (n_units, n_levels))
    side = rng.uniform(1, 10, (n_units, n_levels))
    deg = rng.uniform(0, 1, (n_units, n_levels))
    return Tables(units, make_levels(s=np.linspace(0, 0.6, n_levels)), {"bytes_decode": cost, "time_prefill": side},
                  deg)


@pytest.mark.parametrize("seed", range(6))
def test_milp_equals_brute_force_with_a_side_limit(seed):
    t = _tables(seed)
    budget = 0.7 * t.cost("bytes_decode").max(1).sum()
    side = 0.55 * t.cost("time_prefill").max(1).sum()
    problem = Problem(t, budget=budget, side_limits={"time_prefill": side})
    try:
        exact = minimize(problem, "brute")
    except Infeasible:
        with pytest.raises(Infeasible):
            minimize(problem, "milp")
        return
    got = minimize(problem, "milp")
    assert got.feasible and got.degradation == pytest.approx(exact.degradation, abs=1e-9)
    assert t.cost("time_prefill")[np.arange(5), got.x].sum() <= side + 1e-9
    unconstrained = minimize(Problem(t, budget=budget), "milp")
    assert unconstrained.degradation <= got.degradation + 1e-12     # the side limit can only cost


def test_search_solvers_return_allocations_within_the_side_limit():
    t = _tables(3)
    side = 0.5 * t.cost("time_prefill").max(1).sum()
    problem = Problem(t, budget=0.7 * t.cost("bytes_decode").max(1).sum(), side_limits={"time_prefill": side})
    result = minimize(problem, "evo", max_evals=600)
    assert result.feasible and t.cost("time_prefill")[np.arange(5), result.x].sum() <= side + 1e-9


def test_solvers_that_cannot_honour_a_side_limit_say_which_can():
    t = _tables(0)
    problem = Problem(t, budget=40.0, side_limits={"time_prefill": 30.0})
    with pytest.raises(ValueError, match=r"cannot honour side limits \['time_prefill'\].*'milp'"):
        minimize(problem, "dp")


def test_bad_side_limits_are_clear_errors():
    t = _tables(0)
    with pytest.raises(Exception, match="no such cost kind"):
        Problem(t, budget=40.0, side_limits={"time_prefil": 30.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        Problem(t, budget=40.0, side_limits={"time_prefill": float("nan")})
    least = t.cost("time_prefill").min(1).sum()
    with pytest.raises(Infeasible, match="side limit time_prefill"):
        minimize(Problem(t, budget=1e9, side_limits={"time_prefill": 0.5 * least}), "milp")
