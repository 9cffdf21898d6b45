"""Benchmark of the activation-sparse decode GEMV and the fused R-Sparse layer against cuBLAS (GPU only).

    python studies/kernel_bench.py all --out DIR          # tune, gemv table, R-Sparse table (~5 min, H100)
    python studies/kernel_bench.py report --out DIR --dest studies/results/kernel_bench_h100.md   # DIR/*.csv -> md
    python studies/kernel_bench.py all --quick --out DIR  # one shape per table: a smoke run (a minute)

Protocol (kernels/latency.py): each call captured in a CUDA graph cycling through >= 300 MB of weight copies
(L2 defeated), median of do_bench over graph replays, random unstructured masks at exactly s shared by the
batch rows. "dense" is cuBLAS `F.linear(x, W)` on the usual row-major W; "fallback" is the same masked
function through cuBLAS on the transposed Wt (what the op runs below the crossover sparsity).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import pandas as pd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402

SHAPES = [  # (d_out, d_in) = (N, K)
    (4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008),
    (576, 576), (1536, 576), (576, 1536),
]
E2E_SHAPES = [(28672, 4096), (22016, 4096), (12288, 4096), (960, 576), (3072, 576)]  # fused projections
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.7, 0.9, 1.0]
MLP_SHAPES = [(14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]


def _candidates():
    from allocator.kernels import GemvConfig

    tiles = [  # (block_n, block_k, use_dot, num_warps, num_stages); see kernels/NOTES.md for the sweeps
        (128, 64, True, 4, 4), (128, 64, True, 4, 3), (256, 64, True, 8, 4), (64, 64, True, 4, 4),
        (128, 128, True, 4, 3), (64, 32, False, 1, 2), (64, 64, False, 2, 2), (64, 16, False, 1, 2),
        (128, 32, False, 4, 2), (32, 32, False, 1, 2),
    ]
    return [GemvConfig(block_n=bn, block_k=bk, use_dot=d, num_warps=w, num_stages=st) for bn, bk, d, w, st in tiles]


def _split_choices(d_out: int, d_in: int, block_n: int) -> list[int]:
    stripes = -(-d_out // block_n)
    small = d_out * d_in < 4e6
    return [sp for sp in (1, 2, 4, 8, 16, 32, 64) if d_in // sp >= 96 and stripes * sp <= 1024
            and stripes * sp >= (16 if small else 128)] or [max(1, min(64, d_in // 96))]


def explore(out: pathlib.Path, rep_ms: int = 15, device: str = "cuda") -> None:
    """Compaction vs predicated streaming, tiles, stages and splits, at several sparsities (fp16, batch 1)."""
    import torch

    from allocator.kernels import GemvConfig, sparse_gemv_triton
    from allocator.kernels.latency import THRESHOLD, graph_time_us, sparse_input

    dev = torch.device(device)
    rows = []
    variants = [GemvConfig(block_n=128, block_k=64, use_dot=True, num_warps=4, num_stages=4)]
    for bn, bk, warps in [(64, 32, 2), (128, 32, 4), (128, 16, 4), (256, 16, 4), (128, 64, 8), (256, 32, 8),
                          (64, 64, 4), (128, 32, 2), (256, 32, 4), (64, 32, 1), (512, 16, 8), (128, 16, 2)]:
        variants.append(GemvConfig(block_n=bn, block_k=bk, use_dot=False, num_warps=warps, num_stages=2))
    for d_out, d_in in [(14336, 4096), (4096, 14336), (4096, 4096), (576, 1536)]:
        _, wt = _weights(d_out, d_in, torch.float16, dev)
        xs = {s: sparse_input(1, d_in, s, torch.float16, dev) for s in (0.0, 0.5, 0.9, 1.0)}
        for base in variants:
            stripes = -(-d_out // base.block_n)
            for splits in [sp for sp in (1, 2, 4, 8, 16, 32) if stripes * sp <= 1400 and d_in // sp >= 128
                           and (stripes * sp >= 100 or d_out * d_in < 4e6)]:
                cfg = dataclasses.replace(base, n_splits=splits)
                try:
                    t = {s: graph_time_us([lambda m=m: sparse_gemv_triton(x, m, THRESHOLD, config=cfg) for m in wt],
                                          rep_ms) for s, x in xs.items()}
                except Exception as exc:
                    print(f"skip {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                    continue
                rows.append({"d_out": d_out, "d_in": d_in, **dataclasses.asdict(cfg),
                             **{f"us_s{int(s * 100)}": v for s, v in t.items()}})
                print(f"{d_out}x{d_in} bn={cfg.block_n} bk={cfg.block_k} dot={cfg.use_dot} "
                      f"w={cfg.num_warps} st={cfg.num_stages} S={splits}: " +
                      " ".join(f"{v:.1f}" for v in t.values()), flush=True)
        del wt
        torch.cuda.empty_cache()
        pd.DataFrame(rows).to_csv(out / "explore.csv", index=False)


def _split_options(K, N, cfg, device):
    from allocator.kernels.gemv import _pick_splits

    auto = _pick_splits(K, N, cfg, device)
    return sorted({max(1, auto // 2), auto, min(auto * 2, max(1, K // 128))})


def _weights(d_out, d_in, dtype, device):
    import torch

    from allocator.kernels.latency import n_copies_for

    copies = n_copies_for(d_out * d_in * torch.finfo(dtype).bits // 8)
    w = [torch.randn(d_out, d_in, device=device, dtype=dtype) * d_in**-0.5 for _ in range(copies)]
    return w, [m.T.contiguous() for m in w]


def tune(out: pathlib.Path, shapes, rep_ms: int = 15, device: str = "cuda") -> dict:
    """Best config per shape for fp16, batch 1, by the time at s=0.5 plus the time at s=0."""
    import torch

    from allocator.kernels import sparse_gemv_triton
    from allocator.kernels.latency import THRESHOLD, graph_time_us, sparse_input

    dev = torch.device(device)
    rows, best = [], {}
    for d_out, d_in in shapes:
        w, wt = _weights(d_out, d_in, torch.float16, dev)
        del w
        xs = {s: sparse_input(1, d_in, s, torch.float16, dev) for s in (0.0, 0.5)}
        scores = []
        for base in _candidates():
            for splits in _split_choices(d_out, d_in, base.block_n):
                cfg = dataclasses.replace(base, n_splits=splits)
                t = {}
                try:
                    for s, x in xs.items():
                        t[s] = graph_time_us([lambda m=m: sparse_gemv_triton(x, m, THRESHOLD, config=cfg) for m in wt],
                                             rep_ms)
                except Exception as exc:  # a tile that does not compile (registers, shared memory)
                    print(f"skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                rows.append({"d_out": d_out, "d_in": d_in, **dataclasses.asdict(cfg), "us_s0": t[0.0], "us_s50": t[0.5]})
                scores.append((t[0.5] + 0.5 * t[0.0], cfg, t))
        scores.sort(key=lambda r: r[0])
        best[f"{d_in},{d_out}"] = dataclasses.asdict(scores[0][1])
        print(f"tune {d_out}x{d_in}: best {scores[0][1]} s0={scores[0][2][0.0]:.2f} s50={scores[0][2][0.5]:.2f} us",
              flush=True)
        del wt
        torch.cuda.empty_cache()
    pd.DataFrame(rows).to_csv(out / "tune.csv", index=False)
    (out / "tuned.json").write_text(json.dumps(best, indent=1))
    return best


INDEXED_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (14336, 4096), (11008, 4096),
                  (4096, 11008), (22016, 4096), (12288, 4096)]


def indexed(out: pathlib.Path, rep_ms: int = 15, sparsities=(0.0, 0.4, 0.5, 0.7, 0.9), shapes=INDEXED_SHAPES,
            device: str = "cuda") -> pd.DataFrame:
    """Producer-indexed GEMV (kernels/pipelined.py): kept lists given, atomic fp32 accumulation. Sweeps tiles and
    K splits at s = 0.5 per shape, then times the best at every s against cuBLAS and the standalone kernel
    (which compacts itself and reduces through the last-arriving program)."""
    import torch
    import torch.nn.functional as F

    from allocator.kernels import GemvConfig, sparse_gemv_reference, sparse_gemv_triton
    from allocator.kernels.latency import THRESHOLD, graph_time_us, producer_lists, sparse_input
    from allocator.kernels.pipelined import SiteBuffers, indexed_gemv, plan_site

    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev)
    tiles = [(256, 64, True, 8, 4), (128, 64, True, 4, 4), (128, 64, True, 4, 3), (64, 64, True, 4, 4),
             (128, 128, True, 4, 3), (64, 32, False, 1, 2), (128, 32, False, 4, 2)]
    rows, best = [], {}
    for d_out, d_in in shapes:
        w, wt = _weights(d_out, d_in, torch.float16, dev)
        x5 = sparse_input(1, d_in, 0.5, torch.float16, dev)
        ref = sparse_gemv_reference(x5, wt[0], THRESHOLD).float()
        scores = []
        for bn, bk, dot, warps, stages in tiles:
            for splits in (4, 8, 16, 32, 64):
                if d_in // splits < 64:
                    continue
                cfg = GemvConfig(block_n=bn, block_k=bk, use_dot=dot, num_warps=warps, num_stages=stages,
                                 n_splits=splits)
                site = SiteBuffers(plan_site(d_in, d_out, dev, config=cfg), dev)
                producer_lists(x5, site)
                try:
                    indexed_gemv(x5, wt[0], site)
                    err = ((site.acc - ref).norm() / ref.norm()).item()
                    assert err < 2e-2, f"relative error {err:.2e}"
                    t = graph_time_us([lambda m=m: indexed_gemv(x5, m, site) for m in wt], rep_ms)
                except Exception as exc:  # a tile that does not compile, or a wrong answer
                    print(f"skip {d_out}x{d_in} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                scores.append((t, cfg))
        scores.sort(key=lambda r: r[0])
        cfg = scores[0][1]
        best[f"{d_in},{d_out}"] = dataclasses.asdict(cfg)
        print(f"indexed {d_out}x{d_in}: best {cfg} {scores[0][0]:.2f} us at s=0.5; next "
              f"{[(round(t, 2), c.block_n, c.block_k, c.n_splits) for t, c in scores[1:4]]}", flush=True)
        x0 = sparse_input(1, d_in, 0.0, torch.float16, dev)
        dense = graph_time_us([lambda m=m: F.linear(x0, m) for m in w], rep_ms)
        for s in sparsities:
            x = sparse_input(1, d_in, s, torch.float16, dev)
            site = SiteBuffers(plan_site(d_in, d_out, dev, config=cfg), dev)
            producer_lists(x, site)
            ours = graph_time_us([lambda m=m: indexed_gemv(x, m, site) for m in wt], rep_ms)
            scan_site = SiteBuffers(plan_site(d_in, d_out, dev, config=cfg), dev, scan=True)
            scan = graph_time_us([lambda m=m: indexed_gemv(x, m, scan_site, THRESHOLD) for m in wt], rep_ms)
            standalone = graph_time_us([lambda m=m: sparse_gemv_triton(x, m, THRESHOLD) for m in wt], rep_ms)
            rows.append(dict(gpu=gpu, d_out=d_out, d_in=d_in, dtype="float16", s=s, dense_us=dense,
                             indexed_us=ours, scan_atomic_us=scan, standalone_us=standalone,
                             speedup_indexed=dense / ours, speedup_standalone=dense / standalone,
                             frac_ideal_indexed=dense / ours * (1 - s), block_n=cfg.block_n, block_k=cfg.block_k,
                             splits=cfg.n_splits, use_dot=cfg.use_dot, warps=cfg.num_warps, stages=cfg.num_stages))
            print(f"{d_out}x{d_in} s={s}: dense {dense:.2f} indexed {ours:.2f} (x{dense / ours:.2f}) scan+atomic "
                  f"{scan:.2f} standalone {standalone:.2f} (x{dense / standalone:.2f})", flush=True)
        del w, wt
        torch.cuda.empty_cache()
        pd.DataFrame(rows).to_csv(out / "kernel_bench_indexed.csv", index=False)
        (out / "indexed_tuned.json").write_text(json.dumps(best, indent=1))
    return pd.DataFrame(rows)


def producers(out: pathlib.Path, rep_ms: int = 15, device: str = "cuda") -> pd.DataFrame:
    """The elementwise kernels of a Llama-3-8B decode step, plain (decode_ops.py) against their versions that
    also write the next GEMV's kept lists / read and clear its accumulator (pipelined.py)."""
    import torch

    from allocator.kernels.decode_ops import add_rms_norm, rope_and_cache, silu_mul
    from allocator.kernels.latency import graph_time_us
    from allocator.kernels.pipelined import (SiteBuffers, add_rms_norm_split, plan_site,
                                             rope_and_cache_from_acc, silu_mul_compact)

    dev, dt, H, I, reps = torch.device(device), torch.float16, 4096, 14336, 100
    h, d, w = (torch.randn(1, H, device=dev, dtype=dt) for _ in range(3))
    qkv, gu, down = (SiteBuffers(plan_site(k, n, dev), dev) for k, n in ((H, 6144), (H, 2 * I), (I, H)))
    cos = sin = torch.rand(512, 64, device=dev)
    pos = torch.tensor([300], device=dev)
    kc = vc = torch.zeros(8, 512, 128, device=dev, dtype=dt)
    gu_out = torch.randn(1, 2 * I, device=dev, dtype=dt)
    qkv_out = torch.randn(6144, device=dev, dtype=dt)
    calls = {
        "add_rms_norm": lambda: add_rms_norm(h, d, w, 1e-5),
        "silu_mul": lambda: silu_mul(gu_out),
        "rope_and_cache": lambda: rope_and_cache(qkv_out, cos, sin, pos, kc, vc, 32, 8),
        "rope_and_cache_from_acc": lambda: rope_and_cache_from_acc(qkv, cos, sin, pos, kc, vc, 32, 8),
        "silu_mul_compact": lambda: silu_mul_compact(gu, dt, 0.5, down),
        "add_rms_norm_split_qkv": lambda: add_rms_norm_split(h, d, down, w, 1e-5, 0.5, qkv),
        "add_rms_norm_split_gate_up": lambda: add_rms_norm_split(h, d, down, w, 1e-5, 0.5, gu),
    }
    rows = []
    for name, call in calls.items():
        t = graph_time_us([call] * reps, rep_ms)
        rows.append({"kernel": name, "us": t})
        print(f"{name}: {t:.2f} us", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "kernel_bench_producers.csv", index=False)
    return df


