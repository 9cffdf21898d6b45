"""Bad-input catalogue of the solver layer: every bad solver option, seed or Problem argument given to
``minimize`` / ``Problem`` is the project's own error (or a standard one) whose message names the input and
says what would fit."""
from __future__ import annotations

import numpy as np
import pytest

from allocator import Problem, analytic_tables, make_levels, minimize
from allocator.registry import UnknownSolver
from allocator.solvers import SolverOptionError
from allocator.synthetic import synthetic_tables

TABLES = synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=[0.0, 0.25, 0.5, 0.75])), seed=0)
N, M = TABLES.n_units, TABLES.n_levels


def budget(**kw):
    return Problem(TABLES, "bytes_decode", sparsity=0.4, **kw)


def measured(unit_levels, fidelity=None):
    return float(TABLES.degradation[np.arange(N), unit_levels].sum())


def solve(solver, **options):
    return lambda: minimize(budget(), solver, progress=False, **options) if solver in ("evo", "bayes") \
        else minimize(budget(), solver, **options)


def search(solver):
    pytest.importorskip("pymoo" if solver == "evo" else "optuna")


# (id, call, exception type, substrings the message must hold: the input, then the fix)
CASES = [
    ("milp-misspelt", solve("milp", tim_limit=5), SolverOptionError, ["'tim_limit'", "did you mean 'time_limit'"]),
    ("dp-misspelt", solve("dp", buckts=10), SolverOptionError, ["'buckts'", "did you mean 'buckets'", "two_phase"]),
    ("dp-buckets-zero", solve("dp", buckets=0), SolverOptionError, ["buckets=0", "integer >= 1"]),
    ("dp-buckets-negative", solve("dp", buckets=-3), SolverOptionError, ["buckets=-3", "integer >= 1"]),
    ("dp-buckets-text", solve("dp", buckets="ten"), SolverOptionError, ["buckets='ten'", "integer >= 1"]),
    ("dp-two-phase-text", solve("dp", two_phase="yes"), SolverOptionError, ["two_phase='yes'", "True or False"]),
    ("milp-time-negative", solve("milp", time_limit=-5), SolverOptionError, ["time_limit=-5", "> 0"]),
    ("milp-gap-nan", solve("milp", mip_rel_gap=float("nan")), SolverOptionError, ["mip_rel_gap=nan", ">= 0"]),
    ("greedy-moves", solve("greedy", moves="some"), SolverOptionError, ["moves='some'", "'auto', 'next', 'any'"]),
    ("uniform-takes-none", solve("uniform", level=2), SolverOptionError, ["'level'", "takes no options"]),
    ("brute-max-zero", solve("brute", max_candidates=0), SolverOptionError, ["max_candidates=0", ">= 1"]),
    ("evo-pop-zero", solve("evo", pop_size=0), SolverOptionError, ["pop_size=0", "integer >= 1"]),
    ("evo-gen-zero", solve("evo", n_gen=0), SolverOptionError, ["n_gen=0", "integer >= 1"]),
    ("evo-evals-zero", solve("evo", max_evals=0), SolverOptionError, ["max_evals=0", "integer >= 1"]),
    ("evo-evals-negative", solve("evo", max_evals=-1), SolverOptionError, ["max_evals=-1", "integer >= 1"]),
    ("evo-time-zero", solve("evo", max_time=0), SolverOptionError, ["max_time=0", "> 0"]),
    ("evo-p-switch", solve("evo", p_switch=1.5), SolverOptionError, ["p_switch=1.5", "[0, 1]"]),
    ("evo-multi-step", solve("evo", multi_step=[(0, 4)]), SolverOptionError, ["multi_step=[(0, 4)]", "pairs"]),
    ("evo-preset", solve("evo", preset="rsparce"), SolverOptionError, ["preset='rsparce'", "'rsparse'"]),
    ("evo-fitness-word", solve("evo", fitness="true"), SolverOptionError, ["fitness='true'", "'measured'"]),
    ("evo-old-objective", solve("evo", objective="true"), SolverOptionError, ["'objective'", "renamed to 'fitness'"]),
    ("evo-measured-missing", solve("evo", fitness="measured"), SolverOptionError,
     ["fitness='measured'", "measured_objective="]),
    ("evo-warm-above-grid", solve("evo", warm_start=[M] * N, n_gen=2), SolverOptionError,
     ["warm_start=", f"integers in [0, {M - 1}]"]),
    ("evo-warm-short", solve("evo", warm_start=[0, 1], n_gen=2), SolverOptionError,
     ["warm_start=[0, 1]", f"length {N}"]),
    ("evo-warm-name", solve("evo", warm_start="dpp"), SolverOptionError, ["warm_start='dpp'", "'dp'"]),
    ("evo-validation-top", solve("evo", validation_top=0), SolverOptionError, ["validation_top=0", ">= 1"]),
    ("bayes-trials-zero", solve("bayes", n_trials=0), SolverOptionError, ["n_trials=0", "integer >= 1"]),
    ("bayes-sampler", solve("bayes", sampler="cmaes"), SolverOptionError, ["sampler='cmaes'", "'tpe'"]),
    ("bayes-storage-syntax", solve("bayes", storage="sqlite//study.db"), SolverOptionError,
     ["storage='sqlite//study.db'", "sqlite:///study.db"]),
    ("bayes-storage-driver", solve("bayes", storage="nosuchdb://host/db", n_trials=2), SolverOptionError,
     ["storage='nosuchdb://host/db'", "could not be opened", "sqlite:///"]),
    ("seed-text", lambda: minimize(budget(), "dp", seed="abc"), SolverOptionError, ["seed='abc'", "integer >= 0"]),
    ("seed-negative", lambda: minimize(budget(), "dp", seed=-2), SolverOptionError, ["seed=-2", "integer >= 0"]),
    ("unknown-solver", lambda: minimize(budget(), "dpp"), UnknownSolver, ["'dpp'", "did you mean 'dp'", "milp"]),
    ("not-a-problem", lambda: minimize(TABLES, "dp"), TypeError, ["allocator.Problem", "Tables"]),
    ("max-groups-fraction", lambda: Problem(TABLES, "bytes_decode", sparsity=0.4, grouping="consecutive",
                                            max_groups=2.5), ValueError, ["max_groups=2.5", "integer >= 1"]),
    ("max-groups-ungrouped", lambda: budget(max_groups=2), ValueError, ["max_groups=2", "grouping='consecutive'"]),
    ("sparsity-above-one", lambda: Problem(TABLES, "bytes_decode", sparsity=1.5), ValueError, ["sparsity", "[0, 1)"]),
    ("measured-not-callable", lambda: budget(measured_objective="ppl"), TypeError, ["measured_objective", "callable"]),
    ("measured-with-delta", lambda: minimize(Problem(TABLES, "bytes_decode", delta=1.0, measured_objective=measured),
                                             "evo", progress=False), ValueError, ["measured objective", "budget="]),
]


@pytest.mark.parametrize("call, error, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_itself_and_the_fix(request, call, error, words):
    case = request.node.callspec.id
    if case.startswith(("evo-", "measured-with")):
        search("evo")
    elif case.startswith("bayes-"):
        search("bayes")
    with pytest.raises(error) as err:
        call()
    assert type(err.value).__module__.startswith(("allocator", "builtins")), type(err.value)
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_the_catalogue_is_large_and_distinct():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_a_search_budget_spent_before_any_feasible_score_names_the_budget_not_an_achievable_cost():
    search("evo")
    import time

    def slow(unit_levels, fidelity=None):
        time.sleep(0.02)
        return measured(unit_levels)

    for solver in ("evo", "bayes"):
        search(solver)
        with pytest.raises(SolverOptionError, match=r"max_time=1e-06 ran out .*raise max_time") as err:
            minimize(budget(measured_objective=slow), solver, max_time=1e-6, repair=False, progress=False)
        assert "achievable" not in str(err.value)
