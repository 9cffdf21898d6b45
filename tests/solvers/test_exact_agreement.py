"""Property tests over 220 seeded random small instances: dp == milp == brute, heuristics never beat them.

Integer tables: dp must equal the certificate exactly. Float tables: dp must be feasible, never better than the
optimum, and no worse than the optimum of the limit tightened by n bucket widths (the bound in dp's docstring).
Infeasible instances: every solver raises Infeasible; exact solvers state exactly brute's best value.
"""
import numpy as np
import pytest

from allocator import Infeasible, Problem, minimize
from allocator.testing import random_tables

RTOL = 1e-7
GROUP_CASES = range(100)
UNIT_CASES = range(120)


def close(a, b):
    return abs(a - b) <= RTOL * max(1.0, abs(a), abs(b))


def outcome(problem, solver, **options):
    """('ok', Result) or ('infeasible', best achievable value stated by the error)."""
    try:
        result = minimize(problem, solver, **options)
    except Infeasible as exc:
        assert f"{exc.best_achievable:.6g}" in str(exc), "the message must state the best achievable value"
        return "infeasible", exc.best_achievable
    assert result.feasible, f"{solver} returned an infeasible answer: {result.summary()}"
    return "ok", result


def with_limit(problem, limit):
    """The same problem with another limit (None when that limit is not a valid budget)."""
    if problem.direction == "min_degradation" and limit < 0:
        return None
    key = "delta" if problem.direction == "min_cost" else "budget"
    grouping = problem.grouping if problem.grouping != "fixed" else [problem.layer_ids[g] for g in problem.fixed_groups]
    return Problem(problem.tables, problem.cost_kind, grouping=grouping, max_groups=problem.max_groups,
                   group_degradation=problem.group_degradation, **{key: limit})


def make_problem(seed, grouped):
    rng = np.random.default_rng(10_000 * grouped + seed)
    integer = seed % 2 == 0
    direction = "budget" if seed % 4 < 2 else "delta"
    per_layer = int(rng.integers(1, 3))
    if grouped:
        layers, m = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        while m * (m + 1) ** (layers - 1) > 60_000:
            m -= 1
    else:
        layers, m = int(rng.integers(1, 7)), int(rng.integers(1, 6))
        while m ** layers > 20_000:
            layers -= 1
        layers, per_layer = layers, 1
    tables = random_tables(seed, n_units=layers * per_layer, n_levels=m, integer=integer, units_per_layer=per_layer)
    matrix = tables.degradation if direction == "delta" else tables.costs["cost"]
    low, high = matrix.min(axis=1).sum(), matrix.max(axis=1).sum()
    limit = float(low + rng.uniform(-0.15, 1.05) * (high - low))
    kwargs = {}
    if grouped:
        kwargs["grouping"] = "consecutive"
        if rng.random() < 0.5:
            kwargs["max_groups"] = int(rng.integers(1, layers + 1))
        if rng.random() < 0.4:   # a measured group table covering some spans (interactions inside a group)
            kwargs["group_degradation"] = {
                (i, j): np.sort(rng.integers(0, 12, m) if integer else rng.random(m)).astype(float) * (j - i + 1)
                for i in range(layers) for j in range(i, layers) if rng.random() < 0.6}
    if direction == "budget":
        limit = max(limit, 0.0)
    return Problem(tables, "cost", **{direction: limit}, **kwargs), integer


def check_exact_agreement(problem, integer, dp_options):
    kind, ref = outcome(problem, "brute")
    items = problem.n_units if problem.grouping == "unit" else min(problem.n_layers, problem.max_groups or 10**9)
    coarse = [] if integer else [("dp", {**dp_options, "buckets": 16})]   # forces the rounding-up repair path
    for solver, options in [("milp", {}), ("dp", dp_options)] + coarse:
        got_kind, got = outcome(problem, solver, **options)
        assert got_kind == kind, f"{solver}: {got_kind} but brute says {kind}"
        if kind == "infeasible":
            assert close(got, ref), f"{solver} states best {got}, brute {ref}"
            continue
        if solver == "milp" or integer or got.info.get("certified_optimal") or got.info.get("exact"):
            assert close(got.objective, ref.objective), f"{solver} {got.objective} != brute {ref.objective}"
            continue
        assert got.objective >= ref.objective - RTOL * max(1.0, abs(ref.objective))   # never beats the optimum
        tight = with_limit(problem, problem.limit - items * got.info["bucket_width"])
        if tight is not None:
            t_kind, t_ref = outcome(tight, "brute")
            if t_kind == "ok":
                assert got.objective <= t_ref.objective + RTOL * max(1.0, abs(t_ref.objective)), \
                    f"dp {got.objective} worse than OPT(limit - n w) = {t_ref.objective}"
    return kind, ref


def check_heuristics(problem, kind, ref):
    min_constrained = ref if kind == "infeasible" else ref.history[0]["min_constrained"]
    for solver in ("greedy", "uniform"):
        got_kind, got = outcome(problem, solver)
        if got_kind == "infeasible":
            assert got >= min_constrained - RTOL * max(1.0, abs(min_constrained))
        else:
            assert kind == "ok", f"{solver} found a feasible answer where brute found none"
            assert got.objective >= ref.objective - RTOL * max(1.0, abs(ref.objective)), f"{solver} beat brute"


