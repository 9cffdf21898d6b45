"""Study: per-layer sparsity allocation on SmolLM2-135M against uniform, with TEAL and R-Sparse.

For model-level sparsity 0.4 / 0.5 / 0.6 and methods teal / rsparse: uniform, greedy and dp on KL tables
profiled in both modes (isolated: rest dense; operating_point: rest at the budget's uniform level). Measured
on held-out text (Austen: Pride and Prejudice + Persuasion; the second half of the wiki articles): perplexity
and KL to dense; and the additivity audit: the table's predicted KL against the KL measured on the profiling
windows with the whole allocation applied. Every allocation is measured with dense-calibrated and with
sequentially calibrated thresholds (``--calibrations``), with the sparsity it realizes on each text. Rows of
earlier runs with other keys are kept. Gains: ``gain_*`` = ``allocator.gains.share_removed``, the share of
uniform's perplexity increase over dense that the allocation removes.

The config is the main job's (``python -m allocator`` presets and defaults, e.g. ``method=rsparse`` with its
(s, rho) grid; ``--rho`` replaces rsparse's rho grid); the study calls its stages: ``load``, ``data``,
``calibrate``, ``level_grid`` (the trust region around each budget), ``cost_tables``, ``profile_tables``,
``plan`` (dense or sequential calibration), and ``measure.compare`` for the held-out text and the audit.

    python studies/smollm2_allocation.py --out DIR         # ~15 min per method and budget on 2 busy CPU cores
    python studies/smollm2_allocation.py --unit block --budgets 0.5 --rho 1 0.9 0.8 --solvers dp --op-budgets --out DIR
    python studies/smollm2_allocation.py --quick --out /tmp/sa      # 2 layers, tiny windows: a smoke run

Writes smollm2_allocation.{csv,md} in ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, add_config_args, base_overrides, job_config, short  # noqa: E402

from allocator import Allocation, minimize  # noqa: E402
from allocator.experiments import build_problem  # noqa: E402
from allocator.gains import share_removed  # noqa: E402

logger = logging.getLogger("smollm2_allocation")
NOTES = "## Setup"
#: the study's settings on top of the main job's defaults: whole-layer units, 4 held-out windows per source
STUDY = ["profile.unit=layer", "data.eval_windows=4"]
KEY = ["method", "unit", "rho_grid", "profile_tokens", "budget", "solver", "profile_mode", "calibration"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(ap, quick="2 layers, tiny windows, teal at 0.5 (a smoke run)")
    add_config_args(ap)
    ap.add_argument("--budgets", type=float, nargs="+", default=None, help="model-level sparsities (default 0.5 0.4 "
                    "0.6; --quick: 0.5)")
    ap.add_argument("--methods", nargs="+", default=None, help="method presets (default teal rsparse; --quick: teal)")
    ap.add_argument("--solvers", nargs="+", default=["greedy", "dp"])
    ap.add_argument("--window", type=float, default=0.2, help="trust region of levels around the budget "
                    "(profile.window)")
    ap.add_argument("--op-budgets", type=float, nargs="*", default=None,
                    help="budgets that also get operating-point tables (default: all)")
    ap.add_argument("--iso-center", type=float, default=0.5,
                    help="the isolated table (budget independent) is profiled once on the levels around this")
    ap.add_argument("--unit", default="layer", choices=["layer", "block", "input", "projection"],
                    help="allocation unit (profile.unit)")
    ap.add_argument("--rho", type=float, nargs="+", default=None,
                    help="rsparse sparse ratios (method.levels.rho; default: the rsparse preset's); teal uses rho = 1")
    ap.add_argument("--calibrations", nargs="+", default=["dense", "sequential"], choices=["dense", "sequential"],
                    help="threshold calibration(s) every allocation is measured with (method.calibration)")
    ap.add_argument("--eval-seed", type=int, default=None, help="draw of the held-out windows (noise checks; "
                    "default: --seed)")
    ap.add_argument("--render", action="store_true", help="only re-render the markdown from --out's CSV")
    args = ap.parse_args(argv)
    args.budgets = args.budgets or ([0.5] if args.quick else [0.5, 0.4, 0.6])
    args.methods = args.methods or (["teal"] if args.quick else ["teal", "rsparse"])
    return args


def configs(args, name: str, budget: float) -> dict:
    """The main-job configs of one (method, budget): the budget's, the isolated table's (centred on
    ``--iso-center``) and the operating-point table's (rho = the operating rho only)."""
    over = [*base_overrides(args, STUDY), f"profile.unit={args.unit}", f"profile.window={args.window}",
            f"method={name}", f"budget.value={budget}"]
    if name == "rsparse" and args.rho:
        over.append(f"method.levels.rho=[{','.join(map(str, args.rho))}]")
    config = job_config(over)
    return {"budget": config, "isolated": job_config([*over, f"budget.value={args.iso_center}"]),
            "operating_point": job_config([*over, "profile.mode=operating_point",
                                           f"method.levels.rho=[{config.method.operating_rho}]"])}