def load_indexed(path: pathlib.Path) -> None:
    from allocator.kernels import GemvConfig
    from allocator.kernels.pipelined import INDEXED_CONFIGS

    for key, cfg in json.loads(path.read_text()).items():
        K, N = map(int, key.split(","))
        INDEXED_CONFIGS[(K, N)] = GemvConfig(**cfg)


def load_tuned(path: pathlib.Path) -> None:
    from allocator.kernels import GemvConfig
    from allocator.kernels.gemv import TUNED_CONFIGS

    for key, cfg in json.loads(path.read_text()).items():
        K, N = map(int, key.split(","))
        TUNED_CONFIGS[(K, N, 1)] = GemvConfig(**cfg)


def gemv_table(out: pathlib.Path, rep_ms: int = 30, shapes=SHAPES, sparsities=SPARSITIES,
               device: str = "cuda") -> pd.DataFrame:
    import torch
    import torch.nn.functional as F

    from allocator.kernels import keep_mask, sparse_gemv_reference, sparse_gemv_triton
    from allocator.kernels.gemv import _pick_splits, default_config
    from allocator.kernels.latency import THRESHOLD, graph_time_us, sparse_input

    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev)
    rows = []
    for d_out, d_in in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            w, wt = _weights(d_out, d_in, dtype, dev)
            for batch in (1, 2, 4) if dtype == torch.float16 else (1,):
                x0 = sparse_input(batch, d_in, 0.0, dtype, dev)
                dense = graph_time_us([lambda m=m: F.linear(x0, m) for m in w], rep_ms)
                fallback = graph_time_us(
                    [lambda m=m: (x0 * keep_mask(x0, THRESHOLD)) @ m for m in wt], rep_ms
                )
                cfg = default_config(d_in, d_out, batch, dev)
                xc = sparse_input(batch, d_in, 0.5, dtype, dev)
                err = ((sparse_gemv_triton(xc, wt[0], THRESHOLD).float() - sparse_gemv_reference(xc, wt[0], THRESHOLD)
                        .float()).norm() / sparse_gemv_reference(xc, wt[0], THRESHOLD).float().norm()).item()
                assert err < 2e-2, f"{d_out}x{d_in} {dtype} b{batch}: relative error {err:.2e}"
                for s in sparsities if batch == 1 else (0.0, 0.5, 0.9):
                    x = sparse_input(batch, d_in, s, dtype, dev)
                    ours = graph_time_us([lambda m=m: sparse_gemv_triton(x, m, THRESHOLD) for m in wt], rep_ms)
                    kept_bytes = (1 - s) * d_out * d_in * wt[0].element_size()
                    rows.append(dict(
                        gpu=gpu, d_out=d_out, d_in=d_in, dtype=str(dtype)[6:], batch=batch, s=s,
                        dense_us=dense, fallback_us=fallback, ours_us=ours, speedup=dense / ours,
                        ideal=1 / (1 - s) if s < 1 else float("inf"),
                        frac_ideal=(dense / ours) * (1 - s), ours_tbps=kept_bytes / ours / 1e6,
                        dense_tbps=d_out * d_in * wt[0].element_size() / dense / 1e6,
                        block_n=cfg.block_n, block_k=cfg.block_k, splits=_pick_splits(d_in, d_out, cfg, dev),
                        use_dot=cfg.use_dot, warps=cfg.num_warps, stages=cfg.num_stages,
                    ))
                    r = rows[-1]
                    print(f"{d_out}x{d_in} {r['dtype']} b{batch} s={s:.2f}: dense {dense:.2f} ours {ours:.2f} "
                          f"x{r['speedup']:.2f} ({r['frac_ideal']:.0%} of ideal) {r['ours_tbps']:.2f} TB/s", flush=True)
            del w, wt
            torch.cuda.empty_cache()
            pd.DataFrame(rows).to_csv(out / "kernel_bench_gemv.csv", index=False)
    df = pd.DataFrame(rows)
    return df


