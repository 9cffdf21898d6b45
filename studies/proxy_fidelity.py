"""Which degradation table predicts held-out quality best, per second of profiling (issue 17, build 4)?

On one loaded model and one ``teal`` calibration (the main job's stages), layer units on the grid s = 0.3 ... 0.7:

- proxies from the main job's isolated profile (``evaluators.profiling``): the KL to dense and the NLL increase,
  on the default profiling windows and on ``--more-windows`` x ``--more-length`` tokens;
- the block output error (TEAL's objective, ``evaluators.block_split.block_errors`` on the calibration windows,
  every projection of the layer at s: summed over the projections) and its NMSE (divided by the mean square of
  the block's dense output on the same tokens);

then ``--allocations`` random allocations at the budget's bytes (uniform with random pairs of layers moved one
level up and down, spread from 1 to ``--max-moves`` moves) are applied and measured on the held-out windows. Per
proxy: Spearman's rank correlation of the table's sum with the measured held-out perplexity and KL (each source),
the profiling seconds, and the additivity audit (measured KL on the profiling windows / the table's sum, for
the KL tables).

    python studies/proxy_fidelity.py --out DIR                 # SmolLM2-135M, 40 allocations, 16 windows a source
    python studies/proxy_fidelity.py --quick --out /tmp/proxy  # 2 layers, tiny windows

Writes ``proxy_fidelity.md`` (the table, the command), ``proxy_fidelity.csv`` (per proxy) and
``proxy_fidelity.allocations.csv`` (per allocation: every proxy's sum and the measured values).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, add_config_args, base_overrides, job_config, short  # noqa: E402

GRID = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, quick="2 layers, tiny windows (a smoke run)")
    add_config_args(p)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--allocations", type=int, default=40, help="random allocations measured")
    p.add_argument("--max-moves", type=int, default=12, help="most pairs of layers moved one level up / down")
    p.add_argument("--more-windows", type=int, default=8)
    p.add_argument("--more-length", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per source")
    return p.parse_args(argv)


def random_allocations(n_units: int, n_levels: int, base: int, count: int, max_moves: int, rng) -> np.ndarray:
    """Level indices: uniform at ``base`` with k random (up, down) pairs, k spread over 1..max_moves (equal bytes
    when the units are equal in size, as whole layers are)."""
    out = []
    for i in range(count):
        x = np.full(n_units, base)
        for _ in range(1 + i % max_moves):
            up, down = rng.choice(n_units, size=2, replace=False)
            if x[up] + 1 < n_levels and x[down] - 1 >= 1:
                x[up] += 1
                x[down] -= 1
        out.append(x)
    return np.array(out)


def block_proxies(config, model, method, windows, levels) -> tuple[np.ndarray, np.ndarray, float]:
    """(block error, NMSE) per layer x level (every projection of the layer at s, errors summed) and seconds."""
    import torch

    from allocator.evaluators.block_split import block_errors
    from allocator.evaluators.models import decoder_layers
    from allocator.evaluators.plan import temporarily_dense
    p = config.profile
    start = time.perf_counter()
    errors = block_errors(model, method, windows.calibration, step=0.1, max_s=0.7, cache=p.cache,
                          progress=p.progress, error_fraction=p.split_error_fraction)
    column = [int(round(s / 0.1)) for s in levels]
    error = errors.error[:, :, column].sum(axis=1)
    energy, hooks = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        def hook(module, args, out, i=i):
            h = (out[0] if isinstance(out, tuple) else out).float()
            cut = h.shape[-2] - max(1, int(np.ceil(p.split_error_fraction * h.shape[-2])))
            energy.setdefault(i, []).append(float(h[..., cut:, :].pow(2).mean()))
        hooks.append(layer.register_forward_hook(hook))
    try:
        with temporarily_dense(model), torch.no_grad():
            for b in range(0, len(windows.calibration), config.data.batch_size):
                model(windows.calibration[b:b + config.data.batch_size])
    finally:
        for h in hooks:
            h.remove()
    scale = np.array([np.mean(energy[i]) for i in range(len(error))])
    return error, error / scale[:, None], time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from scipy.stats import spearmanr

    from allocator import Allocation
    from allocator.evaluators import stages
    from allocator.evaluators.measure import compare
    from allocator.evaluators.plan import CompressionPlan

    args.out.mkdir(parents=True, exist_ok=True)
    common = base_overrides(args, ["profile.unit=layer", "profile.window=null", f"budget.value={args.budget}",
                                   f"method.levels.s=[{','.join(map(str, GRID))}]",
                                   f"data.eval_windows={args.eval_windows}",
                                   f"profile.cache={(args.out / 'cache').resolve()}"])
    more = [] if args.quick else [f"data.profile_windows={args.more_windows}",
                                  f"data.profile_length={args.more_length}"]
    config = job_config(common)
    model, tokenizer = stages.load(config)
    windows = stages.data(config, tokenizer)
    method = stages.calibrate(config, model, windows)
    grid = stages.level_grid(config)
    tables, tabled, seconds = {}, {}, {}
    for tag, over in (("default", []), ("more", more)):
        cfg = job_config(common + over)
        w = stages.data(cfg, tokenizer)
        start = time.perf_counter()
        t, prof = stages.profile_tables(cfg, model, method, w, stages.cost_tables(cfg, model, grid), grid)
        seconds[tag] = time.perf_counter() - start
        tokens = int(w.profile.numel())
        tables[f"kl_{tokens}"], tables[f"nll_{tokens}"] = prof.table("kl"), prof.table("ppl")
        tabled[f"kl_{tokens}"] = tabled[f"nll_{tokens}"] = seconds[tag]
        if tag == "default":
            base = t
    s = [float(v) for v in grid.levels["s"]]
    error, nmse, sec = block_proxies(config, model, method, windows, s)
    tables["block_error"], tables["block_nmse"] = error, nmse
    tabled["block_error"] = tabled["block_nmse"] = sec

    rng = np.random.default_rng(args.seed)
    x = random_allocations(base.n_units, base.n_levels, s.index(args.budget), args.allocations, args.max_moves, rng)
    plans = {f"a{i}": CompressionPlan.build(model, method, Allocation.from_levels(base, row))
             for i, row in enumerate(x)}
    with torch.no_grad():
        runs = {short(src): compare(model, w, plans, config.evaluator.batch_size, config.evaluator.score_last)
                for src, w in windows.evaluation.items()}
        audit = compare(model, windows.profile, plans, config.evaluator.batch_size, config.evaluator.score_last)
    rows = pd.DataFrame({"moves": [1 + i % args.max_moves for i in range(len(x))]})
    for name, table in tables.items():
        rows[name] = table[np.arange(base.n_units), x].sum(axis=1)
    for src, res in runs.items():
        rows[f"ppl_{src}"] = [res[f"a{i}"]["perplexity"] for i in range(len(x))]
        rows[f"kl_{src}"] = [res[f"a{i}"]["kl"] for i in range(len(x))]
    rows["kl_profile_measured"] = [audit[f"a{i}"]["kl"] for i in range(len(x))]
    rows.to_csv(args.out / "proxy_fidelity.allocations.csv", index=False)
    out = []
    for name in tables:
        row = {"proxy": name, "profile_seconds": tabled[name]}
        for src in runs:
            for what in ("ppl", "kl"):
                row[f"spearman_{what}_{src}"] = float(spearmanr(rows[name], rows[f"{what}_{src}"]).statistic)
        if name.startswith("kl_"):
            row["additivity"] = float((rows["kl_profile_measured"] / rows[name]).mean()) \
                if name == f"kl_{int(windows.profile.numel())}" else float("nan")
        out.append(row)
    frame = pd.DataFrame(out)
    frame.to_csv(args.out / "proxy_fidelity.csv", index=False)
    (args.out / "proxy_fidelity.md").write_text(report(frame, rows, args, argv))
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return {"proxies": out}


def report(frame: pd.DataFrame, rows: pd.DataFrame, args, argv) -> str:
    spread = {c: (rows[c].min(), rows[c].max()) for c in rows if c.startswith("ppl_")}
    return "\n".join([
        "# Which table predicts held-out quality (studies/proxy_fidelity.py)", "",
        f"Command: `python studies/proxy_fidelity.py {' '.join(argv or sys.argv[1:])}`", "",
        f"{len(rows)} random layer-unit allocations at {args.budget:.0%} of the bytes (uniform with 1-"
        f"{args.max_moves} pairs of layers moved one level up / down), held-out perplexity ranges "
        + ", ".join(f"{k[4:]} {a:.2f}-{b:.2f}" for k, (a, b) in spread.items())
        + ". Spearman's rank correlation of each table's sum with the measured values (higher is better); "
        "`additivity`: measured KL on the profiling windows / the table's sum (1 = additive).", "",
        frame.to_markdown(index=False, floatfmt=".3g"), ""])


if __name__ == "__main__":
    main()
