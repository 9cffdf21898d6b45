"""Latency evaluator: measured decode-GEMV latency per (shape, sparsity, rho, dtype, batch) on this GPU.

Why: the kernel time is not proportional to the kept bytes (a launch + compaction floor, tile effects,
small shapes that are launch-bound), and that changes which layers are worth sparsifying. The core attaches
`latency_cost_matrix(...)` to its Tables as the cost kind `latency_decode`.

Protocol (same as studies/kernel_bench.py): every call is captured in a CUDA graph that cycles through
enough weight copies (>= 300 MB) that the 50 MB L2 cannot hold them; the graph is replayed under
`triton.testing.do_bench` and the median per call is kept. Masks are random and unstructured at exactly s,
shared by the batch rows (s is the sparsity of the union of the masks: with independent per-token masks the
union keeps 1 - s**B of the channels). rho < 1 rows time the R-Sparse layer (sparse + low-rank) with
R-Sparse's own (s, rho) -> (kept, rank) mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

logger = logging.getLogger(__name__)

COLUMNS = ["gpu", "d_out", "d_in", "s", "rho", "dtype", "batch", "latency_us", "dense_us", "path"]
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
) -> pd.DataFrame:
    """One row per (shape, s, rho, dtype, batch, path): median latency of our op and of the cuBLAS dense GEMV.
    path "fused" (rho = 1, batch 1): the GEMV of the fused decode step, kept lists given by the producer."""
    from .rsparse import rsparse_gemv_triton, rsparse_rank
    from .gemv import sparse_gemv_triton
    from .pipelined import SiteBuffers, indexed_gemv, plan_site

    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown latency path(s) {sorted(unknown)}; use {PATHS}")

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
                for rho in rhos:
                    lr = None
                    for s in sparsities:
                        x = sparse_input(batch, d_in, s if rho >= 1 else 1 - (1 - s) * rho, dtype, device, g)
                        if rho >= 1:
                            calls = [lambda m=m: sparse_gemv_triton(x, m, THRESHOLD) for m in wt]
                        else:
                            _, rank = rsparse_rank(d_in, d_out, s, rho)
                            lr = [
                                (torch.randn(d_in, rank, device=device, dtype=dtype) * 0.05,
                                 torch.randn(rank, d_out, device=device, dtype=dtype) * 0.05)
                                for _ in range(len(wt))
                            ]
                            calls = [
                                lambda m=m, f=f: rsparse_gemv_triton(x, m, f[0], f[1], THRESHOLD)
                                for m, f in zip(wt, lr)
                            ]
                        us = graph_time_us(calls, rep_ms)
                        rows.append([gpu, d_out, d_in, s, rho, str(dtype).removeprefix("torch."), batch, us, dense_us,
                                     "standalone"])
                        logger.info("%s %dx%d s=%.2f rho=%.2f b=%d: %.2f us (dense %.2f)", dtype, d_out, d_in, s,
                                    rho, batch, us, dense_us)
                        if "fused" in paths and rho >= 1 and batch == 1:
                            site = SiteBuffers(plan_site(d_in, d_out, device), device)
                            producer_lists(x, site)
                            us = graph_time_us([lambda m=m: indexed_gemv(x, m, site) for m in wt], rep_ms)
                            rows.append([gpu, d_out, d_in, s, rho, str(dtype).removeprefix("torch."), batch, us,
                                         dense_us, "fused"])
                    del lr
            del w, wt
            torch.cuda.empty_cache()
    return pd.DataFrame(rows, columns=COLUMNS)


def producer_lists(x: torch.Tensor, site) -> None:
    """Fill a site's kept lists as the producing kernel would for this x (|x| > THRESHOLD per K split)."""
    keep = x.float().abs().reshape(-1) > THRESHOLD
    ks = site.plan.k_split
    for s in range(site.plan.n_splits):
        kept = torch.nonzero(keep[s * ks:(s + 1) * ks]).flatten().to(torch.int32) + s * ks
        site.idx[s * ks:s * ks + kept.numel()] = kept
        site.cnt[s] = kept.numel()


def _levels_frame(levels) -> pd.DataFrame:
    if isinstance(levels, pd.DataFrame):
        df = levels.copy()
    else:
        items = [lv if isinstance(lv, (tuple, list)) else (lv, 1.0) for lv in levels]
        df = pd.DataFrame(items, columns=["s", "rho"])
    if "rho" not in df:
        df["rho"] = 1.0
    return df.fillna({"rho": 1.0})


def latency_cost_matrix(
    df: pd.DataFrame,
    units_shapes: Sequence[Sequence[tuple[int, int]]],
    levels,
    dtype: str = "float16",
    batch: int = 1,
    gpu: str | None = None,
    with_fallback: bool = True,
    path: str = "standalone",
) -> np.ndarray:
    """Decode latency in microseconds, shape (n_units, n_levels).

    units_shapes[u] lists the (d_out, d_in) projections of unit u; levels is a sequence of s values, of
    (s, rho) pairs, or a DataFrame with columns s (and rho). Each projection takes the row of its shape with
    the nearest measured s (and nearest rho); `with_fallback` takes min(kernel, dense) as the op does.
    `path` picks the kernel path ("fused": the decode step of pipelined.py; tables without a path column are
    standalone). A shape that was not measured raises KeyError.
    """
    table = df[(df["dtype"] == dtype) & (df["batch"] == batch)]
    if "path" in table:
        table = table[table["path"].fillna("standalone") == path]
    if gpu is None:
        gpu = table["gpu"].iloc[0]
    table = table[table["gpu"] == gpu]
    lv = _levels_frame(levels)
    out = np.zeros((len(units_shapes), len(lv)))
    for u, shapes in enumerate(units_shapes):
        for d_out, d_in in shapes:
            rows = table[(table["d_out"] == d_out) & (table["d_in"] == d_in)]
            if rows.empty:
                raise KeyError(f"no latency measured for shape {d_out}x{d_in} ({dtype}, batch {batch}, {gpu})")
            for j, (s, rho) in enumerate(zip(lv["s"], lv["rho"])):
                near_rho = rows[(rows["rho"] - rho).abs() == (rows["rho"] - rho).abs().min()]
                row = near_rho.iloc[int(np.argmin((near_rho["s"] - s).abs().to_numpy()))]
                us = row["latency_us"]
                if with_fallback:
                    us = min(us, row["dense_us"])
                out[u, j] += us
    return out
