"""End-to-end batch-1 decode: tokens/s dense vs 40/50/70% activation sparsity through the kernels (GPU only).

    python studies/e2e_decode.py --out DIR [--layers 32] [--models llama3_8b,llama2_7b] [--tuned tuned.json]
    python studies/e2e_decode.py --quick --out /tmp/e2e      # 2 layers of Llama-3-8B, fp16, s = 0.5 (a smoke run)

Random-weight Llama-3-8B- and Llama-2-7B-shaped decoders (kernels/llama_decode.py), full depth by default,
fp16 and bf16. A whole decode step (embedding, 32 layers, LM head) is captured in one CUDA graph and
timed by do_bench over replays (median; `allocator.kernels.latency.graph_time_us`, the latency evaluator's
protocol). Dense = cuBLAS on row-major weights; sparse = every q|k|v, o,
gate|up and down projection through `torch.ops.allocator.sparse_gemv`, thresholds calibrated per site as the
s-quantile of |input| over dense steps; the achieved sparsity is measured on fresh tokens and reported.
The Amdahl ceiling counts weight bytes only: dense bytes / (sparse-able bytes (1 - s) + the rest).

Then the logits check: a SmolLM2-135M-shaped random model gives the same logits through the kernels as
through the PyTorch reference path (fp32 and fp16, 50% sparsity, 8 decode steps).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import pandas as pd
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402


def step_us(model, mode: str, pos: int, rep_ms: int = 300) -> float:
    """Median microseconds of one whole decode step at position ``pos``, replayed from a CUDA graph."""
    from allocator.kernels.latency import graph_time_us

    token = torch.zeros(1, dtype=torch.long, device=model.device)
    p = torch.tensor([pos], device=model.device)
    with torch.no_grad():
        return graph_time_us([lambda: model.step(token, p, mode)], rep_ms)


def amdahl_ceiling(model, s: float) -> float:
    sh = model.shape
    sparse_bytes = sum(model.layers[0][k].numel() for k in ("qkv", "o", "gate_up", "down")) * sh.n_layers
    dense_bytes = sparse_bytes + model.lm_head.numel() + sh.hidden  # LM head + one embedding row
    return dense_bytes / (sparse_bytes * (1 - s) + dense_bytes - sparse_bytes)


def tokens_per_s(name: str, shape, dtype, layers: int | None, levels, out_rows: list,
                 modes=("sparse", "fused"), device: str = "cuda", seed: int = 0) -> None:
    import dataclasses

    from allocator.kernels.llama_decode import RandomLlamaDecoder

    if layers:
        shape = dataclasses.replace(shape, n_layers=layers)
    t0 = time.time()
    model = RandomLlamaDecoder(shape, dtype, device, max_len=512, seed=seed)
    pos = 500  # decode at a ~500-token context
    dense = step_us(model, "dense", pos)
    base = dict(model=name, dtype=str(dtype)[6:], layers=shape.n_layers)
    out_rows.append({**base, "target_s": 0.0, "measured_s": 0.0, "mode": "dense", "step_us": dense,
                     "tokens_per_s": 1e6 / dense, "speedup": 1.0, "amdahl_ceiling": 1.0})
    print(f"{name} {dtype} dense: {dense:.1f} us/token = {1e6 / dense:.1f} tok/s [{time.time() - t0:.0f}s]", flush=True)
    for s in levels:
        model.calibrate(s, steps=4, start_pos=400)
        measured = model.measured_sparsity(steps=2, start_pos=450)
        for mode in modes:
            us = step_us(model, mode, pos)
            out_rows.append({**base, "target_s": s, "measured_s": measured, "mode": mode, "step_us": us,
                             "tokens_per_s": 1e6 / us, "speedup": dense / us,
                             "amdahl_ceiling": amdahl_ceiling(model, s)})
            print(f"{name} {dtype} s={s} {mode} (measured {measured:.3f}): {us:.1f} us/token = {1e6 / us:.1f} "
                  f"tok/s, x{dense / us:.3f} (ceiling x{amdahl_ceiling(model, s):.3f}) [{time.time() - t0:.0f}s]",
                  flush=True)
    del model
    torch.cuda.empty_cache()


@torch.no_grad()
def logits_check(dtype, steps: int = 8, sparsity: float = 0.5, device: str = "cuda", seed: int = 1) -> dict:
    from allocator.kernels.llama_decode import SMOLLM2_135M, RandomLlamaDecoder

    model = RandomLlamaDecoder(SMOLLM2_135M, dtype, device, max_len=64, keep_dense_weights=True, seed=seed)
    model.calibrate(sparsity, steps=4, start_pos=0)
    kv0 = model.kv.clone()
    tokens = torch.randint(0, SMOLLM2_135M.vocab, (steps,), device=device)
    logits = {}
    for mode in ("sparse", "fused", "reference", "dense"):
        model.kv.copy_(kv0)
        logits[mode] = torch.stack([model.step(tokens[t : t + 1], torch.tensor([8 + t], device=device), mode)[0]
                                    for t in range(steps)])
    ref, ker, den, fus = logits["reference"], logits["sparse"], logits["dense"], logits["fused"]
    rel = ((ker - ref).norm() / ref.norm()).item()
    return dict(dtype=str(dtype)[6:], steps=steps, sparsity=sparsity,
                max_abs_diff=(ker - ref).abs().max().item(), rel_err=rel,
                rel_err_fused=((fus - ref).norm() / ref.norm()).item(),
                top1_agree=(ker.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                top1_agree_fused=(fus.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                rel_err_sparse_vs_dense=((ref - den).norm() / den.norm()).item())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, device="cuda", quick="2 layers of Llama-3-8B, fp16, s = 0.5, logits check in fp16 only",
                    seed="seed of the random weights")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the real model (scaled run)")
    p.add_argument("--models", default="llama3_8b,llama2_7b")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--tuned", type=pathlib.Path)
    p.add_argument("--skip-logits", action="store_true")
    p.add_argument("--modes", default="sparse,fused", help="kernel paths timed beside dense")
    p.add_argument("--indexed", type=pathlib.Path, help="indexed_tuned.json from `kernel_bench.py indexed`")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.5, 0.7])
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.models, a.dtypes, a.sparsities = a.layers or 2, "llama3_8b", "float16", [0.5]
    a.out.mkdir(parents=True, exist_ok=True)
    if a.tuned:
        from kernel_bench import load_tuned

        load_tuned(a.tuned)
    if a.indexed:
        from kernel_bench import load_indexed

        load_indexed(a.indexed)
    from allocator.kernels.llama_decode import LLAMA2_7B, LLAMA3_8B

    shapes = {"llama3_8b": LLAMA3_8B, "llama2_7b": LLAMA2_7B}
    rows: list = []
    if not a.skip_logits:
        kinds = ([(torch.float16, 0.5)] if a.quick
                 else [(torch.float32, 0.5), (torch.float16, 0.5), (torch.float16, 0.0)])
        checks = [logits_check(dt, sparsity=sp, device=a.device, seed=a.seed + 1) for dt, sp in kinds]
        pd.DataFrame(checks).to_csv(a.out / "e2e_logits_check.csv", index=False)
        for c in checks:
            print("SmolLM2-shaped logits, kernels vs reference:", c, flush=True)
    for name in a.models.split(","):
        for dt in a.dtypes.split(","):
            tokens_per_s(name, shapes[name], getattr(torch, dt), a.layers, tuple(a.sparsities), rows,
                         tuple(a.modes.split(",")), a.device, a.seed)
            pd.DataFrame(rows).to_csv(a.out / "e2e_decode.csv", index=False)
    df = pd.DataFrame(rows)
    print(df[["model", "dtype", "mode", "target_s", "measured_s", "step_us", "tokens_per_s", "speedup",
              "amdahl_ceiling"]].to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
