"""Solver comparison on SmolLM2-135M: table solvers against search on the measured objective.

One job = one method at one model-level sparsity on one unit granularity. Its config is the main job's
(``python -m allocator`` presets and defaults: the method's level grid, the shipped data) with the study's
settings: ``profile.window=null`` (the whole grid), fitness windows of 4 x 128 calibration tokens, one thread
per process. It runs the main job's stages (load, data, calibrate, the isolated KL table), then uniform, greedy
and dp on the table, dp on a table profiled around the operating point (optional), evo on the table, and evo and
bayes (optuna) on the measured objective (``MeasuredObjective``: KL to dense of the whole allocation on the
table's windows) warm-started from dp, at the same evaluation budget. Each search's answer is picked on
*validation* windows (other calibration windows): the dp start unless a candidate among the search's best few
beats it there. Every answer becomes a ``CompressionPlan`` measured on held-out text by ``measure.compare`` (Austen:
Pride and Prejudice + Persuasion; Wikipedia: the evaluation half): perplexity, KL to dense, realized sparsity.
Gains are ``allocator.gains.share_removed``: the share of uniform's perplexity increase over dense that an
allocation removes (1 = as good as dense, 0 = no better than uniform).

Writes one folder per job (``compare_solvers.{csv,curves.json,runs.json,md,png}``) under ``--out``, and the
merged report of them in ``--out``; ``--merge`` combines job folders of several runs into one report.

    python studies/compare_solvers.py --methods teal rsparse --sparsities 0.5 0.6 --out DIR
    python studies/compare_solvers.py --merge DIR1 DIR2 --out studies/results --notes findings.md
    python studies/compare_solvers.py --quick --out /tmp/compare_solvers      # 2 layers, tiny windows, 6 evaluations

Costs: a measured evaluation is a forward on ``data.profile_windows x data.profile_length`` tokens; the isolated
table costs ``units x (levels - 1)`` partial forwards on the same windows (cached on disk, so the second sparsity
of a method reuses it).
"""
from __future__ import annotations

import argparse
import json
import logging
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

logger = logging.getLogger("compare_solvers")
#: the study's settings on top of the main job's defaults (the fitness windows, the whole grid, one thread a job)
STUDY = ["profile.window=null", "data.profile_windows=4", "data.profile_length=128", "model.threads=1"]
#: ``--quick``: the study's own sizes on top of ``_common.QUICK``
QUICK_STUDY = {"unit": "layer", "budget": 6, "pop_size": 4, "validation_windows": 2, "ms_windows": 3,
               "curve_points": 2}


# ---------------------------------------------------------------------------------------------- model side
def disjoint_windows(tok, n: int, length: int, seed: int, exclude):
    """``n`` calibration windows none of which is a row of ``exclude`` (windows of one length from one source
    either coincide or do not overlap, so dropping equal rows makes the sets disjoint)."""
    import torch

    from allocator.evaluators.text import token_windows

    drawn = token_windows(tok, "calibration", n + len(exclude), length, seed)
    taken = {tuple(row.tolist()) for row in exclude}
    keep = [row for row in drawn if tuple(row.tolist()) not in taken]
    return torch.stack(keep[:n])


class HeldOut:
    """Held-out perplexity, KL to dense and realized sparsity of level vectors, through ``measure.compare``:
    each call builds one plan per new vector and streams every source once (dense logits once per batch)."""

    def __init__(self, config, model, method, tables, windows):
        self.config, self.model, self.method, self.tables, self.windows = config, model, method, tables, windows
        self.done: dict[bytes, dict] = {}

    def __call__(self, vectors: dict[str, np.ndarray]) -> dict[str, dict]:
        from allocator.evaluators.measure import compare
        from allocator.evaluators.plan import CompressionPlan

        todo = {np.asarray(x, dtype=int).tobytes(): np.asarray(x, dtype=int) for x in vectors.values()}
        plans = {key.hex(): CompressionPlan.build(self.model, self.method, Allocation.from_levels(self.tables, x))
                 for key, x in todo.items() if key not in self.done}
        if plans:
            e = self.config.evaluator
            res = {short(src): compare(self.model, w, plans, e.batch_size, e.score_last)
                   for src, w in self.windows.evaluation.items()}
            for name in plans:
                self.done[bytes.fromhex(name)] = {src: r[name] for src, r in res.items()}
        return {label: self.done[np.asarray(x, dtype=int).tobytes()] for label, x in vectors.items()}