def rsparse_table(out: pathlib.Path, rep_ms: int = 30, shapes=MLP_SHAPES,
                  points=((0.5, 0.9), (0.5, 0.8), (0.5, 0.5), (0.4, 0.9), (0.7, 0.9)),
                  device: str = "cuda") -> pd.DataFrame:
    """R-Sparse layer at s=0.5: fused time vs sparse-only time at the same kept channels."""
    import torch
    import torch.nn.functional as F

    from allocator.costs import rsparse_split
    from allocator.kernels import rsparse_gemv_triton, rsparse_gemv_two_launch_triton, sparse_gemv_triton
    from allocator.kernels.latency import THRESHOLD, graph_time_us, sparse_input
    from allocator.kernels.rsparse import default_low_rank_config

    dev = torch.device(device)
    rows = []
    for d_out, d_in in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            w, wt = _weights(d_out, d_in, dtype, dev)
            x0 = sparse_input(1, d_in, 0.0, dtype, dev)
            dense = graph_time_us([lambda m=m: F.linear(x0, m) for m in w], rep_ms)
            del w
            for s, rho in points:
                kept_frac = (1 - s) * rho
                _, rank = rsparse_split(d_out=d_out, d_in=d_in, s=s, rho=rho)
                x = sparse_input(1, d_in, 1 - kept_frac, dtype, dev)
                lr = [(torch.randn(d_in, rank, device=dev, dtype=dtype) * 0.05,
                       torch.randn(rank, d_out, device=dev, dtype=dtype) * 0.05) for _ in wt]
                sparse_only = graph_time_us([lambda m=m: sparse_gemv_triton(x, m, THRESHOLD) for m in wt], rep_ms)
                fused = graph_time_us(
                    [lambda m=m, f=f: rsparse_gemv_triton(x, m, f[0], f[1], THRESHOLD) for m, f in zip(wt, lr)], rep_ms
                )
                two_launch = graph_time_us(
                    [lambda m=m, f=f: rsparse_gemv_two_launch_triton(x, m, f[0], f[1], THRESHOLD)
                     for m, f in zip(wt, lr)], rep_ms
                )
                low_rank_only = graph_time_us(
                    [lambda f=f: sparse_gemv_triton(x, f[0], THRESHOLD, invert=True, out_dtype=torch.float32,
                                                    config=default_low_rank_config(d_in, rank)) for f in lr], rep_ms
                )
                sparse_bytes = kept_frac * d_in * d_out
                lr_bytes = rank * (d_in * (1 - kept_frac) + d_out)
                share_sparse = lr_bytes / sparse_bytes
                share_dense = rank * (d_in + d_out) / (d_in * d_out)
                rows.append(dict(
                    d_out=d_out, d_in=d_in, dtype=str(dtype)[6:], s=s, rho=rho, kept=kept_frac, rank=rank,
                    dense_us=dense, sparse_only_us=sparse_only, fused_us=fused, two_launch_us=two_launch,
                    z_kernel_us=low_rank_only,
                    ratio=fused / sparse_only, lr_share_of_sparse_bytes=share_sparse,
                    lr_share_of_dense_bytes=share_dense, bound=1 + share_sparse + 0.10,
                    bound_strict=1 + share_dense + 0.10, speedup_vs_dense=dense / fused,
                ))
                r = rows[-1]
                print(f"rsparse {d_out}x{d_in} {r['dtype']} s={s} rho={rho} r={rank}: sparse-only {sparse_only:.2f} "
                      f"fused {fused:.2f} (x{r['ratio']:.3f}, bound x{r['bound']:.3f}/{r['bound_strict']:.3f}) "
                      f"two-launch {two_launch:.2f} z {low_rank_only:.2f} dense {dense:.2f}", flush=True)
                del lr
            del wt
            torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    df.to_csv(out / "kernel_bench_rsparse.csv", index=False)
    return df


