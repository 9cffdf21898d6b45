"""The README's plug-in examples run as written and plug in: a solver, a cost provider, a method, an evaluator."""
import re
from pathlib import Path

import numpy as np
import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SNIPPETS = {m.group(1): m.group(0) for m in re.finditer(r"```python\n# (an? [a-z ]+?):.*?```", README, re.S)}


def run(name: str) -> dict:
    code = SNIPPETS[name].removeprefix("```python\n").removesuffix("```")
    scope: dict = {}
    exec(compile(code, f"README:{name}", "exec"), scope)
    return scope


def smol_tables():
    from allocator import analytic_tables, make_levels
    from allocator.synthetic import synthetic_tables
    return synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=[0, 0.3, 0.6])), seed=0)


def test_the_readme_solver_plugs_into_minimize_with_validated_options():
    from allocator import Problem, minimize
    from allocator.solvers.options import SolverOptionError
    run("a solver")
    problem = Problem(smol_tables(), sparsity=0.2)
    assert set(minimize(problem, "lowest", level=2).x) == {2}
    with pytest.raises(SolverOptionError, match="level"):
        minimize(problem, "lowest", levl=2)


def test_the_readme_cost_provider_prices_a_new_kind():
    from allocator import Problem, minimize
    from allocator.cost_providers import with_costs
    run("a cost provider")
    tables = with_costs(smol_tables(), "weight_params")
    assert tables.cost("weight_params")[0, 0] == tables.units[0].params
    assert minimize(Problem(tables, cost="weight_params", sparsity=0.3), "dp").feasible


def test_the_readme_method_and_evaluator_run_on_the_real_model(small_model, eval_windows):
    pytest.importorskip("torch")
    from allocator.evaluators import CompressionPlan, compressed, get_method
    from allocator.evaluators.metrics import evaluate, logits_of
    from allocator.evaluators.plan import uniform_targets
    run("a compression method")
    run("an evaluator")
    model = small_model[0]
    dense = logits_of(model, eval_windows[:1])
    with compressed(model, CompressionPlan.build(model, get_method("halve"), uniform_targets(4, {"s": 0.5}))):
        assert not np.allclose(logits_of(model, eval_windows[:1]).numpy(), dense.numpy())
    assert evaluate("tokens", model, windows=eval_windows)["tokens"] == eval_windows.numel()
