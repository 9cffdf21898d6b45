"""Solver scaling: solve time of dp / milp / greedy / uniform and their optimality gap against the certificate.

Instances: analytic prefill-FLOP tables (2048 tokens) from shipped configs (Llama-2-7B for 32 layers, Llama-2-70B
for 80; 120 and 200 layers tile the 70B layers), one unit per decoder layer, levels s = linspace(0, 0.8, m), and
seeded synthetic degradation (``allocator.synthetic``: convex in s, U-shaped layer sensitivity, log-normal noise).
Directions: ``sparsity=0.5`` (min degradation) and ``delta`` = the degradation of uniform s = 0.4 (min cost).
Modes: per unit, consecutive groups (unconstrained: equals the per-layer optimum here) and at most 8 groups.
The certificate is milp when HiGHS proves optimality within ``--milp-time-limit``, else the best value any
solver found (marked). Torch-free: the core's ``analytic_tables``, ``synthetic_tables``, ``Problem`` and ``minimize``.

    python studies/solver_scaling.py --out DIR [--layers 32 80] [--levels 11 21]    # solver_scaling.{csv,md}
    python studies/solver_scaling.py --quick --out /tmp/ss                          # 32 layers x 11 levels, seconds
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import sys

import numpy as np
import pandas as pd
import scipy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402

from allocator import Infeasible, Problem, Tables, Unit, analytic_tables, make_levels, minimize
from allocator.synthetic import synthetic_tables  # noqa: E402

MODES = {"unit": (None, None), "grouped": ("consecutive", None), "grouped G<=8": ("consecutive", 8)}


def machine() -> str:
    name = platform.processor() or ""
    if not name and Path("/proc/cpuinfo").exists():
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name or platform.machine()}, {cores} cores usable ({os.cpu_count()} online), {platform.system()}"


def make_tables(layers: int, n_levels: int, seed: int) -> Tables:
    levels = make_levels(s=np.linspace(0.0, 0.8, n_levels))
    source = analytic_tables("llama-2-7b" if layers == 32 else "llama-2-70b", levels)
    if layers not in (32, 80):   # synthesize deeper models by tiling the 70B layers
        rows = np.arange(layers) % source.n_units
        units = [Unit(f"layers.{k}", k, source.units[r].kinds, source.units[r].params, source.units[r].shapes)
                 for k, r in enumerate(rows)]
        source = Tables(units, levels, {k: v[rows] for k, v in source.costs.items()},
                        provenance={"model": f"llama-2-70b tiled to {layers} layers"})
    return synthetic_tables(source, seed)


def timed(problem, solver, repeat, **options):
    """(result or None, best wall time, note)."""
    best, result, note = np.inf, None, ""
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            result = minimize(problem, solver, **options)
        except Infeasible as exc:
            note = f"infeasible (best {exc.best_achievable:.4g})"
        except TimeoutError:
            note = "no incumbent within the time limit"
        best = min(best, time.perf_counter() - start)
        if best > 1.0:
            break
    return result, best, note


def run_case(layers, n_levels, mode, direction, args) -> list[dict]:
    tables = make_tables(layers, n_levels, args.seed)
    grouping, max_groups = MODES[mode]
    if direction == "budget":
        limit = {"sparsity": 0.5}
    else:
        s = tables.levels["s"].to_numpy()
        limit = {"delta": float(tables.degradation[:, int(np.argmin(np.abs(s - 0.4)))].sum())}
    problem = Problem(tables, "flops_prefill", grouping=grouping, max_groups=max_groups, **limit)
    runs = {"milp": timed(problem, "milp", 1, time_limit=args.milp_time_limit)}
    runs["dp"] = timed(problem, "dp", args.repeat)
    if grouping and layers * layers * n_levels * (max_groups or 1) <= args.full_dp_cells:
        runs["dp (full fine)"] = timed(problem, "dp", 1, two_phase=False)
    runs["greedy"] = timed(problem, "greedy", args.repeat)
    runs["uniform"] = timed(problem, "uniform", args.repeat)
    milp = runs["milp"][0]
    proven = milp is not None and milp.info.get("optimal")
    found = [r.objective for r, _, _ in runs.values() if r is not None and r.feasible]
    certificate = milp.objective if proven else (min(found) if found else np.nan)
    rows = []
    for solver, (result, seconds, note) in runs.items():
        if solver == "milp" and result is not None and not proven:
            note = f"time limit, HiGHS gap {result.info['mip_gap']:.2e}"
        objective = result.objective if result is not None else np.nan
        rows.append({"layers": layers, "levels": n_levels, "mode": mode, "direction": direction, "solver": solver,
                     "seconds": seconds, "objective": objective,
                     "gap_pct": 100 * (objective - certificate) / abs(certificate) if result is not None else np.nan,
                     "certificate": "milp (optimal)" if proven else "best found", "runs":
                     len(problem.runs(problem.layer_levels(result.x[None])[0])) if result is not None else None,
                     "feasible": bool(result.feasible) if result is not None else False, "note": note})
    return rows


def markdown(frame: pd.DataFrame, header: str) -> str:
    shown = frame.assign(seconds=frame["seconds"].map(lambda v: f"{v:.3f}"),
                         objective=frame["objective"].map(lambda v: f"{v:.6g}"),
                         gap_pct=frame["gap_pct"].map(lambda v: "" if np.isnan(v) else f"{v:.4f}"))
    cols = list(shown.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return header + "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, device=None, quick="32 layers x 11 levels, one repeat, 10 s milp limit (seconds)")
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 80, 120, 200])
    parser.add_argument("--levels", type=int, nargs="+", default=[11, 21])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--directions", nargs="+", default=["budget", "delta"], choices=["budget", "delta"])
    parser.add_argument("--milp-time-limit", type=float, default=60.0)
    parser.add_argument("--full-dp-cells", type=float, default=2e6, help="run the full fine DP up to L^2 m G")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for solvers under a second")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.levels, args.repeat, args.milp_time_limit = [32], [11], 1, 10.0
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for layers in args.layers:
        for n_levels in args.levels:
            for mode in args.modes:
                for direction in args.directions:
                    rows += run_case(layers, n_levels, mode, direction, args)
                    print(f"done L={layers} m={n_levels} {mode} {direction}", flush=True)
    frame = pd.DataFrame(rows)
    dp = frame[(frame.solver == "dp") & (frame.layers == 80) & (frame.levels == 21)]
    targets = [f"- per-unit dp, 80 units x 21 levels: {dp[dp['mode'] == 'unit'].seconds.max():.3f} s "
               f"(target < 0.5 s)" if not dp[dp['mode'] == 'unit'].empty else "",
               f"- two-phase grouped dp, 80 layers x 21 levels: {dp[dp['mode'] == 'grouped'].seconds.max():.3f} s "
               f"unconstrained, {dp[dp['mode'] == 'grouped G<=8'].seconds.max():.3f} s with at most 8 groups "
               f"(target < 5 s)" if not dp[dp['mode'] != 'unit'].empty else ""]
    header = (f"# Solver scaling\n\nMachine: {machine()}; python {platform.python_version()}, numpy {np.__version__}, "
              f"scipy {scipy.__version__}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.\n"
              f"Command: `python studies/solver_scaling.py` with {vars(args) | {'out': str(args.out)}}.\n\n"
              + __doc__.split("\n\n")[1] + "\n\nTimes are wall seconds (best of "
              f"{args.repeat} under a second); gap_pct = 100 (objective - certificate) / certificate, lower is better "
              "(both directions minimise). Shared 2-core machine: other jobs ran at the same time.\n\n## Targets\n\n"
              + "\n".join(t for t in targets if t) + "\n\n## All runs\n\n")
    text = markdown(frame, header)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "solver_scaling.csv", index=False)
    (args.out / "solver_scaling.md").write_text(text)


if __name__ == "__main__":
    main()
