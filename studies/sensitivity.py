"""Where the sensitivity sits: the degradation table as a layer x site heatmap, how alike neighbouring layers are,
and what in the weights and activations goes with it (reviewer questions 1 and 9).

Reads a saved degradation table (``--tables DIR``: a main job's ``tables/`` folder, ``allocator.Tables.load``;
one profiled unit per row, i.e. made with ``profile.split=none``) and writes into ``--out DIR``:

- ``sensitivity.png``: heatmaps of the degradation (KL per token) per layer x site (the unit's name without its
  ``layers.<i>.`` prefix: q+k+v, o, gate+up, down for ``profile.unit=input``) at the budget level and one other;
- the lag-1 Spearman correlation of the per-layer sensitivities (layer l against layer l + 1, per site and for
  the layer's sum) with a permutation p-value (layers shuffled), and the mean Spearman of neighbouring layers'
  whole profiles (sites x levels) against that of all layer pairs: question 1, why consecutive layers may share
  a level;
- per-unit allocations against consecutive groups of layers (``grouping="consecutive"``, at most G groups) at the
  budget's model-level sparsity, predicted by the table and, with ``--measure``, measured on the real model (KL
  to dense on the profiling windows, the quantity the table sums, and on the held-out windows);
- Spearman correlations of the sensitivity at the budget level with simple statistics of the loaded model, per
  site and pooled: the unit's weight Frobenius norm, its RMS weight, layer position, and the excess kurtosis and
  RMS of the unit's input activations on ``--stat-windows`` calibration windows (question 9).

The model, its calibration and the windows are the main job's (``studies/_common.py``: ``--set`` takes the same
overrides as ``python -m allocator``); give the overrides the table was made with, so that ``--measure``
measures the same thresholds.

    python studies/sensitivity.py --tables RUN/tables --out DIR --measure --set model.threads=1
    python studies/sensitivity.py --tables RUN/tables --out DIR --quick        # no model statistics, no measuring

Writes ``sensitivity.csv`` (one row per unit), ``sensitivity.groups.csv`` (grouped vs per-unit),
``sensitivity.json`` (every number of the report) and ``sensitivity.md``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, add_config_args, base_overrides, job_config, short  # noqa: E402

GROUPS = [1, 2, 4, 8, None]          # max_groups of the consecutive grouping; None: one level per layer, any runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, quick="tables only: heatmaps, neighbour correlations and predicted grouping (no model)")
    add_config_args(p)
    p.add_argument("--tables", type=Path, required=True, help="a main job's tables/ folder (profile.split=none)")
    p.add_argument("--budget", type=float, default=0.5, help="model-level sparsity: the heatmap's level and the "
                   "grouped vs per-unit budget")
    p.add_argument("--other", type=float, default=0.7, help="the second heatmap's sparsity level")
    p.add_argument("--stat-windows", type=int, default=2, help="calibration windows for activation statistics")
    p.add_argument("--measure", action="store_true", help="measure the grouped and per-unit allocations' KL")
    p.add_argument("--permutations", type=int, default=2000, help="shuffles for the neighbour p-values")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- the table
def site_of(unit) -> str:
    """``layers.3.gate+up`` -> ``gate+up``; a unit spanning a whole layer -> ``layer``."""
    prefix = f"layers.{unit.layer}."
    return unit.name[len(prefix):] if unit.name.startswith(prefix) else "layer"


def level_at(tables, s: float) -> int:
    """The index of the level with sparsity ``s`` (the first, if several share it)."""
    hit = np.flatnonzero(np.isclose(tables.levels["s"].to_numpy(float), s))
    if not hit.size:
        raise SystemExit(f"no level at s = {s} in the table (levels: {sorted(set(tables.levels['s']))})")
    return int(hit[0])


def unit_frame(tables) -> pd.DataFrame:
    """One row per unit: name, layer, site, degradation at every level (columns ``deg_s<s>``)."""
    frame = pd.DataFrame({"unit": tables.unit_names, "layer": [u.layer for u in tables.units],
                          "site": [site_of(u) for u in tables.units]})
    deg = np.asarray(tables.degradation, dtype=float)
    for j, s in enumerate(tables.levels["s"]):
        frame[f"deg_s{s:g}"] = deg[:, j]
    return frame


def heatmap(frame: pd.DataFrame, s: float) -> pd.DataFrame:
    """Layer x site degradation at level ``s`` (sites in the table's order)."""
    sites = list(dict.fromkeys(frame["site"]))
    return frame.pivot_table(index="layer", columns="site", values=f"deg_s{s:g}", aggfunc="sum")[sites]


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def lag1(x, permutations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Spearman of x[l] against x[l + 1] and its two-sided permutation p-value (the layers shuffled)."""
    x = np.asarray(x, float)
    rho = spearman(x[:-1], x[1:])
    if not np.isfinite(rho) or permutations <= 0:
        return rho, float("nan")
    rng = np.random.default_rng(seed)
    null = np.array([spearman(y[:-1], y[1:]) for y in (rng.permutation(x) for _ in range(permutations))])
    return rho, float((np.sum(np.abs(null) >= abs(rho)) + 1) / (permutations + 1))


def neighbours(frame: pd.DataFrame, s: float, permutations: int, seed: int) -> dict:
    """Question 1: how alike neighbouring layers' sensitivities are."""
    grid = heatmap(frame, s)
    out = {"lag1": {}, "profile": {}}
    columns = {**{site: grid[site].to_numpy() for site in grid.columns}, "layer sum": grid.sum(axis=1).to_numpy()}
    for name, x in columns.items():
        rho, p = lag1(x, permutations, seed)
        out["lag1"][name] = {"spearman": rho, "p": p}
    # whole profiles: every site at every level, one vector per layer
    deg_cols = [c for c in frame.columns if c.startswith("deg_s")]
    prof = frame.pivot_table(index="layer", columns="site", values=deg_cols, aggfunc="sum").to_numpy(float)
    prof = np.log(np.maximum(prof, 1e-8))
    prof = (prof - prof.mean(axis=0)) / np.maximum(prof.std(axis=0), 1e-12)   # each (site, level) across layers
    L = prof.shape[0]
    pair = np.array([[spearman(prof[i], prof[j]) for j in range(L)] for i in range(L)])
    off = ~np.eye(L, dtype=bool)
    near = np.array([pair[i, i + 1] for i in range(L - 1)])
    far = np.array([pair[i, j] for i in range(L) for j in range(L) if j >= i + 4])
    out["profile"] = {"neighbours": float(np.nanmean(near)), "all_pairs": float(np.nanmean(pair[off])),
                      "distance_ge_4": float(np.nanmean(far)) if far.size else float("nan")}
    return out


def grouped_vs_unit(tables, sparsity: float, cost: str = "bytes_decode") -> list[dict]:
    """Per-unit dp against consecutive groups of layers (each group one level for all its units), predicted."""
    from allocator import Problem, minimize
    rows = []
    for label, kwargs in [("per unit", {}), *[(f"consecutive, G <= {g}" if g else "consecutive (one level per "
                                                "layer, any runs)", {"grouping": "consecutive", "max_groups": g})
                                               for g in GROUPS]]:
        t0 = time.perf_counter()
        result = minimize(Problem(tables, cost=cost, sparsity=sparsity, **kwargs), "dp")
        levels = np.asarray(result.allocation.level_index)
        layer_levels = pd.Series(levels).groupby(np.asarray(tables.layers)).first().to_numpy()
        runs = 1 + int(np.sum(layer_levels[1:] != layer_levels[:-1])) if kwargs else None
        rows.append({"allocation": label, "max_groups": kwargs.get("max_groups"), "feasible": bool(result.feasible),
                     "predicted_kl": float(result.degradation),
                     "sparsity": 1 - float(result.cost) / float(tables.dense_cost(cost).sum()),
                     "distinct_levels": int(len(set(levels.tolist()))), "layer_runs": runs,
                     "solve_s": time.perf_counter() - t0, "_allocation": result.allocation})
    return rows


# ---------------------------------------------------------------------------------------------- the model
def model_statistics(model, tables, windows, n_windows: int) -> pd.DataFrame:
    """Per unit: weight Frobenius norm, RMS weight, and the excess kurtosis / RMS of its input activations."""
    import torch
    from scipy.stats import kurtosis

    from allocator.evaluators.models import find_projections
    from allocator.evaluators.plan import Target

    rows = find_projections(model)
    first, stats = {}, []
    for unit in tables.units:
        projs = Target.from_unit(unit).projections(rows)
        weights = [getattr(p.parent, p.attr).weight.detach().float() for p in projs]
        sq = sum(float((w ** 2).sum()) for w in weights)
        n = sum(w.numel() for w in weights)
        stats.append({"unit": unit.name, "weight_fro": sq ** 0.5, "weight_rms": (sq / n) ** 0.5})
        first[unit.name] = getattr(projs[0].parent, projs[0].attr)   # the units' members share one input
    captured = {name: [] for name in first}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: captured[name].append(
        inp[0].detach().float().reshape(-1, inp[0].shape[-1]).cpu())) for name, m in first.items()]
    try:
        with torch.no_grad():
            model(windows[:n_windows].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    for row in stats:
        x = torch.cat(captured[row["unit"]]).numpy().ravel()
        row["act_kurtosis"] = float(kurtosis(x, fisher=True))
        row["act_rms"] = float(np.sqrt(np.mean(x ** 2)))
    return pd.DataFrame(stats)


def correlations(frame: pd.DataFrame, s: float, stats: list[str]) -> pd.DataFrame:
    """Spearman of the sensitivity at level ``s`` with each statistic, within each site and pooled."""
    col = f"deg_s{s:g}"
    out = []
    for site, part in [*frame.groupby("site", sort=False), ("pooled", frame)]:
        out.append({"site": site, "n": len(part), **{st: spearman(part[col], part[st]) for st in stats}})
    return pd.DataFrame(out)


def measure(args, tables, rows: list[dict]) -> None:
    """KL to dense of every allocation on the profiling windows and on the held-out windows (in place)."""
    from allocator.evaluators import stages
    from allocator.evaluators.objective import MeasuredObjective

    config = job_config(base_overrides(args, [f"budget.value={args.budget}"]))
    model, tokenizer = stages.load(config)
    windows = stages.data(config, tokenizer)
    method = stages.calibrate(config, model, windows)
    sets = {"profile": windows.profile, **{short(k): v for k, v in windows.evaluation.items()}}
    for name, w in sets.items():
        objective = MeasuredObjective(model, w, method, metric="kl", tables=tables, batch_size=config.profile.batch_size,
                                      score_last=config.evaluator.score_last, kl_top_k=config.profile.kl_top_k,
                                      kl_exact_vocab=config.profile.kl_exact_vocab)
        for row in rows:
            row[f"measured_kl_{name}"] = float(objective(row["_allocation"]))
    return model, windows


# ---------------------------------------------------------------------------------------------- outputs
def plot(frame: pd.DataFrame, levels: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels) + 1, 7), squeeze=False)
    for ax, s in zip(axes[0], levels):
        grid = heatmap(frame, s)
        vals = grid.to_numpy(float)
        im = ax.imshow(vals, aspect="auto", cmap="magma", norm=LogNorm(vmin=max(np.nanmin(vals), 1e-6),
                                                                         vmax=np.nanmax(vals)))
        ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=30)
        ax.set_yticks(range(0, len(grid.index), 2), grid.index[::2])
        ax.set_xlabel("site")
        ax.set_ylabel("layer")
        ax.set_title(f"KL per token, s = {s:g}\n(that unit alone sparse)")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def report(args, tables, frame, near, groups, corr, argv) -> str:
    prov = tables.provenance
    cmd = "python studies/sensitivity.py " + " ".join(shlex.quote(a) for a in argv)
    lines = [f"# Sensitivity: layer x site heatmaps, neighbouring layers, and what goes with sensitivity "
             f"(generated by studies/sensitivity.py)", "", f"Command: `{cmd}`", "",
             f"Table: `{args.tables}` ({prov.get('model')}, unit `{prov.get('unit')}`, metric {prov.get('metric')}, "
             f"{prov.get('profile_mode')}, method {prov.get('method', {}).get('name')}, profiling windows "
             f"{prov.get('windows')}, levels s = {', '.join(f'{s:g}' for s in tables.levels['s'])}). Each entry: KL "
             f"to dense per token with that unit alone at that level, the rest dense. Heatmaps: `sensitivity.png` "
             f"(s = {args.budget:g} and {args.other:g}); per-unit numbers: `sensitivity.csv`.", ""]
    grid = heatmap(frame, args.budget)
    lines += [f"## Per site at s = {args.budget:g}", "", "| site | mean KL | median | min (layer) | max (layer) | "
              "share of the layer sum |", "|---|---|---|---|---|---|"]
    total = grid.to_numpy().sum()
    for site in grid.columns:
        c = grid[site]
        lines.append(f"| {site} | {c.mean():.4f} | {c.median():.4f} | {c.min():.4f} ({c.idxmin()}) | "
                     f"{c.max():.4f} ({c.idxmax()}) | {c.sum() / total:.2f} |")
    lines += ["", f"## Neighbouring layers (question 1), s = {args.budget:g}", "",
              f"Lag-1 Spearman: the sensitivity of layer l against layer l + 1 over the {len(grid)} layers; p: "
              f"two-sided, {args.permutations} shuffles of the layers.", "", "| series | Spearman(l, l+1) | p |",
              "|---|---|---|"]
    for name, v in near["lag1"].items():
        lines.append(f"| {name} | {fmt(v['spearman'])} | {fmt(v['p'], 4)} |")
    p = near["profile"]
    lines += ["", f"Whole profiles (log KL of every site at every level, each (site, level) standardized across "
              f"layers, one vector per layer): mean Spearman of "
              f"neighbouring layers {p['neighbours']:.3f}, of all layer pairs {p['all_pairs']:.3f}, of layers at "
              f"least 4 apart {p['distance_ge_4']:.3f}.", "",
              f"## Per unit against consecutive groups (question 1), model-level sparsity {args.budget:g}", "",
              "dp on the same table; a group = a run of consecutive layers, every unit in it at one level.", ""]
    meas = [c for c in groups.columns if c.startswith("measured_kl_")]
    head = ["allocation", "predicted KL", "distinct levels", "layer runs", *[c.replace("measured_kl_", "measured KL ")
                                                                              for c in meas]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in groups.iterrows():
        lines.append("| " + " | ".join([r["allocation"], f"{r['predicted_kl']:.4f}", str(r["distinct_levels"]),
                                         fmt(r["layer_runs"], 0), *[f"{r[c]:.4f}" for c in meas]]) + " |")
    if corr is not None:
        lines += ["", f"## What goes with sensitivity (question 9), s = {args.budget:g}", "",
                  f"Spearman of the unit's KL with: layer position, weight Frobenius norm and RMS weight of its "
                  f"projections, excess kurtosis and RMS of its input activations ({args.stat_windows} calibration "
                  f"windows). Within a site n = {len(grid)}: |rho| > {2 / np.sqrt(len(grid) - 1):.2f} is about two "
                  f"standard errors.", "", "| site | n | " + " | ".join(STATS) + " |", "|---|---|" + "---|" * len(STATS)]
        for _, r in corr.iterrows():
            lines.append(f"| {r['site']} | {r['n']} | " + " | ".join(fmt(r[s]) for s in STATS) + " |")
    return "\n".join(lines) + "\n"


STATS = ["layer", "weight_fro", "weight_rms", "act_kurtosis", "act_rms"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from allocator import Tables
    tables = Tables.load(args.tables)
    split = tables.provenance.get("split")
    if split not in (None, "none"):
        raise SystemExit(f"{args.tables}: a table with profile.split={split} has split levels; give a table made "
                         "with profile.split=none")
    args.out.mkdir(parents=True, exist_ok=True)
    frame = unit_frame(tables)
    level_at(tables, args.budget)
    level_at(tables, args.other)
    near = neighbours(frame, args.budget, args.permutations, args.seed)
    rows = grouped_vs_unit(tables, args.budget)
    corr = None
    if not args.quick:
        if args.measure:
            model, windows = measure(args, tables, rows)
        else:
            from allocator.evaluators import stages
            config = job_config(base_overrides(args))
            model, tokenizer = stages.load(config)
            windows = stages.data(config, tokenizer)
        stats = model_statistics(model, tables, windows.calibration, args.stat_windows)
        frame = frame.merge(stats, on="unit")
        corr = correlations(frame, args.budget, STATS)
    groups = pd.DataFrame([{k: v for k, v in r.items() if k != "_allocation"} for r in rows])
    frame.to_csv(args.out / "sensitivity.csv", index=False)
    groups.to_csv(args.out / "sensitivity.groups.csv", index=False)
    plot(frame, [args.budget, args.other], args.out / "sensitivity.png")
    payload = {"neighbours": near, "groups": groups.to_dict("records"),
               "correlations": None if corr is None else corr.to_dict("records"), "tables": str(args.tables)}
    (args.out / "sensitivity.json").write_text(json.dumps(payload, indent=1, default=float))
    text = report(args, tables, frame, near, groups, corr, argv)
    (args.out / "sensitivity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
