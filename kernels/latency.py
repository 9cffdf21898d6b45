"""Latency evaluator: measured decode-GEMV latency per (shape, sparsity, rho, dtype, batch, format) and prefill
GEMM latency per (shape, tokens, prefill kernel) on this GPU.

Why: the kernel time is not proportional to the kept bytes (a launch + compaction floor, tile effects,
small shapes that are launch-bound), and that changes which layers are worth sparsifying. The core attaches
`latency_cost_matrix(...)` to its Tables as the cost kind `latency_decode`.

Protocol (same as studies/kernel_bench.py): every call is captured in a CUDA graph that cycles through
enough weight copies (>= 300 MB) that the 50 MB L2 cannot hold them; the graph is replayed under
`triton.testing.do_bench` and the median per call is kept. Masks are random and unstructured at exactly s,
shared by the batch rows (s is the sparsity of the union of the masks: with independent per-token masks the
union keeps 1 - s**B of the channels). rho < 1 rows time the R-Sparse layer (sparse + low-rank) with
the core's (s, rho) -> (kept, rank) mapping (`allocator.costs.rsparse_split`).

Formats (issue 12): a low-bit format's decode rows time the runtime's low-bit GEMV (`runtime.decode_lowbit_gemv`:
INT4 / INT8 weights, FP8 weights with e4m3 inputs) on random packed weights, over as many copies; its dense_us is
still cuBLAS bf16. Prefill rows (`measure_prefill_table`) time the bf16 GEMM and the W8A8 FP8 path; the cost kinds
`latency_decode` and `latency_prefill` (`allocator.cost_providers`) read them per level format.

The table formats (`COLUMNS`, `PREFILL_COLUMNS`) and `latency_cost_matrix` live in the torch-free core
(`allocator.cost_providers`), so a saved table prices a problem without torch; they are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pandas as pd
import torch

from allocator.cost_providers import LATENCY_COLUMNS as COLUMNS
from allocator.cost_providers import PREFILL_COLUMNS
from allocator.cost_providers import latency_cost_matrix  # noqa: F401  (re-exported)
from allocator.costs import rsparse_split
from allocator.formats import DECODE_KERNELS, PER_CHANNEL, decode_kernel, get_format

logger = logging.getLogger(__name__)

PATHS = ("standalone", "fused")  # sparse_gemv per call | inside the fused decode step (pipelined.py)
ROTATE_BYTES = 300 * 2**20
THRESHOLD = 0.05  # kept activations have |x| > 0.1, dropped ones |x| < 0.04


def graph_time_us(calls: Sequence[Callable[[], object]], rep_ms: int = 40) -> float:
    """Median time of one call, from a CUDA graph that runs every call of `calls` in order."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:  # warm up (compilation, workspace growth) outside the capture
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")
    return ms * 1e3 / len(calls)


