"""Allocation quality against TEAL's own greedy, at equal decode bytes, with paired standard errors (issue 17).

Per budget (model-level sparsity = share of projection decode bytes removed), on one loaded model and one
calibration of the ``teal`` method (the main job's stages, ``evaluators.stages``), every variant is solved as the
main job solves it and measured on the same held-out windows (Austen and wiki, ``--eval-windows`` of 256 tokens):

- ``uniform``: every projection at the budget;
- ``teal_greedy``: TEAL's block-wise greedy (``studies/teal_greedy.py``'s ``allocation_<pct>.json``, read from
  ``--teal-greedy DIR``): every block at the budget, split inside by the block output error;
- ``dp_input``: dp on one unit per GEMV input (q+k+v, o, gate+up, down; the main job's default before the hybrid);
- ``dp_projection_fine``: dp on one unit per projection, the profiled table refined to 0.05 steps;
- ``hybrid_layer`` / ``hybrid_block``: the hybrid (``profile.split=milp``): per layer (or attention / MLP block)
  and unit sparsity the projections' split of least summed block output error, then dp across units on the
  profiled KL of each unit at each split, refined to 0.05 steps;
- ``evo_measured``: evo on the measured KL of the profiling windows, warm-started from ``--evo-from``'s dp answer;
- ``<variant>_1024``: the variant with its KL table profiled on 1,024 tokens (``data.profile_windows=8
  data.profile_length=128``, what ``studies/results/proxy_fidelity.md`` found ranks allocations best) instead of
  the main job's 3 x 96 = 288 before the hybrid became the default; the calibration and the block output errors
  stay the same.

Every variant profiles the whole grid (``profile.window=null``), so one cache serves every budget. Reported per
variant: held-out perplexity and KL, the paired per-window difference against ``teal_greedy`` (per-token NLL and
KL, mean +- standard error, "tie" within two standard errors), the byte-weighted sparsity the plan applies, and
the seconds its tables and solve took in this run (the rows are cached under ``DIR/cache``: a variant whose table
an earlier budget profiled counts only its solve; the first budget's seconds are the full cost).

    python studies/quality.py --out DIR --teal-greedy TEAL_DIR                 # SmolLM2-135M, 40 / 50 / 60%
    python studies/quality.py --quick --out /tmp/quality                        # 2 layers, tiny windows

Writes ``allocations/<pct>/<variant>.json`` (``--evaluate-only`` measures these again), ``quality.csv`` (one row per budget and variant), ``quality.md`` (the tables, the command) and
``quality.json`` (with the per-window values).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_common_args, add_config_args, base_overrides, byte_sparsity, job_config,  # noqa: E402
                     paired, paired_markdown, short)

VARIANTS = {
    "dp_input": ["profile.unit=input", "profile.split=none", "profile.refine=null"],
    "dp_projection_fine": ["profile.unit=projection", "profile.split=none", "profile.refine=0.05"],
    "hybrid_layer": ["profile.unit=layer", "profile.split=milp", "profile.refine=0.05"],
    "hybrid_block": ["profile.unit=block", "profile.split=milp", "profile.refine=0.05"],
}
PROFILE_1024 = ["data.profile_windows=8", "data.profile_length=128"]     # 1,024 profiling tokens
PROFILE_288 = ["data.profile_windows=3", "data.profile_length=96"]       # the variants' 288 (whatever the default)
VARIANTS = {**{name: over + PROFILE_288 for name, over in VARIANTS.items()},
            **{f"{name}_1024": over + PROFILE_1024 for name, over in VARIANTS.items() if name.startswith("hybrid")}}
EVO = ["solver=evo", "solver.options.fitness=measured", "solver.options.warm_start=dp", "+solver.options.pop_size=16", "+solver.options.n_gen=6"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, quick="2 layers, tiny windows (a smoke run)")
    add_config_args(p)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    p.add_argument("--variants", nargs="+", default=[*(v for v in VARIANTS if not v.endswith("_1024")), "evo_measured"],
                   choices=[*VARIANTS, "evo_measured"])
    p.add_argument("--evo-from", default="hybrid_layer", choices=list(VARIANTS), help="evo's warm start")
    p.add_argument("--teal-greedy", type=Path, default=None, help="studies/teal_greedy.py's output folder")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows per source (256 tokens)")
    p.add_argument("--keep-solved", action="store_true", help="do not solve again a variant whose allocation an "
                   "earlier run saved under DIR/allocations (its seconds are kept): add variants to a run")
    p.add_argument("--evaluate-only", action="store_true", help="measure the allocations an earlier run saved "
                   "under DIR/allocations (e.g. once TEAL's greedy has finished)")
    return p.parse_args(argv)


def solved(config, model, method, windows, tokenizer):
    """(the allocation the variant's main job would apply, seconds of its tables and solve). The profiling windows
    are the variant's own (``data.profile_*``); the calibration (``method``) is shared."""
    import dataclasses

    from allocator.evaluators.stages import allocate, data, level_grid, tabulate
    start = time.perf_counter()
    windows = dataclasses.replace(windows, profile=data(config, tokenizer).profile)
    grid, split, tables, _ = tabulate(config, model, method, windows, level_grid(config))
    solution, _ = allocate(config, model, method, windows, tables, grid, split)
    return solution, time.perf_counter() - start


def variant_overrides(args, name: str) -> list[str]:
    """The main-job overrides of variant ``name``; its profiling size wins over ``--set`` (``--quick`` keeps its
    tiny windows)."""
    over = VARIANTS.get(name) or VARIANTS[args.evo_from] + EVO
    return [o for o in over if not o.startswith("data.profile_")] if args.quick else over


def uniform_allocation(config, model):
    """Every GEMV input (q+k+v, o, gate+up, down) at the budget's level: no profiling needed."""
    from allocator import Allocation
    from allocator.evaluators.stages import cost_tables, level_grid
    grid = level_grid(config)
    tables = cost_tables(config, model, grid)
    j = int(np.flatnonzero((grid.levels["s"].sub(grid.operating.s).abs() < 1e-9)
                           & (grid.levels["rho"].sub(grid.operating.rho).abs() < 1e-9))[0])
    return Allocation.from_levels(tables, [j] * tables.n_units, solver="uniform")


def solve_budget(args, common: list[str], budget: float, model, method, windows, tokenizer, saved: Path) -> None:
    """Every variant at ``budget``, saved as ``allocations/<pct>/<name>.json`` (with its seconds in seconds.json;
    a variant solved by an earlier run into the same folder keeps its entry)."""
    folder = saved / str(round(budget * 100))
    folder.mkdir(parents=True, exist_ok=True)
    seconds = json.loads((folder / "seconds.json").read_text()) if (folder / "seconds.json").exists() else {}
    uniform_allocation(job_config(common + [f"budget.value={budget}", *VARIANTS["dp_input"]]),
                       model).to_json(folder / "uniform.json")
    for name in args.variants:
        if args.keep_solved and name in seconds and (folder / f"{name}.json").exists():
            continue
        config = job_config(common + [f"budget.value={budget}", *variant_overrides(args, name)])
        solution, seconds[name] = solved(config, model, method, windows, tokenizer)
        solution.allocations[config.solver.name].to_json(folder / f"{name}.json")
        print(f"{budget:.0%} {name}: solved in {seconds[name]:.0f} s", flush=True)
        (folder / "seconds.json").write_text(json.dumps({**seconds, "uniform": 0.0}))


def load_budget(args, budget: float, saved: Path) -> tuple[dict, dict]:
    """The saved allocations of ``budget`` (uniform, TEAL's greedy when its folder has it, the variants)."""
    from allocator.result import Allocation
    folder = saved / str(round(budget * 100))
    if not (folder / "seconds.json").exists():
        raise FileNotFoundError(f"no solved allocations in {folder}: run without --evaluate-only first")
    seconds = json.loads((folder / "seconds.json").read_text())
    allocations = {"uniform": Allocation.from_json(folder / "uniform.json")}
    greedy = args.teal_greedy and args.teal_greedy / f"allocation_{round(budget * 100)}.json"
    if greedy and greedy.exists():
        allocations["teal_greedy"] = Allocation.from_json(greedy)
        summary = json.loads((args.teal_greedy / "teal_greedy.json").read_text())
        seconds["teal_greedy"] = summary["calibration_s"] + summary["greedy_s"]
    elif greedy:
        print(f"no TEAL greedy allocation at {greedy}: pairing against uniform", flush=True)
    for name in args.variants:
        allocations[name] = Allocation.from_json(folder / f"{name}.json")
    return allocations, seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from allocator.evaluators import stages
    from allocator.evaluators.measure import compare
    from allocator.evaluators.plan import CompressionPlan

    args.out.mkdir(parents=True, exist_ok=True)
    common = base_overrides(args, ["profile.window=null", f"data.eval_windows={args.eval_windows}",
                                   f"profile.cache={(args.out / 'cache').resolve()}"])   # every row timed here
    config = job_config(common + [f"budget.value={args.budgets[0]}"])
    model, tokenizer = stages.load(config)
    windows = stages.data(config, tokenizer)
    method = stages.calibrate(config, model, windows)
    saved = args.out / "allocations"
    if not args.evaluate_only:
        for budget in args.budgets:                   # solve every budget first (one table serves them all)
            solve_budget(args, common, budget, model, method, windows, tokenizer, saved)
    rows, per_window = [], {}
    for budget in args.budgets:
        allocations, seconds = load_budget(args, budget, saved)
        plans = {n: CompressionPlan.build(model, method, a) for n, a in allocations.items()}
        with torch.no_grad():
            runs = {src: compare(model, w, plans, config.evaluator.batch_size, config.evaluator.score_last)
                    for src, w in windows.evaluation.items()}
        against = "teal_greedy" if "teal_greedy" in plans else "uniform"
        for name, alloc in allocations.items():
            row = {"budget": budget, "allocation": name, "byte_sparsity": byte_sparsity(model, alloc),
                   "seconds": seconds[name]}
            for src, res in runs.items():
                row[f"ppl_{short(src)}"], row[f"kl_{short(src)}"] = res[name]["perplexity"], res[name]["kl"]
            rows.append({**row, "against": against, **(paired(runs, name, against) if name != against else {})})
        per_window[str(budget)] = {src: {n: r["per_window"] for n, r in res.items()} for src, res in runs.items()}
        frame = pd.DataFrame(rows)
        frame.to_csv(args.out / "quality.csv", index=False)
        (args.out / "quality.md").write_text(report(frame, windows, argv))
        print(frame[frame.budget == budget].to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    dense = {src: res["dense"]["perplexity"] for src, res in runs.items()}
    (args.out / "quality.json").write_text(json.dumps({"rows": rows, "dense_perplexity": dense,
                                                       "per_window": per_window}, default=float))
    return {"rows": rows, "dense": dense}


def report(frame: pd.DataFrame, windows, argv) -> str:
    n = {short(s): len(w) for s, w in windows.evaluation.items()}
    lines = ["# Allocation quality against TEAL's greedy (studies/quality.py)", "",
             f"Command: `python studies/quality.py {' '.join(argv or sys.argv[1:])}`", "",
             f"Held-out windows: {n} of 256 tokens. `dnll` / `dkl`: per-token difference against `against`, "
             "paired over the windows (negative: better), +- one standard error; `tie` within two.", ""]
    for budget, part in frame.groupby("budget"):
        lines += [f"## {budget:.0%} of projection bytes", ""]
        cols = ["allocation", "byte_sparsity", "ppl_austen", "kl_austen", "ppl_wiki", "kl_wiki", "seconds"]
        lines += [paired_markdown(part, cols), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