@pytest.mark.parametrize("seed", UNIT_CASES)
def test_unit_mode_dp_milp_brute_agree(seed):
    problem, integer = make_problem(seed, grouped=False)
    kind, ref = check_exact_agreement(problem, integer, {})
    check_heuristics(problem, kind, ref)


@pytest.mark.parametrize("seed", GROUP_CASES)
def test_grouped_dp_milp_brute_agree(seed):
    problem, integer = make_problem(seed, grouped=True)
    kind, ref = check_exact_agreement(problem, integer, {"two_phase": False})
    check_heuristics(problem, kind, ref)
    two_kind, two = outcome(problem, "dp")       # default: ASAF's two-phase
    assert two_kind == kind
    if kind == "ok":
        assert two.objective >= ref.objective - RTOL * max(1.0, abs(ref.objective))
        if problem.n_levels < 8 and (integer or two.info.get("certified_optimal")):   # coarse grid == fine grid
            assert close(two.objective, ref.objective)


def test_two_phase_agreement_rate_with_narrowing():
    """21-level grid (narrowing active): two-phase equals the full DP on most smooth instances; report the rate."""
    from allocator.costs import analytic_tables
    from allocator.synthetic import synthetic_tables
    from allocator.tables import make_levels
    from allocator.tables import Tables
    equal, total, worst = 0, 0, 0.0
    full_model = analytic_tables("smollm2-135m", make_levels(s=np.linspace(0, 0.8, 21)))
    for seed in range(6):
        first = slice(seed, seed + 12)      # 12 consecutive layers keep the full fine DP quick
        part = Tables(full_model.units[first], full_model.levels, {k: v[first] for k, v in full_model.costs.items()})
        tables = synthetic_tables(part, seed)
        for kwargs in ({"sparsity": 0.4}, {"delta": float(tables.degradation[:, 10].sum())}):
            for max_groups in (None, 4):
                problem = Problem(tables, "flops_prefill", grouping="consecutive", max_groups=max_groups, **kwargs)
                full = minimize(problem, "dp", two_phase=False)
                two = minimize(problem, "dp")
                assert two.feasible and two.objective >= full.info["lower_bound"] * (1 - 1e-9)
                gap = (two.objective - full.objective) / abs(full.objective)
                equal += gap <= 1e-9
                worst, total = max(worst, gap), total + 1
    print(f"two-phase == full fine DP on {equal}/{total} instances; worst relative gap {worst:.2e}")
    assert equal >= 0.75 * total and worst < 0.01


def test_fixed_groups_dp_milp_brute_agree():
    for seed in range(10):
        tables = random_tables(seed, n_units=6, n_levels=4, integer=True)
        budget = float(tables.costs["cost"].mean(axis=1).sum())
        problem = Problem(tables, "cost", budget=budget, grouping=[[0, 3], [1, 2], [4, 5]])
        objectives = {s: minimize(problem, s).objective for s in ("brute", "milp", "dp")}
        assert len({round(v, 9) for v in objectives.values()}) == 1, objectives


def test_dp_exact_on_larger_integer_instance():
    for seed in range(3):
        tables = random_tables(seed, n_units=30, n_levels=6, integer=True)
        problem = Problem(tables, "cost", budget=float(tables.costs["cost"].mean(axis=1).sum()))
        dp, milp = minimize(problem, "dp"), minimize(problem, "milp")
        assert dp.info["exact"] and dp.objective == milp.objective


def test_dp_float_bound_recorded():
    tables = random_tables(5, n_units=40, n_levels=8)
    problem = Problem(tables, "cost", budget=float(tables.costs["cost"].mean(axis=1).sum()))
    result = minimize(problem, "dp", buckets=50)          # coarse on purpose: the repair path must hold
    certificate = minimize(problem, "milp").objective
    assert result.feasible and result.info["lower_bound"] <= certificate + 1e-9 <= result.objective + 2e-9


def test_brute_refuses_large_instances():
    problem = Problem(random_tables(0, n_units=30, n_levels=4), "cost", sparsity=0.3)
    with pytest.raises(ValueError, match=r"1\.15e\+18 candidates.*milp"):
        minimize(problem, "brute")


def test_table_solvers_refuse_callables_greedy_accepts_them():
    tables = random_tables(1, n_units=5, n_levels=4)
    deg = lambda U: tables.degradation[np.arange(5), U].sum(axis=1).__abs__() ** 1.5   # non-additive true objective
    problem = Problem(tables, "cost", budget=float(tables.costs["cost"].mean(axis=1).sum()), degradation_fn=deg)
    for solver in ("dp", "milp"):
        with pytest.raises(TypeError, match="additive"):
            minimize(problem, solver)
    greedy, brute = minimize(problem, "greedy"), minimize(problem, "brute")
    assert greedy.feasible and greedy.objective >= brute.objective - 1e-12
