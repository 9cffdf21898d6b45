"""TEAL's block-wise greedy as a baseline (``allocator.evaluators.teal_greedy``): the per-block lookup table and
its allocation at a budget.

Calibrates the ``teal`` method with per-projection statistics (``shared_inputs=False``), runs the greedy on the
calibration windows (TEAL's settings: base step 0.05, error on the last 25% of tokens, targets 0.05 ... 0.9),
writes ``teal_greedy_table.csv`` (one row per block and target: achieved byte-weighted sparsity, block output
error, ``s_<kind>``) and ``allocation_<pct>.json`` per ``--sparsity`` (every block at the budget, its split from
the table: the baseline beside the others at equal bytes), and prints the wall time.

    python studies/teal_greedy.py --out DIR                       # SmolLM2-135M, 8 x 256 calibration tokens
    python studies/teal_greedy.py --quick --out /tmp/teal         # 4 layers, 2 x 64 tokens
    python studies/teal_greedy.py --out DIR --from-table studies/results/teal_greedy_smollm2.table.csv

``--from-table CSV`` skips the calibration and the greedy (90 minutes on the shared CPU): it rebuilds the table
from a committed ``teal_greedy_table.csv`` (and its summary, ``--summary``, default: the CSV's name with
``.table.csv`` replaced by ``.json``, whose seconds are copied into ``teal_greedy.json``) and writes the same
files. The CSV holds the greedy's state at each target, not every step, so a budget on the target grid (0.05
steps: 0.4, 0.5, 0.6) gives the allocation of the original run exactly (a greedy step raises a block's sparsity
by ``base_step / n_proj``, so the path passes through every target); a budget between two targets interpolates
between their states, a coarser interpolation than the full path's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402


def main(argv=None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.4, 0.5, 0.6])
    parser.add_argument("--base-step", type=float, default=0.05)
    parser.add_argument("--error-fraction", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--from-table", type=Path, default=None, metavar="CSV",
                        help="rebuild the allocations from a saved teal_greedy_table.csv (no greedy run)")
    parser.add_argument("--summary", type=Path, default=None, help="with --from-table: the original run's "
                        "teal_greedy.json (default: the CSV's name, .table.csv -> .json)")
    args = parser.parse_args(argv)
    if args.from_table is not None:
        return from_table(args)

    import torch

    from allocator.evaluators.methods import get_method
    from allocator.evaluators.models import load_model, set_threads
    from allocator.evaluators.teal_greedy import DEFAULT_TARGETS, teal_greedy_allocation, teal_greedy_table
    from allocator.evaluators.text import token_windows

    set_threads(args.threads)
    n, length, layers = (2, 64, 4) if args.quick else (8, 256, None)
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device, max_layers=layers)
    windows = token_windows(tokenizer, "calibration", n, length, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    method = get_method("teal", shared_inputs=False, seed=args.seed).calibrate(model, windows)
    calibrated = time.perf_counter()
    with torch.no_grad():
        table = teal_greedy_table(model, method, windows, targets=DEFAULT_TARGETS, base_step=args.base_step,
                                  error_fraction=args.error_fraction)
    done = time.perf_counter()
    table.to_frame().to_csv(args.out / "teal_greedy_table.csv", index=False)
    for budget in args.sparsity:
        teal_greedy_allocation(model, table, budget).to_json(args.out / f"allocation_{round(budget * 100)}.json")
    summary = {"model": args.model, "layers": table.n_layers, "windows": [n, length],
               "calibration_s": calibrated - start, "greedy_s": done - calibrated,
               "block_forwards": table.provenance["block_forwards"], "sparsity": args.sparsity}
    (args.out / "teal_greedy.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


def table_from_frame(frame, sizes, provenance=None):
    """A ``TealGreedyTable`` from its ``to_frame()`` (one row per block and target): each block's path is its
    states at the targets (row 0 dense), so ``split`` at a target is the original run's and between two targets
    interpolates between their states. ``sizes``: (n_layers, n_kinds) weight elements, in the CSV's kind order."""
    import numpy as np

    from allocator.evaluators.teal_greedy import TealGreedyTable

    kinds = tuple(c[2:] for c in frame.columns if c.startswith("s_"))
    targets = tuple(sorted(float(t) for t in frame["target"].unique()))
    layers = sorted(int(i) for i in frame["layer"].unique())
    if layers != list(range(len(layers))) or len(frame) != len(layers) * len(targets):
        raise ValueError(f"the table needs one row per block 0..n-1 and target; it has {len(frame)} rows for "
                         f"blocks {layers[:3]}... and {len(targets)} targets")
    frame = frame.sort_values(["layer", "target"])
    n_l, n_t, n_k = len(layers), len(targets), len(kinds)
    sparsity = frame[[f"s_{k}" for k in kinds]].to_numpy(float).reshape(n_l, n_t, n_k)
    achieved = frame["achieved"].to_numpy(float).reshape(n_l, n_t)
    error = frame["error"].to_numpy(float).reshape(n_l, n_t)
    if np.asarray(sizes).shape != (n_l, n_k):
        raise ValueError(f"the model has sizes {np.asarray(sizes).shape}; the table {n_l} blocks x {n_k} kinds")
    path_s, path_sparsity, path_error = [], [], []
    for i in range(n_l):
        ok = np.isfinite(achieved[i])
        path_s.append(np.vstack([np.zeros((1, n_k)), sparsity[i][ok]]))
        path_sparsity.append(np.concatenate([[0.0], achieved[i][ok]]))
        path_error.append(np.concatenate([[0.0], error[i][ok]]))
    return TealGreedyTable(kinds, targets, np.asarray(sizes, dtype=float), sparsity, achieved, error, path_s,
                           path_sparsity, path_error, dict(provenance or {}))


def from_table(args) -> dict:
    """``--from-table``: the allocations and ``teal_greedy.json`` from a saved table (module docstring)."""
    import numpy as np
    import pandas as pd

    from allocator.evaluators.models import find_projections, load_model
    from allocator.evaluators.teal_greedy import teal_greedy_allocation

    summary_path = args.summary or args.from_table.with_name(args.from_table.name.replace(".table.csv", ".json"))
    original = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    model, _ = load_model(args.model, dtype="float32", device=args.device, max_layers=4 if args.quick else None)
    frame = pd.read_csv(args.from_table)
    rows = find_projections(model)
    kinds = [c[2:] for c in frame.columns if c.startswith("s_")]
    by_kind = [{p.kind: p.d_in * p.d_out for p in row} for row in rows]
    if any(set(k) != set(kinds) for k in by_kind):
        raise ValueError(f"the table's kinds {kinds} are not the model's {sorted(by_kind[0])}")
    sizes = np.array([[k[kind] for kind in kinds] for k in by_kind], dtype=float)
    table = table_from_frame(frame, sizes, {"algorithm": "teal_greedy (TEAL, arXiv 2408.14690)",
                                            "from_table": str(args.from_table), **original})
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_frame().to_csv(args.out / "teal_greedy_table.csv", index=False)
    for budget in args.sparsity:
        teal_greedy_allocation(model, table, budget).to_json(args.out / f"allocation_{round(budget * 100)}.json")
    summary = {**original, "layers": table.n_layers, "sparsity": args.sparsity, "from_table": str(args.from_table),
               "calibration_s": original.get("calibration_s", float("nan")),
               "greedy_s": original.get("greedy_s", float("nan"))}
    (args.out / "teal_greedy.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