def latency(out: pathlib.Path, device: str = "cuda") -> pd.DataFrame:
    """The latency evaluator's table for the Llama-3-8B and SmolLM2 projections (fused q|k|v and gate|up)."""
    import torch

    from allocator.kernels.latency import measure_latency_table

    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (960, 576), (576, 576), (3072, 576),
              (576, 1536)]
    df = measure_latency_table(shapes, sparsities=(0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), dtypes=(torch.float16,),
                               batches=(1,), rhos=(1.0, 0.9), rep_ms=10, paths=("standalone", "fused"), device=device)
    df.to_csv(out / "kernel_bench_latency.csv", index=False)
    return df


def _md_table(df: pd.DataFrame, cols: list[str], fmt: dict[str, str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def report(out: pathlib.Path, dest: pathlib.Path) -> None:
    """Markdown summary of the CSVs under `out` (gemv, rsparse, e2e if present)."""
    parts = ["# Sparse decode GEMV on the H100: results", "",
             "Generated by `python studies/kernel_bench.py report`; protocol in the module docstring of "
             "studies/kernel_bench.py. Times in microseconds (median, CUDA graphs, L2 defeated). "
             "speedup = cuBLAS dense / ours; frac = speedup x (1 - s), the fraction of the ideal 1/(1-s); "
             "TB/s = kept weight bytes / our time. s = 1.0 is the floor (every channel dropped). "
             "fallback = the same masked product through cuBLAS on the transposed Wt. Batch > 1: the mask "
             "(union over the rows) is at s. The committed file combines `kernel_bench.py all` (GEMV), "
             "`kernel_bench.py rsparse` (after the last R-Sparse change), `kernel_bench.py indexed` / "
             "`producers` and `e2e_decode.py --modes sparse,fused,fused_pdl`, on one H100.", ""]
    g = out / "kernel_bench_gemv.csv"
    if g.exists():
        df = pd.read_csv(g)
        fmt = {"dense_us": "{:.2f}", "fallback_us": "{:.2f}", "ours_us": "{:.2f}", "speedup": "{:.2f}x",
               "frac_ideal": "{:.0%}", "ours_tbps": "{:.2f}", "dense_tbps": "{:.2f}", "s": "{:.2f}"}
        for (dtype, batch), sub in df.groupby(["dtype", "batch"], sort=False):
            parts += [f"## GEMV, {dtype}, batch {batch}", "",
                      _md_table(sub, ["d_out", "d_in", "s", "dense_us", "dense_tbps", "fallback_us", "ours_us",
                                      "speedup", "frac_ideal", "ours_tbps"], fmt), ""]
    r = out / "kernel_bench_rsparse.csv"
    if r.exists():
        df = pd.read_csv(r)
        fmt = {c: "{:.2f}" for c in ("dense_us", "sparse_only_us", "fused_us", "two_launch_us", "z_kernel_us", "kept")}
        fmt.update({"ratio": "{:.3f}", "bound": "{:.3f}", "bound_strict": "{:.3f}", "speedup_vs_dense": "{:.2f}x"})
        parts += ["## R-Sparse fused layer (sparse + low-rank of the dropped channels)", "",
                  "ratio = fused / sparse-only at the same kept channels; bound = 1 + low-rank bytes / sparse "
                  "bytes + 10%; bound_strict = 1 + low-rank bytes / dense bytes + 10%.", "",
                  _md_table(df, ["d_out", "d_in", "dtype", "s", "rho", "rank", "dense_us", "sparse_only_us",
                                 "z_kernel_us", "two_launch_us", "fused_us", "ratio", "bound", "bound_strict", "speedup_vs_dense"],
                            fmt), ""]
    ix = out / "kernel_bench_indexed.csv"
    if ix.exists():
        df = pd.read_csv(ix)
        fmt = {c: "{:.2f}" for c in ("dense_us", "indexed_us", "scan_atomic_us", "standalone_us")}
        fmt.update({"speedup_indexed": "{:.2f}x", "speedup_standalone": "{:.2f}x", "frac_ideal_indexed": "{:.0%}",
                    "s": "{:.2f}"})
        parts += ["## GEMV with the kept lists from the producer (kernels/pipelined.py), float16, batch 1", "",
                  "indexed = the kept channel lists written by the kernel that produces x (its cost is in the "
                  "producer table below), split-K partials added atomically into an fp32 buffer that the consumer "
                  "clears; scan_atomic = the GEMV compacts itself, atomic accumulation; standalone = `sparse_gemv` "
                  "(compacts itself, last-arriver reduction, writes y in the model dtype). Tile and splits per shape "
                  "tuned at s = 0.5 (`kernel_bench.py indexed`).", "",
                  _md_table(df, ["d_out", "d_in", "s", "dense_us", "standalone_us", "scan_atomic_us", "indexed_us",
                                 "speedup_standalone", "speedup_indexed", "frac_ideal_indexed"], fmt), ""]
    pr = out / "kernel_bench_producers.csv"
    if pr.exists():
        df = pd.read_csv(pr)
        parts += ["## Producer kernels of a Llama-3-8B step (float16, one call, CUDA graph)", "",
                  "Plain kernels (decode_ops.py) against the versions that also write the next GEMV's kept lists "
                  "(`_compact`: one program, a variant since removed, kernels/NOTES.md 10; `_split`: one program per K "
                  "split, the one the fused step uses) or "
                  "read its accumulator (`_from_acc`).", "",
                  _md_table(df, ["kernel", "us"], {"us": "{:.2f}"}), ""]
    e = out / "e2e_decode.csv"
    if e.exists():
        df = pd.read_csv(e)
        if "mode" not in df:
            df["mode"] = ["dense" if s == 0 else "sparse" for s in df["target_s"]]
        fmt = {"tokens_per_s": "{:.1f}", "step_us": "{:.1f}", "speedup": "{:.3f}x", "measured_s": "{:.3f}",
               "amdahl_ceiling": "{:.2f}x"}
        parts += ["## End-to-end decode, batch 1 (random weights, CUDA graph of a whole step)", "",
                  "Modes (kernels/llama_decode.py): dense = cuBLAS projections; sparse = `sparse_gemv` per "
                  "projection; fused = kept lists from the producing kernel + atomic accumulation; fused_pdl = "
                  "fused, every kernel launched with programmatic dependent launch. All modes share the fused "
                  "norm / RoPE / SiLU kernels and the split-KV decode attention; context ~500 tokens.", "",
                  _md_table(df, ["model", "dtype", "layers", "mode", "target_s", "measured_s", "step_us",
                                 "tokens_per_s", "speedup", "amdahl_ceiling"], fmt), ""]
    lg = out / "e2e_logits_check.csv"
    if lg.exists():
        df = pd.read_csv(lg)
        parts += ["## Logits check: SmolLM2-135M-shaped random model, kernels vs PyTorch reference path", "",
                  _md_table(df, list(df.columns), {"max_abs_diff": "{:.3g}", "rel_err": "{:.3g}",
                                                   "rel_err_fused": "{:.3g}", "top1_agree": "{:.2f}",
                                                   "top1_agree_fused": "{:.2f}", "rel_err_sparse_vs_dense": "{:.3f}"}),
                  "", "rel_err_sparse_vs_dense: how far the sparse model's logits are from the dense model's "
                  "(the sensitivity of this random 30-layer model).", ""]
    dest.write_text("\n".join(parts) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["all", "tune", "gemv", "rsparse", "report", "explore", "latency", "indexed",
                                    "producers"])
    add_common_args(p, device="cuda", quick="one shape per table, s in {0, 0.5}, one R-Sparse point (a smoke run)",
                    seed="torch seed of the random weights and masks")
    p.add_argument("--tuned", type=pathlib.Path, help="tuned.json from a previous `tune`")
    p.add_argument("--dest", type=pathlib.Path, help="the markdown `report` writes (default: OUT/kernel_bench.md; the "
                   "committed one: studies/results/kernel_bench_h100.md)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "report":
        report(a.out, a.dest or a.out / "kernel_bench.md")
        return
    import torch

    torch.manual_seed(a.seed)
    dev, t0 = a.device, time.time()
    cut = (lambda shapes: shapes[:1]) if a.quick else (lambda shapes: shapes)
    if a.what == "explore":
        explore(a.out, device=dev)
        return
    if a.what == "indexed":
        indexed(a.out, shapes=cut(INDEXED_SHAPES), sparsities=(0.0, 0.5) if a.quick else (0.0, 0.4, 0.5, 0.7, 0.9),
                device=dev)
        return
    if a.what == "producers":
        producers(a.out, device=dev)
        return
    if a.what == "latency":
        if a.tuned:
            load_tuned(a.tuned)
        latency(a.out, device=dev)
        return
    if a.what in ("all", "tune"):
        tune(a.out, cut(SHAPES) + cut(E2E_SHAPES), device=dev)
        load_tuned(a.out / "tuned.json")
    elif a.tuned:
        load_tuned(a.tuned)
    print(f"[{time.time() - t0:.0f}s]", flush=True)
    if a.what in ("all", "gemv"):
        gemv_table(a.out, shapes=cut(SHAPES), sparsities=[0.0, 0.5] if a.quick else SPARSITIES, device=dev)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
    if a.what in ("all", "rsparse"):
        rsparse_table(a.out, shapes=cut(MLP_SHAPES), device=dev,
                      **({"points": ((0.5, 0.9),)} if a.quick else {}))
        print(f"[{time.time() - t0:.0f}s]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
