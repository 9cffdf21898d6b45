"""Study: per-layer sparsity allocation on SmolLM2-135M against uniform, with TEAL and R-Sparse.

For model-level sparsity 0.4 / 0.5 / 0.6 and methods teal / rsparse: uniform, greedy and dp on KL tables
profiled in both modes (isolated: rest dense; operating_point: rest at the budget's uniform level). Measured
on held-out text (Austen: Pride and Prejudice + Persuasion; the second half of the wiki articles): perplexity
and KL to dense; and the additivity audit: the table's predicted KL against the KL measured on the profiling
windows with the whole allocation applied. Every allocation is measured with dense-calibrated and with
sequentially calibrated thresholds (``--calibrations``), with the sparsity it realizes on each text; rsparse
may get a per-unit (s, rho) grid (``--rho 1 0.9 0.8``). Rows of earlier runs with other keys are kept.

    python studies/smollm2_allocation.py            # ~15 min per method and budget on 2 busy CPU cores, minutes with cached tables
    python studies/smollm2_allocation.py --unit block --budgets 0.5 --rho 1 0.9 0.8 --solvers dp --op-budgets
    python studies/smollm2_allocation.py --quick    # 6 layers, tiny windows: a smoke run

Writes studies/results/smollm2_allocation.{csv,md} (or --out).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from allocator import Allocation, Problem, analytic_tables, make_levels, minimize
from allocator.evaluators.calibration import for_allocations
from allocator.evaluators.methods import get_method
from allocator.evaluators.models import load_model
from allocator.evaluators.pipeline import budget_level, compare, trust_region
from allocator.evaluators.profiling import profile
from allocator.evaluators.text import token_windows

logger = logging.getLogger("smollm2_allocation")
RESULTS = Path(__file__).parent / "results"
GRID = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
NOTES = "## Setup"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.4, 0.6])
    ap.add_argument("--methods", nargs="+", default=["teal", "rsparse"])
    ap.add_argument("--solvers", nargs="+", default=["greedy", "dp"])
    ap.add_argument("--window", type=float, default=0.2, help="trust region of levels around the budget")
    ap.add_argument("--op-budgets", type=float, nargs="*", default=None,
                    help="budgets that also get operating-point tables (default: all)")
    ap.add_argument("--iso-center", type=float, default=0.5,
                    help="the isolated table (budget independent) is profiled once on the levels around this")
    ap.add_argument("--calib", type=int, nargs=2, default=[8, 256], help="calibration windows x length")
    ap.add_argument("--profile", type=int, nargs=2, default=[3, 96], help="profiling windows x length (one per calibration source)")
    ap.add_argument("--eval", type=int, nargs=2, default=[4, 256], help="held-out windows x length per source")
    ap.add_argument("--unit", default="layer", choices=["layer", "block", "projection"],
                    help="allocation unit: a decoder layer, attention / MLP block, or one projection")
    ap.add_argument("--rho", type=float, nargs="+", default=[1.0],
                    help="rsparse sparse ratios: a per-unit (s, rho) grid (R-Sparse: 1 0.9 0.8); teal uses rho = 1")
    ap.add_argument("--calibrations", nargs="+", default=["dense", "sequential"], choices=["dense", "sequential"],
                    help="threshold calibration(s) every allocation is measured with")
    ap.add_argument("--eval-seed", type=int, default=0, help="draw of the held-out windows (noise checks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true", help="6 layers and tiny windows (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="only re-render the markdown from the CSV")
    return ap.parse_args()


def solve(tables, solver: str, sparsity: float):
    problem = Problem(tables, cost="bytes_decode", sparsity=sparsity)
    return minimize(problem, solver, seed=0)


KEY = ["method", "unit", "rho_grid", "profile_tokens", "budget", "solver", "profile_mode", "calibration"]


def isolated_table(model, method, windows, iso_levels, units, rhos):
    """The isolated KL table on ``iso_levels`` x ``rhos``: the rho = 1 rows and the rho < 1 rows are profiled (and
    cached) as two tables, so a grid that adds rho < 1 reuses the rho = 1 rows; columns in ``make_levels`` order."""
    s_values = sorted(set(iso_levels["s"]))
    levels = make_levels(s=s_values, rho=rhos)
    kl = np.zeros((len(units), len(levels)))
    parts = [[1.0]] + ([[r for r in rhos if r < 1]] if any(r < 1 for r in rhos) else [])
    for part_rhos in parts:
        part_levels = make_levels(s=[s for s in s_values if s > 0 or part_rhos == [1.0]], rho=part_rhos)
        table = profile(model, method, windows, part_levels, units, mode="isolated").table("kl")
        for j, lv in enumerate(part_levels.itertuples()):
            kl[:, _level_index(levels, lv.s, lv.rho)] = table[:, j]
    return levels, kl


def _level_index(levels, s, rho=1.0) -> int:
    return int(np.flatnonzero(np.isclose(levels["s"], s) & np.isclose(levels["rho"], rho))[0])


def matched_uniform(model, method, rows, units, evals, prof_windows, name, budget, args) -> dict:
    """Uniform with sequential thresholds at the sparsity that dense-calibrated uniform actually realizes: the two
    calibrations compared at equal realized cost."""
    dense_uniform = next(r for r in rows if r["method"] == name and r["budget"] == budget and r["unit"] == args.unit
                         and r["solver"] == "uniform" and r["calibration"] == "dense")
    s = round(float(np.mean([dense_uniform[f"realized_{src}"] for src in evals])), 3)
    alloc = {"matched": {u: {"s": s, "rho": 1.0, "bits": 16} for u in units}}
    per_alloc = for_allocations(model, method, alloc, "sequential")
    audit = compare(model, prof_windows, per_alloc, alloc, batch_size=8)["matched"]
    held = {src: compare(model, w, per_alloc, alloc, batch_size=4)["matched"] for src, w in evals.items()}
    return {**{k: dense_uniform[k] for k in ("method", "unit", "rho_grid", "profile_tokens", "budget")},
            "solver": "uniform@realized", "profile_mode": "-", "calibration": "sequential", "s_min": s, "s_max": s,
            "low_rank_units": 0, "predicted_kl": float("nan"), "measured_kl_calib": audit["kl"],
            **{f"ppl_{src}": h["perplexity"] for src, h in held.items()}, **{f"kl_{src}": h["kl"] for src, h in held.items()},
            **{f"realized_{src}": h["realized_sparsity"] for src, h in held.items()}, "levels": f"{s:g} everywhere"}


def main():
    args = parse_args()
    if args.render:
        write(pd.read_csv(args.out / "smollm2_allocation.csv").to_dict("records"), args.out, merge=False)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.calib, args.profile, args.eval = [2, 64], [2, 32], [2, 64]
    model, tok = load_model("smollm2-135m", dtype=args.dtype, max_layers=6 if args.quick else None)
    calib = token_windows(tok, "calibration", *args.calib, seed=0)
    prof_windows = token_windows(tok, "calibration", *args.profile, seed=1)
    evals = {"austen": token_windows(tok, "austen_eval", *args.eval, seed=args.eval_seed),
             "wiki": token_windows(tok, "wiki_eval", *args.eval, seed=args.eval_seed)}
    profile_tokens = f"{args.profile[0]}x{args.profile[1]}"
    units = analytic_tables(model.config.to_dict(), make_levels(s=GRID), unit=args.unit).unit_names
    methods = {name: get_method(name, seed=0).calibrate(model, calib, batch_size=4) for name in args.methods}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    iso_levels = trust_region(make_levels(s=GRID), args.iso_center, args.window)
    op_budgets = args.budgets if args.op_budgets is None else args.op_budgets
    for budget in args.budgets:
        for name, method in methods.items():
            rhos = args.rho if name == "rsparse" else [1.0]
            t0 = time.perf_counter()
            iso_grid, iso_kl = isolated_table(model, method, prof_windows, iso_levels, units, rhos)
            near = trust_region(iso_grid, budget, args.window)
            base = analytic_tables(model.config.to_dict(), near, unit=args.unit)
            iso_index = [_level_index(iso_grid, lv.s, lv.rho) for lv in near.itertuples()]
            tables = {"isolated": base.with_degradation(iso_kl[:, iso_index])}
            if any(np.isclose(budget, op_budgets)):
                near1 = near[np.isclose(near["rho"], 1.0)].reset_index(drop=True)
                op = profile(model, method, prof_windows, near1, units, mode="operating_point",
                             operating_level=budget_level(near1, budget))
                op_index = [_level_index(near, lv.s, 1.0) for lv in near1.itertuples()]
                tables["operating_point"] = base.select_levels(op_index).with_degradation(op.table("kl"))
            profile_s = time.perf_counter() - t0
            j = _level_index(near, budget)
            allocations = {("uniform", "-"): Allocation.from_levels(tables["isolated"], [j] * len(units))}
            predicted = {("uniform", "-"): {m: float(t.degradation[:, _level_index(t.levels, budget)].sum())
                                            for m, t in tables.items()}}
            for mode, table in tables.items():
                for solver in args.solvers:
                    result = solve(table, solver, budget)
                    allocations[(solver, mode)] = result.allocation
                    predicted[(solver, mode)] = {mode: float(result.degradation)}
            named = {f"{s}/{m}": a for (s, m), a in allocations.items()}
            for calibration in args.calibrations:
                per_alloc = for_allocations(model, method, named, calibration)
                audit = compare(model, prof_windows, per_alloc, named, batch_size=8)
                held = {src: compare(model, w, per_alloc, named, batch_size=4) for src, w in evals.items()}
                if not rows:
                    rows.append({"method": "-", "unit": "-", "rho_grid": "-", "profile_tokens": "-", "budget": 0.0,
                                 "solver": "dense", "profile_mode": "-", "calibration": "-", "s_min": 0.0,
                                 "s_max": 0.0, "predicted_kl": 0.0, "measured_kl_calib": 0.0,
                                 **{f"ppl_{src}": h["dense"]["perplexity"] for src, h in held.items()},
                                 **{f"kl_{src}": 0.0 for src in held}})
                for (solver, mode), alloc in allocations.items():
                    key = f"{solver}/{mode}"
                    s = np.array([lv["s"] for lv in alloc.levels])
                    rho = np.array([lv.get("rho", 1.0) for lv in alloc.levels])
                    pred = predicted[(solver, mode)]
                    rows.append({"method": name, "unit": args.unit, "rho_grid": " ".join(f"{r:g}" for r in rhos),
                                 "profile_tokens": profile_tokens, "budget": budget, "solver": solver,
                                 "profile_mode": mode, "calibration": calibration,
                                 "s_min": s.min(), "s_max": s.max(), "low_rank_units": int((rho < 1).sum()),
                                 "predicted_kl": pred.get(mode, pred.get("operating_point", pred.get("isolated"))),
                                 "measured_kl_calib": audit[key]["kl"],
                                 **{f"ppl_{src}": h[key]["perplexity"] for src, h in held.items()},
                                 **{f"kl_{src}": held[src][key]["kl"] for src in held},
                                 **{f"realized_{src}": held[src][key]["realized_sparsity"] for src in held},
                                 "levels": " ".join(f"{v:g}" if r >= 1 else f"{v:g}/{r:g}" for v, r in zip(s, rho))})
                write(rows, args.out)
            if {"dense", "sequential"} <= set(args.calibrations):
                rows.append(matched_uniform(model, method, rows, units, evals, prof_windows, name, budget, args))
                write(rows, args.out)
            logger.info("%s at %.1f done (profiles %.0f s)", name, budget, profile_s)
    write(rows, args.out)


def with_gains(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of uniform's perplexity increase over dense that each allocation removes (1/3 is the issue's bar)."""
    frame = frame.copy()
    dense = frame[frame["solver"] == "dense"].iloc[0]
    for src in [c[4:] for c in frame.columns if c.startswith("ppl_")]:
        gains = []
        for _, row in frame.iterrows():
            same = np.ones(len(frame), dtype=bool)
            for col in ("method", "unit", "rho_grid", "profile_tokens", "budget", "calibration"):
                if col in frame:
                    same &= (frame[col].astype(str) == str(row[col])).to_numpy()
            uni = frame[same & (frame["solver"] == "uniform").to_numpy()]
            if row["solver"] == "dense" or uni.empty:
                gains.append(float("nan"))
                continue
            u = uni.iloc[0][f"ppl_{src}"]
            gains.append((u - row[f"ppl_{src}"]) / (u - dense[f"ppl_{src}"]))
        frame[f"gain_{src}"] = gains
        if f"realized_{src}" in frame:
            frame[f"gain_eq_{src}"] = [equal_cost_gain(frame, row, src, dense[f"ppl_{src}"]) for _, row in frame.iterrows()]
    return frame