def n_copies_for(bytes_per_copy: int, min_bytes: int = ROTATE_BYTES, cap: int = 2000) -> int:
    return int(min(cap, max(2, -(-min_bytes // max(bytes_per_copy, 1)))))


def sparse_input(
    batch: int, d_in: int, s: float, dtype: torch.dtype, device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x [batch, d_in] whose union mask at THRESHOLD drops exactly round(s * d_in) channels (random)."""
    g = generator
    n_drop = int(round(s * d_in))
    drop = torch.randperm(d_in, generator=g, device="cpu")[:n_drop].to(device)
    kept = (0.1 + torch.randn(batch, d_in, generator=g, device="cpu").abs()) * torch.sign(
        torch.randn(batch, d_in, generator=g, device="cpu")
    )
    small = (torch.rand(batch, d_in, generator=g, device="cpu") * 2 - 1) * 0.04
    x = kept.to(device)
    x[:, drop] = small.to(device)[:, drop]
    return x.to(dtype)


def measure_latency_table(
    shapes: Sequence[tuple[int, int]],  # (d_out, d_in)
    sparsities: Sequence[float] = (0.0, 0.25, 0.4, 0.5, 0.7, 0.9),
    dtypes: Sequence[torch.dtype] = (torch.float16,),
    batches: Sequence[int] = (1,),
    rhos: Sequence[float] = (1.0,),
    device: str | torch.device = "cuda",
    rep_ms: int = 40,
    seed: int = 0,
    paths: Sequence[str] = ("standalone",),
    formats: Sequence[str] = ("bf16",),
) -> pd.DataFrame:
    """One row per (shape, s, rho, dtype, batch, path, fmt): median latency of our op and of the cuBLAS dense GEMV.
    path "fused" (rho = 1, batch 1): the GEMV of the fused decode step, kept lists given by the producer. A low-bit
    ``fmt`` (``allocator.formats.decode_kernel``) times the runtime's low-bit GEMV (``runtime.decode_lowbit_gemv``,
    standalone, rho = 1 only; s = 0: the dense low-bit path)."""
    from .pipelined import SiteBuffers, indexed_gemv, plan_site

    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown latency path(s) {sorted(unknown)}; use {PATHS}")
    if not formats:
        raise ValueError("no format to time")
    lowbit = [f for f in formats if decode_kernel(f) != "bf16"]
    sixteen_bit = len(lowbit) < len(formats)
    missing = [f for f in lowbit if decode_kernel(f) is None]
    if missing:
        raise ValueError(f"formats {missing} have no decode kernel; low-bit decode runs {DECODE_KERNELS[1:]} weights")

    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for d_out, d_in in shapes:
        for dtype in dtypes:
            itemsize = torch.finfo(dtype).bits // 8
            copies = n_copies_for(d_out * d_in * itemsize)
            w = [torch.randn(d_out, d_in, device=device, dtype=dtype) * d_in**-0.5 for _ in range(copies)]
            wt = [m.T.contiguous() for m in w]
            for batch in batches:
                xd = sparse_input(batch, d_in, 0.0, dtype, device, g)
                dense_us = graph_time_us([lambda m=m: torch.nn.functional.linear(xd, m) for m in w], rep_ms)
                for fmt in lowbit:
                    rows += _lowbit_rows(gpu, fmt, d_out, d_in, sparsities, dtype, batch, dense_us, device, g,
                                         rep_ms)
                if not sixteen_bit:
                    continue
                for rho in rhos:
                    for s in sparsities:
                        _, rank = rsparse_split(d_out=d_out, d_in=d_in, s=s, rho=rho)
                        x = sparse_input(batch, d_in, s if rank == 0 else 1 - (1 - s) * rho, dtype, device, g)
                        us = graph_time_us(_layer_calls(x, wt, rank, THRESHOLD), rep_ms)
                        rows.append([gpu, d_out, d_in, s, rho, str(dtype).removeprefix("torch."), batch, us, dense_us,
                                     "standalone", "bf16"])
                        logger.info("%s %dx%d s=%.2f rho=%.2f b=%d: %.2f us (dense %.2f)", dtype, d_out, d_in, s,
                                    rho, batch, us, dense_us)
                        if "fused" in paths and rho >= 1 and batch == 1:
                            site = SiteBuffers(plan_site(d_in, d_out, device), device)
                            producer_lists(x, site)
                            us = graph_time_us([lambda m=m: indexed_gemv(x, m, site) for m in wt], rep_ms)
                            rows.append([gpu, d_out, d_in, s, rho, str(dtype).removeprefix("torch."), batch, us,
                                         dense_us, "fused", "bf16"])
            del w, wt
            torch.cuda.empty_cache()
    return pd.DataFrame(rows, columns=COLUMNS)


def random_decode_weight(fmt: str, d_out: int, d_in: int, device, generator: torch.Generator | None = None):
    """A random ``runtime.DecodeWeight`` of format ``fmt`` (its kernel's layout, group and input type)."""
    from .lowbit_gemv import GROUP, pack_fp8, pack_int4, pack_int8
    from .runtime import DecodeWeight

    kernel, f = decode_kernel(fmt), get_format(fmt)
    w = torch.randn(d_out, d_in, generator=generator).to(device) * d_in**-0.5
    if kernel == "int4":
        return DecodeWeight(pack_int4(w, GROUP if f.group == PER_CHANNEL else f.group))
    if kernel == "int8":
        return DecodeWeight(pack_int8(w))
    if kernel == "fp8":
        return DecodeWeight(pack_fp8(w), act="fp8")
    raise ValueError(f"format {fmt} has no low-bit decode kernel")


def _lowbit_rows(gpu, fmt, d_out, d_in, sparsities, dtype, batch, dense_us, device, g, rep_ms) -> list[list]:
    from .runtime import decode_lowbit_gemv

    first = random_decode_weight(fmt, d_out, d_in, device, g)
    weights = [first] + [random_decode_weight(fmt, d_out, d_in, device, g)
                         for _ in range(n_copies_for(first.weight.nbytes) - 1)]
    rows = []
    for s in sparsities:
        x = sparse_input(batch, d_in, s, dtype, device, g)
        thr = THRESHOLD if s > 0 else None
        us = graph_time_us([lambda w=w: decode_lowbit_gemv(x, w, thr) for w in weights], rep_ms)
        rows.append([gpu, d_out, d_in, s, 1.0, str(dtype).removeprefix("torch."), batch, us, dense_us, "standalone",
                     fmt])
        logger.info("%s %s %dx%d s=%.2f b=%d: %.2f us (bf16 dense %.2f)", fmt, dtype, d_out, d_in, s, batch, us,
                    dense_us)
    return rows


def _layer_calls(x: torch.Tensor, wt: list[torch.Tensor], rank: int, threshold: float) -> list[Callable[[], object]]:
    """One call per weight copy: the sparse GEMV, or the R-Sparse layer with random rank-`rank` factors.

    rank 0 (s = 0 or rho = 1 in the core's mapping) is the plain sparse GEMV, as the cost model prices it."""
    from .gemv import sparse_gemv_triton
    from .rsparse import rsparse_gemv_triton

    if rank == 0:
        return [lambda m=m: sparse_gemv_triton(x, m, threshold) for m in wt]
    d_in, d_out = wt[0].shape
    factors = [(torch.randn(d_in, rank, device=x.device, dtype=x.dtype) * 0.05,
                torch.randn(rank, d_out, device=x.device, dtype=x.dtype) * 0.05) for _ in wt]
    return [lambda m=m, f=f: rsparse_gemv_triton(x, m, f[0], f[1], threshold) for m, f in zip(wt, factors)]


def producer_lists(x: torch.Tensor, site) -> None:
    """Fill a site's kept lists as the producing kernel would for this x (|x| > THRESHOLD per K split)."""
    keep = x.float().abs().reshape(-1) > THRESHOLD
    ks = site.plan.k_split
    for s in range(site.plan.n_splits):
        kept = torch.nonzero(keep[s * ks:(s + 1) * ks]).flatten().to(torch.int32) + s * ks
        site.idx[s * ks:s * ks + kept.numel()] = kept
        site.cnt[s] = kept.numel()


def measure_prefill_table(
    shapes: Sequence[tuple[int, int]],  # (d_out, d_in)
    tokens: Sequence[int] = (512, 2048),
    kernels: Sequence[str] = ("bf16", "fp8"),
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    rep_ms: int = 40,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (shape, tokens, kernel) (``PREFILL_COLUMNS``): median time of one prefill GEMM as the runtime
    runs it. "bf16": ``F.linear`` on the row-major weight (weight-only formats prefill so, on their dequantized
    weights); "fp8": ``fp8_prefill.fp8_linear`` (the one-pass Triton per-token quantization of x + rowwise
    ``torch._scaled_mm``). Weight copies rotate (>= 300 MB) so that the L2 holds none of them."""
    from .fp8_prefill import fp8_linear, pack_fp8_weight

    unknown = set(kernels) - {"bf16", "fp8"}
    if unknown:
        raise ValueError(f"unknown prefill kernel(s) {sorted(unknown)}; use bf16, fp8")
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for d_out, d_in in shapes:
        copies = n_copies_for(d_out * d_in * 2)
        w = [(torch.randn(d_out, d_in, generator=g) * d_in**-0.5).to(device=device, dtype=dtype) for _ in range(copies)]
        fp8 = [pack_fp8_weight(m) for m in w] if "fp8" in kernels else []
        for t in tokens:
            x = torch.randn(t, d_in, generator=g).to(device=device, dtype=dtype)
            calls = {"bf16": [lambda m=m: torch.nn.functional.linear(x, m) for m in w],
                     "fp8": [lambda m=m: fp8_linear(x, m, out_dtype=dtype) for m in fp8]}
            for kernel in kernels:
                us = graph_time_us(calls[kernel], rep_ms)
                rows.append([gpu, d_out, d_in, t, kernel, str(dtype).removeprefix("torch."), us])
                logger.info("prefill %s %dx%d T=%d: %.1f us", kernel, d_out, d_in, t, us)
        del w, fp8
        torch.cuda.empty_cache()
    return pd.DataFrame(rows, columns=PREFILL_COLUMNS)
