"""Fine level grids from a coarse profile: how close is the interpolated table to the fine table profiled directly,
and does dp on it allocate better than dp on the coarse table?

On SmolLM2-135M cut to 4 decoder layers (the main job's config otherwise: teal calibrated on the dense model,
input units, isolated KL on the profiling windows, decode-byte cost), two tables are profiled: a coarse grid
s = 0, 0.2, ..., 0.8 and the fine grid s = 0, 0.05, ..., 0.8 directly. The coarse table is refined to the fine grid
(``allocator.refine``: PCHIP in s per unit of log(KL + eps), its default; PCHIP of the KL itself and straight
lines beside it), and at the levels the coarse grid lacks the study reports the absolute and relative error
against the direct fine table and Spearman's rank correlation (all entries, and per level across units: the order
dp trades on). Then dp at ``--budget`` (50%) of the decode bytes on the coarse, refined (both spaces) and direct
fine tables; each allocation is applied and measured on the held-out windows (KL to dense and perplexity, Austen
and wiki), with paired standard errors over the windows (``allocator.gains``: "tie" within two standard errors),
and priced on the direct fine table (its predicted KL). Profiling rows are cached under ``DIR/cache``.

    python studies/refine_levels.py --out DIR                         # 4 layers, the main job's data sizes
    python studies/refine_levels.py --out DIR --replicate --set data.eval_windows=32   # + noise floor, 32 windows
    python studies/refine_levels.py --quick --out /tmp/refine          # 2 layers, tiny windows (a smoke run)

Writes ``refine_levels.md`` (the numbers and this command), ``refine_levels.csv`` (one row per allocation),
``refine_levels.entries.csv`` (per unit and fine level: direct, the two PCHIPs, linear), ``refine_levels.levels.csv``
(per fine-only level) and ``refine_levels.json``.
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
from _common import add_common_args, add_config_args, base_overrides, job_config, short  # noqa: E402

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, quick="2 layers, tiny windows (a smoke run)")
    add_config_args(p)
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (--quick: 2)")
    p.add_argument("--coarse", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8], help="s of the coarse grid")
    p.add_argument("--step", type=float, default=0.05, help="s step of the fine grid")
    p.add_argument("--budget", type=float, default=0.5, help="model-level sparsity (share of decode bytes) of dp")
    p.add_argument("--replicate", action="store_true", help="profile the fine grid a second time on other profiling "
                   "windows (seed + 101): the table's own sampling noise beside the interpolation error")
    return p.parse_args(argv)


def profiled(config, model, method, windows, levels):
    """(tables with the isolated KL degradation, seconds, rows measured) on ``levels``, as the main job profiles."""
    from allocator.evaluators.stages import Grid, cost_tables, profile_tables

    grid = Grid(levels)
    start = time.perf_counter()
    tables, _ = profile_tables(config, model, method, windows, cost_tables(config, model, grid), grid)
    return tables, time.perf_counter() - start, int(tables.n_units * (levels["s"] > 0).sum())


def replicate_windows(config, tokenizer, windows):
    from allocator.evaluators.stages import Windows
    from allocator.evaluators.text import token_windows

    d = config.data
    return Windows(windows.calibration, token_windows(tokenizer, d.profile, d.profile_windows, d.profile_length,
                                                      config.seed + 101), windows.evaluation)


def linear(coarse, fine_levels) -> np.ndarray:
    s_c, s_f = coarse.levels["s"].to_numpy(), fine_levels["s"].to_numpy()
    return np.vstack([np.interp(s_f, s_c, row) for row in coarse.degradation])


def fidelity(direct: np.ndarray, approx: np.ndarray, fine_only: np.ndarray) -> dict:
    """Errors and rank correlations of ``approx`` against ``direct`` at the fine-only levels."""
    from scipy.stats import spearmanr

    d, a = direct[:, fine_only], approx[:, fine_only]
    err = np.abs(a - d)
    rel = err[d > 1e-6] / d[d > 1e-6]
    per_level = [spearmanr(d[:, j], a[:, j])[0] for j in range(d.shape[1])]
    return {"mae": float(err.mean()), "max_abs": float(err.max()), "median_rel": float(np.median(rel)),
            "p90_rel": float(np.quantile(rel, 0.9)), "spearman_all": float(spearmanr(d.ravel(), a.ravel())[0]),
            "spearman_per_level_mean": float(np.mean(per_level)), "spearman_per_level_min": float(np.min(per_level)),
            "mean_kl_direct": float(d.mean())}


def per_level(direct: np.ndarray, approx: dict, fine_only: np.ndarray, s: np.ndarray) -> pd.DataFrame:
    """Per fine-only level: the direct entries' mean, and each approximation's mean absolute error and Spearman
    correlation across units."""
    from scipy.stats import spearmanr

    rows = []
    for j in np.flatnonzero(fine_only):
        row = {"s": float(s[j]), "mean_kl_direct": float(direct[:, j].mean())}
        for name, a in approx.items():
            row[f"mae_{name}"] = float(np.abs(a[:, j] - direct[:, j]).mean())
            row[f"spearman_{name}"] = float(spearmanr(direct[:, j], a[:, j])[0])
        rows.append(row)
    return pd.DataFrame(rows)


def per_window_kl(result: dict) -> np.ndarray:
    w = np.asarray(result["per_window"], dtype=float)
    return w[:, 1] / w[:, 2]


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from allocator import Allocation, make_levels, minimize
    from allocator.evaluators.measure import compare
    from allocator.evaluators.plan import CompressionPlan
    from allocator.evaluators.stages import Grid, calibrate, cost_tables, data, load
    from allocator.experiments import build_problem
    from allocator.gains import paired_difference, verdict
    from allocator.refine import refine_grid, refine_tables

    over = [*base_overrides(args, [f"model.max_layers={args.layers}", f"budget.value={args.budget}",
                                   "profile.unit=input", "profile.mode=isolated", "profile.window=null",
                                   "print_allocation=false"]),
            f"profile.cache={args.out.resolve() / 'cache'}"]
    config = job_config(over)
    model, tokenizer = load(config)
    windows = data(config, tokenizer)
    method = calibrate(config, model, windows)
    coarse_levels = make_levels(s=args.coarse)
    fine_levels = refine_grid(coarse_levels, args.step)
    coarse, coarse_s, coarse_rows = profiled(config, model, method, windows, coarse_levels)
    direct, fine_s, fine_rows = profiled(config, model, method, windows, fine_levels)
    t0 = time.perf_counter()
    fine_costs = cost_tables(config, model, Grid(fine_levels))
    refined = refine_tables(coarse, fine_levels, fine_costs)                    # PCHIP of log(d + eps): the default
    refine_s = time.perf_counter() - t0
    refined_lin = refine_tables(coarse, fine_levels, fine_costs, space="linear")
    lin = linear(coarse, fine_levels)
    fine_only = ~np.isin(np.round(fine_levels["s"].to_numpy(), 6), np.round(args.coarse, 6))
    approx = {"pchip_log": refined.degradation, "pchip_linear": refined_lin.degradation, "linear": lin}
    if args.replicate:  # the same fine grid on other profiling windows: how far two direct profiles disagree
        other = replicate_windows(config, tokenizer, windows)
        approx["direct_replicate"] = profiled(config, model, method, other, fine_levels)[0].degradation
    fid = {name: fidelity(direct.degradation, a, fine_only) for name, a in approx.items()}
    levels_frame = per_level(direct.degradation, approx, fine_only, fine_levels["s"].to_numpy())

    tables = {"coarse": coarse, "refined": refined, "refined_linear_space": refined_lin, "direct_fine": direct}
    allocations, solve_s = {}, {}
    for name, t in tables.items():
        t0 = time.perf_counter()
        allocations[name] = minimize(build_problem(config, t), "dp", seed=config.seed).allocation
        solve_s[name] = time.perf_counter() - t0
    j = int(np.flatnonzero(np.isclose(fine_levels["s"], args.budget))[0]) if np.isclose(
        fine_levels["s"], args.budget).any() else None
    if j is not None:
        allocations["uniform"] = Allocation.from_levels(direct, [j] * direct.n_units, solver="uniform")
    plans = {name: CompressionPlan.build(model, method, a) for name, a in allocations.items()}
    held = {src: compare(model, w, plans, config.evaluator.batch_size, config.evaluator.score_last)
            for src, w in windows.evaluation.items()}

    rows = []
    for name, alloc in allocations.items():
        t = tables.get(name, direct)
        idx = _fine_index(alloc, fine_levels)
        rows_s = {"coarse": (coarse_rows, coarse_s), "refined": (coarse_rows, coarse_s + refine_s),
                  "refined_linear_space": (coarse_rows, coarse_s + refine_s), "direct_fine": (fine_rows, fine_s)}
        row = {"allocation": name, "levels": t.n_levels if name in tables else direct.n_levels,
               "profile_rows": rows_s.get(name, (None, None))[0], "profile_s": rows_s.get(name, (None, None))[1],
               "solve_s": solve_s.get(name),
               "bytes_share": float(direct.cost("bytes_decode")[np.arange(direct.n_units), idx].sum()
                                    / direct.dense_cost("bytes_decode").sum()),
               "predicted_own": float(t.degradation[np.arange(t.n_units), alloc.level_index].sum()),
               "predicted_direct": float(direct.degradation[np.arange(direct.n_units), idx].sum()),
               "mean_s": float(fine_levels["s"].to_numpy()[idx].mean())}
        for src, res in held.items():
            row[f"kl_{short(src)}"] = res[name]["kl"]
            row[f"ppl_{short(src)}"] = res[name]["perplexity"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    paired = {}
    for a, b in (("refined", "coarse"), ("refined", "direct_fine"), ("direct_fine", "coarse"),
                 ("refined_linear_space", "coarse"), ("refined", "refined_linear_space")):
        for src, res in held.items():
            mean, se, n = paired_difference(per_window_kl(res[a]), per_window_kl(res[b]))
            paired[f"{a} - {b}, {short(src)}"] = {"mean": mean, "se": se, "n": n, "verdict": verdict(mean, se)}
    entries = _entries(direct, refined, refined_lin, lin, fine_levels)
    command = "python studies/refine_levels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command, "model": config.model.name, "layers": config.model.max_layers,
               "dtype": config.model.dtype,
               "units": direct.n_units, "profile_windows": list(windows.profile.shape),
               "eval_windows": {src: list(w.shape) for src, w in windows.evaluation.items()},
               "coarse_s": args.coarse, "step": args.step, "budget": args.budget, "fidelity": fid, "paired_kl": paired,
               "dense_ppl": {short(src): res["dense"]["perplexity"] for src, res in held.items()},
               "allocations": {n: dict(zip(a.units, (lv.s for lv in a.levels))) for n, a in allocations.items()}}
    frame.to_csv(args.out / "refine_levels.csv", index=False)
    entries.to_csv(args.out / "refine_levels.entries.csv", index=False)
    (args.out / "refine_levels.json").write_text(json.dumps(summary, indent=1, default=str))
    levels_frame.to_csv(args.out / "refine_levels.levels.csv", index=False)
    (args.out / "refine_levels.md").write_text(report(summary, frame, levels_frame))
    print(report(summary, frame, levels_frame))
    return summary


def _fine_index(alloc, fine_levels) -> np.ndarray:
    """Each unit's level of ``alloc`` as an index into the fine grid (the coarse s all lie on it)."""
    s = np.asarray([lv.s for lv in alloc.levels], dtype=float)
    return np.array([int(np.flatnonzero(np.isclose(fine_levels["s"], v))[0]) for v in s])


