"""The main job as stages: load -> data -> calibrate -> tables -> profile -> solve -> plan -> measure -> report.

Each stage is a short function over the typed config (``allocator.config``); ``run_main_job`` is their list. The
CLI (``experiment=smollm2``) and the studies call these stages, so a default lives only in the config
dataclasses and a study measures what the main job measures.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from allocator import Allocation, analytic_tables, minimize
from allocator.config import JobConfig, check_solver_options, load_config
from allocator.experiments import build_problem, save_result
from allocator.levels import Level
from allocator.refine import refine_grid, refine_tables
from allocator.tables import TablesError

from . import distributed
from .calibration import for_allocations
from .distributed import share_objective
from .methods import Method, get_method
from .models import load_model, model_id
from .plan import CompressionPlan
from .profiling import profile
from .text import token_windows

logger = logging.getLogger(__name__)


class Stopwatch:
    """Seconds per stage, in order (the report's timings table)."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 2)
        self._clock = now
        logger.info("%s done in %.1f s", name, self.timings[name])


@dataclass
class Windows:
    calibration: torch.Tensor
    profile: torch.Tensor
    evaluation: dict[str, torch.Tensor]


@dataclass
class Solution:
    result: object
    allocations: dict[str, Allocation]          # {"uniform": ..., <solver>: ...}
    predicted: dict[str, float]
    measured_evaluations: int | None = None


@dataclass
class Grid:
    """The level grid the job profiles, and the operating level (the budget's uniform level) when there is one."""
    levels: object
    operating: Level | None = None


# ---------------------------------------------------------------------------------------------- stages
def load(config: JobConfig):
    from .models import set_threads
    set_threads(config.model.threads)
    torch.manual_seed(config.seed)
    m = config.model
    return load_model(m.name, gguf_file=m.gguf_file, dtype=m.dtype, device=m.device, device_map=m.device_map,
                      max_layers=m.max_layers)


def level_grid(config: JobConfig) -> Grid:
    """The method's grid cut to the trust region around the budget, and the operating level on it."""
    levels = config.method.levels.make()
    kind, value = config.budget.kind, float(config.budget.value)
    if kind == "sparsity" and config.profile.window is not None:
        keep = (levels["s"] - value).abs() <= config.profile.window + 1e-9
        if not keep.any():
            raise TablesError(f"no level of the grid lies within profile.window={config.profile.window} of the "
                              f"budget sparsity {value}; widen the window or add levels near {value}")
        levels = levels[keep].reset_index(drop=True)
    operating = operating_level(levels, value, config.method.operating_rho) if kind == "sparsity" else None
    if config.profile.mode == "operating_point" and operating is None:
        raise ValueError("profile.mode=operating_point needs budget=sparsity (the uniform operating level)")
    return Grid(levels, operating)


def operating_level(levels, sparsity: float, rho: float = 1.0) -> Level:
    """The grid level at the budget's sparsity (the uniform baseline and the operating point)."""
    s_grid = sorted(set(levels["s"].round(6)))
    if not s_grid[0] <= sparsity <= s_grid[-1]:
        raise TablesError(f"budget sparsity {sparsity} lies outside the level grid s in [{s_grid[0]}, {s_grid[-1]}]; "
                          f"extend method.levels.s or lower budget.value")
    hit = levels[(levels["s"].sub(sparsity).abs() < 1e-9) & (levels["rho"].sub(rho).abs() < 1e-9)]
    if hit.empty:
        raise TablesError(f"budget sparsity {sparsity} (rho {rho}) is not a level of the grid s={s_grid}, "
                          f"rho={sorted(set(levels['rho']))}; add it to method.levels or choose a grid value")
    return Level(float(sparsity), float(rho), fmt=str(hit.iloc[0]["fmt"]))


def data(config: JobConfig, tokenizer) -> Windows:
    d, seed = config.data, config.seed
    return Windows(token_windows(tokenizer, d.calibration, d.calibration_windows, d.calibration_length, seed),
                   token_windows(tokenizer, d.profile, d.profile_windows, d.profile_length, seed + 1),
                   {src: token_windows(tokenizer, src, d.eval_windows, d.eval_length, seed) for src in d.evaluation})


def rotate(config: JobConfig, model, windows: Windows):
    """``method.rotation``: rotate the model in place before calibration (rotate -> sparsify -> quantize); the
    ``AppliedRotation`` (saved with the plan), or None."""
    if config.method.rotation == "none":
        return None
    from .rotation import RotationConfig, rotate_
    return rotate_(model, RotationConfig(config.method.rotation, seed=config.seed), windows.calibration,
                   config.data.batch_size)


def calibrate(config: JobConfig, model, windows: Windows) -> Method:
    m = config.method
    method = get_method(m.name, sparse_fraction=m.sparse_fraction, seed=config.seed, quantizer=m.quantizer, **m.options)
    for fmt in sorted(set(m.levels.make()["fmt"])):
        method.check_level(Level(fmt=fmt))
    return method.calibrate(model, windows.calibration, batch_size=config.data.batch_size)


def cost_tables(config: JobConfig, model, grid: Grid):
    """Analytic cost tables of the loaded model's shapes, plus the problem's cost kind from its provider."""
    from allocator.cost_providers import with_costs

    tables = analytic_tables(model.config.to_dict(), grid.levels, unit=config.profile.unit,
                             tokens=config.problem.tokens)
    device = config.model.device if config.model.device.startswith("cuda") else None
    return with_costs(tables, config.problem.cost, device=device, latency_table=config.problem.latency_table,
                      path=config.problem.latency_path if config.problem.cost == "latency_decode" else None)


def check_cost(config: JobConfig) -> None:
    """Fail before loading anything when the problem's cost kind cannot be provided here."""
    from allocator.cost_providers import CostProviderError, check_available

    cost = config.problem.cost
    if cost == "latency_decode" and config.budget.kind == "sparsity":
        raise CostProviderError("problem.cost=latency_decode prices time, and the sparsity budget is a share of the "
                                "dense cost the trust region leaves out: use budget=delta budget.value=<max KL> (the "
                                "fastest allocation within a degradation budget) or budget=absolute "
                                "budget.value=<microseconds>")
    check_available(cost, latency_table=config.problem.latency_table)


def split_mode(config: JobConfig, model, method: Method, grid: Grid) -> str:
    """``profile.split`` resolved: ``auto`` (the default) is ``milp`` where the hybrid applies (layer or block
    units, one rho and one dense format in the grid, a method that wraps each projection itself: teal, rsparse at
    rho 1, oracle_topk) and ``none`` elsewhere, with a log line saying why; ``milp`` and ``none`` as given."""
    p = config.profile
    if p.split != "auto":
        return p.split
    why = None
    slices = grid.levels[["rho", "fmt"]].drop_duplicates()
    if p.unit not in ("layer", "block"):
        why = f"profile.unit={p.unit} is already finer than a layer or block"
    elif len(slices) != 1:
        why = f"the grid has {len(slices)} (rho, format) slices, the split one"
    elif not Level(fmt=str(slices.iloc[0]["fmt"])).format.is_dense:
        why = f"the grid's format {slices.iloc[0]['fmt']} is quantized"
    else:
        from .models import find_projections
        from .plan import temporarily_dense
        level = Level(s=0.5, rho=float(slices.iloc[0]["rho"]), fmt=str(slices.iloc[0]["fmt"]))
        with temporarily_dense(model):
            row = find_projections(model)[0]
            wrapped = [method.wrap(proj, level) for proj in row]
        if any([(w[0], w[1]) for w in wraps] != [(proj.parent, proj.attr)] for proj, wraps in zip(row, wrapped)):
            why = f"method {method.name} does not wrap each projection itself"
    if why is not None:
        logger.info("profile.split=auto: no within-block split (%s); profile.split=none", why)
        return "none"
    return "milp"


def block_split(config: JobConfig, model, method: Method, windows: Windows, grid: Grid):
    """``profile.split``: the hybrid's within-block stage (``evaluators.block_split``) on the calibration
    windows, or None (``split_mode``: ``auto`` resolved)."""
    p = config.profile
    mode = split_mode(config, model, method, grid)
    if mode == "none":
        return None
    from .block_split import BlockSplit, block_errors
    if p.unit not in ("layer", "block"):
        raise ValueError(f"profile.split={mode} splits a layer or block unit over its projections; "
                         f"profile.unit={p.unit} is already finer: use profile.unit=layer or profile.unit=block")
    slices = grid.levels[["rho", "fmt"]].drop_duplicates()
    if len(slices) != 1:
        raise ValueError(f"profile.split needs one rho and one format in method.levels; the grid has "
                         f"{slices.to_dict('records')}")
    template = Level(rho=float(slices.iloc[0]["rho"]), fmt=str(slices.iloc[0]["fmt"]))
    errors = block_errors(model, method, windows.calibration, step=p.split_step, max_s=p.split_max,
                          error_fraction=p.split_error_fraction, template=template,
                          batch_size=config.data.batch_size,
                          cache=(p.cache if p.cache in (True, False, None) else Path(p.cache) / "block_errors"),
                          progress=p.progress)
    return BlockSplit(errors, mode)


def profile_tables(config: JobConfig, model, method: Method, windows: Windows, tables, grid: Grid, split=None):
    p = config.profile
    prof = profile(model, method, windows.profile, grid.levels, tables.units, mode=p.mode,
                   operating_level=grid.operating.to_dict() if grid.operating else None, batch_size=p.batch_size,
                   score_last=config.evaluator.score_last, cache=p.cache, progress=p.progress,
                   distributed=p.distributed, kl_top_k=p.kl_top_k, kl_exact_vocab=p.kl_exact_vocab, expand=split)
    tables = tables.with_degradation(prof.table(p.metric), metric=p.metric, **prof.provenance)
    return (split.price(tables, config.problem.tokens) if split is not None else tables), prof


def solve(config: JobConfig, model, method: Method, windows: Windows, tables, grid: Grid, split=None) -> Solution:
    """The configured solver and the uniform baseline on the same problem."""
    options = dict(config.solver.options)
    measured = shared = None
    if options.get("fitness") == "measured":       # search solvers scoring candidates on the model itself
        measured = measured_objective(config, model, method, windows, tables, split)
        shared = share_objective(measured)         # under torchrun: batches scored across the ranks
        if options.get("warm_start") is None:
            options["warm_start"] = "dp"
    problem = build_problem(config, tables, **({"measured_objective": shared} if measured else {}))
    try:
        result = minimize(problem, config.solver.name, seed=config.seed, **options)
    finally:
        getattr(shared, "close", lambda: None)()   # releases the serving ranks
    if grid.operating is not None:
        j = int(np.flatnonzero((grid.levels["s"].sub(grid.operating.s).abs() < 1e-9)
                               & (grid.levels["rho"].sub(grid.operating.rho).abs() < 1e-9)
                               & (grid.levels["fmt"] == grid.operating.fmt))[0])
        uniform = Allocation.from_levels(tables, [j] * tables.n_units, solver="uniform")
        uniform_pred = float(tables.degradation[:, j].sum())
    else:
        u = minimize(problem, "uniform")
        uniform, uniform_pred = u.allocation, u.degradation
    result.allocation.metadata.update({"method": method.options(), "model": model_id(model)})
    return Solution(result, {"uniform": uniform, config.solver.name: result.allocation},
                    {"uniform": uniform_pred, config.solver.name: float(result.degradation)},
                    measured.evaluations if measured else None)


def measured_objective(config: JobConfig, model, method: Method, windows: Windows, tables, split=None):
    from .objective import MeasuredObjective
    return MeasuredObjective(model, windows.profile, method, metric=config.profile.metric, tables=tables,
                             batch_size=config.profile.batch_size, score_last=config.evaluator.score_last,
                             kl_top_k=config.profile.kl_top_k, kl_exact_vocab=config.profile.kl_exact_vocab,
                             expand=split)


def on_projections(config: JobConfig, model, solution: Solution, grid: Grid, split):
    """The hybrid's unit allocations as per-projection ones (the plan and the measure stage read these) and the
    projection tables that price them; the unit solution is kept in ``solution.result`` (saved as solved)."""
    allocations, ptables = split.on_projections(model.config.to_dict(), solution.allocations, grid.operating)
    predicted = {**solution.predicted, "uniform": float("nan")}   # the unit table prices splits, not uniform
    return Solution(solution.result, allocations, predicted, solution.measured_evaluations), ptables


def plan(config: JobConfig, model, method: Method, solution: Solution, rotation=None) -> dict[str, CompressionPlan]:
    """One compression plan per allocation (sequential calibration re-takes the thresholds per allocation), each
    carrying the model's rotation."""
    methods = for_allocations(model, method, solution.allocations, config.method.calibration,
                              config.data.batch_size)
    return {name: CompressionPlan.build(model, methods[name], alloc).attach_rotation(rotation)
            for name, alloc in solution.allocations.items()}


def tabulate(config: JobConfig, model, method: Method, windows: Windows, grid: Grid, watch: Stopwatch | None = None):
    """The split (``profile.split``), the profiled tables and their refinement (``profile.refine``): (grid, split,
    tables, profile), the grid and tables being the ones the solver sees."""
    split = block_split(config, model, method, windows, grid)
    if split is not None and watch is not None:
        watch.lap("split")
    tables, prof = profile_tables(config, model, method, windows, cost_tables(config, model, grid), grid, split)
    if config.profile.refine is not None:           # the degradation interpolated onto a finer s grid
        grid = Grid(refine_grid(grid.levels, config.profile.refine), grid.operating)
        tables = refine_tables(tables, grid.levels, cost_tables(config, model, grid))
        tables = split.price(tables, config.problem.tokens) if split is not None else tables
    return grid, split, tables, prof


def allocate(config: JobConfig, model, method: Method, windows: Windows, tables, grid: Grid, split=None):
    """The solver and uniform on ``tables``; with a split, the allocations as per-projection ones. Returns the
    solution and the tables that price its allocations (the projection tables under a split)."""
    solution = solve(config, model, method, windows, tables, grid, split)
    if split is None:
        return solution, tables
    solution, ptables = on_projections(config, model, solution, grid, split)
    profiled = ("profile_mode", "profile_key", "method", "data_hash", "tokens", "windows", "operating_level", "seed",
                "kl_top_k", "metric", "split")               # what the report says of the profile, not the pricing
    ptables.provenance.update({k: v for k, v in tables.provenance.items() if k in profiled})
    return solution, ptables


def run_main_job(config: JobConfig | dict, output_dir: Path) -> dict:
    """The stages in order; writes tables/, allocation.json, plan/, result.parquet, measurements.csv, report.md,
    allocation.png and summary.json into ``output_dir``."""
    from .measure import measure
    from .report import write_report

    config = config if isinstance(config, JobConfig) else load_config(config)
    ranks = distributed.setup(config)               # torchrun's ranks (README: Scale-out), before CUDA starts
    check_solver_options(config.solver)
    check_cost(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch()
    grid = level_grid(config)
    if config.profile.refine is not None:           # a bad step fails before anything loads
        refine_grid(grid.levels, config.profile.refine)
    model, tokenizer = load(config)
    watch.lap("load")
    windows = data(config, tokenizer)
    watch.lap("data")
    rotation = rotate(config, model, windows)
    method = calibrate(config, model, windows)
    watch.lap("calibrate")
    grid, split, tables, prof = tabulate(config, model, method, windows, grid, watch)
    if not ranks.main:                              # rank 0 alone solves, measures and reports
        return distributed.worker(config, lambda: measured_objective(config, model, method, windows, tables, split))
    tables.save(out / "tables")
    watch.lap("profile")
    solution, priced = allocate(config, model, method, windows, tables, grid, split)
    save_result(solution.result, out)
    if split is not None:
        split.to_frame().to_csv(out / "split.csv", index=False)
        solution.allocations[config.solver.name].to_json(out / "allocation_projections.json")
    tables = priced
    watch.lap("solve")
    plans = plan(config, model, method, solution, rotation)
    plans[config.solver.name].save(out / "plan")
    watch.lap("plan")
    measurements = measure(config, model, tokenizer, plans, windows, tables, solution)
    watch.lap("measure")
    return write_report(out, config, model, method, tables, prof, solution, measurements, watch)