# ---------------------------------------------------------------------------------------------- study
def run_job(args, method_name: str, sparsity: float, out: Path) -> None:
    """The main job's stages up to the isolated table, then every solver on it; writes the job's outputs."""
    import torch

    from allocator.evaluators import stages
    from allocator.evaluators.measure import compare

    overrides = [*base_overrides(args, STUDY), f"method={method_name}", f"budget.value={sparsity}",
                 f"profile.unit={args.unit}"]
    config = job_config(overrides)
    out.mkdir(parents=True, exist_ok=True)
    started, t_start = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), time.perf_counter()
    grid = stages.level_grid(config)
    model, tok = stages.load(config)
    windows = stages.data(config, tok)
    d = config.data
    extra = {}
    if args.validation_windows:
        extra["validation"] = disjoint_windows(tok, args.validation_windows, d.profile_length, config.seed + 3,
                                               windows.profile)
    if "evo-ms" in args.searches:
        extra["multi_step"] = disjoint_windows(tok, args.ms_windows - d.profile_windows, d.profile_length,
                                               config.seed + 2, windows.profile)
    t0 = time.perf_counter()
    dense_only = {short(src): compare(model, w, {}, config.evaluator.batch_size)["dense"]
                  for src, w in windows.evaluation.items()}
    dense_tok_s = sum(r["tokens"] for r in dense_only.values()) / (time.perf_counter() - t0)
    dense = {src: r["perplexity"] for src, r in dense_only.items()}
    logger.info("dense perplexity %s; %.0f tokens/s", dense, dense_tok_s)
    method = stages.calibrate(config, model, windows)
    t0 = time.perf_counter()
    tables, _ = stages.profile_tables(config, model, method, windows, stages.cost_tables(config, model, grid), grid)
    profile_s = time.perf_counter() - t0  # ~0 when the on-disk cache had the table

    rows, curves = solve_all(args, config, model, method, windows, extra, tables, grid, profile_s, out)
    settings = {"method": method_name, "sparsity": sparsity, "unit": args.unit, "budget": args.budget,
                "searches": list(args.searches), "pop_size": args.pop_size, "bayes_sampler": args.bayes_sampler,
                "validation_windows": args.validation_windows, "validation_top": args.validation_top,
                "validation_z": args.validation_z, "operating_point": args.operating_point,
                "calib_windows": d.calibration_windows, "calib_len": d.calibration_length,
                "profile_windows": d.profile_windows, "profile_len": d.profile_length,
                "eval_windows": d.eval_windows, "eval_len": d.eval_length, "ms_windows": args.ms_windows,
                "curve_points": args.curve_points, "dtype": config.model.dtype, "device": config.model.device,
                "threads": config.model.threads, "seed": config.seed, "overrides": overrides}
    if config.model.device != "cpu":
        settings["device_name"] = torch.cuda.get_device_name()
    command = "python studies/compare_solvers.py " + " ".join(sys.argv[1:])
    timing = {"command": command, "started": started, "hours": (time.perf_counter() - t_start) / 3600,
              "dense_tok_s": dense_tok_s, "dense": dense, "args": settings}
    write_outputs(rows, curves, [timing], out)


