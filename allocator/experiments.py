"""The experiment registry: ``experiment=<name>`` picks the job the CLI runs.

A job is ``run(config: JobConfig, output_dir: Path) -> dict``. Built-ins are named by module path and imported
only when chosen, so the torch-free core never imports the real-model stages: ``synthetic`` (this module) solves
analytic tables with a seeded synthetic degradation table; ``smollm2`` (``allocator.evaluators.stages``) is the
real-model main job. ``register_experiment(name)`` adds one from Python.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from .config import ConfigError, JobConfig

BUILTIN_EXPERIMENTS = {"synthetic": "allocator.experiments:run_synthetic",
                       "smollm2": "allocator.evaluators.stages:run_main_job"}
_EXPERIMENTS: dict[str, Callable] = {}


def register_experiment(name: str):
    def decorate(fn):
        _EXPERIMENTS[name] = fn
        return fn
    return decorate


def get_experiment(name: str) -> Callable:
    if name in _EXPERIMENTS:
        return _EXPERIMENTS[name]
    if name not in BUILTIN_EXPERIMENTS:
        raise ConfigError(f"unknown experiment '{name}'; registered: {sorted({*BUILTIN_EXPERIMENTS, *_EXPERIMENTS})}")
    module, _, attr = BUILTIN_EXPERIMENTS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise SystemExit(f"experiment '{name}' needs the real-model extras: pip install 'layer-allocator[torch]' "
                         f"({exc})") from exc


def build_problem(config: JobConfig, tables, **extra):
    """The ``Problem`` of the budget and problem groups over ``tables``."""
    from .problem import Problem

    side = {kind: float(share) * float(tables.dense_cost(kind).sum()) for kind, share in
            config.problem.side_limits.items()}
    return Problem(tables, cost=config.problem.cost, grouping=config.problem.grouping,
                   max_groups=config.problem.max_groups, side_limits=side,
                   **{config.budget.kind: float(config.budget.value)}, **extra)


def save_result(result, out: Path) -> None:
    result.allocation.to_json(out / "allocation.json")
    result.to_dataframe().to_parquet(out / "result.parquet", index=False)
    if result.history:
        result.history_frame().to_parquet(out / "history.parquet", index=False)


def run_synthetic(config: JobConfig, out: Path) -> dict:
    """Analytic cost tables + a seeded synthetic degradation table, solved, with the uniform baseline."""
    from . import analytic_tables, minimize
    from .plot import plot_allocation
    from .synthetic import synthetic_tables

    exp = config.experiment
    levels = exp.levels.make()
    tables = synthetic_tables(analytic_tables(exp.model_config, levels, unit=exp.unit, tokens=exp.tokens),
                              seed=config.seed)
    tables.save(out / "tables")
    problem = build_problem(config, tables)
    result = minimize(problem, config.solver.name, seed=config.seed, **config.solver.options)
    save_result(result, out)
    uniform = None
    if config.solver.name != "uniform":
        try:
            uniform = minimize(problem, "uniform")
        except ValueError:
            pass
    shown = {config.solver.name: result.allocation, **({"uniform": uniform.allocation} if uniform else {})}
    plot_allocation(shown, title=f"{exp.model_config}: {problem.direction} ({problem.cost_kind})").savefig(
        out / "allocation.png", dpi=120)
    lines = [f"# allocator: synthetic job on {exp.model_config}", "",
             f"- problem: {problem.describe()}", f"- solver: {result.summary()}"]
    if uniform is not None:
        lines.append(f"- uniform baseline: {uniform.summary()}")
    lines += ["", "![allocation](allocation.png)", "", result.allocation.to_frame().to_markdown(index=False)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if config.print_allocation:
        print(result.allocation.to_frame().to_string(index=False))
    print(result.summary())
    if uniform is not None:
        print("baseline " + uniform.summary())
    return {"objective": result.objective, "feasible": result.feasible}
