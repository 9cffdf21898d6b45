"""Solver comparison on SmolLM2-135M: table solvers against search on the measured objective (issue 5).

For each method (``teal``, ``rsparse``) and model-level sparsity (0.5, 0.6) it runs: uniform, greedy, dp on an
isolated per-layer KL table, dp on a table profiled around the operating point (when the pipeline provides
one), evo on the table, evo on the true objective warm-started from dp, and bayes (optuna) on the true
objective, the two true-objective searches at the same evaluation budget. Every answer is applied to the model
and measured on held-out text (Austen: Pride and Prejudice + Persuasion; Wikipedia: the evaluation half),
perplexity and KL to the dense model. Writes ``compare_solvers.{csv,md,png}`` (the PNG: best-so-far held-out
perplexity against true-objective evaluations).

    .venv/bin/python studies/compare_solvers.py                       # the committed run
    .venv/bin/python studies/compare_solvers.py --sparsity 0.5 --methods teal --budget 20 --out /tmp/cs

Argparse (one process per configuration works too: ``--methods rsparse --sparsity 0.6 --out DIR``).
Costs: the true objective is KL to the dense model on ``--fit-windows x --fit-len`` calibration tokens; the
isolated table costs ``units x (levels - 1)`` forwards on ``--profile-windows`` windows.
"""
from __future__ import annotations

import argparse
import json
import sys
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from allocator import Allocation, Problem, analytic_tables, make_levels, minimize
from allocator.evaluators.methods import Protocol, apply_allocation_, get_method, remove_compression_
from allocator.evaluators.models import load_model
from allocator.evaluators.objective import TrueObjective
from allocator.evaluators.pipeline import budget_level
from allocator.evaluators.profiling import profile
from allocator.evaluators.text import token_windows

