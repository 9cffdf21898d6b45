"""Study: latency tables by format (issue 12, build 3): decode GEMV per (GEMV shape, s, format) and prefill GEMM per
(shape, tokens, prefill kernel) of a model's projections on this GPU, the tables the cost kinds ``latency_decode``
and ``latency_prefill`` price a joint (sparsity x format) allocation with.

Decode: ``kernels.latency.measure_latency_table(formats=...)`` on the runtime's decode GEMVs (q|k|v and gate|up
fused), batch 1, standalone kernels (a plan with low-bit formats decodes in the runtime's per-site mode); bf16 rows
are our sparse GEMV, low-bit rows the runtime's low-bit GEMV (s = 0: its dense path). Prefill:
``measure_prefill_table`` (bf16 ``F.linear``; W8A8 FP8 = Triton per-token quantization + ``torch._scaled_mm``).
Writes ``decode.csv`` and ``prefill.csv`` (the formats ``problem.latency_table`` reads) and ``latency_formats.md``
(per shape: speedup over cuBLAS bf16 dense).

    python studies/latency_formats.py --model llama-3-8b --out out/lat8b          # on a CUDA GPU
    python studies/latency_formats.py --model smollm2-135m --formats bf16 w4a16-g64 w8a16 w8a8-fp8 --out out/lat
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from _common import add_common_args


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--formats", nargs="+", default=["bf16", "w4a16-g128", "w8a16", "w8a8-fp8"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tuned", type=Path, default=Path(__file__).resolve().parent / "results" / "lowbit_h200.tuned.json")
    return ap.parse_args()


def gemv_shapes(model: str) -> list[tuple[int, int]]:
    """(d_out, d_in) of the decode GEMVs of one layer (all layers share them)."""
    from allocator import analytic_tables, make_levels
    from allocator.cost_providers import decode_gemv_shapes
    units = analytic_tables(model, make_levels(s=[0.0]), unit="input").units
    return sorted({tuple(s) for u in units for s in decode_gemv_shapes(u)})


def summary(decode: pd.DataFrame, prefill: pd.DataFrame) -> str:
    d = decode.assign(speedup=decode["dense_us"] / decode["latency_us"])
    table = d.pivot_table(index=["d_out", "d_in", "fmt"], columns="s", values="speedup").round(2)
    p = prefill.pivot_table(index=["d_out", "d_in", "tokens"], columns="kernel", values="latency_us")
    if "fp8" in p:
        p["fp8 speedup"] = (p["bf16"] / p["fp8"]).round(2)
    return ("## Decode GEMV, batch 1: speedup over cuBLAS bf16 dense (columns: s)\n\n" + table.to_markdown()
            + "\n\n## Prefill GEMM (us) and the FP8 speedup\n\n" + p.round(1).to_markdown() + "\n")


def main():
    args = parse_args()
    from allocator.kernels.latency import measure_latency_table, measure_prefill_table
    from allocator.kernels.lowbit_gemv import load_tuned

    if args.tuned.exists():
        load_tuned(args.tuned)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.sparsities, args.tokens = [0.0, 0.5], [64]
    t0, shapes, dtype = time.perf_counter(), gemv_shapes(args.model), getattr(torch, args.dtype)
    decode = measure_latency_table(shapes, sparsities=args.sparsities, dtypes=(dtype,), formats=args.formats,
                                   seed=args.seed)
    decode.to_csv(out / "decode.csv", index=False)
    kernels = sorted({"bf16", *(["fp8"] if "w8a8-fp8" in args.formats else [])})
    prefill = measure_prefill_table(shapes, tokens=args.tokens, kernels=kernels, dtype=dtype, seed=args.seed)
    prefill.to_csv(out / "prefill.csv", index=False)
    gpu = torch.cuda.get_device_name()
    text = (f"# Latency by format, {args.model} shapes, {gpu}\n\n`python studies/latency_formats.py --model "
            f"{args.model} --formats {' '.join(args.formats)}` (torch {torch.__version__}, {args.dtype}; "
            f"{time.perf_counter() - t0:.0f} s)\n\n" + summary(decode, prefill))
    (out / "latency_formats.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