def equal_cost_gain(frame: pd.DataFrame, row, src: str, dense_ppl: float) -> float:
    """The gain against uniform at the sparsity the row *realizes* on ``src``: uniform's perplexity there is
    interpolated (log-linear) between the sequentially calibrated uniform rows of the method (whose realized
    sparsity matches their nominal level); NaN more than 0.01 outside their range."""
    if row["solver"] in ("dense",) or pd.isna(row.get(f"realized_{src}")):
        return float("nan")
    curve = frame[(frame["method"] == row["method"]) & frame["solver"].isin(["uniform", "uniform@realized"])
                  & (frame["calibration"] == "sequential") & frame[f"realized_{src}"].notna()]
    curve = curve.drop_duplicates(f"realized_{src}").sort_values(f"realized_{src}")
    r, x = float(row[f"realized_{src}"]), curve[f"realized_{src}"].to_numpy(float)
    if len(curve) < 2 or not x[0] - 0.01 <= r <= x[-1] + 0.01:
        return float("nan")
    logp = np.log(curve[f"ppl_{src}"].to_numpy(float))
    k = int(np.clip(np.searchsorted(x, r), 1, len(x) - 1))        # segment (k-1, k), extrapolated at the ends
    u = math.exp(logp[k - 1] + (logp[k] - logp[k - 1]) * (r - x[k - 1]) / (x[k] - x[k - 1]))
    return (u - row[f"ppl_{src}"]) / (u - dense_ppl)


