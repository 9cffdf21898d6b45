"""Command line: ``python -m allocator`` / ``allocator`` (Hydra).

The ``experiment`` config group picks the job: ``smollm2`` (the default; the real-model pipeline of
``allocator.evaluators``) calibrates, profiles, solves, applies and measures a real model, the embedded
SmolLM2-135M unless ``model.name`` says otherwise; ``synthetic`` solves analytic cost tables of a shipped model
config with a seeded synthetic degradation table (torch-free).
Every run writes ``allocation.json``, ``result.parquet`` and ``report.md`` into Hydra's output directory.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger("allocator")


def build_problem(cfg: DictConfig, tables):
    from .problem import Problem

    kind = cfg.budget.kind
    if kind not in ("sparsity", "delta", "budget"):
        raise ValueError(f"unknown budget.kind '{kind}'; use sparsity, delta or budget")
    return Problem(tables, cost=cfg.problem.cost, grouping=cfg.problem.grouping,
                   max_groups=cfg.problem.max_groups, **{kind: float(cfg.budget.value)})


def run_synthetic(cfg: DictConfig, out: Path) -> dict:
    from . import analytic_tables, make_levels, minimize
    from .synthetic import synthetic_tables

    exp = cfg.experiment
    levels = make_levels(s=list(exp.levels.s), rho=list(exp.levels.rho), bits=list(exp.levels.bits))
    tables = synthetic_tables(analytic_tables(exp.model_config, levels, unit=exp.unit, tokens=exp.tokens), seed=cfg.seed)
    tables.save(out / "tables")
    problem = build_problem(cfg, tables)
    options = solver_options(cfg)
    result = minimize(problem, cfg.solver.name, seed=cfg.seed, **options)
    save_result(result, out)
    uniform = None
    if cfg.solver.name != "uniform":
        try:
            uniform = minimize(problem, "uniform")
        except ValueError:
            pass
    from .plot import plot_allocation
    shown = {cfg.solver.name: result.allocation, **({"uniform": uniform.allocation} if uniform is not None else {})}
    plot_allocation(shown, title=f"{exp.model_config}: {problem.direction} ({problem.cost_kind})").savefig(
        out / "allocation.png", dpi=120)
    lines = [f"# allocator: synthetic job on {exp.model_config}", "",
             f"- problem: {problem.describe()}", f"- solver: {result.summary()}"]
    if uniform is not None:
        lines.append(f"- uniform baseline: {uniform.summary()}")
    lines += ["", "![allocation](allocation.png)", "", result.allocation.to_frame().to_markdown(index=False)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if cfg.print_allocation:
        print(result.allocation.to_frame().to_string(index=False))
    print(result.summary())
    if uniform is not None:
        print("baseline " + uniform.summary())
    return {"objective": result.objective, "feasible": result.feasible}


def solver_options(cfg: DictConfig) -> dict:
    options = cfg.solver.get("options")
    return dict(OmegaConf.to_container(options, resolve=True)) if options else {}


def save_result(result, out: Path):
    result.allocation.to_json(out / "allocation.json")
    result.to_dataframe().to_parquet(out / "result.parquet", index=False)
    if result.history:
        result.history_frame().to_parquet(out / "history.parquet", index=False)


@hydra.main(version_base="1.3", config_path="pkg://allocator.conf", config_name="config")
def hydra_main(cfg: DictConfig):
    out = Path(HydraConfig.get().runtime.output_dir)
    logger.info("output directory: %s", out)
    name = cfg.experiment.name
    if name == "synthetic":
        summary = run_synthetic(cfg, out)
    else:
        try:
            from .evaluators.pipeline import run_pipeline
        except ImportError as exc:
            raise SystemExit(f"experiment '{name}' needs the real-model pipeline: pip install 'layer-allocator[torch]' "
                             f"({exc})") from exc
        summary = run_pipeline(cfg, out)
    print(f"outputs written to {out}")
    return summary.get("objective") if isinstance(summary, dict) else None


def main():
    """Console-script entry point (Hydra exits non-zero itself when the job raises)."""
    hydra_main()


if __name__ == "__main__":
    main()