def tables_of(cfgs: dict, model, method, windows, with_op: bool) -> dict:
    """The isolated table cut to the budget's trust region and, when asked, the operating-point table."""
    from allocator.evaluators import stages

    iso_grid = stages.level_grid(cfgs["isolated"])
    iso, _ = stages.profile_tables(cfgs["isolated"], model, method, windows,
                                   stages.cost_tables(cfgs["isolated"], model, iso_grid), iso_grid)
    near = stages.level_grid(cfgs["budget"]).levels
    keep = [j for j, lv in enumerate(iso.levels.itertuples())
            if (np.isclose(near["s"], lv.s) & np.isclose(near["rho"], lv.rho)).any()]
    out = {"isolated": iso.select_levels(keep)}
    if with_op:
        op_grid = stages.level_grid(cfgs["operating_point"])
        out["operating_point"], _ = stages.profile_tables(cfgs["operating_point"], model, method, windows,
                                                          stages.cost_tables(cfgs["operating_point"], model, op_grid),
                                                          op_grid)
    return out


def _level_index(levels, s, rho=1.0) -> int:
    return int(np.flatnonzero(np.isclose(levels["s"], s) & np.isclose(levels["rho"], rho))[0])


def measure_all(config, model, method, windows, allocations: dict, calibration: str) -> tuple[dict, dict]:
    """Audit (KL on the profiling windows) and held-out results of every allocation, with ``calibration``'s
    thresholds: the main job's plan stage, then ``measure.compare``."""
    from allocator.evaluators import stages
    from allocator.evaluators.measure import compare

    config = replace(config, method=replace(config.method, calibration=calibration))
    plans = stages.plan(config, model, method, stages.Solution(None, allocations, {}))
    e = config.evaluator
    audit = compare(model, windows.profile, plans, e.batch_size, e.score_last)
    held = {short(src): compare(model, w, plans, e.batch_size, e.score_last) for src, w in windows.evaluation.items()}
    return audit, held


