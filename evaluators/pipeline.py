"""The main job: load, calibrate, profile (cached), solve, apply, measure on held-out text, report.

``run_pipeline(cfg, output_dir)`` is what ``python -m allocator experiment=smollm2`` calls with the composed
Hydra config. It reads the groups ``model``, ``method``, ``data``, ``profile``, ``evaluator`` (this package's
YAML under ``allocator/conf``) and the core's ``solver``, ``budget``, ``problem``; a missing group falls back to
its default file, so a plain dict works from Python too.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from allocator import Allocation, Problem, analytic_tables, make_levels, minimize
from allocator.tables import TablesError

from .calibration import SparsityMeter, for_allocations
from .methods import Protocol, apply_allocation_, get_method, remove_compression_
from .metrics import allocation_cost, logits_of, memory, token_losses
from .models import load_model, model_id
from .profiling import profile
from .text import token_windows

logger = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DEFAULTS = {"model": "smollm2", "method": "teal", "data": "shipped", "profile": "isolated",
            "evaluator": "default", "solver": "dp", "budget": "sparsity", "problem": "default"}


def _group(cfg, name: str) -> dict:
    """The config group as a plain dict, or its default YAML when the composed config lacks it."""
    from omegaconf import OmegaConf

    value = cfg.get(name) if cfg is not None else None
    if value is None:
        path = CONF_DIR / name / f"{DEFAULTS[name]}.yaml"
        if not path.exists():
            import importlib.resources as res
            path = Path(str(res.files("allocator.conf") / name / f"{DEFAULTS[name]}.yaml"))
        value = OmegaConf.load(path)
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value)


def budget_level(levels: pd.DataFrame, sparsity: float, rho: float = 1.0) -> dict:
    """The grid level at the budget's sparsity (the uniform baseline and the operating point); a clear error
    when the budget lies outside the level grid."""
    s_grid = sorted(set(levels["s"].round(6)))
    if not s_grid[0] <= sparsity <= s_grid[-1]:
        raise TablesError(f"budget sparsity {sparsity} lies outside the level grid s in [{s_grid[0]}, {s_grid[-1]}]; "
                          f"extend method.levels.s or lower budget.value")
    hit = levels[(levels["s"].sub(sparsity).abs() < 1e-9) & (levels["rho"].sub(rho).abs() < 1e-9)]
    if hit.empty:
        raise TablesError(f"budget sparsity {sparsity} (rho {rho}) is not a level of the grid s={s_grid}, "
                          f"rho={sorted(set(levels['rho']))}; add it to method.levels or choose a grid value")
    return {"s": float(sparsity), "rho": float(rho), "bits": int(hit.iloc[0]["bits"])}


def trust_region(levels: pd.DataFrame, sparsity: float, window: float) -> pd.DataFrame:
    """Only the levels with |s - sparsity| <= window: a first-order table is trustworthy near its operating point,
    and the rows far from it cost profiling time the solver rarely repays."""
    keep = (levels["s"] - sparsity).abs() <= window + 1e-9
    if not keep.any():
        raise TablesError(f"no level of the grid lies within {window} of the budget sparsity {sparsity}")
    return levels[keep].reset_index(drop=True)


@torch.no_grad()
def compare(model, windows: torch.Tensor, method, allocations: dict, batch_size: int = 4,
            score_last: float = 1.0) -> dict[str, dict]:
    """Perplexity, KL to dense and realized sparsity (``SparsityMeter``) of several allocations on the same
    windows, the dense logits computed once. ``method``: one method, or ``{allocation name: method}`` (e.g. one
    sequentially calibrated copy per allocation, ``calibration.for_allocations``)."""
    methods = method if isinstance(method, dict) else {name: method for name in allocations}
    sums = {name: [0.0, 0.0, 0] for name in ["dense", *allocations]}
    meters = {name: None for name in allocations}
    remove_compression_(model)
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        dense = logits_of(model, ids)
        ref = dense[:, :-1].log_softmax(-1)
        a, _, n = token_losses(dense, ids, None, score_last)
        sums["dense"] = [sums["dense"][0] + a, 0.0, sums["dense"][2] + n]
        del dense
        for name, alloc in allocations.items():
            apply_allocation_(model, alloc, methods[name])
            try:
                meter = SparsityMeter(model) if meters[name] is None else meters[name]
                with meter:
                    a, k, n = token_losses(logits_of(model, ids), ids, ref, score_last)
                meters[name] = meter
            finally:
                remove_compression_(model)
            s = sums[name]
            sums[name] = [s[0] + a, s[1] + k, s[2] + n]
    out = {name: {"perplexity": math.exp(s[0] / s[2]), "kl": s[1] / s[2], "tokens": s[2]} for name, s in sums.items()}
    out["dense"]["realized_sparsity"] = 0.0
    for name, meter in meters.items():
        out[name]["realized_sparsity"] = meter.share() if meter is not None else float("nan")
    return out


def run_pipeline(cfg, output_dir: Path) -> dict:
    """Run the whole job; writes allocation.json, tables/, result.parquet, allocation.png, report.md, summary.json."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    m_cfg, meth_cfg, d_cfg = _group(cfg, "model"), _group(cfg, "method"), _group(cfg, "data")
    p_cfg, e_cfg = _group(cfg, "profile"), _group(cfg, "evaluator")
    s_cfg, b_cfg, pr_cfg = _group(cfg, "solver"), _group(cfg, "budget"), _group(cfg, "problem")
    seed = int(cfg.get("seed", 0)) if cfg is not None else 0
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now
        logger.info("%s done in %.1f s", name, timings[name])

    if m_cfg.get("threads"):
        torch.set_num_threads(int(m_cfg["threads"]))
    torch.manual_seed(seed)
    model, tokenizer = load_model(m_cfg["name"], gguf_file=m_cfg.get("gguf_file"), dtype=m_cfg.get("dtype", "bfloat16"),
                                  device=m_cfg.get("device", "cpu"), device_map=m_cfg.get("device_map"),
                                  max_layers=m_cfg.get("max_layers"))
    lap("load")

    # --- levels, budget, cost tables (analytic, from the loaded model's config)
    lv_cfg = meth_cfg.get("levels", {})
    levels = make_levels(s=lv_cfg.get("s", [0.0, 0.5]), rho=lv_cfg.get("rho", [1.0]), bits=lv_cfg.get("bits", [16]))
    kind, value = b_cfg.get("kind", "sparsity"), float(b_cfg.get("value", 0.5))
    if kind == "sparsity" and p_cfg.get("window") is not None:
        levels = trust_region(levels, value, float(p_cfg["window"]))
    operating = budget_level(levels, value, float(meth_cfg.get("operating_rho", 1.0))) if kind == "sparsity" else None
    if p_cfg.get("mode") == "operating_point" and operating is None:
        raise ValueError("profile.mode=operating_point needs budget.kind=sparsity (the uniform operating level)")
    tables = analytic_tables(model.config.to_dict(), levels, unit=p_cfg.get("unit", "layer"),
                             tokens=int(pr_cfg.get("tokens", 2048)))

    # --- windows: calibration (thresholds), profiling (tables), evaluation (held out)
    calib = token_windows(tokenizer, d_cfg["calibration"], d_cfg["calibration_windows"], d_cfg["calibration_length"], seed)
    prof_windows = token_windows(tokenizer, d_cfg["profile"], d_cfg["profile_windows"], d_cfg["profile_length"],
                                 seed + 1)
    evals = {src: token_windows(tokenizer, src, d_cfg["eval_windows"], d_cfg["eval_length"], seed)
             for src in d_cfg["evaluation"]}
    lap("data")

    method_options = {k: v for k, v in meth_cfg.get("options", {}).items()}
    method = get_method(meth_cfg["name"], protocol=Protocol(float(meth_cfg.get("sparse_fraction", 1.0))), seed=seed,
                        **method_options)
    method.calibrate(model, calib, batch_size=int(d_cfg.get("batch_size", 4)))
    lap("calibrate")

    prof = profile(model, method, prof_windows, levels, tables.unit_names, mode=p_cfg.get("mode", "isolated"),
                   operating_level=operating, batch_size=int(p_cfg.get("batch_size", 8)),
                   score_last=float(e_cfg.get("score_last", 1.0)), cache=p_cfg.get("cache", True),
                   progress=bool(p_cfg.get("progress", True)))
    metric = p_cfg.get("metric", "kl")
    tables = tables.with_degradation(prof.table(metric), metric=metric, **prof.provenance)
    tables.save(output_dir / "tables")
    lap("profile")

    # --- solve: the configured solver and the uniform baseline on the same problem
    solver_options = dict(s_cfg.get("options") or {})
    true_objective = None
    if solver_options.get("objective") in ("true", True):  # search solvers scoring candidates on the model itself
        from .objective import TrueObjective
        true_objective = TrueObjective(model, prof_windows, method, metric=metric, tables=tables,
                                       batch_size=int(p_cfg.get("batch_size", 8)),
                                       score_last=float(e_cfg.get("score_last", 1.0)))
        if solver_options.get("warm_start", "absent") is None:
            solver_options["warm_start"] = "dp"
    problem = Problem(tables, cost=pr_cfg.get("cost", "bytes_decode"), grouping=pr_cfg.get("grouping"),
                      max_groups=pr_cfg.get("max_groups"), objective=true_objective, **{kind: value})
    result = minimize(problem, s_cfg.get("name", "dp"), seed=seed, **solver_options)
    if true_objective is not None:
        timings["true_evaluations"] = true_objective.evaluations
    if operating is not None:
        j = int(np.flatnonzero((levels["s"].sub(operating["s"]).abs() < 1e-9)
                               & (levels["rho"].sub(operating["rho"]).abs() < 1e-9))[0])
        uniform = Allocation.from_levels(tables, [j] * tables.n_units, solver="uniform")
        uniform_pred = float(tables.degradation[:, j].sum())
    else:
        u = minimize(problem, "uniform")
        uniform, uniform_pred = u.allocation, u.degradation
    result.allocation.metadata.update({"method": method.options(), "model": model_id(model)})
    result.allocation.to_json(output_dir / "allocation.json")
    result.to_dataframe().to_parquet(output_dir / "result.parquet", index=False)
    lap("solve")

    # --- apply and measure: the audit on the profiling windows, then held-out text
    allocations = {"uniform": uniform, s_cfg.get("name", "dp"): result.allocation}
    batch = int(e_cfg.get("batch_size", 4))
    calibration = meth_cfg.get("calibration", "dense")
    methods = for_allocations(model, method, allocations, calibration, int(d_cfg.get("batch_size", 4)))
    if calibration != "dense":
        lap(f"calibrate_{calibration}")
    audit = compare(model, prof_windows, methods, allocations, batch, float(e_cfg.get("score_last", 1.0)))
    held_out = {src: compare(model, w, methods, allocations, batch, float(e_cfg.get("score_last", 1.0)))
                for src, w in evals.items()}
    lap("evaluate")

    rows = []
    predicted = {"uniform": uniform_pred, s_cfg.get("name", "dp"): float(result.degradation)}
    for name in ["dense", *allocations]:
        alloc = allocations.get(name)
        row = {"allocation": name,
               "model_sparsity": allocation_cost(model, alloc, "bytes_decode")["model_sparsity"] if alloc else 0.0,
               "predicted": predicted.get(name, 0.0),
               f"measured_{metric}_calib": audit[name]["kl"] if metric == "kl"
               else audit[name]["perplexity"] - audit["dense"]["perplexity"]}
        for src, res in held_out.items():
            row[f"ppl_{src}"] = res[name]["perplexity"]
            row[f"kl_{src}"] = res[name]["kl"]
            row[f"realized_{src}"] = res[name]["realized_sparsity"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.to_csv(output_dir / "measurements.csv", index=False)
    if e_cfg.get("memory", True):
        apply_allocation_(model, result.allocation, methods[s_cfg.get("name", "dp")])
        mem = memory(model)
        remove_compression_(model)
    else:
        mem = {}
    zs = e_cfg.get("zeroshot") or {}
    summary_zs = {}
    if zs.get("tasks"):
        summary_zs = run_zeroshot_all(model, tokenizer, methods, allocations, zs)
        (output_dir / "zeroshot.json").write_text(json.dumps(summary_zs, indent=1, default=float))
        lap("zeroshot")
    _plot(allocations, output_dir / "allocation.png", f"{model_id(model)} / {method.name}: {kind} {value}")
    summary = {"objective": float(result.objective), "feasible": bool(result.feasible), "model": model_id(model),
               "method": method.options(), "calibration": calibration, "budget": {kind: value},
               "profile_mode": prof.mode, "metric": metric,
               "solver": result.summary(), "measurements": rows, "memory": mem, "zeroshot": summary_zs,
               "timings": timings}
    lap("report")
    summary["timings"] = timings
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    _report(output_dir, summary, frame, result, tables)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\n".join(_gains(frame)))
    return summary


def run_zeroshot_all(model, tokenizer, method, allocations: dict, zs_cfg: dict) -> dict:
    """lm-eval tasks for the dense model and each allocation (tasks need the hub unless they are custom);
    ``method``: one method or ``{allocation name: method}``."""
    from .zeroshot import run_zeroshot
    methods = method if isinstance(method, dict) else {name: method for name in allocations}
    out = {"dense": run_zeroshot(model, tokenizer, zs_cfg["tasks"], limit=zs_cfg.get("limit"),
                                 include_path=zs_cfg.get("include_path"))}
    for name, alloc in allocations.items():
        apply_allocation_(model, alloc, methods[name])
        try:
            out[name] = run_zeroshot(model, tokenizer, zs_cfg["tasks"], limit=zs_cfg.get("limit"),
                                     include_path=zs_cfg.get("include_path"))
        finally:
            remove_compression_(model)
    return out


def _plot(allocations: dict, path: Path, title: str) -> None:
    from allocator.plot import plot_allocation
    fig = plot_allocation(allocations, title=title)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)


