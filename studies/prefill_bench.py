"""FP8 (W8A8) prefill on the GPU (kernels/fp8_prefill.py, kernels/runtime.py's prefill) against bf16.

    python studies/prefill_bench.py --out DIR            # Llama-3-8B shapes + whole model (~2-3 min on the H200)
    python studies/prefill_bench.py --out DIR --quick    # 512 / 2048 tokens, a 2-layer model: a smoke run
    python studies/prefill_bench.py --out DIR --smoke    # tiny shapes on the CPU, wall clock (tests)

Per projection (Llama-3-8B, N x K = d_out x d_in: q|k|v 6144x4096, o 4096x4096, gate|up 28672x4096, down
4096x14336) at M tokens (512 / 2048 / 4096 / 8192), bf16 activations [M, K]:
``bf16`` (``F.linear`` on the row-major bf16 weight, cuBLAS), ``fp8_gemm`` (the FP8 GEMM alone on pre-quantized
x: ``fp8_gemm``, i.e. ``torch._scaled_mm`` with rowwise scales), ``fp8_gemm_fast`` (the same with
``use_fast_accum``), ``fp8_triton`` (``fp8_linear``: our one-pass Triton per-token quantization + the GEMM),
``fp8_eager`` (per-token quantization in eager PyTorch, the accuracy path's rule: ``quantize_rows_fp8_reference``,
+ the GEMM), and the quantization alone (``quant_triton``, ``quant_eager``). Summed per layer (the four sites).
The per-layer speedup is the sum of the bf16 times over the sum of the variant's times.

Whole model: a random-weight Llama-3-8B-shaped ``kernels.runtime.Decoder`` (``random_weights``, bf16, batch 1),
``prefill`` dense vs every projection in FP8 (``rtn_fp8_prefill``), at 512 / 2048 / 4096 / 8192 tokens; beside
it, for the share of each part: the linear layers only (32 x the per-layer sums above, bf16 / fp8_triton), the
attention alone (causal SDPA at that length, x 32 layers) and the LM head alone (logits of every position, fp32).

Protocol: every time is ``kernels.latency.graph_time_us`` (CUDA graph replays under ``triton.testing.do_bench``,
median); per projection the graph cycles through weight copies of >= 300 MB (L2 defeated, as a layer's weights
are in a real prefill); the whole prefill is one graph. Before any timing, ``fp8_linear`` is checked against
``fp8_linear_reference`` (dequantize, fp32 matmul; codes bit-equal) at each shape and length; the FP8 model's
logits are compared with the dense model's (random weights: information only). Outputs: DIR/prefill_bench.csv
(one row per time: ``table`` gemm / layer / model), DIR/quant_tune.csv (the activation quantization's launch,
tuned per row width at 2048 tokens before anything else; the best is used for the rest of the run),
DIR/prefill_bench.md (the GPU named).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys
import time

import pandas as pd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
SMOKE_SHAPES = {"qkv": (128, 64), "o": (64, 64), "gate_up": (256, 64), "down": (64, 128)}
TOKENS = (512, 2048, 4096, 8192)
LINEAR_VARIANTS = ("bf16", "fp8_gemm", "fp8_gemm_fast", "fp8_triton", "fp8_eager")
QUANT_VARIANTS = ("quant_triton", "quant_eager")
# ../shared/research/h200_bits_prefill_anchors.md: per-layer speedup, FP8 rowwise GEMM alone / with eager quant
ANCHORS = {512: (1.59, 0.84), 2048: (1.72, 1.05), 4096: (1.75, 1.12)}
TOL = 1e-2  # bf16 output rounding


def with_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """speedup = bf16 time / time at the same site and tokens (NaN for the quantization-only rows)."""
    base = df[df.variant == "bf16"].set_index(["site", "tokens"]).us
    df = df.copy()
    df["speedup"] = [base[(s, t)] / us if v in LINEAR_VARIANTS else float("nan")
                     for s, t, v, us in zip(df.site, df.tokens, df.variant, df.us)]
    return df


def per_layer(df: pd.DataFrame) -> pd.DataFrame:
    """The four sites summed per (tokens, variant); speedup = summed bf16 / summed variant."""
    layer = df.groupby(["tokens", "variant"], as_index=False).us.sum()
    base = layer[layer.variant == "bf16"].set_index("tokens").us
    layer["speedup"] = [base[t] / us if v in LINEAR_VARIANTS else float("nan")
                        for t, v, us in zip(layer.tokens, layer.variant, layer.us)]
    layer.insert(0, "table", "layer")
    return layer


def _cell(us: float, speedup: float | None = None) -> str:
    return f"{us:.1f}" + ("" if speedup is None or speedup != speedup else f" ({speedup:.2f}x)")


def markdown(df: pd.DataFrame, layer: pd.DataFrame, model: pd.DataFrame, meta: dict) -> str:
    out = [f"# FP8 (W8A8) prefill on the {meta['gpu']}", "",
           f"`{meta['command']}` (torch {meta['torch']}, triton {meta['triton']}"
           + (f", {meta['date']}" if meta.get("date") else "") + "). Times in us (speedup over bf16): "
           "median of CUDA-graph replays; per projection the graph cycles through >= 300 MB of weight copies."
           + (f" Activation quantization launch, tuned at 2048 tokens (DIR/quant_tune.csv): {meta['quant']}."
              if meta.get("quant") else ""), "",
           "## Llama-3-8B, per layer (q|k|v + o + gate|up + down summed)", "",
           "| tokens | bf16 | FP8 GEMM alone | GEMM fast accum | FP8 + our Triton quant | FP8 + eager quant "
           "| quant alone: Triton | eager | anchors: GEMM / eager |",
           "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(layer.tokens.unique()):
        r = layer[layer.tokens == t].set_index("variant")
        get = lambda v: _cell(r.us[v], r.speedup[v]) if v in r.index else ""  # noqa: E731
        anchor = ANCHORS.get(int(t))
        out.append(f"| {t} | {get('bf16').split()[0]} | {get('fp8_gemm')} | {get('fp8_gemm_fast')} | "
                   f"{get('fp8_triton')} | {get('fp8_eager')} | {get('quant_triton')} | {get('quant_eager')} | "
                   + (f"{anchor[0]:.2f}x / {anchor[1]:.2f}x |" if anchor else "|"))
    out += ["", "## Per projection", "",
            "| site | N x K | tokens | bf16 | FP8 GEMM | fast accum | + Triton quant | + eager quant | quant Triton "
            "| quant eager | rel. err vs reference |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (site, t), g in df.groupby(["site", "tokens"], sort=False):
        r = g.set_index("variant")
        get = lambda v: _cell(r.us[v], r.speedup[v]) if v in r.index else ""  # noqa: E731
        err = r.rel_err.dropna() if "rel_err" in r else pd.Series(dtype=float)
        out.append(f"| {site} | {int(r.n.iloc[0])}x{int(r.k.iloc[0])} | {t} | {r.us['bf16']:.1f} | {get('fp8_gemm')} "
                   f"| {get('fp8_gemm_fast')} | {get('fp8_triton')} | {get('fp8_eager')} | "
                   f"{get('quant_triton')} | {get('quant_eager')} | {err.iloc[0] if len(err) else float('nan'):.1e} |")
    if len(model):
        out += ["", f"## Whole-model prefill ({meta.get('model', 'Llama-3-8B')}-shaped runtime, random weights, "
                "batch 1, bf16; dense: F.linear on row-major weights; FP8: every projection)", "",
                "| tokens | dense ms | FP8 ms | speedup | linear only: dense ms | FP8 ms | attention ms (share of "
                "dense / FP8) | LM head ms | rest ms (dense / FP8) | FP8 vs dense logits: rel. diff | top-1 agree |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t, g in model.groupby("tokens"):
            r = g.set_index("variant").us / 1e3
            d, f, att, head = r["dense"], r["fp8"], r["attention"], r["lm_head"]
            ld, lf = r.get("linear_dense", float("nan")), r.get("linear_fp8", float("nan"))
            info = g.set_index("variant")
            out.append(f"| {t} | {d:.2f} | {f:.2f} | **{d / f:.2f}x** | {ld:.2f} | {lf:.2f} | {att:.2f} "
                       f"({att / d:.0%} / {att / f:.0%}) | {head:.2f} | {d - ld - att - head:.2f} / "
                       f"{f - lf - att - head:.2f} | {info.rel_err['fp8']:.3f} | {info.top1['fp8']:.3f} |")
    out += ["", "Not measured: quantizing x inside the kernel that produces it (RMSNorm, SiLU * up), out of scope "
            "here; it would remove at most the `quant alone: Triton` time. 'rest' = whole prefill - linear - "
            "attention - LM head (norms, RoPE, cache writes, residual adds, embedding, launch gaps inside the graph)."]
    return "\n".join(out) + "\n"


def _wall_timer(calls, rep_ms: int = 40) -> float:
    """--smoke (CPU): mean wall-clock us of one call, after one warm-up."""
    for c in calls:
        c()
    start = time.perf_counter()
    for c in calls:
        c()
    return (time.perf_counter() - start) * 1e6 / len(calls)


def gemm_rows(shapes: dict, tokens, timer, rep_ms: int, device, seed: int, gpu: str, copies) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from allocator.kernels.fp8_prefill import (fp8_gemm, fp8_linear, fp8_linear_reference, pack_fp8_weight,
                                               quantize_rows_fp8, quantize_rows_fp8_reference)

    g = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for site, (n, k) in shapes.items():
        wb = [(torch.randn(n, k, generator=g, device=device) * k**-0.5).to(torch.bfloat16)
              for _ in range(copies(2 * n * k))]
        wf = [pack_fp8_weight(wb[i % len(wb)]) for i in range(copies(n * k))]
        for t in tokens:
            x = torch.randn(t, k, generator=g, device=device).to(torch.bfloat16)
            xq, sx = quantize_rows_fp8(x)
            qr, sr = quantize_rows_fp8_reference(x)
            if not (torch.equal(xq.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(sx, sr)):
                raise RuntimeError(f"{site} {t} tokens: quantize_rows_fp8 differs from the reference")
            ref = fp8_linear_reference(x, wf[0]).float()
            err = ((fp8_linear(x, wf[0]).float() - ref).norm() / ref.norm()).item()
            if not err < TOL:
                raise RuntimeError(f"{site} {t} tokens: fp8_linear relative error {err:.2e} > {TOL}")
            del ref
            calls = {
                "bf16": [lambda w=w: F.linear(x, w) for w in wb],
                "fp8_gemm": [lambda w=w: fp8_gemm(xq, sx, w) for w in wf],
                "fp8_gemm_fast": [lambda w=w: fp8_gemm(xq, sx, w, use_fast_accum=True) for w in wf],
                "fp8_triton": [lambda w=w: fp8_linear(x, w) for w in wf],
                "fp8_eager": [lambda w=w: fp8_gemm(*quantize_rows_fp8_reference(x), w) for w in wf],
                "quant_triton": [lambda: quantize_rows_fp8(x)] * 8,
                "quant_eager": [lambda: quantize_rows_fp8_reference(x)] * 8,
            }
            for variant, cs in calls.items():
                us = timer(cs, rep_ms)
                rows.append(dict(table="gemm", gpu=gpu, site=site, n=n, k=k, tokens=t, variant=variant, us=us,
                                 rel_err=err if variant == "fp8_triton" else float("nan")))
                print(f"  {site:8s} {n}x{k} M={t:5d} {variant:14s} {us:9.1f} us", flush=True)
        del wb, wf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


QUANT_CANDIDATES = [(None, 4), (None, 8), (None, 16), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8),
                    (8192, 16)]  # (two-pass block or None: one pass, num_warps)


def tune_quant(ks, tokens: int, timer, rep_ms: int, device, seed: int, gpu: str) -> tuple[dict, list[dict]]:
    """Per row width K, the fastest launch of quantize_rows_fp8 at `tokens` rows (bf16 input) -> (configs, rows)."""
    import torch

    from allocator.kernels.fp8_prefill import QuantConfig, quantize_rows_fp8, quantize_rows_fp8_reference

    g = torch.Generator(device=device).manual_seed(seed)
    best, rows = {}, []
    for k in sorted(set(ks)):
        x = torch.randn(tokens, k, generator=g, device=device).to(torch.bfloat16)
        ref = quantize_rows_fp8_reference(x)[0].view(torch.uint8)
        for block, warps in QUANT_CANDIDATES:
            if block is None and k > 16384:
                continue
            cfg = QuantConfig(block, warps)
            if not torch.equal(quantize_rows_fp8(x, config=cfg)[0].view(torch.uint8), ref):
                raise RuntimeError(f"quantize_rows_fp8 {cfg} differs from the reference at K={k}")
            us = timer([lambda: quantize_rows_fp8(x, config=cfg)] * 8, rep_ms)
            rows.append(dict(table="quant_tune", gpu=gpu, site="", n=0, k=k, tokens=tokens,
                             variant=f"block={block or 'one-pass'},warps={warps}", us=us))
            if k not in best or us < best[k][1]:
                best[k] = (cfg, us)
        print(f"  quant K={k}: best {best[k][0]} {best[k][1]:.1f} us", flush=True)
    return {k: cfg for k, (cfg, _) in best.items()}, rows


def model_rows(shape, tokens, timer, rep_ms: int, device, seed: int, gpu: str, layer: pd.DataFrame) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from allocator.kernels.runtime import Decoder, random_weights, rtn_fp8_prefill

    g = torch.Generator(device=device).manual_seed(seed)
    weights = random_weights(shape, torch.bfloat16, device, g)
    fp8 = rtn_fp8_prefill(shape, weights)
    t_max = max(tokens)
    dense = Decoder(shape, weights, max_len=t_max, dtype=torch.bfloat16, device=device, keep_dense_weights=True)
    quant = Decoder(shape, weights, max_len=t_max, dtype=torch.bfloat16, device=device, prefill_fp8=fp8)
    sums = layer.set_index(["tokens", "variant"]).us if len(layer) else pd.Series(dtype=float)
    rows = []
    for t in tokens:
        ids = torch.randint(0, shape.vocab, (1, t), generator=g, device=device)
        ld, lf = dense.prefill(ids), quant.prefill(ids)
        rel = ((lf - ld).norm() / ld.norm()).item()
        top1 = (lf.argmax(-1) == ld.argmax(-1)).float().mean().item()
        del ld, lf
        base = dict(table="model", gpu=gpu, site="model", n=shape.n_layers, k=shape.hidden, tokens=t)
        times = {"dense": timer([lambda: dense.prefill(ids)], rep_ms),
                 "fp8": timer([lambda: quant.prefill(ids)], rep_ms)}
        q = torch.randn(1, shape.n_heads, t, shape.head_dim, generator=g, device=device).to(torch.bfloat16)
        kv = torch.randn(2, 1, shape.n_kv_heads, t, shape.head_dim, generator=g, device=device).to(torch.bfloat16)
        times["attention"] = shape.n_layers * timer(
            [lambda: F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True,
                                                    enable_gqa=shape.n_kv_heads != shape.n_heads)], rep_ms)
        h = torch.randn(1, t, shape.hidden, generator=g, device=device).to(torch.bfloat16)
        times["lm_head"] = timer([lambda: F.linear(h, dense.lm_head).float()], rep_ms)
        for variant, name in (("bf16", "linear_dense"), ("fp8_triton", "linear_fp8")):
            if (t, variant) in sums.index:
                times[name] = shape.n_layers * sums[(t, variant)]
        for variant, us in times.items():
            rows.append(dict(base, variant=variant, us=us, rel_err=rel if variant == "fp8" else float("nan"),
                             top1=top1 if variant == "fp8" else float("nan")))
        print(f"  model T={t:5d}: dense {times['dense'] / 1e3:.2f} ms, FP8 {times['fp8'] / 1e3:.2f} ms "
              f"({times['dense'] / times['fp8']:.2f}x), attention {times['attention'] / 1e3:.2f} ms, "
              f"LM head {times['lm_head'] / 1e3:.2f} ms; logits rel. diff {rel:.3f}, top-1 {top1:.3f}", flush=True)
        del q, kv, h
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, device="cuda", quick="512 / 2048 tokens and a 2-layer model (a smoke run on the GPU)",
                    seed="the random weights' and inputs' seed")
    parser.add_argument("--tokens", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                        help=f"prompt lengths per projection (default {','.join(map(str, TOKENS))})")
    parser.add_argument("--model-tokens", type=lambda s: tuple(int(v) for v in s.split(",") if v), default=None,
                        help="whole-model prefill lengths (default: --tokens; empty: no whole-model rows)")
    parser.add_argument("--rep-ms", type=int, default=40, help="do_bench time per measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, wall clock (tests only)")
    args = parser.parse_args(argv)

    import torch
    import triton

    if not args.smoke and not torch.cuda.is_available():
        print("prefill_bench needs a CUDA GPU (--smoke runs tiny shapes on the CPU)", file=sys.stderr)
        return 2
    from allocator.kernels.latency import graph_time_us, n_copies_for
    from allocator.kernels.llama_decode import LLAMA3_8B
    from allocator.kernels.runtime import DecoderShape

    if args.smoke:
        device, gpu, timer, shapes = torch.device("cpu"), "CPU (smoke)", _wall_timer, SMOKE_SHAPES
        tokens = args.tokens or (8, 16)
        shape = DecoderShape(64, 128, 4, 2, 2, 97, head_dim=16)
        copies = lambda nbytes: 2  # noqa: E731
    else:
        device = torch.device(args.device)
        gpu, timer, shapes = torch.cuda.get_device_name(device), graph_time_us, SHAPES
        tokens = args.tokens or ((512, 2048) if args.quick else TOKENS)
        shape = LLAMA3_8B
        if args.quick:
            shape = dataclasses.replace(shape, n_layers=2)
        copies = n_copies_for
    model_tokens = tokens if args.model_tokens is None else args.model_tokens
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python studies/prefill_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{gpu}: per projection at {tokens} tokens", flush=True)
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, command=command,
                date=datetime.date.today().isoformat(), model="Llama-3-8B" if not args.smoke else "tiny")
    if args.quick and not args.smoke:
        meta["model"] = "Llama-3-8B (2 layers)"

    def write(model: pd.DataFrame) -> str:  # after each part: a run stopped later keeps what it measured
        pd.concat([df, layer.assign(gpu=gpu), model], ignore_index=True).to_csv(args.out / "prefill_bench.csv",
                                                                                  index=False)
        md = markdown(df, layer, model, meta)
        (args.out / "prefill_bench.md").write_text(md)
        return md

    from allocator.kernels import fp8_prefill

    tuned, tune = tune_quant([k for _, k in shapes.values()], 2048 if not args.smoke else 16, timer, args.rep_ms,
                             device, args.seed, gpu)
    fp8_prefill.QUANT_CONFIGS.update(tuned)  # every later quantize_rows_fp8 of this run uses them
    pd.DataFrame(tune).to_csv(args.out / "quant_tune.csv", index=False)
    meta["quant"] = ", ".join(f"K={k}: {cfg}" for k, cfg in sorted(tuned.items()))
    df = with_speedups(pd.DataFrame(gemm_rows(shapes, tokens, timer, args.rep_ms, device, args.seed, gpu, copies)))
    layer = per_layer(df)
    md = write(pd.DataFrame())
    if model_tokens:
        print(f"whole-model prefill ({shape.n_layers} layers) at {model_tokens} tokens", flush=True)
        md = write(pd.DataFrame(model_rows(shape, model_tokens, timer, args.rep_ms, device, args.seed, gpu, layer)))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
