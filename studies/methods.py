"""Every sparsity method at equal sparsity and equal decode bytes, uniform and allocated (issue 13, Q4 / Q12 / Q15).

On one loaded model, per method of ``evaluators.methods`` (``--methods``: teal, rsparse, oracle_topk, cats,
griffin) and per budget (``--budgets``: model-level shares of the projections' decode bytes), the main job's
stages (``evaluators.stages``: calibrate, tabulate, allocate, plan) give the uniform baseline and the dp
allocation, and ``evaluators.measure.compare`` measures them with the dense model on the same held-out windows
(Austen and wiki, ``--eval-windows`` of 256 tokens each).

Pinned here (not read from the main job's defaults, which move): the main job's allocation before issue 17 made the
hybrid its default (d71ab43), an isolated KL profile on 3 x 96 calibration-text tokens with one unit per GEMV
input (``profile.unit=input``: q+k+v, o, gate+up, down), no split, no refinement, solved by ``dp``, calibration
on 8 x 256 tokens. One table per method serves every budget (``profile.window=null`` on a grid cut to the union
of the main job's trust regions, ``profile.window=0.2``, around the runs' sparsities, plus s = 0: at 40 / 50% the
levels 0, 0.2, ..., 0.7 of the default grid).

Equal sparsity and equal bytes: teal, rsparse and oracle_topk act on every projection, so a level's sparsity is
its share of decode bytes (R-Sparse's low-rank factors included: ``allocator.costs.rsparse_split``), and the two
coincide. cats and griffin act on the MLP only, at one site per layer (``_common.MLP_ONLY``); their units are
whole layers (``profile.unit=layer``: the layer's level is its MLP neuron sparsity), and a neuron sparsity ``s``
skips ``s * f`` of the model's projection bytes (CATS: up and down, its gate runs dense; GRIFFIN: gate, up and
down; ``f`` from the model's shapes, ``_common.mlp_byte_factor``). Each is run at equal sparsity (``s`` = the
budget) and at equal bytes (``s`` = budget / f, added to the level grid; "infeasible" when that is 1 or more).

Reported per row: the byte share skipped (``_common.byte_sparsity``), held-out perplexity and KL per source, and
paired per-window differences of per-token NLL and KL (mean +- standard error, "tie" within two): each dp row
against its uniform, and each equal-bytes row against teal's row of the same budget and allocation kind.

    python studies/methods.py --out DIR --set model.threads=1                       # SmolLM2-135M, all methods
    python studies/methods.py --model gemma3 --methods teal rsparse cats --eval-windows 8 --out DIR
    python studies/methods.py --quick --out /tmp/methods                            # 2 layers, tiny windows

Writes ``<method>.json`` per method (rows, per-window values, timings; a later run on the same ``--out`` with other
``--methods`` adds to them, and the report pairs across them), ``methods_<model>.csv`` and ``methods_<model>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MLP_ONLY, add_common_args, add_config_args, base_overrides, byte_sparsity,  # noqa: E402
                     job_config, mlp_byte_factor, paired, short)

METHODS = ["teal", "rsparse", "oracle_topk", "cats", "griffin"]
MODELS = {"smollm2": "smollm2", "gemma3": "gemma3"}
#: the main job's profile and solve, pinned (see the docstring)
PINNED = ["solver=dp", "profile.mode=isolated", "profile.metric=kl", "profile.unit=input", "profile.split=none",
          "profile.refine=null", "profile.window=null", "data.calibration_windows=8", "data.calibration_length=256",
          "data.profile_windows=3", "data.profile_length=96", "data.eval_length=256"]
#: the main job's trust region (``profile.window``): the grid a study profiles is the union of the runs' regions
TRUST = 0.2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, quick="2 layers, tiny windows (a smoke run)")
    add_config_args(p)
    p.add_argument("--model", default="smollm2", choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5],
                   help="model-level shares of the projections' decode bytes")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per source (256 tokens)")
    p.add_argument("--report-only", action="store_true", help="rewrite the csv and md from the <method>.json "
                   "files under --out (e.g. after runs of disjoint --methods on the same folder)")
    return p.parse_args(argv)


def specs(method: str, budgets, factor: float) -> list[dict]:
    """(budget, match, s) per run of ``method``: equal bytes for every method, equal sparsity too for the MLP-only
    ones (``s = None``: equal bytes needs every neuron off, infeasible)."""
    out = []
    for b in budgets:
        if method in MLP_ONLY:
            out.append({"budget": b, "match": "sparsity", "s": b})
            need = round(b / factor, 4)
            out.append({"budget": b, "match": "bytes", "s": need if need < 1 else None, "needs_s": b / factor})
        else:
            out.append({"budget": b, "match": "bytes", "s": b})
    return out


def method_overrides(method: str, runs: list[dict], base_grid: list[float]) -> list[str]:
    """``method=<name>``, its units, and one level grid for all its runs (one table): s = 0, the method's grid
    levels within the main job's trust region (``TRUST``) of some run's ``s``, and every run's ``s``."""
    over = [f"method={method}"] + (["profile.unit=layer"] if method in MLP_ONLY else [])
    wanted = {r["s"] for r in runs if r["s"] is not None}
    grid = {0.0} | {s for s in base_grid if any(abs(s - w) <= TRUST + 1e-9 for w in wanted)} | wanted
    return over + ["method.levels.s=[" + ",".join(f"{v:g}" for v in sorted(grid)) + "]"]


