"""Solver options: every registered solver validates them through its Options dataclass; the shipped YAML agrees
with the dataclass defaults; a seed fixes the answer byte for byte."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from allocator import Problem, analytic_tables, available_solvers, get_solver, make_levels, minimize
from allocator.solvers.options import SolverOptionError, SolverOptions
from allocator.synthetic import synthetic_tables

CONF = Path(__file__).resolve().parents[2] / "conf" / "solver"
YAML_PRESETS = {("milp", "time_limit")}   # documented non-default CLI presets (the comment in the YAML says why)


def _solver_class(name):
    try:
        return get_solver(name)
    except ImportError as exc:  # evo / bayes without the [search] extra
        pytest.skip(str(exc))


def _misspelt(name: str) -> str:
    """A key that is not an option: the first option with two letters swapped, or a made-up one."""
    names = _solver_class(name).Options.names()
    if not names:
        return "iterations"
    first = names[0]
    return first[:1] + first[2:3] + first[1:2] + first[3:] if len(first) > 3 else first + "x"


@pytest.fixture(scope="module")
def small_problem():
    tables = synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=[0.0, 0.25, 0.5, 0.75])), seed=0)
    return Problem(tables, "bytes_decode", sparsity=0.4)


@pytest.mark.parametrize("name", available_solvers())
def test_every_solver_rejects_a_misspelt_option_listing_the_valid_ones(name):
    cls = _solver_class(name)
    assert issubclass(cls.Options, SolverOptions) and dataclasses.is_dataclass(cls.Options)
    key = _misspelt(name)
    with pytest.raises(SolverOptionError) as err:
        cls(**{key: 1})
    message = str(err.value)
    assert f"'{key}'" in message and f"'{name}'" in message
    assert all(valid in message for valid in cls.Options.names())
    assert err.value.option == key and err.value.solver == name


@pytest.mark.parametrize("name", available_solvers())
def test_every_solver_builds_from_its_defaults_given_explicitly(name):
    cls = _solver_class(name)
    defaults = cls.Options()
    solver = cls(**defaults.as_dict())
    assert solver.options == defaults and cls().options == defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.options.__setattr__(next(iter(defaults.as_dict()), "x"), None)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_yaml_builds_and_agrees_with_the_dataclass_defaults(path):
    conf = yaml.safe_load(path.read_text())
    cls = _solver_class(conf["name"])
    options = cls(**(conf.get("options") or {})).options
    defaults = cls.Options()
    for key in conf.get("options") or {}:
        if (conf["name"], key) not in YAML_PRESETS:
            assert getattr(options, key) == getattr(defaults, key), f"{path.name}: {key} contradicts the dataclass"
    presets = getattr(cls.Options, "PRESETS", {})
    preset_keys = {k for bundle in presets.values() for k in bundle}
    assert not preset_keys & set(conf.get("options") or {}), "a key a preset sets would override the preset"


def test_preset_fills_only_the_options_not_given():
    evo = _solver_class("evo")
    assert evo(preset="rsparse").options.pop_size == 32 and evo(preset="rsparse").options.n_gen == 5
    assert evo(preset="evopress").options.pop_size == 8
    assert evo(preset="evopress", pop_size=12).options.pop_size == 12


@pytest.mark.parametrize("solver, options", [
    ("dp", {}), ("evo", {"n_gen": 3, "pop_size": 8, "progress": False}),
    ("bayes", {"n_trials": 8, "n_startup_trials": 4, "progress": False}),
])
def test_same_seed_gives_byte_identical_allocation_json(small_problem, tmp_path, solver, options):
    _solver_class(solver)
    paths = [minimize(small_problem, solver, seed=5, **options).allocation.to_json(tmp_path / f"{solver}{k}.json")
             for k in range(2)]
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize("solver, budget", [
    ("evo", {"max_evals": 0}), ("evo", {"max_evals": -1}), ("evo", {"max_time": 0}),
    ("bayes", {"n_trials": 0}), ("bayes", {"max_time": -1.0}), ("evo", {"pop_size": 0}), ("evo", {"n_gen": 0}),
])
def test_a_zero_or_negative_search_budget_is_an_option_error_not_infeasible(small_problem, solver, budget):
    _solver_class(solver)
    (key, value), = budget.items()
    with pytest.raises(SolverOptionError, match=rf"{key}={value!r} is invalid: expected .*(>= 1|> 0)") as err:
        minimize(small_problem, solver, progress=False, **budget)
    assert "infeasible" not in str(err.value).lower() and "achievable" not in str(err.value)


def test_warm_start_outside_the_level_grid_is_refused_not_clipped(small_problem):
    _solver_class("evo")
    top = small_problem.n_levels - 1
    for bad in ([top + 1] * small_problem.n_units, [-1] * small_problem.n_units, [0, 1], [0.5] * small_problem.n_units):
        with pytest.raises(SolverOptionError, match=rf"warm_start=.*integers in \[0, {top}\]"):
            minimize(small_problem, "evo", warm_start=bad, n_gen=2, pop_size=4, progress=False)
    good = [1] * small_problem.n_units
    assert minimize(small_problem, "evo", warm_start=good, n_gen=2, pop_size=4, progress=False).feasible


def test_bayes_storage_that_cannot_be_opened_names_the_option(small_problem, tmp_path):
    _solver_class("bayes")
    for url in ("nosuchdb://host/x", f"sqlite:///{tmp_path}/missing/dir/study.db"):
        with pytest.raises(SolverOptionError, match=r"(?s)storage=.*could not be opened.*sqlite:///"):
            minimize(small_problem, "bayes", storage=url, n_trials=2, progress=False)
    with pytest.raises(SolverOptionError, match=r"storage='sqlite//study.db' is invalid: expected .*database URL"):
        minimize(small_problem, "bayes", storage="sqlite//study.db", n_trials=2, progress=False)


def test_seed_is_checked_once_for_every_solver(small_problem):
    for seed in ("abc", -1, 1.5, True):
        with pytest.raises(SolverOptionError, match=r"seed=.* expected None or an integer >= 0"):
            minimize(small_problem, "uniform", seed=seed)
    assert minimize(small_problem, "uniform", seed=np.int64(3)).feasible