def matched_uniform(config, model, method, windows, rows, n_layers: int, name, budget, args) -> dict:
    """Uniform with sequential thresholds at the sparsity that dense-calibrated uniform actually realizes: the two
    calibrations compared at equal realized cost."""
    from allocator.evaluators.plan import uniform_targets
    from allocator.levels import Level

    dense_uniform = next(r for r in rows if r["method"] == name and r["budget"] == budget and r["unit"] == args.unit
                         and r["solver"] == "uniform" and r["calibration"] == "dense")
    s = round(float(np.mean([dense_uniform[f"realized_{src}"] for src in map(short, windows.evaluation)])), 3)
    audit, held = measure_all(config, model, method, windows,
                              {"matched": uniform_targets(n_layers, Level(s=s))}, "sequential")
    return {**{k: dense_uniform[k] for k in ("method", "unit", "rho_grid", "profile_tokens", "budget")},
            "solver": "uniform@realized", "profile_mode": "-", "calibration": "sequential", "s_min": s, "s_max": s,
            "low_rank_units": 0, "predicted_kl": float("nan"), "measured_kl_calib": audit["matched"]["kl"],
            **{f"ppl_{src}": h["matched"]["perplexity"] for src, h in held.items()},
            **{f"kl_{src}": h["matched"]["kl"] for src, h in held.items()},
            **{f"realized_{src}": h["matched"]["realized_sparsity"] for src, h in held.items()},
            "levels": f"{s:g} everywhere"}


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        write(pd.read_csv(args.out / "smollm2_allocation.csv").to_dict("records"), args.out, merge=False)
        return
    from allocator.evaluators import stages
    from allocator.evaluators.text import token_windows

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    first = configs(args, args.methods[0], args.budgets[0])["budget"]
    model, tok = stages.load(first)
    windows = stages.data(first, tok)
    d = first.data
    if args.eval_seed is not None:
        windows.evaluation = {src: token_windows(tok, src, d.eval_windows, d.eval_length, args.eval_seed)
                              for src in d.evaluation}
    profile_tokens = f"{d.profile_windows}x{d.profile_length}"
    methods = {name: stages.calibrate(configs(args, name, args.budgets[0])["budget"], model, windows)
               for name in args.methods}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    op_budgets = args.budgets if args.op_budgets is None else args.op_budgets
    for budget in args.budgets:
        for name, method in methods.items():
            cfgs = configs(args, name, budget)
            config = cfgs["budget"]
            rhos = config.method.levels.rho
            t0 = time.perf_counter()
            tables = tables_of(cfgs, model, method, windows, with_op=any(np.isclose(budget, op_budgets)))
            profile_s = time.perf_counter() - t0
            iso = tables["isolated"]
            op = stages.level_grid(config).operating
            allocations = {("uniform", "-"): Allocation.from_levels(
                iso, [_level_index(iso.levels, op.s, op.rho)] * iso.n_units, solver="uniform")}
            predicted = {("uniform", "-"): {m: float(t.degradation[:, _level_index(t.levels, op.s, op.rho)].sum())
                                            for m, t in tables.items()}}
            for mode, table in tables.items():
                for solver in args.solvers:
                    result = minimize(build_problem(config, table), solver, seed=config.seed)
                    allocations[(solver, mode)] = result.allocation
                    predicted[(solver, mode)] = {mode: float(result.degradation)}
            named = {f"{s}/{m}": a for (s, m), a in allocations.items()}
            for calibration in args.calibrations:
                audit, held = measure_all(config, model, method, windows, named, calibration)
                if not rows:
                    rows.append({"method": "-", "unit": "-", "rho_grid": "-", "profile_tokens": "-", "budget": 0.0,
                                 "solver": "dense", "profile_mode": "-", "calibration": "-", "s_min": 0.0,
                                 "s_max": 0.0, "predicted_kl": 0.0, "measured_kl_calib": 0.0,
                                 **{f"ppl_{src}": h["dense"]["perplexity"] for src, h in held.items()},
                                 **{f"kl_{src}": 0.0 for src in held}})
                for (solver, mode), alloc in allocations.items():
                    key = f"{solver}/{mode}"
                    s = np.array([lv.s for lv in alloc.levels])
                    rho = np.array([lv.rho for lv in alloc.levels])
                    pred = predicted[(solver, mode)]
                    rows.append({"method": name, "unit": args.unit, "rho_grid": " ".join(f"{r:g}" for r in rhos),
                                 "profile_tokens": profile_tokens, "budget": budget, "solver": solver,
                                 "profile_mode": mode, "calibration": calibration,
                                 "s_min": s.min(), "s_max": s.max(), "low_rank_units": int((rho < 1).sum()),
                                 "predicted_kl": pred.get(mode, pred.get("operating_point", pred.get("isolated"))),
                                 "measured_kl_calib": audit[key]["kl"],
                                 **{f"ppl_{src}": h[key]["perplexity"] for src, h in held.items()},
                                 **{f"kl_{src}": h[key]["kl"] for src, h in held.items()},
                                 **{f"realized_{src}": h[key]["realized_sparsity"] for src, h in held.items()},
                                 "levels": " ".join(f"{v:g}" if r >= 1 else f"{v:g}/{r:g}" for v, r in zip(s, rho))})
                write(rows, args.out)
            if {"dense", "sequential"} <= set(args.calibrations):
                rows.append(matched_uniform(config, model, method, windows, rows, int(iso.layers.max()) + 1, name,
                                            budget, args))
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
            gains.append(share_removed(dense[f"ppl_{src}"], uni.iloc[0][f"ppl_{src}"], row[f"ppl_{src}"]))
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
    return share_removed(dense_ppl, u, row[f"ppl_{src}"])


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
        "`gain_*`: share of uniform's perplexity increase over dense that the allocation removes,\n"
        "(uniform - ppl) / (uniform - dense) (`allocator.gains.share_removed`: 1 = as good as dense, 0 = no better than\n"
        "uniform), against the uniform row of the same method, unit, rho grid, profiling tokens and calibration.\n"
        "`predicted_kl`: the table's sum;\n"
        "`measured_kl_calib`: the same quantity measured on the profiling windows with the whole allocation applied\n"
        "(the additivity audit). `realized_*`: share of the dense projection bytes not read on that held-out text\n"
        "(zeroed channels less the low-rank factors). `calibration`: thresholds from the dense model, or sequential\n"
        "(per allocation, on the model whose earlier layers are already compressed). `gain_eq_*`: the gain against\n"
        "uniform at the sparsity the row realizes on that text (uniform interpolated between the sequentially\n"
        "calibrated uniform rows of the method): the comparison at equal real cost.\n\n"
        + shown.to_markdown(index=False, floatfmt=".4g") + "\n" + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    main()