def solve_all(args, config, model, method, windows, extra, tables, grid, profile_s, out: Path):
    """All solvers on one (method, sparsity); the measured objective is KL on the profiling windows."""
    import torch

    from allocator.evaluators import stages
    from allocator.evaluators.objective import MeasuredObjective

    sparsity, rows, curves = float(config.budget.value), [], []
    held = HeldOut(config, model, method, tables, windows)
    measured = dict(metric="kl", tables=tables, batch_size=config.profile.batch_size,
                    score_last=config.evaluator.score_last)
    objective = MeasuredObjective(model, windows.profile, method, **measured)
    validation = (MeasuredObjective(model, extra["validation"], method, per_window=True, **measured)
                  if "validation" in extra else None)
    table_problem = build_problem(config, tables)
    problem = build_problem(config, tables, measured_objective=objective)
    dense_cost = float(tables.dense_cost(config.problem.cost).sum())
    profile_evals = int(tables.n_units * (tables.levels["s"] > 0).sum())  # rows of the isolated table

    def record(found: dict[str, dict]) -> list[dict]:
        """One row per ``{label: {x, n_evals, true_evals, table_based, search_s, ...}}``, measured together."""
        measured_out = held({label: f["x"] for label, f in found.items()})
        new = []
        for label, f in found.items():
            f = dict(f)
            x, m = np.asarray(f.pop("x"), dtype=int), measured_out[label]
            ev = table_problem.evaluate_units(x[None])
            table_based = f.pop("table_based", False)
            row = {"method": config.method.name, "unit": config.profile.unit, "sparsity": sparsity, "solver": label,
                   "ppl_austen": m["austen"]["perplexity"], "ppl_wiki": m["wiki"]["perplexity"],
                   "kl_austen": m["austen"]["kl"], "kl_wiki": m["wiki"]["kl"], "fit_kl": objective(x),
                   "val_kl": float(np.mean(validation(x))) if validation is not None else np.nan,
                   "table_kl": float(ev.degradation[0]), "true_evals": f.pop("true_evals", 0),
                   "profile_evals": f.pop("profile_evals", profile_evals) if table_based else 0,
                   "n_evals": f.pop("n_evals", 0), "search_s": f.pop("search_s", 0.0),
                   "profile_s": profile_s if table_based else 0.0, "cost_ratio": float(ev.cost[0]) / dense_cost,
                   "allocation": " ".join(str(int(v)) for v in x),
                   "realized_austen": m["austen"]["realized_sparsity"],
                   "realized_wiki": m["wiki"]["realized_sparsity"], **f}
            new.append(row)
            logger.info("%s %s %.1f %-28s austen %.2f wiki %.2f fitKL %.4f valKL %.4f evals %d %.0fs",
                        row["method"], row["unit"], sparsity, label, row["ppl_austen"], row["ppl_wiki"], row["fit_kl"],
                        row["val_kl"], row["true_evals"], row["search_s"])
        rows.extend(new)
        pd.DataFrame(rows).to_csv(out / "compare_solvers.partial.csv", index=False)
        return new

    # the table solvers; the uniform operating point (s = sparsity, rho = operating rho) when the best uniform
    # level by the table is another one
    found, results = {}, {}
    j = int(np.flatnonzero((tables.levels["s"].sub(grid.operating.s).abs() < 1e-9)
                           & (tables.levels["rho"].sub(grid.operating.rho).abs() < 1e-9))[0])
    for label, solver, kw in (("uniform", "uniform", {}), ("greedy (isolated)", "greedy", {}),
                              ("dp (isolated)", "dp", {}),
                              ("evo (tables)", "evo", {"fitness": "table", "progress": False})):
        t0 = time.perf_counter()
        results[label] = minimize(table_problem, solver, seed=config.seed, **kw)
        found[label] = {"x": results[label].x, "n_evals": results[label].n_evals, "table_based": label != "uniform",
                        "search_s": time.perf_counter() - t0}
    if results["uniform"].x[0] != j:
        found = {f"uniform (s={grid.operating.s:g}, rho={grid.operating.rho:g})": {"x": np.full(tables.n_units, j)},
                 **found}
    if args.operating_point:  # dp on the table profiled around the operating point (first-order interactions)
        op_config = replace(config, profile=replace(config.profile, mode="operating_point"))
        op_tables, _ = stages.profile_tables(op_config, model, method, windows,
                                             stages.cost_tables(op_config, model, grid), grid)
        res = minimize(build_problem(op_config, op_tables), "dp", seed=config.seed)
        found["dp (operating point)"] = {"x": res.x, "n_evals": res.n_evals, "table_based": True,
                                         "search_s": res.solve_time,
                                         "profile_evals": int(tables.n_units * (tables.n_levels - 1))}
    record(found)

    start = results["dp (isolated)"].x
    guard = ({"validation": validation, "validation_top": args.validation_top, "validation_z": args.validation_z}
             if validation is not None else {})
    searches = {
        "evo": ("evo (true, warm dp)", "evo", {"pop_size": args.pop_size, "n_gen": 10_000}),
        "bayes": ("bayes (true, warm dp)", "bayes", {"n_trials": 10_000, "sampler": args.bayes_sampler,
                                                     "n_startup_trials": min(10, args.budget)}),
        # EvoPress's multi-step selection: children screened on the table's windows, the best 2 of each
        # generation re-scored on more calibration windows (the table's first, then others)
        "evo-ms": (f"evo (true, multi-step {config.data.profile_windows}->{args.ms_windows} windows)", "evo",
                   {"pop_size": args.pop_size, "n_gen": 10_000, "multi_step": [(config.data.profile_windows, 2)]}),
    }
    for name in args.searches:
        label, solver, kw = searches[name]
        fn = objective if name != "evo-ms" else MeasuredObjective(
            model, torch.cat([windows.profile, extra["multi_step"]]), method, **measured)
        evals0, secs0 = fn.evaluations, fn.seconds
        val0 = (validation.evaluations, validation.seconds) if validation is not None else (0, 0.0)
        t0 = time.perf_counter()
        res = minimize(problem, solver, seed=config.seed, fitness=fn, warm_start=start, max_evals=args.budget,
                       progress=not args.quick, **guard, **kw)
        wall = time.perf_counter() - t0
        n_true = fn.evaluations - evals0
        info = {"n_evals": res.n_evals, "true_evals": n_true, "search_s": wall,
                "s_per_eval": (fn.seconds - secs0) / max(1, n_true), "chosen": "search"}
        if validation is not None:
            info.update(chosen=res.info["validation"]["chosen"], val_evals=validation.evaluations - val0[0],
                        val_s=validation.seconds - val0[1])
        improved = [h for h in res.history if h.get("improved")]
        best = np.array(improved[-1]["x"]) if improved else res.x
        found = {label: {"x": res.x, **info}}
        if not np.array_equal(best, res.x):  # what the search alone would have answered (its best fitness)
            found[label.replace("warm dp", "fitness best")] = {
                "x": best, "n_evals": res.n_evals, "true_evals": n_true, "search_s": wall,
                "s_per_eval": info["s_per_eval"], "chosen": "fitness"}
        # convergence: held-out Austen perplexity of the incumbents (a few of them + the answer)
        pick = improved if len(improved) <= args.curve_points else (
            [improved[int(i)] for i in np.linspace(0, len(improved) - 1, args.curve_points)])
        incumbents = held({f"incumbent {k}": np.array(h["x"]) for k, h in enumerate(pick)})
        row = record(found)[0]
        curves.append({"method": config.method.name, "unit": config.profile.unit, "sparsity": sparsity,
                       "solver": label,
                       "points": [(h["eval"], incumbents[f"incumbent {k}"]["austen"]["perplexity"])
                                  for k, h in enumerate(pick)],
                       "answer": [res.n_evals, row["ppl_austen"]],
                       "fit": [(h["eval"], h["best"]) for h in res.history]})
        (out / "compare_solvers.curves.json").write_text(json.dumps(curves))
    return rows, curves



