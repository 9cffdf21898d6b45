"""Study: decode speed of HF models through the Triton runtime (``evaluators.runtime``), the path a real checkpoint
takes: an HF causal LM built from a shipped config with random initialisation (no download), TEAL thresholds
calibrated on it (a uniform plan at each sparsity, ``shared_inputs``: one mask per fused GEMV), converted with
``decoder_from_hf`` and timed per decode step by CUDA-graph replay (``triton.testing.do_bench``, median).

Columns: model, dtype, batch, context (KV positions before the timed step), sparsity, mode, step_ms,
tokens_per_s, speedup over the dense step at the same (model, dtype, batch, context). Batch 1 runs the fused step
(``fused_pdl``); batch 2 / 4 the per-site sparse GEMV (``sparse``: the batch shares the union of its masks).

    python studies/runtime_bench.py --out out/runtime                      # on a CUDA GPU
    python studies/runtime_bench.py --out out/runtime --quick              # one model, fewer cells
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import pandas as pd
import torch

from _common import add_common_args

CONFIGS = ["llama-3-8b", "llama-2-7b", "mistral-7b", "qwen2.5-7b"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--models", nargs="+", default=CONFIGS)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.4, 0.5, 0.7])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--full-grid-models", nargs="+", default=["llama-3-8b"],
                    help="models that get every dtype / context / batch; the others: the first of each, s=0.5")
    return ap.parse_args()


def build_hf(name: str, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from allocator import load_model_config
    config = AutoConfig.for_model(**load_model_config(name))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def plans_at(model, sparsities, seed: int):
    """A uniform TEAL plan per sparsity, thresholds calibrated on random token windows."""
    from allocator.evaluators.methods import get_method
    from allocator.evaluators.plan import CompressionPlan, uniform_targets

    gen = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, model.config.vocab_size, (4, 128), generator=gen)
    method = get_method("teal", seed=seed, shared_inputs=True).calibrate(model, windows, batch_size=2)
    n = model.config.num_hidden_layers
    return {s: None if s <= 0 else CompressionPlan.build(model, method, uniform_targets(n, {"s": s})) for s in sparsities}


def step_ms(decoder, batch: int, context: int, mode: str, vocab: int) -> float:
    from allocator.evaluators.runtime import graph_step_ms
    return graph_step_ms(decoder, torch.randint(0, vocab, (batch, context), device="cuda"), mode)


def bench_model(name: str, dtype_name: str, args, cells) -> list[dict]:
    from allocator.evaluators.runtime import RuntimeUnsupported, decoder_from_hf, decoder_weights

    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    model = build_hf(name, dtype, "cuda")
    try:
        weights = decoder_weights(model)
    except RuntimeUnsupported as exc:
        print(f"{name}: {exc}")
        return [{"model": name, "dtype": dtype_name, "mode": "unsupported", "note": str(exc)}]
    plans = plans_at(model, sorted({s for _, _, s in cells}), args.seed)
    rows, max_ctx = [], max(c for _, c, _ in cells)
    for batch in sorted({b for b, _, _ in cells}):
        dense = {}
        for s in sorted({s for b, _, s in cells if b == batch}):
            decoder = decoder_from_hf(model, plans[s], max_len=max_ctx + 8, max_batch=batch, weights=weights)
            mode = "dense" if s <= 0 else ("fused_pdl" if batch == 1 else "sparse")
            for context in sorted({c for b, c, ss in cells if b == batch and ss == s}):
                ms = step_ms(decoder, batch, context, mode, model.config.vocab_size)
                dense.setdefault(context, ms) if s <= 0 else None
                rows.append({"model": name, "dtype": dtype_name, "batch": batch, "context": context, "sparsity": s,
                             "mode": mode, "step_ms": ms, "tokens_per_s": batch * 1e3 / ms,
                             "speedup": dense.get(context, float("nan")) / ms})
                print(rows[-1], flush=True)
            del decoder
            torch.cuda.empty_cache()
    print(f"{name} {dtype_name}: {time.perf_counter() - t0:.0f} s")
    del model, weights, plans
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def cells_for(name: str, dtype: str, args) -> list[tuple[int, int, float]]:
    if name in args.full_grid_models:
        return [(b, c, s) for b in args.batches for c in args.contexts for s in args.sparsities
                if b == 1 or c == args.contexts[len(args.contexts) // 2]]
    if dtype != args.dtypes[0]:
        return []
    return [(1, args.contexts[len(args.contexts) // 2], s) for s in (0.0, 0.5)]


def main():
    args = parse_args()
    if args.quick:
        args.models, args.dtypes, args.contexts, args.batches = args.models[:1], args.dtypes[:1], [128], [1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            cells = cells_for(name, dtype, args)
            if cells:
                rows += [{**r, "gpu": gpu} for r in bench_model(name, dtype, args, cells)]
                pd.DataFrame(rows).to_csv(out / "runtime_bench.csv", index=False)
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