def run_method(args, common: list[str], name: str, model, windows, out: Path) -> dict:
    """Calibrate ``name``, tabulate once, solve uniform and dp per run, measure every plan; saved as ``<name>.json``."""
    import torch

    from allocator.evaluators import stages
    from allocator.evaluators.measure import compare

    factor = mlp_byte_factor(model, name)
    base = job_config(common + [f"method={name}"]).method.levels.s
    runs = specs(name, args.budgets, factor)
    over = method_overrides(name, runs, list(base))
    start = time.perf_counter()
    config = job_config(common + over + [f"budget.value={args.budgets[0]}"])
    method = stages.calibrate(config, model, windows)
    timings = {"calibrate_s": time.perf_counter() - start}
    plans, rows = {}, []
    for run in runs:
        if run["s"] is None:
            rows.append({"method": name, "budget": run["budget"], "match": run["match"], "s": run["needs_s"],
                         "allocation": "infeasible"})
            continue
        config = job_config(common + over + [f"budget.value={run['s']}"])
        t0 = time.perf_counter()
        grid, split, tables, _ = stages.tabulate(config, model, method, windows, stages.level_grid(config))
        solution, _ = stages.allocate(config, model, method, windows, tables, grid, split)
        built = stages.plan(config, model, method, solution)
        seconds = time.perf_counter() - t0
        for alloc in ("uniform", "dp"):
            key = f"{round(run['budget'] * 100)}_{run['match']}_{alloc}"
            plans[key] = built[alloc]
            rows.append({"method": name, "budget": run["budget"], "match": run["match"], "s": run["s"],
                         "allocation": alloc, "key": key,
                         "byte_sparsity": byte_sparsity(model, solution.allocations[alloc], name),
                         "table_solve_s": seconds})
        print(f"{name} {run['budget']:.0%} {run['match']} (s = {run['s']}): tables + dp in {seconds:.0f} s",
              flush=True)
    timings["tables_solve_s"] = time.perf_counter() - start - timings["calibrate_s"]
    t0 = time.perf_counter()
    with torch.no_grad():
        measured = {src: compare(model, w, plans, config.evaluator.batch_size, config.evaluator.score_last)
                    for src, w in windows.evaluation.items()}
    timings["measure_s"] = time.perf_counter() - t0
    for row in rows:
        for src, res in measured.items():
            hit = res.get(row.get("key"), {})
            row[f"ppl_{short(src)}"], row[f"kl_{short(src)}"] = hit.get("perplexity"), hit.get("kl")
            row[f"realized_{short(src)}"] = hit.get("realized_sparsity")
    result = {"method": name, "byte_factor": factor, "rows": rows, "timings": timings, "command": command(args.argv),
              "machine": machine_line(config),
              "grid": next(o for o in over if o.startswith("method.levels.s=")).split("=", 1)[1],
              "per_window": {src: {n: r["per_window"] for n, r in res.items()} for src, res in measured.items()},
              "dense": {src: {"perplexity": res["dense"]["perplexity"]} for src, res in measured.items()}}
    (out / f"{name}.json").write_text(json.dumps(result, default=float))
    print(f"{name}: calibrate {timings['calibrate_s']:.0f} s, tables + solve {timings['tables_solve_s']:.0f} s, "
          f"measure {timings['measure_s']:.0f} s", flush=True)
    return result


