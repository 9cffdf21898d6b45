"""Evolutionary hyperparameters at equal evaluations: population x generations x fitness windows (issue 13, q. 13).

On one loaded model and one calibration of the ``teal`` method (the main job's stages, ``evaluators.stages``), one
KL table is profiled (pinned ``profile.unit=input profile.split=none profile.refine=null``, the main job's level
window around ``--budget``: one unit per GEMV input, no split, no refinement, so that it is cheap) and dp solves it.
Then for every setting ``PxG`` of ``--settings`` (population ``P``, ``G`` generations, the first being the initial
population: ``P * G`` evaluations, all equal to ``--evals``; pymoo drops duplicate children, so a search runs on
until it has spent ``--evals`` evaluations, and ``generations_run`` says how many generations that took) and
every fitness-window count ``W`` of ``--fitness-windows``, evo searches the measured objective
(``MeasuredObjective``: per-token KL to dense of the whole allocation on the first ``W`` of ``max(W)`` calibration
windows drawn as the profiling windows are, at the profiling length), warm-started from dp's answer, as
``studies/quality.py``'s ``evo_measured`` and ``studies/compare_solvers.py``'s searches do. Recorded per search:
the fitness of the answer and of the warm start, the solver's evaluation count and the model evaluations the
objective ran (repeats answered from its memo), and wall seconds.

Every answer, dp's warm start and uniform are then measured on the same held-out Austen and wiki windows
(``--eval-windows`` of the main job's length): perplexity, KL, and the per-token NLL / KL difference against dp,
paired over the windows (``_common.paired``: "tie" within two standard errors).

    python studies/evo_hyperparameters.py --out DIR --set model.threads=1           # 144 evaluations a search
    python studies/evo_hyperparameters.py --quick --out /tmp/evo_hyper --evals 4 --settings 2x2 4x1 \\
        --fitness-windows 1 2 --eval-windows 2                                        # 2 layers, tiny windows

Writes ``evo_hyperparameters.csv`` (one row per allocation), ``evo_hyperparameters.md`` (the table, the command,
the machine and wall times), ``evo_hyperparameters.json`` (with the per-window values) and
``allocations/<name>.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_common_args, add_config_args, base_overrides, job_config, paired,  # noqa: E402
                     paired_markdown, short)

#: the one table: one unit per GEMV input, no split, no refinement (fast to profile; the main job's level window)
TABLE = ["profile.unit=input", "profile.split=none", "profile.refine=null"]
#: the table's profiling windows (3 x 96 = 288 tokens; the fitness windows are drawn the same way, more of them)
PROFILE = ["data.profile_windows=3", "data.profile_length=96"]


def setting(text: str) -> tuple[int, int]:
    """``"24x6"`` -> (population 24, 6 generations)."""
    try:
        pop, gen = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is POPxGEN, e.g. 24x6; got {text!r}") from None
    if pop < 1 or gen < 1:
        raise argparse.ArgumentTypeError(f"population and generations must be >= 1; got {text!r}")
    return pop, gen


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, quick="2 layers, tiny windows (a smoke run)")
    add_config_args(p)
    p.add_argument("--budget", type=float, default=0.5, help="model-level sparsity (share of projection bytes)")
    p.add_argument("--evals", type=int, default=144, help="objective evaluations per search (population x "
                   "generations of every setting)")
    p.add_argument("--settings", type=setting, nargs="+", default=[setting(s) for s in ("12x12", "24x6", "48x3")],
                   help="POPxGEN settings")
    p.add_argument("--fitness-windows", type=int, nargs="+", default=[4, 16], help="calibration windows the "
                   "fitness scores (the first W of max(W))")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per source")
    args = p.parse_args(argv)
    for pop, gen in args.settings:
        if pop * gen != args.evals:
            p.error(f"setting {pop}x{gen} is {pop * gen} evaluations, not --evals {args.evals}")
    if min(args.fitness_windows) < 1:
        p.error("--fitness-windows must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from allocator import Allocation, minimize
    from allocator.evaluators import stages
    from allocator.evaluators.measure import compare
    from allocator.evaluators.plan import CompressionPlan
    from allocator.experiments import build_problem

    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "allocations").mkdir(exist_ok=True)
    common = base_overrides(args, [f"budget.value={args.budget}", f"data.eval_windows={args.eval_windows}",
                                   *PROFILE, *TABLE])
    config = job_config(common + ["solver=dp"])
    watch = {}
    t0 = time.perf_counter()
    model, tokenizer = stages.load(config)
    windows = stages.data(config, tokenizer)
    method = stages.calibrate(config, model, windows)
    watch["load_calibrate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid, split, tables, _ = stages.tabulate(config, model, method, windows, stages.level_grid(config))
    solution = stages.solve(config, model, method, windows, tables, grid, split)
    watch["table_dp_s"] = time.perf_counter() - t0
    dp_x = np.asarray(solution.result.x, dtype=int)

    # the fitness windows: max(W) drawn as the profiling windows are (same length and seed); W uses the first W
    n_fit = max(args.fitness_windows)
    fit_config = job_config(common + ["solver=dp", f"data.profile_windows={n_fit}"]
                            + ([f"data.profile_length={config.data.profile_length}"]))
    fit_windows = stages.data(fit_config, tokenizer).profile
    allocations = {"uniform": solution.allocations["uniform"], "dp": solution.allocations["dp"]}
    searches = []
    for w in args.fitness_windows:
        objective = stages.measured_objective(config, model, method,
                                              dataclasses.replace(windows, profile=fit_windows[:w]), tables)
        problem = build_problem(config, tables, measured_objective=objective)
        for pop, gen in args.settings:
            name = f"evo_{pop}x{gen}_w{w}"
            evals0 = objective.evaluations
            t0 = time.perf_counter()
            # pymoo drops duplicate children, so G generations may fall short of P * G evaluations: the search
            # runs on until the evaluation budget is spent (as compare_solvers' searches), G is the nominal count
            res = minimize(problem, "evo", seed=config.seed, fitness="measured", warm_start="dp", pop_size=pop,
                           n_gen=10_000, max_evals=args.evals, progress=False)
            wall = time.perf_counter() - t0
            true_evals = objective.evaluations - evals0
            x = np.asarray(res.x, dtype=int)
            allocations[name] = Allocation.from_levels(tables, x, solver=name)
            searches.append({"allocation": name, "population": pop, "generations": gen,
                             "generations_run": int(res.info["generations"]), "fitness_windows": w,
                             "fitness_tokens": int(w * fit_windows.shape[1]), "n_evals": int(res.n_evals),
                             "true_evals": int(true_evals), "fit_kl": float(objective(x)),
                             "fit_kl_dp": float(objective(dp_x)), "search_s": wall,
                             "same_as_dp": bool(np.array_equal(x, dp_x))})
            print(f"{name}: fitness KL {searches[-1]['fit_kl']:.4f} (dp {searches[-1]['fit_kl_dp']:.4f}), "
                  f"{res.n_evals} evaluations ({true_evals} run), {wall:.0f} s", flush=True)
    for name, alloc in allocations.items():
        alloc.to_json(args.out / "allocations" / f"{name}.json")

    t0 = time.perf_counter()
    plans = {n: CompressionPlan.build(model, method, a) for n, a in allocations.items()}
    with torch.no_grad():
        runs = {src: compare(model, win, plans, config.evaluator.batch_size, config.evaluator.score_last)
                for src, win in windows.evaluation.items()}
    watch["held_out_s"] = time.perf_counter() - t0
    by_name = {s["allocation"]: s for s in searches}
    rows = []
    for name, alloc in allocations.items():
        row = {"allocation": name, **{k: v for k, v in by_name.get(name, {}).items() if k != "allocation"}}
        row["table_kl"] = float(tables.degradation[np.arange(tables.n_units), alloc_levels(tables, alloc)].sum())
        for src, res in runs.items():
            row[f"ppl_{short(src)}"], row[f"kl_{short(src)}"] = res[name]["perplexity"], res[name]["kl"]
        rows.append({**row, "against": "dp", **(paired(runs, name, "dp") if name != "dp" else {})})
    frame = pd.DataFrame(rows)
    watch["total_s"] = time.perf_counter() - t_start
    dense = {short(src): res["dense"]["perplexity"] for src, res in runs.items()}
    meta = {"command": "python studies/evo_hyperparameters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": started, "machine": machine(config), "dtype": config.model.dtype,
            "threads": config.model.threads, "levels": sorted(set(float(s) for s in tables.levels["s"])),
            "units": int(tables.n_units), "table_tokens": int(windows.profile.numel()),
            "eval_windows": {short(s): list(w.shape) for s, w in windows.evaluation.items()},
            "dense_perplexity": dense, "seconds": watch}
    frame.to_csv(args.out / "evo_hyperparameters.csv", index=False)
    (args.out / "evo_hyperparameters.md").write_text(report(frame, meta))
    (args.out / "evo_hyperparameters.json").write_text(json.dumps(
        {**meta, "rows": rows, "per_window": {src: {n: r["per_window"] for n, r in res.items()}
                                             for src, res in runs.items()}}, default=float))
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    return {"rows": rows, "meta": meta, "runs": runs}


def alloc_levels(tables, allocation) -> np.ndarray:
    """The table's level index of each unit of ``allocation`` (its units in the table's order)."""
    from allocator.evaluators.plan import allocation_targets
    levels = tables.levels
    out = []
    for _, level in allocation_targets(allocation):
        hit = np.flatnonzero((levels["s"].sub(level.s).abs() < 1e-9) & (levels["rho"].sub(level.rho).abs() < 1e-9))
        out.append(int(hit[0]))
    return np.asarray(out)


def machine(config) -> str:
    import torch
    if str(config.model.device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{config.model.threads} torch thread(s)")


def report(frame: pd.DataFrame, meta: dict) -> str:
    sec = meta["seconds"]
    lines = ["# Evolutionary hyperparameters at equal evaluations (studies/evo_hyperparameters.py)", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}, dtype {meta['dtype']}; started {meta['started']}. Wall time "
             f"{sec['total_s']:.0f} s: load + calibration {sec['load_calibrate_s']:.0f} s, table + dp "
             f"{sec['table_dp_s']:.0f} s, held-out measurement {sec['held_out_s']:.0f} s, the searches' "
             f"`search_s` below.", "",
             f"Table: {meta['units']} units (one per GEMV input), levels s = {meta['levels']}, profiled on "
             f"{meta['table_tokens']} tokens (profile.unit=input profile.split=none profile.refine=null). "
             f"Held-out windows (windows, tokens): {meta['eval_windows']}; dense perplexity "
             f"{meta['dense_perplexity']}.",
             "", "`n_evals`: the solver's evaluations; `true_evals`: model evaluations the objective ran (the rest "
             "answered from its memo). `fit_kl`: the answer's KL on its fitness windows (`fit_kl_dp`: the warm "
             "start's). `dnll` / `dkl`: per-token difference against dp, paired over the held-out windows "
             "(negative: better), +- one standard error; `tie` within two.", ""]
    cols = ["allocation", "population", "generations", "generations_run", "fitness_windows", "n_evals", "true_evals",
            "fit_kl", "fit_kl_dp", "search_s", "table_kl", "ppl_austen", "kl_austen", "ppl_wiki", "kl_wiki"]
    lines += [paired_markdown(frame, cols), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