def write(rows: list[dict], out: Path, merge: bool = True) -> None:
    """CSV and markdown; ``merge`` keeps the rows of earlier runs that this run did not recompute (same KEY)."""
    frame = pd.DataFrame(rows)
    path_csv = out / "smollm2_allocation.csv"
    if merge and path_csv.exists():
        old = pd.read_csv(path_csv, keep_default_na=False, na_values=[""])
        for col, default in (("calibration", "dense"), ("rho_grid", "1"), ("profile_tokens", "3x96")):
            if col not in old:
                old[col] = np.where(old["solver"] == "dense", "-", default)
        old["rho_grid"] = old["rho_grid"].astype(str)
        fresh = set(map(tuple, frame[KEY].astype(str).values))
        old = old[[tuple(r) not in fresh for r in old[KEY].astype(str).values]]
        frame = pd.concat([old, frame], ignore_index=True)
    frame = frame.sort_values(["budget", "method", "unit", "rho_grid", "profile_tokens", "calibration"],
                              kind="stable").reset_index(drop=True)
    frame.to_csv(path_csv, index=False, float_format="%.5g")
    shown = with_gains(frame).drop(columns=["levels", "iso_levels"], errors="ignore")
    path = out / "smollm2_allocation.md"
    old_md = path.read_text() if path.exists() else ""
    notes = old_md[old_md.index(NOTES):] if NOTES in old_md else ""      # hand-written findings survive a re-render
    path.write_text(
        "# SmolLM2-135M: per-layer allocation vs uniform (generated by studies/smollm2_allocation.py)\n\n"
        "`gain_*`: share of uniform's perplexity increase over dense that the allocation removes (against the uniform\n"
        "row of the same method, unit, rho grid, profiling tokens and calibration). `predicted_kl`: the table's sum;\n"
        "`measured_kl_calib`: the same quantity measured on the profiling windows with the whole allocation applied\n"
        "(the additivity audit). `realized_*`: share of the dense projection bytes not read on that held-out text\n"
        "(zeroed channels less the low-rank factors). `calibration`: thresholds from the dense model, or sequential\n"
        "(per allocation, on the model whose earlier layers are already compressed). `gain_eq_*`: the gain against\n"
        "uniform at the sparsity the row realizes on that text (uniform interpolated between the sequentially\n"
        "calibrated uniform rows of the method): the comparison at equal real cost.\n\n"
        + shown.to_markdown(index=False, floatfmt=".4g") + "\n" + ("\n" + notes if notes else ""))

if __name__ == "__main__":
    main()