def plot(curves, rows, dense, path):
    """Top: held-out Austen perplexity of each search's incumbent (its best candidate on the fitness so far) against
    true-objective evaluations, the star being the answer validation picked; bottom: the incumbent's fitness KL.
    A gap between the rows is overfitting to the fitness windows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    frame = pd.DataFrame(rows)
    configs = sorted({(c["method"], c.get("unit", "layer"), c["sparsity"]) for c in curves})
    fig, axes = plt.subplots(2, len(configs), figsize=(4.4 * len(configs), 6.4), constrained_layout=True,
                             squeeze=False, sharex="col")
    colors = {}
    for col, (method, unit, s) in enumerate(configs):
        top, bottom = axes[0][col], axes[1][col]
        sub = frame[(frame.method == method) & (frame.unit == unit) & (frame.sparsity == s)]
        highs = [dense["austen"]]
        for c in curves:
            if (c["method"], c.get("unit", "layer"), c["sparsity"]) != (method, unit, s):
                continue
            color = colors.setdefault(c["solver"], f"C{len(colors)}")
            ev, ppl = zip(*c["points"])
            top.step(ev, ppl, where="post", marker="o", markersize=3, color=color, label=c["solver"])
            top.plot(*c["answer"], marker="*", markersize=11, color=color, linestyle="none")
            fev, fit = zip(*c["fit"])
            bottom.step(fev, fit, where="post", color=color, label=c["solver"])
            highs += list(ppl) + [c["answer"][1]]
        for label, style in (("dp (isolated)", "--"), ("dp (operating point)", "-.")):
            hit = sub[sub.solver == label]
            if len(hit):
                top.axhline(hit.ppl_austen.iloc[0], linestyle=style, color="gray", label=label)
                bottom.axhline(hit.fit_kl.iloc[0], linestyle=style, color="gray")
                highs.append(hit.ppl_austen.iloc[0])
        uni = sub[sub.solver == "uniform"]
        top.axhline(dense["austen"], color="k", linewidth=0.8, label="dense")
        top.set_ylim(dense["austen"] * 0.97, max(highs) * 1.05)
        title = f"{method}, {unit} units, sparsity {s}" + (f"\n(uniform {uni.ppl_austen.iloc[0]:.1f})" if len(uni) else "")
        top.set_title(title, fontsize=10)
        top.set_ylabel("held-out Austen perplexity")
        bottom.set_ylabel("fitness KL (calibration)")
        bottom.set_xlabel("true-objective evaluations")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=6.5, loc="center right")
    fig.savefig(path, dpi=110)


# Measured on the lent H100 (bf16, random weights of the real shapes, transformers LlamaForCausalLM, forward +
# log-softmax + KL as in the fitness; 2 x 4096 tokens per step for Llama-3-8B, 16 x 256 for SmolLM2).
H100_TOK_S = {"llama-3-8b": 28756.0, "smollm2-135m": 149483.0}
RSPARSE_SEARCH_TOKENS = 32 * 5 * 16 * 4096  # population 32, 5 generations, 16 samples of 4096 tokens (C4)
# Measured on the lent H100 (`compare_solvers.py --probe-8b`): MeasuredObjective, teal, Llama-3-8B's 64 blocks
H100_8B = {"tokens": 16 * 1024, "eval_s": 0.68, "apply_s": 0.021}


def report(rows, runs) -> str:
    frame, a, dense = pd.DataFrame(rows), runs[0]["args"], runs[0]["dense"]
    if "unit" not in frame:
        frame["unit"] = "layer"
    val = (f"Each search's answer is picked on {a['validation_windows']} x {a['profile_len']} other calibration "
           f"tokens (validation, disjoint from the fitness windows and from the held-out text) among its "
           f"{a['validation_top']} best candidates and the dp start: the start unless a candidate beats it there"
           + (f" (by more than {a['validation_z']} standard errors of the per-window differences)"
              if a.get("validation_z") else "") + "; "
           "a row `(true, fitness best)` shows what the search alone would have answered, where that differs."
           if a.get("validation_windows") else "No validation: each search answers its best fitness.")
    lines = ["# Solver comparison on SmolLM2-135M (issue 5)", "",
             *[f"- `{r['command']}` (started {r['started']} UTC, {r['hours']:.2f} h)" for r in runs],
             "", (f"On one {a['device_name']} (bf16)" if a.get("device", "cpu") != "cpu" and a.get("device_name") else
                  "On the shared 2-core CPU machine (bf16, one thread per process, other engineers' jobs running "
                  "beside it)") + ", one job per configuration, merged with `--merge`.", "",
             f"Dense held-out perplexity: Austen {dense['austen']:.2f}, wiki {dense['wiki']:.2f} "
             f"({a['eval_windows']} x {a['eval_len']} tokens each; Austen = Pride and Prejudice + Persuasion, wiki = "
             "the evaluation half of the shipped articles). Units: `layer` = one level per decoder layer, `block` = "
             "one for the attention (q, k, v, o) and one for the MLP (gate, up, down) of each layer, `input` = q+k+v, o, "
             "gate+up and down, `projection` = each of the seven. Tables: KL to "
             f"dense per unit x level, on {a['profile_windows']} x {a['profile_len']} calibration tokens, the rest "
             "dense (isolated). True objective (fitness): KL to dense of the whole allocation on the same windows. "
             f"Searches: {a['budget']} true evaluations each, warm-started from the dp answer; evo population "
             f"{a['pop_size']}; bayes sampler `{a['bayes_sampler']}`. {val}", "",
             "Columns: perplexity and KL (per token) on held-out text; fitness KL = the true objective; val KL = KL "
             "on the validation windows; true evals = model evaluations of whole allocations during the search "
             "(validation calls not included, see the CSV); table rows = forwards spent on the table; search s = "
             "solver wall time including validation; removed = the share of uniform's perplexity increase over "
             "dense that the allocation removes, (uniform ppl - ppl) / (uniform ppl - dense), on Austen and wiki "
             "(`allocator.gains.share_removed`: 1 = as good as dense, 0 = no better than uniform; target on Austen: "
             ">= 0.5 at 50%, >= 0.75 at 60%).", ""]
    for (method, unit, sp), sub in frame.groupby(["method", "unit", "sparsity"], sort=True):
        uni = sub[sub.solver == "uniform"]
        lines += [f"## {method}, {unit} units, model-level sparsity {sp}", "",
                  "| solver | ppl Austen | ppl wiki | KL Austen | KL wiki | fitness KL | val KL | true evals "
                  "| table rows | search s | removed Austen | removed wiki |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub.itertuples():
            sa = share_removed(dense["austen"], uni.ppl_austen.iloc[0], r.ppl_austen) if len(uni) else np.nan
            sw = share_removed(dense["wiki"], uni.ppl_wiki.iloc[0], r.ppl_wiki) if len(uni) else np.nan
            lines.append(f"| {r.solver} | {r.ppl_austen:.2f} | {r.ppl_wiki:.2f} | {r.kl_austen:.4f} | {r.kl_wiki:.4f} "
                         f"| {r.fit_kl:.4f} | {r.val_kl:.4f} | {r.true_evals} | {r.profile_evals} | {r.search_s:.0f} "
                         f"| {sa:.2f} | {sw:.2f} |")
        start = sub[sub.solver == "dp (isolated)"]
        for label in [v for v in sub.solver if "warm dp" in v]:
            hit = sub[sub.solver == label]
            if len(hit) and len(start):
                d = hit.ppl_austen.iloc[0] - start.ppl_austen.iloc[0]
                w = hit.ppl_wiki.iloc[0] - start.ppl_wiki.iloc[0]
                chosen = hit.chosen.iloc[0] if "chosen" in hit else "search"
                lines.append(f"\n{label} (answer: {chosen}) against its dp start: Austen {d:+.2f}, wiki {w:+.2f} "
                             f"perplexity ({'never worse' if d <= 1e-9 and w <= 1e-9 else 'WORSE on held-out text'}).")
        lines.append("")
    search = frame[(frame.true_evals > 0) & (frame.get("chosen", "search") != "fitness")]
    if len(search) and "s_per_eval" in search:
        tok = a["profile_windows"] * a["profile_len"]
        spe = float(search.s_per_eval.mean())
        fwd = tok / runs[0]["dense_tok_s"]
        h100 = H100_TOK_S["llama-3-8b"]
        eval_tok_s = H100_8B["tokens"] / H100_8B["eval_s"]
        evals_rs = 32 * 5
        lines += ["## Cost of the search", "",
                  f"- One true evaluation here: {spe:.2f} s on average over {len(search)} searches ({tok} tokens; a "
                  f"dense forward of them takes ~{fwd:.2f} s at the measured {runs[0]['dense_tok_s']:.0f} tokens/s, "
                  "the rest is applying the allocation and the KL). Search wall time (evaluations + solver + "
                  f"validation): {search.search_s.mean() / 60:.1f} min per search on average, "
                  f"{search.search_s.sum() / 3600:.2f} h for all {len(search)}; the whole study: "
                  f"{sum(r['hours'] for r in runs):.2f} CPU-process hours.",
                  f"- R-Sparse reports ~1 GPU-hour for its 7B search (population 32, 5 generations, fitness on 16 "
                  f"samples: {evals_rs} evaluations x {RSPARSE_SEARCH_TOKENS / evals_rs:.0f} tokens = "
                  f"{RSPARSE_SEARCH_TOKENS / 1e6:.1f} M tokens).",
                  f"- Llama-3-8B on one H100, measured: {h100:.0f} tokens/s for forward + log-softmax + KL in bf16 "
                  f"(SmolLM2 on the same GPU: {H100_TOK_S['smollm2-135m']:.0f} tokens/s: too small to fill it, so "
                  "scaling its time by FLOPs would overestimate 8B by ~11x). This library's `MeasuredObjective` with teal "
                  "on Llama-3-8B's 64 attention / MLP blocks (random weights of the real shapes, bf16, "
                  f"`--probe-8b`): applying and removing an allocation {H100_8B['apply_s'] * 1e3:.0f} ms,"
                  f" one true evaluation on {H100_8B['tokens']} tokens {H100_8B['eval_s']:.2f} s "
                  f"({eval_tok_s:.0f} tokens/s, everything included). Hence R-Sparse's search on Llama-3-8B: "
                  f"{RSPARSE_SEARCH_TOKENS / eval_tok_s / 60:.1f} min on one H100 (they report ~1 GPU-hour for "
                  f"7B); this study's searches ({a['budget']} evaluations of {tok} tokens): "
                  f"{a['budget'] * (tok / eval_tok_s + H100_8B['apply_s']):.0f} s each; an EvoPress-size search "
                  "(400 generations x 16 offspring, multi-step 2048 / 16384 / 65536 tokens with 8 / 2 / 1 survivors) "
                  f"{400 * (16 * 2048 + 8 * 16384 + 2 * 65536) / eval_tok_s / 3600:.1f} h.", ""]
    return "\n".join(lines)


def write_outputs(rows, curves, runs, out: Path, notes: Path | None = None):
    """CSV, markdown report and convergence PNG (``runs``: one timing record per job that contributed)."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "compare_solvers.csv", index=False)
    (out / "compare_solvers.curves.json").write_text(json.dumps(curves))
    (out / "compare_solvers.runs.json").write_text(json.dumps(runs, indent=1))
    plot(curves, rows, runs[0]["dense"], out / "compare_solvers.png")
    text = report(rows, runs) + "\n"
    if notes is not None:
        text += "\n" + Path(notes).read_text()
    (out / "compare_solvers.md").write_text(text)
    logger.info("wrote %s", out)


