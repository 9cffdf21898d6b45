"""Study: whole-model decode and prefill with low-bit weights through the runtime (issue 12, build 4).

An HF causal LM built from a shipped config with random initialisation (no download; the conversion path a real
checkpoint takes), TEAL thresholds calibrated on random token windows, plans built by the accuracy path (RTN fake
quantization, ``CompressionPlan.build``) and converted by ``evaluators.runtime.decoder_from_hf``: the low-bit
projections decode through ``kernels/lowbit_gemv.py`` with the plan's own codes and scales (mode "sparse"), the
w8a8-fp8 ones also prefill in W8A8. One plan at a time (each holds its fake-quant copies).

Rows (batch 1, ``--context`` KV positions before the timed step; CUDA-graph replay, ``triton.testing.do_bench``
median): ``bf16`` dense (cuBLAS on row-major copies, the baseline), ``bf16`` at each s through ``fused_pdl``
(the 16-bit runtime's best) and ``sparse``, each format in ``--formats`` at each s (mode "sparse"; s = 0 runs the
dense low-bit path; w8a16 also in ``fused_pdl``: INT8 rows in the fused step), and ``mixed``: attention projections w8a16 and MLP projections w4a16-g128, at s = 0.5.
Columns: step_ms, tokens_per_s, speedup over bf16 dense, decode weight bytes over bf16's, prefill_ms of
``--prefill`` tokens (dense bf16 / FP8 / dequantized bf16 GEMMs, as the plan runs it).

    python studies/lowbit_decode.py --out out/lowbit_decode                 # on a CUDA GPU (Llama-3-8B shape)
    python studies/lowbit_decode.py --out out/ld --quick                     # SmolLM2 shape, two cells
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import pandas as pd
import torch

from _common import add_common_args
from runtime_bench import build_hf, step_ms

TUNED = Path(__file__).resolve().parent / "results" / "lowbit_h200.tuned.json"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--formats", nargs="+", default=["w4a16-g128", "w8a16", "w8a8-fp8"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the timed prefill")
    ap.add_argument("--tuned", type=Path, default=TUNED, help="lowbit_bench.py's tuned launch configs (if present)")
    return ap.parse_args()


def calibrated(model, seed: int):
    from allocator.evaluators.methods import get_method
    windows = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(seed))
    return get_method("teal", seed=seed, shared_inputs=True).calibrate(model, windows, batch_size=2)


def cases(formats, sparsities, n_layers):
    """(name, s, mode, pairs): pairs None = the dense model; else the plan's (Target, Level) list."""
    from allocator.evaluators.plan import Target, uniform_targets
    from allocator.levels import Level

    out = [("bf16", 0.0, "dense", None)]
    out += [("bf16", s, mode, uniform_targets(n_layers, {"s": s})) for s in sparsities if s > 0
            for mode in ("fused_pdl", "sparse")]
    out += [(fmt, s, "sparse", uniform_targets(n_layers, {"s": s, "fmt": fmt})) for fmt in formats for s in sparsities]
    out += [(fmt, s, "fused_pdl", uniform_targets(n_layers, {"s": s, "fmt": fmt})) for fmt in formats if fmt == "w8a16"
            for s in sparsities]   # INT8 weight-only also runs in the fused step
    mixed = [(Target.of(i, kinds), Level(0.5, fmt=fmt)) for i in range(n_layers)
             for kinds, fmt in ((("q", "k", "v", "o"), "w8a16"), (("gate", "up", "down"), "w4a16-g128"))]
    return out + [("mixed", 0.5, "sparse", mixed)]


def main():
    args = parse_args()
    if args.quick:
        args.model, args.formats, args.sparsities, args.prefill = "smollm2-135m", ["w4a16-g64"], [0.5], 64
    from allocator.evaluators.plan import CompressionPlan
    from allocator.evaluators.runtime import decoder_from_hf, decoder_weights, timed_prefill_ms
    from allocator.kernels.lowbit_gemv import load_tuned

    if args.tuned.exists():
        load_tuned(args.tuned)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu, t0 = torch.cuda.get_device_name(), time.perf_counter()
    model = build_hf(args.model, getattr(torch, args.dtype), "cuda")
    weights, method = decoder_weights(model), calibrated(model, args.seed)
    n_layers, vocab = model.config.num_hidden_layers, model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prefill), device="cuda")
    rows, base = [], {}
    todo = cases(args.formats, args.sparsities, n_layers)
    if args.quick:
        todo = [todo[0], todo[-2]]
    for name, s, mode, pairs in todo:
        plan = None if pairs is None else CompressionPlan.build(model, method, pairs)
        decoder = decoder_from_hf(model, plan, max_len=max(args.context, args.prefill) + 8, weights=weights,
                                  keep_dense_weights=pairs is None)
        ms = step_ms(decoder, 1, args.context, mode, vocab)
        prefill_ms = timed_prefill_ms(decoder, prompt, rep_ms=60)
        nbytes = float(decoder.decode_weight_bytes())
        base = base or {"ms": ms, "bytes": nbytes, "prefill": prefill_ms}
        rows.append({"gpu": gpu, "model": args.model, "dtype": args.dtype, "format": name, "sparsity": s, "mode": mode,
                     "context": args.context, "step_ms": ms, "tokens_per_s": 1e3 / ms, "speedup": base["ms"] / ms,
                     "weight_bytes_ratio": nbytes / base["bytes"], "prefill_tokens": args.prefill,
                     "prefill_ms": prefill_ms, "prefill_speedup": base["prefill"] / prefill_ms})
        print(rows[-1], flush=True)
        del plan, decoder
        gc.collect()
        torch.cuda.empty_cache()
        pd.DataFrame(rows).to_csv(out / "lowbit_decode.csv", index=False)
    frame = pd.DataFrame(rows)
    print(frame.drop(columns=["gpu", "model", "dtype"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{gpu}, torch {torch.__version__}; wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
