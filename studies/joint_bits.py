"""Bits and activation sparsity on SmolLM2, alone and allocated jointly (issue 11).

Three parts, every number on the main job's held-out windows (Austen and wiki, perplexity and KL to the dense
model, paired standard errors over windows against a named reference):

1. **formats alone**: every projection in W8A8-FP8, W4A16-g128 by RTN and by GPTQ, W3A16-g128 by GPTQ, under no
   rotation, QuaRot's Hadamard rotation and LaRoSA-style PCA rotation;
2. **TEAL at 50%** (uniform, every projection) under the same three rotations: does rotation help or hurt
   activation sparsity?
3. **joint allocation** at decode-byte budgets (``--budgets``, shares of dense bytes): a degradation table
   profiled once over the joint grid s x format (isolated KL, the main job's profiling windows), then dp on the
   whole grid (joint), on its bf16 columns (sparsity only) and on its s = 0 columns (bits only), all at the same
   bytes; evo on the measured objective warm-started from the joint dp; and milp with a second constraint, the
   estimated H200 prefill time (``--prefill-share`` of dense), which only the FP8 format lowers.

Order of the transforms: rotate -> sparsify -> quantize (``evaluators.methods``). The model runs in float32 on
the CPU (fake quantization: the accuracy path, not the speed path).

    python studies/joint_bits.py --out DIR                # SmolLM2-135M, 30 layers (~40 min on 2 CPU cores)
    python studies/joint_bits.py --out DIR --quick        # 2 layers, tiny windows (a smoke run)

Writes DIR/joint_bits.csv (one row per allocation and source), DIR/joint_bits.md, DIR/joint_bits.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, add_config_args, base_overrides, job_config, short  # noqa: E402

ROTATIONS = ("none", "hadamard", "pca")
ALONE = (("w8a8-fp8", "rtn"), ("w4a16-g128", "rtn"), ("w4a16-g128", "gptq"), ("w3a16-g128", "gptq"))
JOINT_S = [0.0, 0.25, 0.5, 0.7]
JOINT_FMT = ["bf16", "w8a16", "w8a8-fp8", "w4a16-g128", "w3a16-g128"]


def study_overrides(args) -> list[str]:
    return base_overrides(args, ["model.dtype=float32", "profile.window=null", "profile.mode=isolated",
                                 f"method.levels.s=[{','.join(map(str, JOINT_S))}]",
                                 f"method.levels.fmt=[{','.join(JOINT_FMT)}]", f"method.quantizer={args.quantizer}"])


def uniform_plan(model, method, level):
    from allocator.evaluators.models import find_projections
    from allocator.evaluators.plan import CompressionPlan, uniform_targets
    return CompressionPlan.build(model, method, uniform_targets(len(find_projections(model)), level))


def measure_plans(model, windows, plans: dict, batch_size: int) -> dict:
    """``{source: compare(...)}`` on the held-out windows (dense computed once per batch)."""
    from allocator.evaluators.measure import compare
    return {src: compare(model, w, plans, batch_size) for src, w in windows.evaluation.items()}


def rows_of(part: str, rotation: str, measured: dict, extra: dict | None = None) -> list[dict]:
    out = []
    for src, res in measured.items():
        for name, r in res.items():
            if name == "dense" and part != "dense":
                continue
            out.append({"part": part, "rotation": rotation, "allocation": name, "source": short(src),
                        "perplexity": r["perplexity"], "kl": r["kl"], "per_window": r["per_window"],
                        **(extra or {}).get(name, {})})
    return out


def alone_and_teal(config, model, windows, rotation: str, alone=ALONE, teal: bool = True) -> tuple[list, dict]:
    """Parts 1 and 2 under one rotation; returns the rows and the calibrated methods (rtn, gptq)."""
    from allocator.evaluators.methods import get_method
    from allocator.levels import Level

    methods = {q: get_method("teal", seed=config.seed, quantizer=q).calibrate(model, windows.calibration,
                                                                              config.data.batch_size)
               for q in sorted({q for _, q in alone} | {"rtn"})}
    plans = {f"{fmt} {q}": uniform_plan(model, methods[q], Level(0.0, fmt=fmt)) for fmt, q in alone}
    if teal:
        plans["teal s=0.5"] = uniform_plan(model, methods["rtn"], Level(0.5))
    measured = measure_plans(model, windows, plans, config.data.batch_size)
    return rows_of("alone", rotation, measured), methods


def joint(config, model, windows, method, budgets, prefill_share: float, evo_evals: int) -> tuple[list, dict]:
    """Part 3: profile the joint grid once, solve per budget on the grid and its single-axis sub-grids."""
    from allocator import Problem, minimize
    from allocator.evaluators import stages
    from allocator.evaluators.plan import CompressionPlan

    grid = stages.Grid(config.method.levels.make())
    start = time.perf_counter()
    tables, _ = stages.profile_tables(config, model, method, windows, stages.cost_tables(config, model, grid), grid)
    timing = {"profile_s": time.perf_counter() - start, "rows": tables.n_units * tables.n_levels}
    levels = tables.levels
    subsets = {"sparsity only": list(levels.index[levels["fmt"] == "bf16"]),
               "bits only": list(levels.index[levels["s"] == 0.0]), "joint": list(levels.index)}
    objective = stages.measured_objective(config, model, method, windows, tables)
    allocations, info = {}, {}
    for share in budgets:
        tag = f"1/{round(1 / share)}"
        for name, idx in subsets.items():
            sub = tables.select_levels(idx)
            try:
                res = minimize(Problem(sub, sparsity=1 - share), "dp")
            except Exception as exc:      # Infeasible: the sub-grid cannot reach these bytes
                info[f"{name} {tag}"] = {"note": f"infeasible: {exc}"}
                continue
            allocations[f"{name} {tag}"] = res.allocation
        if f"joint {tag}" in allocations:
            res = minimize(Problem(tables, sparsity=1 - share, measured_objective=objective), "evo",
                           seed=config.seed, max_evals=evo_evals, warm_start="dp", fitness="measured")
            allocations[f"joint+evo {tag}"] = res.allocation
            side = prefill_share * float(tables.dense_cost("time_prefill").sum())
            try:
                res = minimize(Problem(tables, sparsity=1 - share, side_limits={"time_prefill": side}), "milp")
                allocations[f"joint milp prefill<={prefill_share:g} {tag}"] = res.allocation
            except Exception as exc:
                info[f"joint milp prefill {tag}"] = {"note": f"infeasible: {exc}"}
    for name, alloc in allocations.items():
        info[name] = describe(tables, alloc)
    plans = {name: CompressionPlan.build(model, method, alloc) for name, alloc in allocations.items()}
    measured = measure_plans(model, windows, plans, config.data.batch_size)
    return rows_of("joint", config.method.rotation, measured, info), {**timing, "allocations": info}


def describe(tables, alloc) -> dict:
    """Bytes and estimated prefill time as shares of dense, and how the allocation spends its formats."""
    import numpy as np
    grid = {lv.key(): j for j, lv in enumerate(tables.level_objects())}     # sub-grid allocations index their own
    idx = np.array([grid[level.key()] for level in alloc.levels])
    rows = np.arange(tables.n_units)
    share = {k: float(tables.cost(k)[rows, idx].sum() / tables.dense_cost(k).sum())
             for k in ("bytes_decode", "time_prefill")}
    fmts = tables.levels["fmt"].to_numpy()[idx]
    weights = tables.dense_cost("bytes_decode")
    mix = {f: round(float(weights[fmts == f].sum() / weights.sum()), 3) for f in sorted(set(fmts))}
    mean_s = float((tables.levels["s"].to_numpy()[idx] * weights).sum() / weights.sum())
    return {"bytes_share": share["bytes_decode"], "prefill_share": share["time_prefill"], "mean_s": mean_s,
            "formats": json.dumps(mix)}


def paired(rows: list[dict], reference: dict[tuple, str]) -> None:
    """Add per-row paired NLL / KL differences (and the tie verdict) against the named reference row."""
    import numpy as np

    from allocator.gains import paired_difference, verdict
    index = {(r["part"], r["rotation"], r["allocation"], r["source"]): r for r in rows}
    for r in rows:
        ref = index.get((*reference.get((r["part"], r["rotation"]), ("", "", "")), r["source"]))
        if ref is None or ref is r:
            continue
        a, b = np.asarray(r["per_window"]), np.asarray(ref["per_window"])
        for col, j in (("nll", 0), ("kl", 1)):
            mean, se, _ = paired_difference(a[:, j] / a[:, 2], b[:, j] / b[:, 2])
            r[f"d_{col}_vs"], r[f"d_{col}"], r[f"d_{col}_se"], r[f"{col}_verdict"] = \
                ref["allocation"], mean, se, verdict(mean, se)


def write(out: Path, rows: list[dict], summary: dict) -> None:
    import pandas as pd
    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "per_window"} for r in rows])
    frame.to_csv(out / "joint_bits.csv", index=False)
    (out / "joint_bits.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=str))
    cols = [c for c in ("part", "rotation", "allocation", "source", "perplexity", "kl", "bytes_share",
                        "prefill_share", "mean_s", "formats", "d_nll", "d_nll_se", "nll_verdict", "d_nll_vs")
            if c in frame.columns]
    body = frame[cols].to_markdown(index=False, floatfmt=".4g")
    (out / "joint_bits.md").write_text(f"# Bits and sparsity, alone and joint\n\n{summary['header']}\n\n{body}\n")
    print(body)


def command(argv, out: Path) -> str:
    given = list(sys.argv[1:] if argv is None else argv)
    return "python studies/joint_bits.py " + " ".join("DIR" if a == str(out) else a for a in given)


def main(argv=None) -> dict:
    parser = add_config_args(add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])))
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25, 0.125],
                        help="decode-byte budgets, shares of dense")
    parser.add_argument("--rotation", default="hadamard", choices=ROTATIONS, help="the rotation of the joint part")
    parser.add_argument("--quantizer", default="gptq", choices=("rtn", "gptq"), help="weights of the joint part")
    parser.add_argument("--prefill-share", type=float, default=0.8, help="the second constraint of the milp run")
    parser.add_argument("--evo-evals", type=int, default=120)
    parser.add_argument("--rotations", nargs="*", default=list(ROTATIONS), choices=ROTATIONS)
    parser.add_argument("--alone", nargs="*", default=[f"{f}:{q}" for f, q in ALONE], metavar="FMT:QUANTIZER",
                        help="the formats of part 1 (e.g. w8a8-fp8:gptq)")
    parser.add_argument("--parts", nargs="*", default=["alone", "teal", "joint"], choices=("alone", "teal", "joint"))
    args = parser.parse_args(argv)
    alone = [tuple(a.split(":")) for a in args.alone] if "alone" in args.parts else []

    from allocator.evaluators import stages
    from allocator.evaluators.rotation import RotationConfig, rotate_

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = job_config(study_overrides(args) + [f"method.rotation={args.rotation}"])
    model, tokenizer = stages.load(config)
    windows = stages.data(config, tokenizer)
    dense = measure_plans(model, windows, {}, config.data.batch_size)
    rows, summary = rows_of("dense", "none", dense), {}
    for rotation in dict.fromkeys([*args.rotations, *([args.rotation] if "joint" in args.parts else [])]):
        applied = None if rotation == "none" else rotate_(model, RotationConfig(rotation, seed=args.seed),
                                                          windows.calibration, config.data.batch_size)
        methods = {}
        if rotation in args.rotations and (alone or "teal" in args.parts):
            part, methods = alone_and_teal(config, model, windows, rotation, alone, "teal" in args.parts)
            rows += part
        if rotation == args.rotation and "joint" in args.parts:
            method = methods.get(args.quantizer) or stages.calibrate(config, model, windows)
            part, summary["joint"] = joint(config, model, windows, method, args.budgets, args.prefill_share,
                                           args.evo_evals)
            rows += part
        if applied is not None:
            applied.restore_(model)
    paired(rows, {("alone", r): ("dense", "none", "dense") for r in ROTATIONS}
           | {("joint", args.rotation): ("dense", "none", "dense")})
    summary["header"] = (f"SmolLM2-135M ({'2 layers, --quick' if args.quick else 'all 30 layers'}), float32 on the "
                         f"CPU, {config.data.eval_windows} x {config.data.eval_length} held-out tokens per source; "
                         + (f"joint part: rotation {args.rotation}, quantizer {args.quantizer}, grid s={JOINT_S} x "
                            f"{JOINT_FMT}, {config.profile.unit} units. " if "joint" in args.parts else "")
                         + f"d_nll: paired mean NLL difference per token against the unrotated dense "
                         f"model (+- SE, 'tie' under 2 SE). Command: `{command(argv, args.out)}`. "
                         f"Wall time {time.perf_counter() - started:.0f} s.")
    write(args.out, rows, summary)
    return summary


if __name__ == "__main__":
    main()
