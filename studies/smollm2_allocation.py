"""Study: per-layer sparsity allocation on SmolLM2-135M against uniform, with TEAL and R-Sparse.

For model-level sparsity 0.4 / 0.5 / 0.6 and methods teal / rsparse: uniform, greedy and dp on KL tables
profiled in both modes (isolated: rest dense; operating_point: rest at the budget's uniform level). Measured
on held-out text (Austen: Pride and Prejudice + Persuasion; the second half of the wiki articles): perplexity
and KL to dense; and the additivity audit: the table's predicted KL against the KL measured on the profiling
windows with the whole allocation applied.

    python studies/smollm2_allocation.py            # ~15 min per method and budget on 2 busy CPU cores, minutes with cached tables
    python studies/smollm2_allocation.py --quick    # 6 layers, tiny windows: a smoke run

Writes studies/results/smollm2_allocation.{csv,md} (or --out).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from allocator import Allocation, Problem, analytic_tables, make_levels, minimize
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
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true", help="6 layers and tiny windows (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="only re-render the markdown from the CSV")
    return ap.parse_args()


def solve(tables, solver: str, sparsity: float):
    problem = Problem(tables, cost="bytes_decode", sparsity=sparsity)
    return minimize(problem, solver, seed=0)


def main():
    args = parse_args()
    if args.render:
        write(pd.read_csv(args.out / "smollm2_allocation.csv").to_dict("records"), args.out)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    if args.quick:
        args.calib, args.profile, args.eval = [2, 64], [2, 32], [2, 64]
    model, tok = load_model("smollm2-135m", dtype=args.dtype, max_layers=6 if args.quick else None)
    calib = token_windows(tok, "calibration", *args.calib, seed=0)
    prof_windows = token_windows(tok, "calibration", *args.profile, seed=1)
    evals = {"austen": token_windows(tok, "austen_eval", *args.eval, seed=0),
             "wiki": token_windows(tok, "wiki_eval", *args.eval, seed=0)}
    grid = make_levels(s=GRID)
    base = analytic_tables(model.config.to_dict(), grid, unit=args.unit)
    units = base.unit_names
    methods = {name: get_method(name, seed=0).calibrate(model, calib, batch_size=4) for name in args.methods}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    iso_levels = trust_region(grid, args.iso_center, args.window)
    op_budgets = args.budgets if args.op_budgets is None else args.op_budgets
    for budget in args.budgets:
        near = trust_region(iso_levels, budget, args.window)
        index = [int(np.flatnonzero(np.isclose(grid["s"], s))[0]) for s in near["s"]]
        iso_index = [int(np.flatnonzero(np.isclose(iso_levels["s"], s))[0]) for s in near["s"]]
        for name, method in methods.items():
            t0 = time.perf_counter()
            iso = profile(model, method, prof_windows, iso_levels, units, mode="isolated")
            tables = {"isolated": base.select_levels(index).with_degradation(iso.table("kl")[:, iso_index])}
            if any(np.isclose(budget, op_budgets)):
                op = profile(model, method, prof_windows, near, units, mode="operating_point",
                             operating_level=budget_level(near, budget))
                tables["operating_point"] = base.select_levels(index).with_degradation(op.table("kl"))
            profile_s = time.perf_counter() - t0
            j = int(np.flatnonzero(np.isclose(near["s"], budget))[0])
            allocations = {("uniform", "-"): Allocation.from_levels(tables["isolated"], [j] * len(units))}
            predicted = {("uniform", "-"): {m: float(t.degradation[:, j].sum()) for m, t in tables.items()}}
            for mode, table in tables.items():
                for solver in args.solvers:
                    result = solve(table, solver, budget)
                    allocations[(solver, mode)] = result.allocation
                    predicted[(solver, mode)] = {mode: float(result.degradation)}
            named = {f"{s}/{m}": a for (s, m), a in allocations.items()}
            audit = compare(model, prof_windows, method, named, batch_size=8)
            held = {src: compare(model, w, method, named, batch_size=4) for src, w in evals.items()}
            if not rows:
                rows.append({"method": "-", "budget": 0.0, "solver": "dense", "profile_mode": "-", "s_min": 0.0,
                             "s_max": 0.0, "predicted_kl": 0.0, "measured_kl_calib": 0.0,
                             **{f"ppl_{src}": h["dense"]["perplexity"] for src, h in held.items()},
                             **{f"kl_{src}": 0.0 for src in held}})
            for (solver, mode), alloc in allocations.items():
                key = f"{solver}/{mode}"
                s = np.array([lv["s"] for lv in alloc.levels])
                pred = predicted[(solver, mode)]
                rows.append({"method": name, "unit": args.unit, "budget": budget, "solver": solver,
                             "profile_mode": mode,
                             "s_min": s.min(), "s_max": s.max(),
                             "predicted_kl": pred.get(mode, pred.get("operating_point", pred.get("isolated"))),
                             "measured_kl_calib": audit[key]["kl"],
                             **{f"ppl_{src}": h[key]["perplexity"] for src, h in held.items()},
                             **{f"kl_{src}": held[src][key]["kl"] for src in held},
                             "levels": " ".join(f"{v:g}" for v in s)})
            logger.info("%s at %.1f done (profiles %.0f s)", name, budget, profile_s)
            write(rows, args.out)
    write(rows, args.out)


def with_gains(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of uniform's perplexity increase over dense that each allocation removes (1/3 is the issue's bar)."""
    frame = frame.copy()
    dense = frame[frame["solver"] == "dense"].iloc[0]
    for src in [c[4:] for c in frame.columns if c.startswith("ppl_")]:
        gains = []
        for _, row in frame.iterrows():
            uni = frame[(frame["method"] == row["method"]) & (frame["budget"] == row["budget"])
                        & (frame["solver"] == "uniform")]
            if row["solver"] == "dense" or uni.empty:
                gains.append(float("nan"))
                continue
            u = uni.iloc[0][f"ppl_{src}"]
            gains.append((u - row[f"ppl_{src}"]) / (u - dense[f"ppl_{src}"]))
        frame[f"gain_{src}"] = gains
    return frame


def write(rows: list[dict], out: Path) -> None:
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "smollm2_allocation.csv", index=False, float_format="%.5g")
    shown = with_gains(frame).drop(columns=["levels"], errors="ignore")
    path = out / "smollm2_allocation.md"
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""      # hand-written findings survive a re-render
    path.write_text(
        "# SmolLM2-135M: per-layer allocation vs uniform (generated by studies/smollm2_allocation.py)\n\n"
        "`gain_*`: share of uniform's perplexity increase over dense that the allocation removes.\n"
        "`predicted_kl`: the table's sum; `measured_kl_calib`: the same quantity measured on the profiling windows\n"
        "with the whole allocation applied (the additivity audit).\n\n"
        + shown.to_markdown(index=False, floatfmt=".4g") + "\n" + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    main()