def job_dirs(paths) -> list[Path]:
    """Job folders under the given paths (a job folder itself, or a sweep folder holding several)."""
    found = []
    for path in map(Path, paths):
        hits = sorted({p.parent for pattern in ("compare_solvers.csv", "compare_solvers.partial.csv")
                       for p in path.rglob(pattern)})
        if not hits:
            raise FileNotFoundError(f"no compare_solvers output under {path}")
        hits = [h for h in hits if not any(h in other.parents for other in hits)]  # jobs, not merged reports
        found += [h for h in hits if h not in found]
    return found


def merge(paths, out: Path, notes: Path | None = None):
    """Combine the outputs of several jobs (e.g. a multirun sweep) into one report."""
    rows, curves, runs = [], [], []
    for d in job_dirs(paths):
        csv = d / "compare_solvers.csv"
        rows += pd.read_csv(csv if csv.exists() else d / "compare_solvers.partial.csv").to_dict("records")
        if (d / "compare_solvers.curves.json").exists():
            curves += json.loads((d / "compare_solvers.curves.json").read_text())
        if (d / "compare_solvers.runs.json").exists():
            runs += json.loads((d / "compare_solvers.runs.json").read_text())
    write_outputs(rows, curves, runs, Path(out), notes)


def probe_llama3_8b(device: str = "cuda") -> dict:
    """Seconds per measured evaluation for Llama-3-8B (random weights of the real shapes, bf16) with teal on its
    64 attention / MLP blocks: what the report's 8B estimate rests on. Needs a GPU with ~40 GB free."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from allocator import analytic_tables, make_levels
    from allocator.evaluators.methods import get_method
    from allocator.evaluators.objective import MeasuredObjective
    from allocator.evaluators.plan import CompressionPlan, compressed

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=5e5)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    method = get_method("teal").calibrate(model, torch.randint(0, config.vocab_size, (4, 512), generator=gen))
    tables = analytic_tables(config.to_dict(), make_levels(s=[0.3, 0.4, 0.5, 0.6, 0.7]), unit="block")
    objective = MeasuredObjective(model, torch.randint(0, config.vocab_size, (16, 1024), generator=gen), method,
                                  "kl", tables=tables, batch_size=4)
    apply_s, eval_s = [], []
    for _ in range(4):
        x = rng.integers(0, tables.n_levels, tables.n_units)
        t0 = time.perf_counter()
        with compressed(model, CompressionPlan.build(model, method, Allocation.from_levels(tables, x))):
            pass
        torch.cuda.synchronize()
        apply_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        objective(x)
        torch.cuda.synchronize()
        eval_s.append(time.perf_counter() - t0)
    return {"tokens": int(objective.windows.numel()), "eval_s": float(np.median(eval_s)),
            "apply_s": float(np.median(apply_s)), "device": torch.cuda.get_device_name()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, quick="2 layers, tiny windows, layer units, 6 evaluations per search (a smoke run)")
    add_config_args(p)
    p.add_argument("--methods", nargs="+", default=["teal"], help="compression methods (conf/method presets)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5], help="model-level sparsity budgets")
    p.add_argument("--unit", default="block", choices=["layer", "block", "input", "projection"],
                   help="allocation unit (studies/results/unit_granularity.md)")
    p.add_argument("--budget", type=int, default=150, help="measured evaluations per search (evo and bayes alike)")
    p.add_argument("--searches", nargs="*", default=["evo", "bayes"], choices=["evo", "bayes", "evo-ms"],
                   help="evo-ms: multi-step, screen on the table's windows, survivors on more")
    p.add_argument("--pop-size", type=int, default=12, help="evo population")
    p.add_argument("--bayes-sampler", default="tpe", choices=["tpe", "gp", "auto"],
                   help="the GP took > 10 min of sampler time for 150 trials on 60 units here")
    p.add_argument("--validation-windows", type=int, default=16,
                   help="held-aside calibration windows (disjoint from the fitness ones) that pick each search's "
                        "answer among its best --validation-top and the dp start; 0: no validation")
    p.add_argument("--validation-top", type=int, default=5)
    p.add_argument("--validation-z", type=float, default=2.0,
                   help="standard errors (paired over the validation windows) a candidate must beat the start by")
    p.add_argument("--operating-point", action="store_true", help="also dp on tables profiled around the "
                   "operating point")
    p.add_argument("--ms-windows", type=int, default=16, help="evo-ms: windows of the final stage")
    p.add_argument("--curve-points", type=int, default=4, help="incumbents per search measured on held-out text")
    p.add_argument("--merge", nargs="+", type=Path, help="only merge these job or sweep folders into --out")
    p.add_argument("--notes", type=Path, help="a markdown file appended to the merged report (findings, by hand)")
    p.add_argument("--probe-8b", action="store_true", help="only time a measured evaluation of Llama-3-8B (GPU)")
    args = p.parse_args(argv)
    if args.quick:
        explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for key, value in QUICK_STUDY.items():
            if key not in explicit:
                setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("allocator").setLevel(logging.WARNING)
    if args.merge:
        merge(args.merge, args.out, args.notes)
        return
    if args.probe_8b:
        print(json.dumps(probe_llama3_8b(args.device if args.device != "cpu" else "cuda")))
        return
    jobs = []
    for method in args.methods:
        for sparsity in args.sparsities:
            jobs.append(args.out / f"{method}_{args.unit}_{sparsity}")
            run_job(args, method, sparsity, jobs[-1])
    merge(jobs, args.out, args.notes)


if __name__ == "__main__":
    main()