def _entries(direct, refined, refined_lin, lin, fine_levels) -> pd.DataFrame:
    n, m = direct.n_units, direct.n_levels
    return pd.DataFrame({"unit": np.repeat(direct.unit_names, m), "s": np.tile(fine_levels["s"].to_numpy(), n),
                         "direct": direct.degradation.ravel(), "pchip_log": refined.degradation.ravel(),
                         "pchip_linear": refined_lin.degradation.ravel(), "linear": lin.ravel()})


def report(summary: dict, frame: pd.DataFrame, levels: pd.DataFrame) -> str:
    fid = pd.DataFrame(summary["fidelity"]).T
    paired = pd.DataFrame(summary["paired_kl"]).T
    return "\n".join([
        "# Refined level grids: a coarse profile interpolated to a fine s grid (generated by studies/refine_levels.py)",
        "", f"`{summary['command']}`", "",
        f"{summary['model']} cut to {summary['layers']} decoder layers ({summary['dtype']}), {summary['units']} input "
        f"units (q+k+v, o, gate+up, down per layer), teal thresholds calibrated on the dense model, isolated KL on "
        f"{summary['profile_windows'][0]} x {summary['profile_windows'][1]} profiling tokens. Coarse grid s = "
        f"{summary['coarse_s']}; fine grid step {summary['step']} profiled directly; the refined table is the coarse "
        "one interpolated by PCHIP in s per unit of log(KL + eps) (allocator.refine's default, the (0, 0) knot "
        "given; `refined_linear_space`: PCHIP of the KL itself), costs priced on the fine grid by the analytic "
        "provider.", "",
        "## Fidelity at the fine-only levels (against the directly profiled fine table)", "",
        fid.to_markdown(floatfmt=".4g"), "",
        "`mae` / `max_abs`: absolute KL error (nats per token); `median_rel` / `p90_rel`: |error| / direct KL; "
        "`spearman_all`: rank correlation of every (unit, level) entry; `spearman_per_level_*`: across units at each "
        "fine-only level (what dp trades on), mean and worst; `mean_kl_direct`: the direct entries' mean; "
        "`pchip_log`: the refined table (allocator.refine's default), `pchip_linear`: PCHIP of the KL itself, "
        "`linear`: straight lines between the coarse points; `direct_replicate` (with --replicate): the fine grid "
        "profiled again on other profiling windows, the table's own sampling noise.", "",
        "Per fine-only level (MAE and Spearman across units):", "",
        levels.to_markdown(index=False, floatfmt=".3g"), "",
        f"## dp at {summary['budget']:.0%} of the decode bytes, measured on held-out windows", "",
        frame.to_markdown(index=False, floatfmt=".4g"), "",
        "`predicted_own`: the KL sum of the table the allocation was solved on; `predicted_direct`: the same "
        "allocation priced on the direct fine table; `kl_*` / `ppl_*`: held-out KL to dense and perplexity (of a "
        "cut model: only the KL is meaningful) "
        f"(dense perplexity {', '.join(f'{k} {v:.2f}' for k, v in summary['dense_ppl'].items())}); `uniform`: "
        "every unit at the budget's s. `profile_s` includes the cached rows' reload when rerun.", "",
        "## Paired differences of per-window held-out KL (mean +- standard error; lower is better)", "",
        paired.to_markdown(floatfmt=".4g"), ""])


if __name__ == "__main__":
    main()
