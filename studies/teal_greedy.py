"""TEAL's block-wise greedy as a baseline (``allocator.evaluators.teal_greedy``): the per-block lookup table and
its allocation at a budget.

Calibrates the ``teal`` method with per-projection statistics (``shared_inputs=False``), runs the greedy on the
calibration windows (TEAL's settings: base step 0.05, error on the last 25% of tokens, targets 0.05 ... 0.9),
writes ``teal_greedy_table.csv`` (one row per block and target: achieved byte-weighted sparsity, block output
error, ``s_<kind>``) and ``allocation_<pct>.json`` per ``--sparsity`` (every block at the budget, its split from
the table: the baseline beside the others at equal bytes), and prints the wall time.

    python studies/teal_greedy.py --out DIR                       # SmolLM2-135M, 8 x 256 calibration tokens
    python studies/teal_greedy.py --quick --out /tmp/teal         # 4 layers, 2 x 64 tokens
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