def _gains(frame: pd.DataFrame) -> list[str]:
    """How much of uniform's perplexity increase over dense the allocation removes, per held-out source."""
    rows = frame.set_index("allocation")
    if "uniform" not in rows.index or len(rows) < 3:
        return []
    name = [n for n in rows.index if n not in ("dense", "uniform")][0]
    out = []
    for col in [c for c in frame.columns if c.startswith("ppl_")]:
        dense, uni, alloc = rows.loc["dense", col], rows.loc["uniform", col], rows.loc[name, col]
        share = (uni - alloc) / (uni - dense) if uni != dense else float("nan")
        out.append(f"{col[4:]}: {name} perplexity {alloc:.3g} vs uniform {uni:.3g} (dense {dense:.3g}): "
                   f"{share:+.0%} of uniform's increase removed")
    return out


def _report(out: Path, summary: dict, frame: pd.DataFrame, result, tables) -> None:
    metric = summary["metric"]
    lines = [f"# allocator: {summary['model']} with {summary['method']['name']}", "",
             f"- budget: {summary['budget']}, cost `{result.problem.get('cost')}`",
             f"- degradation table: {metric} per unit x level, profiled `{summary['profile_mode']}` on "
             f"{tables.provenance.get('tokens')} calibration tokens",
             f"- solver: {summary['solver']}",
             f"- thresholds: `{summary['calibration']}` calibration",
             *[f"- {line}" for line in _gains(frame)], "",
             "## Held-out measurements and the additivity audit", "",
             f"`predicted` is the table's sum for the allocation; `measured_{metric}_calib` is the same quantity "
             "measured with the whole allocation applied, on the profiling windows.", "",
             frame.to_markdown(index=False, floatfmt=".4g"), "",
             "![allocation](allocation.png)", "",
             "## Timings (s)", "", pd.DataFrame([summary["timings"]]).to_markdown(index=False), "",
             "## Allocation", "", result.allocation.to_frame().to_markdown(index=False), ""]
    (out / "report.md").write_text("\n".join(lines))
