"""Scale-out of the profiling stage: rows/s measured here with 1 and 2 processes, and the predicted profiling time
of Llama-3-8B / 70B on 1, 8 and 64 GPUs from the cost model and a measured 8B evaluation time.

    python studies/scaleout.py --out studies/results          # measure (CPU), predict, write scaleout.md

Measured: the real SmolLM2-135M cut to ``--layers`` decoder layers (float32), input units (4 per layer), teal,
levels s in {0.3, ..., 0.7} (the main job's trust region around 50%; s = 0 is the shared base row), the main
job's profiling windows (3 x 96 tokens), a fresh cache each time; the time is ``profile()``'s alone (the model
load and calibration excluded), three layouts: one process with 1 thread, one process with 2 threads,
``torchrun --nproc-per-node 2`` with 1 thread per rank.

Predicted (cost model): a row of a unit in layer l runs layers l..L-1, the final norm and the LM head on T
tokens, plus applying / removing the level; a layer costs max(FLOPs / F, weight bytes / B) where F is the
effective FLOP rate of the measured evaluation (Llama-3-8B, 16,384 tokens, 0.646 s on an H200: forward,
log-softmax and KL) and B = 80% of the H200's 4.8 TB/s; rows go to ranks ``k % world`` and the slowest rank
sets the time. Model load, calibration and the one dense capture per rank are left out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7]
H200_EVAL = {"tokens": 16 * 1024, "seconds": 0.646, "model": "llama-3-8b"}   # compare_solvers.py --probe-8b
H100_EVAL = {"tokens": 16 * 1024, "seconds": 0.68}                          # compare_solvers_h100.md
APPLY_S = 0.021                   # applying + removing one allocation on Llama-3-8B (H100, compare_solvers_h100.md)
H200_BYTES_S = 0.8 * 4.8e12
H200_MEMORY = 141e9
UNITS_PER_LAYER = 4               # profile.unit=input: q|k|v, o, gate|up, down


# ---------------------------------------------------------------------------------------------- measure
def worker(out: str, layers: int) -> None:
    """One process or one torchrun rank: profile, write the wall time of ``profile()`` and the row count."""
    import torch

    from allocator import analytic_tables, make_levels
    from allocator.evaluators.distributed import resolve
    from allocator.evaluators.methods import get_method
    from allocator.evaluators.models import load_model
    from allocator.evaluators.profiling import profile
    from allocator.evaluators.text import token_windows

    torch.set_num_threads(int(os.environ.get("SCALEOUT_THREADS", "1")))
    ranks = resolve("auto")
    model, tok = load_model("smollm2-135m", dtype="float32", max_layers=layers)
    method = get_method("teal").calibrate(model, token_windows(tok, "calibration", 8, 256, seed=0))
    windows = token_windows(tok, "calibration", 3, 96, seed=1)
    levels = make_levels(s=LEVELS)
    units = analytic_tables(model.config.to_dict(), levels, unit="input").units
    counted = []
    ranks.barrier()
    start = time.perf_counter()
    prof = profile(model, method, windows, levels, units, cache=Path(out) / "cache", progress=False,
                   on_row=lambda u, j: counted.append(1), distributed="auto")
    seconds = time.perf_counter() - start
    (Path(out) / f"rank{ranks.rank}.json").write_text(json.dumps(
        {"seconds": seconds, "rows_here": len(counted), "rows": int(prof.kl.size - len(units)), "kl0": prof.kl[0, 1]}))


def measure(layers: int) -> list[dict]:
    results = []
    for name, threads, torchrun in (("1 process, 1 thread", 1, False), ("1 process, 2 threads", 2, False),
                                    ("torchrun 2 ranks, 1 thread each", 1, True)):
        with tempfile.TemporaryDirectory() as tmp:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] \
                if torchrun else [sys.executable]
            env = {**os.environ, "SCALEOUT_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
            subprocess.run([*launcher, __file__, "--worker", tmp, "--out", tmp, "--layers", str(layers)], env=env, check=True,
                           capture_output=True, text=True)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        seconds = max(r["seconds"] for r in ranks)
        rows = ranks[0]["rows"]
        results.append({"layout": name, "load_average": round(os.getloadavg()[0], 2), "processes": len(ranks),
                        "threads": threads, "rows": rows,
                        "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 2),
                        "rows_per_rank": [r["rows_here"] for r in ranks]})
        print(results[-1], flush=True)
    return results


# ---------------------------------------------------------------------------------------------- predict
def params(name: str):
    """(shape, weights of one decoder layer, weights of the LM head) from the shipped config."""
    from allocator import model_shape

    s = model_shape(name)
    attn = s.hidden * s.head_dim * (s.heads + 2 * s.kv_heads) + s.heads * s.head_dim * s.hidden
    return s, attn + 3 * s.hidden * s.intermediate, s.hidden * s.vocab


def layer_costs(name: str, tokens: int) -> tuple[float, float, float]:
    """(seconds of one decoder layer, seconds of the final norm + LM head, bf16 weight bytes) on ``tokens``."""
    s, layer_params, head_params = params(name)
    flop_rate = flop_rate_8b()
    t_layer = max(2 * layer_params * tokens / flop_rate, 2 * layer_params / H200_BYTES_S)
    t_head = max(2 * head_params * tokens / flop_rate, 2 * head_params / H200_BYTES_S)
    weights = 2 * (s.layers * layer_params + head_params * (1 if s.tie_embeddings else 2))
    return t_layer, t_head, weights


def flop_rate_8b() -> float:
    """Effective FLOP/s of the measured Llama-3-8B evaluation on the H200 (its forward's matmul FLOPs / time)."""
    s, layer_params, head_params = params(H200_EVAL["model"])
    return 2 * (s.layers * layer_params + head_params) * H200_EVAL["tokens"] / H200_EVAL["seconds"]


def predict(name: str, tokens: int, levels: int, gpus: int) -> dict:
    from allocator import model_shape

    s = model_shape(name)
    t_layer, t_head, weights = layer_costs(name, tokens)
    gpus_per_rank = max(1, math.ceil(weights * 1.1 / H200_MEMORY))      # 10% headroom for activations
    row = {"model": name, "tokens": tokens, "gpus": gpus, "gpus_per_rank": gpus_per_rank,
           "rows": s.layers * UNITS_PER_LAYER * levels}
    if gpus < gpus_per_rank:
        return {**row, "ranks": 0, "hours": None, "note": f"does not fit: {weights / 1e9:.0f} GB of bf16 weights"}
    ranks = gpus // gpus_per_rank
    times = [(s.layers - layer) * t_layer + t_head + APPLY_S
             for layer in range(s.layers) for _ in range(UNITS_PER_LAYER) for _ in range(levels)]
    per_rank = [sum(times[k::ranks]) for k in range(ranks)]
    return {**row, "ranks": ranks, "hours": max(per_rank) / 3600, "mean_row_s": sum(times) / len(times),
            "note": f"{gpus_per_rank}-GPU device_map groups" if gpus_per_rank > 1 else "one replica per GPU"}


def report(measured: list[dict], layers: int) -> str:
    base = measured[0]["rows_per_s"]
    lines = ["# Scale-out: profiling rows/s here, and predicted profiling time of Llama-3-8B / 70B", "",
             "`python studies/scaleout.py --out studies/results` (the study's docstring says what is timed). "
             "The multi-GPU run itself is a separate issue: the GPU numbers below are predictions.", "",
             f"## Measured on this machine (2 CPU cores shared with other jobs)", "",
             f"SmolLM2-135M cut to {layers} layers (float32), {layers * UNITS_PER_LAYER} input units x "
             f"{len(LEVELS) - 1} levels = {measured[0]['rows']} rows on 3 x 96 tokens, teal; `profile()` alone.",
             "", "| layout | processes | threads each | rows | seconds | rows/s | vs 1 process, 1 thread | "
             "rows per rank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in measured:
        lines.append(f"| {m['layout']} | {m['processes']} | {m['threads']} | {m['rows']} | {m['seconds']} | "
                     f"{m['rows_per_s']} | {m['rows_per_s'] / base:.2f}x | {m['rows_per_rank']} |")
    loads = ", ".join(str(m.get("load_average", "?")) for m in measured)
    lines += ["", f"The machine was shared: 1-minute load average {loads} after each layout (other jobs on the same "
              "2 cores), so these are one noisy run each, not a benchmark. Two processes on two shared cores are two "
              "cores' worth of work at best; one process with two threads gained nothing here (small matmuls of "
              "3 x 96 tokens split badly across threads while the cores are contended), two single-threaded ranks "
              "did. What the ranks are for is scaling past one device (each rank a replica), not speed on this "
              "machine. The tables of both layouts are byte-identical (`tests/scaleout/`).", "",
              "## Predicted on H200s (cost model)", "",
              f"Assumptions: the measured Llama-3-8B evaluation ({H200_EVAL['tokens']} tokens, "
              f"{H200_EVAL['seconds']} s on an H200; {H100_EVAL['seconds']} s on an H100) gives an effective "
              f"{flop_rate_8b() / 1e12:.0f} TFLOP/s for the forward's matmuls, taken as the rate of every layer and "
              f"of the 70B as well; a layer takes max(FLOPs / that rate, weight bytes / {H200_BYTES_S / 1e12:.2f} "
              f"TB/s); each row also pays {APPLY_S * 1e3:.0f} ms to apply and remove its level (measured on the "
              "H100); units = 4 per layer (`profile.unit=input`, Llama-3-70B: 320), levels 5 (the default trust "
              "region around 50%) or 7 (the whole default grid above s = 0). A 70B in bf16 (141 GB) does not fit "
              "one 141 GB H200 with activations: a rank is a 2-GPU `device_map` group (`profile.gpus_per_rank=2`), "
              "which runs its layers one GPU after the other, so it is one replica at one GPU's speed. Left out: "
              "model load, calibration and each rank's one dense capture (minutes).", "",
              "| model | tokens per row | levels | rows | GPUs | ranks | layout | mean row (s) | predicted time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("llama-3-8b", "llama-3-70b"):
        for tokens in (288, 16384):
            for levels in (5, 7):
                for gpus in (1, 8, 64):
                    p = predict(name, tokens, levels, gpus)
                    when = "-" if p["hours"] is None else (
                        f"{p['hours'] * 3600:.1f} s" if p["hours"] < 1 / 60 else
                        f"{p['hours'] * 60:.1f} min" if p["hours"] < 1 else f"{p['hours']:.2f} h")
                    mean = "-" if p["hours"] is None else f"{p['mean_row_s']:.3f}"
                    lines.append(f"| {name} | {tokens} | {levels} | {p['rows']} | {gpus} | {p['ranks']} | "
                                 f"{p['note']} | {mean} | {when} |")
    lines += ["", "288 tokens is the main job's default (3 x 96): there a row reads the weights once per layer and "
              "the time is bandwidth-bound; 16,384 tokens is an EvoPress-size calibration set, compute-bound. "
              "The split `k % world` interleaves units and levels, so the ranks' shares differ by at most one row "
              "and the time falls as 1 / ranks until a rank has a handful of rows.", ""]
    return "\n".join(lines)


def main() -> None:
    from _common import add_common_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, device=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.layers = 2
    if args.worker:
        return worker(args.worker, args.layers)
    measured = measure(args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout.md").write_text(report(measured, args.layers))
    (args.out / "scaleout.json").write_text(json.dumps(measured, indent=1))
    print(f"written {args.out / 'scaleout.md'}")


if __name__ == "__main__":
    main()