logger = logging.getLogger("compare_solvers")
RESULTS = Path(__file__).parent / "results"
LEVELS = {  # the pipeline's method configs (conf/method/*.yaml): teal s only; rsparse s x sparse ratio rho
    "teal": make_levels(s=[0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
    "rsparse": make_levels(s=[0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], rho=[1.0, 0.9]),
}
# SmolLM2-135M and Llama-3-8B: forward FLOPs per token ~ 2 x parameters (weights incl. LM head)
PARAMS = {"smollm2-135m": 134.5e6, "llama-3-8b": 8.03e9}


# ---------------------------------------------------------------------------------------------- model side
class DenseRef:
    """Dense next-token log-probs (bf16, (n, T-1, V)) and perplexity on fixed windows, computed once."""

    @torch.no_grad()
    def __init__(self, model, windows, batch_size=4):
        self.windows, self.batch_size = windows, batch_size
        chunks, nll = [], 0.0
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size]
            lp = model(input_ids=ids, use_cache=False).logits.float()[:, :-1].log_softmax(-1)
            nll -= lp.gather(-1, ids[:, 1:, None]).sum().item()
            chunks.append(lp.to(torch.bfloat16))
        self.logprobs = torch.cat(chunks)
        self.tokens = self.logprobs.shape[0] * self.logprobs.shape[1]
        self.perplexity = math.exp(nll / self.tokens)

    @torch.no_grad()
    def compare(self, model, n=None, kl=True) -> dict:
        """Perplexity of the model as it is and its KL(dense || model), per token, on the first n windows."""
        n = len(self.windows) if n is None else min(n, len(self.windows))
        nll = kl_sum = 0.0
        for i in range(0, n, self.batch_size):
            ids = self.windows[i:min(i + self.batch_size, n)]
            lp = model(input_ids=ids, use_cache=False).logits.float()[:, :-1].log_softmax(-1)
            nll -= lp.gather(-1, ids[:, 1:, None]).sum().item()
            if kl:
                ref = self.logprobs[i:i + len(ids)].float()
                kl_sum += (ref.exp() * (ref - lp)).sum().item()
        tokens = n * self.logprobs.shape[1]
        return {"perplexity": math.exp(nll / tokens), "kl": kl_sum / tokens, "tokens": tokens}


def unit_levels_dict(tables, unit_levels) -> dict:
    """{unit: level} for the compressed units only (s = 0 is the dense layer: left untouched)."""
    out = {}
    for unit, li in zip(tables.unit_names, np.asarray(unit_levels, dtype=int)):
        row = tables.levels.iloc[int(li)]
        if row.s > 0:
            out[unit] = {"s": float(row.s), "rho": float(row.rho), "bits": int(row.bits)}
    return out


# ---------------------------------------------------------------------------------------------- study
def run_config(model, method_name, method, sparsity, args, prof_windows, held, profiles, rows, curves,
               ms_windows=None):
    """All solvers on one (method, sparsity); the true objective is KL on the profiling windows."""
    levels = LEVELS[method_name]
    iso, op = profiles["isolated"], profiles.get(("operating_point", sparsity))
    tables = analytic_tables("smollm2-135m", levels, unit="layer").with_degradation(
        iso.table("kl"), metric="kl", **iso.provenance)
    objective = TrueObjective(model, prof_windows, method, "kl", tables=tables, batch_size=8)
    problem = Problem(tables, "bytes_decode", sparsity=sparsity, objective=objective)
    profile_seconds = profiles["seconds"]
    profile_evals = int(tables.n_units * (tables.levels["s"] > 0).sum())  # rows of the isolated table
    cache = {}

    def held_out(x, kl=True):
        k = (np.asarray(x).tobytes(), kl)
        if k not in cache:
            apply_allocation_(model, unit_levels_dict(tables, x), method)
            try:
                cache[k] = {name: ref.compare(model, kl=kl) for name, ref in held.items()}
            finally:
                remove_compression_(model)
        return cache[k]

    def record(label, result, true_evals, table_based, search_seconds):
        m = held_out(result.x)
        fit = objective(result.x)
        row = {"method": method_name, "sparsity": sparsity, "solver": label,
               "ppl_austen": m["austen"]["perplexity"], "ppl_wiki": m["wiki"]["perplexity"],
               "kl_austen": m["austen"]["kl"], "kl_wiki": m["wiki"]["kl"], "fit_kl": fit,
               "table_kl": float(result.degradation), "true_evals": true_evals,
               "profile_evals": profile_evals if table_based else 0, "n_evals": result.n_evals,
               "search_s": search_seconds, "profile_s": profile_seconds if table_based else 0.0,
               "cost_ratio": float(result.cost / (tables.dense_cost("bytes_decode").sum())),
               "mean_s": float(np.mean([lv["s"] for lv in result.allocation.levels])),
               "allocation": " ".join(str(int(v)) for v in result.x)}
        rows.append(row)
        logger.info("%s %.1f %-22s austen %.2f wiki %.2f fitKL %.4f evals %d %.0fs", method_name, sparsity, label,
                    row["ppl_austen"], row["ppl_wiki"], fit, true_evals, search_seconds)
        pd.DataFrame(rows).to_csv(args.out / "compare_solvers.partial.csv", index=False)
        return row

    table_problem = Problem(tables, "bytes_decode", sparsity=sparsity)
    results = {}
    operating = budget_level(levels, sparsity, 1.0)
    j = int(np.flatnonzero((levels["s"].sub(operating["s"]).abs() < 1e-9) & (levels["rho"] == 1.0))[0])
    uniform = minimize(table_problem, "uniform")  # the best uniform level by the table ...
    if uniform.x[0] != j and not args.searches_only:                          # ... and the operating point (s = sparsity, rho = 1) when different
        x = np.full(tables.n_units, j)
        ev = table_problem.evaluate_units(x[None])
        record(f"uniform (s={operating['s']}, rho=1)", SimpleNamespace(
            x=x, cost=float(ev.cost[0]), degradation=float(ev.degradation[0]), n_evals=0,
            allocation=Allocation.from_levels(tables, x)), 0, False, 0.0)
    for label, solver, kw in (("uniform", "uniform", {}), ("greedy (isolated)", "greedy", {}), ("dp (isolated)", "dp", {}),
                              ("evo (tables)", "evo", {"objective": "tables"})):
        try:
            t0 = time.perf_counter()
            res = minimize(table_problem, solver, seed=args.seed, **kw)
        except Exception as exc:  # e.g. greedy not merged yet
            logger.warning("%s skipped: %s", label, exc)
            continue
        results[label] = res
        if not args.searches_only:
            record(label, res, 0, label != "uniform", time.perf_counter() - t0)

    if op is not None and not args.searches_only:  # dp on the table profiled around the operating point (first-order interactions)
        op_problem = Problem(tables.with_degradation(op.table("kl"), **op.provenance), "bytes_decode", sparsity=sparsity)
        res = minimize(op_problem, "dp", seed=args.seed)
        row = record("dp (operating point)", res, 0, True, res.solve_time)
        row["profile_s"] = profiles.get(("seconds", sparsity), 0.0)
        row["profile_evals"] = int(tables.n_units * (tables.n_levels - 1))

    start = results["dp (isolated)"].x
    budget = args.budget
    searches = {
        "evo": ("evo (true, warm dp)", "evo", {"warm_start": start, "pop_size": args.pop_size, "n_gen": 10_000}),
        "bayes": ("bayes (true, warm dp)", "bayes", {"warm_start": start, "n_trials": 10_000,
                                                     "sampler": args.bayes_sampler, "n_startup_trials": 10}),
        # EvoPress's multi-step selection: children screened on the table's 4 windows, the best 2 of each
        # generation re-scored on 4x more calibration windows (the answer is the best on the larger set)
        "evo-ms": (f"evo (true, multi-step {args.profile_windows}->{args.ms_windows} windows)", "evo",
                   {"warm_start": start, "pop_size": args.pop_size, "n_gen": 10_000,
                    "multi_step": [(args.profile_windows, 2)]}),
    }
    for name in args.searches:
        label, solver, kw = searches[name]
        fn, counter = objective, [objective]
        if name == "evo-ms":  # the table's windows first, so fidelity = len(prof_windows) screens on them
            fn = TrueObjective(model, torch.cat([prof_windows, ms_windows]), method, "kl", tables=tables, batch_size=8)
            counter = [fn]
        calls0 = sum(o.evaluations for o in counter)
        secs0 = sum(o.seconds for o in counter)
        t0 = time.perf_counter()
        res = minimize(problem, solver, seed=args.seed, objective=fn, max_evals=budget, progress=True, **kw)
        wall = time.perf_counter() - t0
        n_true = sum(o.evaluations for o in counter) - calls0
        s_per_eval = (sum(o.seconds for o in counter) - secs0) / max(1, n_true)
        row = record(label, res, n_true, False, wall)
        row["s_per_eval"] = s_per_eval
        # convergence: held-out Austen perplexity of the best-so-far candidates (a few of them + the last)
        improved = [h for h in res.history if h.get("improved")]
        pick = improved if len(improved) <= args.curve_points else (
            [improved[int(i)] for i in np.linspace(0, len(improved) - 1, args.curve_points)])
        pts = [(h["eval"], held_out(np.array(h["x"]), kl=False)["austen"]["perplexity"]
                if not np.array_equal(h["x"], res.x) else row["ppl_austen"]) for h in pick]
        pts.append((res.n_evals, row["ppl_austen"]))
        curves.append({"method": method_name, "sparsity": sparsity, "solver": label, "points": pts,
                       "fit": [(h["eval"], h["best"]) for h in res.history]})
        (args.out / "compare_solvers.curves.json").write_text(json.dumps(curves))


def plot(curves, rows, dense, path):
    """Top: held-out Austen perplexity of each search's incumbent (its best candidate on the fitness so far) against
    true-objective evaluations; bottom: the incumbent's fitness KL. A gap between the rows is overfitting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    frame = pd.DataFrame(rows)
    configs = sorted({(c["method"], c["sparsity"]) for c in curves})
    fig, axes = plt.subplots(2, len(configs), figsize=(4.4 * len(configs), 6.4), constrained_layout=True,
                             squeeze=False, sharex="col")
    colors = {}
    for col, (method, s) in enumerate(configs):
        top, bottom = axes[0][col], axes[1][col]
        sub = frame[(frame.method == method) & (frame.sparsity == s)]
        highs = [dense["austen"]]
        for c in curves:
            if (c["method"], c["sparsity"]) != (method, s):
                continue
            color = colors.setdefault(c["solver"], f"C{len(colors)}")
            ev, ppl = zip(*c["points"])
            top.step(ev, ppl, where="post", marker="o", markersize=3, color=color, label=c["solver"])
            fev, fit = zip(*c["fit"])  # multi-step: the incumbent's KL on its larger final set
            bottom.step(fev, fit, where="post", color=color, label=c["solver"])
            highs += list(ppl)
        for label, style in (("dp (isolated)", "--"), ("dp (operating point)", "-.")):
            hit = sub[sub.solver == label]
            if len(hit):
                top.axhline(hit.ppl_austen.iloc[0], linestyle=style, color="gray", label=label)
                bottom.axhline(hit.fit_kl.iloc[0], linestyle=style, color="gray")
                highs.append(hit.ppl_austen.iloc[0])
        uni = sub[sub.solver == "uniform"]
        top.axhline(dense["austen"], color="k", linewidth=0.8, label="dense")
        top.set_ylim(dense["austen"] * 0.97, max(highs) * 1.05)
        title = f"{method}, sparsity {s}" + (f" (uniform {uni.ppl_austen.iloc[0]:.1f})" if len(uni) else "")
        top.set_title(title, fontsize=10)
        top.set_ylabel("held-out Austen perplexity")
        bottom.set_ylabel("fitness KL (calibration)")
        bottom.set_xlabel("true-objective evaluations")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=6.5, loc="lower right")
    fig.savefig(path, dpi=110)


# Measured on the lent H100 (bf16, random weights of the real shapes, transformers LlamaForCausalLM, forward +
# log-softmax + KL as in the fitness; 2 x 4096 tokens per step for Llama-3-8B, 16 x 256 for SmolLM2).
H100_TOK_S = {"llama-3-8b": 28756.0, "smollm2-135m": 149483.0}
RSPARSE_SEARCH_TOKENS = 32 * 5 * 16 * 4096  # population 32, 5 generations, 16 samples of 4096 tokens (C4)


def report(rows, curves, runs) -> str:
    frame, a, dense = pd.DataFrame(rows), runs[0]["args"], runs[0]["dense"]
    lines = ["# Solver comparison on SmolLM2-135M (issue 5)", "",
             *[f"- `{r['command']}` (started {r['started']} UTC, {r['hours']:.2f} h)" for r in runs],
             "", "On the shared 2-core CPU machine (bf16, other engineers' jobs running beside it), one process per "
             "method with one thread each, merged with `--merge`.", "",
             f"Dense held-out perplexity: Austen {dense['austen']:.2f}, wiki {dense['wiki']:.2f} "
             f"({a['eval_windows']} x {a['eval_len']} tokens each; Austen = Pride and Prejudice + Persuasion, wiki = "
             "the evaluation half of the shipped articles). Tables: KL to dense per layer x level, on "
             f"{a['profile_windows']} x {a['profile_len']} calibration tokens (isolated: the rest dense; operating "
             "point: the rest at the uniform level). True objective: KL to dense of the whole allocation on the same "
             f"windows. Searches: {a['budget']} true evaluations each, warm-started from the isolated-table dp "
             f"answer; evo population {a['pop_size']}; bayes sampler `{a['bayes_sampler']}`.", "",
             "Columns: perplexity and KL (per token) on held-out text; fitness KL = the true objective; true evals = "
             "model evaluations of whole allocations during the search; table rows = forwards spent on the "
             "table; search s = solver wall time (the profiling time is in the CSV, `profile_s`); last column = "
             "(ppl - dense) / (uniform ppl - dense) on Austen (target: <= 0.5 at 50%, <= 0.25 at 60%).", ""]
    for (method, sp), sub in frame.groupby(["method", "sparsity"], sort=True):
        uni = sub[sub.solver == "uniform"]
        lines += [f"## {method}, model-level sparsity {sp}", "",
                  "| solver | ppl Austen | ppl wiki | KL Austen | KL wiki | fitness KL | true evals | table rows "
                  "| search s | increase / uniform's |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub.itertuples():
            inc = (r.ppl_austen - dense["austen"]) / (uni.ppl_austen.iloc[0] - dense["austen"]) if len(uni) else np.nan
            lines.append(f"| {r.solver} | {r.ppl_austen:.2f} | {r.ppl_wiki:.2f} | {r.kl_austen:.4f} | {r.kl_wiki:.4f} "
                         f"| {r.fit_kl:.4f} | {r.true_evals} | {r.profile_evals} | {r.search_s:.0f} | {inc:.2f} |")
        start = sub[sub.solver == "dp (isolated)"]
        for label in [v for v in sub.solver if "(true" in v]:
            hit = sub[sub.solver == label]
            if len(hit) and len(start):
                d = hit.ppl_austen.iloc[0] - start.ppl_austen.iloc[0]
                w = hit.ppl_wiki.iloc[0] - start.ppl_wiki.iloc[0]
                lines.append(f"\n{label} against its dp start: Austen {d:+.2f}, wiki {w:+.2f} perplexity "
                             f"({'never worse' if d <= 1e-9 and w <= 1e-9 else 'WORSE on held-out text'}).")
        lines.append("")
    search = frame[frame.true_evals > 0]
    if len(search) and "s_per_eval" in search:
        tok = a["profile_windows"] * a["profile_len"]
        spe = float(search.s_per_eval.mean())
        fwd = tok / runs[0]["dense_tok_s"]
        h100 = H100_TOK_S["llama-3-8b"]
        evals_rs = 32 * 5
        lines += ["## Cost of the search", "",
                  f"- One true evaluation here: {spe:.2f} s on average ({tok} tokens; a dense forward of them takes "
                  f"~{fwd:.2f} s at the measured {runs[0]['dense_tok_s']:.0f} tokens/s, the rest is applying the "
                  "allocation and the KL). A search of "
                  f"{a['budget']} evaluations: {a['budget'] * spe / 60:.1f} min; the whole study: "
                  f"{sum(r['hours'] for r in runs):.2f} CPU-process hours.",
                  f"- R-Sparse reports ~1 GPU-hour for its 7B search (population 32, 5 generations, fitness on 16 "
                  f"samples: {evals_rs} evaluations x {RSPARSE_SEARCH_TOKENS / evals_rs:.0f} tokens = "
                  f"{RSPARSE_SEARCH_TOKENS / 1e6:.1f} M tokens).",
                  f"- Llama-3-8B on one H100, measured: {h100:.0f} tokens/s for forward + log-softmax + KL in bf16 "
                  f"(462 TFLOP/s; SmolLM2 on the same GPU: {H100_TOK_S['smollm2-135m']:.0f} tokens/s, 40 TFLOP/s: "
                  "too small to fill it, so scaling its time by FLOPs (x60) would overestimate 8B by ~11x). "
                  f"R-Sparse's search on Llama-3-8B: {RSPARSE_SEARCH_TOKENS / h100 / 60:.1f} min of forwards "
                  "(plus the dense reference once, and applying each candidate: ~"
                  f"{spe - fwd:.1f} s measured here per SmolLM2 candidate on the CPU; at an assumed 1 s per 8B "
                  f"candidate on the GPU, {evals_rs / 60:.0f} min); our study's budget ({a['budget']} evaluations of {tok} tokens) would "
                  f"take {a['budget'] * tok / h100:.1f} s of forwards; an EvoPress-size search (400 generations x "
                  f"16 offspring, multi-step 2048 / 16384 / 65536 tokens with 8 / 2 / 1 survivors) "
                  f"{400 * (16 * 2048 + 8 * 16384 + 2 * 65536) / h100 / 3600:.1f} h.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["teal", "rsparse"])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.6])
    p.add_argument("--budget", type=int, default=60, help="true-objective evaluations per search solver")
    p.add_argument("--pop-size", type=int, default=12)
    p.add_argument("--bayes-sampler", default="auto", help="auto: optuna's GP (torch is there), else TPE")
    p.add_argument("--operating-point", nargs="*", default=["teal", "rsparse"],
                   help="methods that also get dp on tables profiled around the operating point")
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--profile-windows", type=int, default=4, help="tables and true objective: calibration windows")
    p.add_argument("--profile-len", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--curve-points", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--searches", nargs="+", default=["evo", "bayes"], choices=["evo", "bayes", "evo-ms"])
    p.add_argument("--ms-windows", type=int, default=16, help="evo-ms: calibration windows of the final stage")
    p.add_argument("--searches-only", action="store_true", help="record only the searches (tables: from cache)")
    p.add_argument("--merge", nargs="+", type=Path, help="only merge the outputs of earlier runs in these folders")
    p.add_argument("--notes", type=Path, help="a markdown file appended to the report (the findings, by hand)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.merge:
        return merge(args.merge, args.out, args.notes)
    logging.getLogger("allocator").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    t_start = time.perf_counter()

    model, tok = load_model(dtype=args.dtype)
    model.eval()
    # the pipeline's default data (conf/data/shipped.yaml): thresholds on 8 x 256, tables on 4 x 128 (seed + 1)
    calib = token_windows(tok, "calibration", args.calib_windows, args.calib_len, args.seed)
    prof_windows = token_windows(tok, "calibration", args.profile_windows, args.profile_len, args.seed + 1)
    # multi-step selection's larger set: the table's windows plus more calibration windows (another seed)
    ms_windows = (token_windows(tok, "calibration", args.ms_windows - args.profile_windows, args.profile_len, args.seed + 2)
                  if "evo-ms" in args.searches else None)
    held_w = {"austen": token_windows(tok, "austen_eval", args.eval_windows, args.eval_len, args.seed),
              "wiki": token_windows(tok, "wiki_eval", args.eval_windows, args.eval_len, args.seed)}
    t0 = time.perf_counter()
    held = {k: DenseRef(model, w) for k, w in held_w.items()}
    dense_tok_s = sum(r.tokens for r in held.values()) / (time.perf_counter() - t0)
    dense = {k: r.perplexity for k, r in held.items()}
    logger.info("dense perplexity %s; %.0f tokens/s", dense, dense_tok_s)

    rows, curves = [], []
    for method_name in args.methods:
        method = get_method(method_name, protocol=Protocol(1.0), seed=args.seed)
        method.calibrate(model, calib, batch_size=4)
        levels = LEVELS[method_name]
        units = [f"layers.{i}" for i in range(model.config.num_hidden_layers)]
        t0 = time.perf_counter()
        profiles = {"isolated": profile(model, method, prof_windows, levels, units, mode="isolated", batch_size=8)}
        profiles["seconds"] = time.perf_counter() - t0
        for sparsity in args.sparsity:
            if method_name in args.operating_point:
                t0 = time.perf_counter()
                profiles[("operating_point", sparsity)] = profile(
                    model, method, prof_windows, levels, units, mode="operating_point", batch_size=8,
                    operating_level=budget_level(levels, sparsity, 1.0))
                profiles[("seconds", sparsity)] = time.perf_counter() - t0
            run_config(model, method_name, method, sparsity, args, prof_windows, held, profiles, rows, curves,
                       ms_windows)

    timing = {"command": "python studies/compare_solvers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": started, "hours": (time.perf_counter() - t_start) / 3600, "dense_tok_s": dense_tok_s,
              "dense": dense, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    write_outputs(rows, curves, [timing], args.out)


def write_outputs(rows, curves, runs, out: Path, notes: Path | None = None):
    """CSV, markdown report and convergence PNG (``runs``: one timing record per process that contributed)."""
    pd.DataFrame(rows).to_csv(out / "compare_solvers.csv", index=False)
    (out / "compare_solvers.curves.json").write_text(json.dumps(curves))
    (out / "compare_solvers.runs.json").write_text(json.dumps(runs, indent=1))
    plot(curves, rows, runs[0]["dense"], out / "compare_solvers.png")
    text = report(rows, curves, runs) + "\n"
    if notes is not None:
        text += "\n" + Path(notes).read_text()
    (out / "compare_solvers.md").write_text(text)
    logger.info("wrote %s", out)


def merge(dirs, out: Path, notes: Path | None = None):
    """Combine the outputs of several processes (e.g. one per method) into one report."""
    rows, curves, runs = [], [], []
    for d in map(Path, dirs):
        csv = d / "compare_solvers.csv"
        rows += pd.read_csv(csv if csv.exists() else d / "compare_solvers.partial.csv").to_dict("records")
        curves += json.loads((d / "compare_solvers.curves.json").read_text())
        runs += json.loads((d / "compare_solvers.runs.json").read_text()) if (d / "compare_solvers.runs.json").exists() \
            else []
    write_outputs(rows, curves, runs, out)

if __name__ == "__main__":
    main()