def table(out: Path) -> pd.DataFrame:
    """Every method's rows saved under ``out``, with the paired differences (against uniform and against teal)."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem in METHODS}
    frames = []
    for name in [m for m in METHODS if m in results]:
        res = results[name]
        for row in res["rows"]:
            row = dict(row)
            if row["allocation"] == "dp":
                runs = {src: {n: {"per_window": pw[n]} for n in (row["key"], row["key"].replace("_dp", "_uniform"))}
                        for src, pw in res["per_window"].items()}
                row.update({f"u_{k}": v for k, v in
                            paired(runs, row["key"], row["key"].replace("_dp", "_uniform")).items()})
            teal = results.get("teal")
            tkey = f"{round(row['budget'] * 100)}_bytes_{row['allocation']}"
            if (name != "teal" and teal and row["match"] == "bytes" and row.get("key")
                    and all(tkey in teal["per_window"].get(src, {}) for src in res["per_window"])):
                runs = {src: {"m": {"per_window": pw[row["key"]]}, "t": {"per_window": teal["per_window"][src][tkey]}}
                        for src, pw in res["per_window"].items()}
                row.update({f"t_{k}": v for k, v in paired(runs, "m", "t").items()})
            row.update({f"{k}_method_s": v for k, v in res["timings"].items()})
            frames.append(row)
    return pd.DataFrame(frames)


def _pm(row, prefix: str, what: str, src: str) -> str:
    mean = row.get(f"{prefix}d{what}_{src}")
    if mean is None or mean != mean:
        return ""
    return f"{mean:+.4f} +- {row[f'{prefix}se_{what}_{src}']:.4f} ({row[f'{prefix}{what}_{src}_verdict']})"


def report(frame: pd.DataFrame, out: Path, args, argv, machine: str, wall: float) -> str:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem in METHODS}
    dense = next(iter(results.values()))["dense"]
    total = sum(v for r in results.values() for v in r["timings"].values())
    n = {short(src): len(next(iter(pw.values()))) for src, pw in next(iter(results.values()))["per_window"].items()}
    lines = [f"# Sparsity methods at equal sparsity and equal bytes: {args.model} (studies/methods.py)", "",
             "Command" + ("s" if len({r["command"] for r in results.values()}) > 1 else "") + ": "
             + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in results.values())), "",
             f"Machine: {'; '.join(dict.fromkeys(r.get('machine', machine) for r in results.values()))}. "
             f"Wall time: per method below, {total:.0f} s summed over the methods"
             + (f" (the last invocation: {wall:.0f} s, model load included)" if wall else "") + ".", "",
             f"Held-out windows: {n} of 256 tokens; dense perplexity "
             + ", ".join(f"{short(s)} {d['perplexity']:.2f}" for s, d in dense.items()) + ".", "",
             "Pinned: " + " ".join(f"`{o}`" for o in PINNED) + "; cats and griffin on `profile.unit=layer`; "
             "level grids (one table per method, every budget): "
             + "; ".join(f"{m} `{r['grid']}`" for m, r in results.items()) + ".", "",
             "`bytes`: share of the projections' decode bytes skipped; `match`: equal `bytes` (every method at the "
             "budget's byte share) or equal `sparsity` (MLP-only methods at neuron sparsity = the budget). "
             "`dp - uniform`: the dp row's per-token NLL / KL minus its uniform's, paired over the windows; `- teal`: "
             "minus teal's row of the same budget and kind (equal bytes); +- one standard error, `tie` within two.",
             ""]
    if any(m in MLP_ONLY for m in results):
        lines += ["Byte share skipped at neuron sparsity 1 (MLP-only methods): "
                  + ", ".join(f"{m} {r['byte_factor']:.3f}" for m, r in results.items() if m in MLP_ONLY) + ".", ""]
    for budget, part in frame.groupby("budget"):
        lines += [f"## {budget:.0%} of projection decode bytes", ""]
        cols = {"method": "method", "match": "match", "s": "s", "allocation": "allocation", "byte_sparsity": "bytes",
                "ppl_austen": "ppl austen", "kl_austen": "kl austen", "ppl_wiki": "ppl wiki", "kl_wiki": "kl wiki"}
        t = part[[c for c in cols if c in part]].rename(columns=cols).copy()
        for src in ("austen", "wiki"):
            t[f"dp - uniform nll {src}"] = [_pm(r, "u_", "nll", src) for _, r in part.iterrows()]
        for src in ("austen", "wiki"):
            t[f"- teal nll {src}"] = [_pm(r, "t_", "nll", src) for _, r in part.iterrows()]
        lines += [t.to_markdown(index=False, floatfmt=".4g"), ""]
        k = part[["method", "match", "allocation"]].copy()
        for src in ("austen", "wiki"):
            k[f"dp - uniform kl {src}"] = [_pm(r, "u_", "kl", src) for _, r in part.iterrows()]
        for src in ("austen", "wiki"):
            k[f"- teal kl {src}"] = [_pm(r, "t_", "kl", src) for _, r in part.iterrows()]
        lines += ["KL, paired:", "", k.to_markdown(index=False), ""]
    lines += ["## Seconds per method (this machine)", "",
              pd.DataFrame([{"method": m, **{k: round(v) for k, v in r["timings"].items()}}
                            for m, r in results.items()]).to_markdown(index=False), ""]
    return "\n".join(lines)


def command(argv) -> str:
    return "python studies/methods.py " + " ".join(argv if argv is not None else sys.argv[1:])


def machine_line(config) -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    where = config.model.device if config.model.device != "cpu" else f"{cpu}, {os.cpu_count()} CPU cores"
    return (f"{where}, torch {torch.__version__}, {config.model.dtype}, model.threads={config.model.threads}")


def main(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    args.argv = argv
    from allocator.evaluators import stages

    wall = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    common = base_overrides(args, [f"model={MODELS[args.model]}", *PINNED, f"data.eval_windows={args.eval_windows}",
                                   f"profile.cache={(args.out / 'cache').resolve()}"])
    config = job_config(common)
    if args.report_only:
        return write(args, argv, machine_line(config), None)
    model, tokenizer = stages.load(config)
    windows = stages.data(config, tokenizer)
    machine = machine_line(config)
    frame = pd.DataFrame()
    for name in args.methods:
        run_method(args, common, name, model, windows, args.out)
        frame = write(args, argv, machine, time.perf_counter() - wall)
    return frame


def write(args, argv, machine: str, wall: float | None) -> pd.DataFrame:
    """``methods_<model>.csv`` and ``.md`` from every ``<method>.json`` under ``--out``."""
    frame = table(args.out)
    frame.drop(columns=[c for c in frame if c == "key"]).to_csv(args.out / f"methods_{args.model}.csv", index=False)
    (args.out / f"methods_{args.model}.md").write_text(report(frame, args.out, args, argv, machine, wall))
    return frame


if __name__ == "__main__":
    main()
