"""Activation-sparse decode GEMV: y = (x * m) @ Wt with m = score(x) > threshold.

Why this shape of kernel. At decode the matrix-vector product is bound by weight bytes, so skipping input
channel j must skip its weights. The weight is stored transposed, Wt [K, N] row-major, so channel j is one
contiguous row of N elements and a skipped channel is one skipped row (the reads that remain stay coalesced).
A TEAL-style split-K kernel launches every (N-tile, K-tile) program whatever the mask, reduces with fp32
atomics and needs an output memset: on the H100 that floor is ~40% of the dense time (see
../shared/research/activation_sparsity.md, section 6). Here the work is proportional to the kept channels:

* grid = (N-stripes, K-splits). Program (n, s) owns output columns [n*BN, (n+1)*BN) and input channels
  [s*KS, (s+1)*KS).
* It first **compacts** the kept channels of its K range into an index list (fused threshold test, a cumsum,
  a scatter into a private scratch row that stays in L1/L2), then loops only over those rows, gathering
  BLOCK_K weight rows of its stripe at a time: through tensor cores (tl.dot, batch padded to 16 rows, loads
  pipelined by Triton) or through FMAs (hand-pipelined, two tiles in flight). A fully masked range costs
  one scan of x and nothing else.
* With one K split each program stores its stripe directly. With several, each writes an fp32 partial and
  the last program to finish a stripe (per-stripe arrival counter, acq_rel atomics) sums the partials in a
  fixed order, writes y and resets the counter to zero. No atomics on the data, no memset, deterministic.
* Batch 1..4 shares the union of the masks (a channel is kept if any row keeps it).
* Fused projections are plain column concatenations (gate|up, q|k|v): one mask, one launch. Up to three
  column segments may carry their own threshold (q, k, v at levels of their own; gate, up: two segments);
  segment boundaries must be multiples of BLOCK_N because each program picks the threshold of its stripe and
  compacts with it, so segment p's columns see exactly the channels |x_j| > t_p (`sparse_gemv_reference`
  masks each segment the same way; `default_config` halves the tile until it divides the boundaries).
* Extra dense rows (`extra_x @ extra_wt`, all kept) can be appended to the reduction: the R-Sparse kernel
  uses them for the low-rank up-projection U_r z (see rsparse.py).

Scores: |x_j| by default, or |x_j| * col_scale_j (col_scale = ||W[:, j]||_2 gives the R-Sparse / WINA score).
The PyTorch reference is `sparse_gemv_reference`. Shapes in comments: B batch, K inputs, N outputs.
Measured behaviour, floors and the variants that lost: kernels/NOTES.md.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

MAX_BATCH = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _compact_kept(x_ptr, scale_ptr, scratch_row, k_lo, k_hi, stride_xb, thr, BATCH: tl.constexpr,
                  SCAN_BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, INVERT: tl.constexpr):
    """Write the kept channels of [k_lo, k_hi) (union over the batch) in order into scratch_row; -> count."""
    count = 0
    for k0 in range(k_lo, k_hi, SCAN_BLOCK):
        k_offs = k0 + tl.arange(0, SCAN_BLOCK)
        k_in = k_offs < k_hi
        score = tl.zeros([SCAN_BLOCK], dtype=tl.float32)
        for b in tl.static_range(BATCH):
            xb = tl.load(x_ptr + b * stride_xb + k_offs, mask=k_in, other=0.0).to(tl.float32)
            score = tl.maximum(score, tl.abs(xb))
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + k_offs, mask=k_in, other=0.0)
        if INVERT:
            keep = (score <= thr) & k_in
        else:
            keep = (score > thr) & k_in
        keep_i = keep.to(tl.int32)
        pos = count + tl.cumsum(keep_i, axis=0) - 1
        tl.store(scratch_row + pos, k_offs, mask=keep)
        count += tl.sum(keep_i, axis=0)
    tl.debug_barrier()  # scratch written by all threads of the program before any reads it
    return count


@triton.jit
def _gather_rows_product(x_ptr, wt_ptr, scratch_row, count, n_offs, n_mask, b_offs, b_mask, N, stride_xb,
                         BATCH_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         USE_DOT: tl.constexpr):
    """acc [BATCH_PAD, BLOCK_N] = sum over the `count` channel indices j in scratch_row of x[:, j] * wt[j, stripe]."""
    acc = tl.zeros([BATCH_PAD, BLOCK_N], dtype=tl.float32)
    k_ar = tl.arange(0, BLOCK_K)
    if USE_DOT:  # tensor cores, batch padded to 16 rows; Triton pipelines the weight loads through shared memory
        for t0 in range(0, count, BLOCK_K):
            t_in = t0 + k_ar < count
            rows = tl.load(scratch_row + t0 + k_ar, mask=t_in, other=0)
            w = tl.load(wt_ptr + rows.to(tl.int64)[:, None] * N + n_offs[None, :],
                        mask=t_in[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            xv = tl.load(x_ptr + b_offs[:, None] * stride_xb + rows[None, :],
                         mask=b_mask[:, None] & t_in[None, :], other=0.0)  # [BATCH_PAD, BLOCK_K]
            w = w.to(x_ptr.dtype.element_ty)  # INT8 / FP8 codes (pipelined.indexed_gemv): exact in 16 bits
            acc = tl.dot(xv.to(w.dtype), w, acc, input_precision="ieee")
    else:
        # FMA path, software-pipelined by hand: two weight tiles (A, B) in flight while one is consumed,
        # indices prefetched a tile pair ahead; the reduction over rows happens once, after the loop.
        acc3 = tl.zeros([BATCH_PAD, BLOCK_K, BLOCK_N], dtype=tl.float32)
        rows_a = tl.load(scratch_row + k_ar, mask=k_ar < count, other=0)
        w_a = tl.load(wt_ptr + rows_a.to(tl.int64)[:, None] * N + n_offs[None, :],
                      mask=(k_ar < count)[:, None] & n_mask[None, :], other=0.0)
        x_a = tl.load(x_ptr + b_offs[:, None] * stride_xb + rows_a[None, :],
                      mask=b_mask[:, None] & (k_ar < count)[None, :], other=0.0)
        rows_b = tl.load(scratch_row + BLOCK_K + k_ar, mask=BLOCK_K + k_ar < count, other=0)
        for t0 in range(0, count, 2 * BLOCK_K):
            in_b = t0 + BLOCK_K + k_ar < count
            w_b = tl.load(wt_ptr + rows_b.to(tl.int64)[:, None] * N + n_offs[None, :],
                          mask=in_b[:, None] & n_mask[None, :], other=0.0)
            x_b = tl.load(x_ptr + b_offs[:, None] * stride_xb + rows_b[None, :],
                          mask=b_mask[:, None] & in_b[None, :], other=0.0)
            in_a2 = t0 + 2 * BLOCK_K + k_ar < count
            in_b2 = t0 + 3 * BLOCK_K + k_ar < count
            rows_a2 = tl.load(scratch_row + t0 + 2 * BLOCK_K + k_ar, mask=in_a2, other=0)
            rows_b2 = tl.load(scratch_row + t0 + 3 * BLOCK_K + k_ar, mask=in_b2, other=0)
            acc3 += x_a.to(tl.float32)[:, :, None] * w_a.to(tl.float32)[None, :, :]
            w_a = tl.load(wt_ptr + rows_a2.to(tl.int64)[:, None] * N + n_offs[None, :],
                          mask=in_a2[:, None] & n_mask[None, :], other=0.0)
            x_a = tl.load(x_ptr + b_offs[:, None] * stride_xb + rows_a2[None, :],
                          mask=b_mask[:, None] & in_a2[None, :], other=0.0)
            acc3 += x_b.to(tl.float32)[:, :, None] * w_b.to(tl.float32)[None, :, :]
            rows_b = rows_b2
        acc += tl.sum(acc3, axis=1)
    return acc


@triton.jit
def _kept_rows_product(
    x_ptr, wt_ptr, scale_ptr, scratch_row, n_offs, n_mask, b_offs, b_mask, k_lo, k_hi, N, stride_xb, thr,
    BATCH: tl.constexpr, BATCH_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, INVERT: tl.constexpr, USE_DOT: tl.constexpr,
):
    """acc [BATCH_PAD, BLOCK_N] = sum over kept channels j in [k_lo, k_hi) of x[:, j] * wt[j, stripe]:
    1. compact the kept channels into this program's scratch row, 2. gather and accumulate those rows."""
    count = _compact_kept(x_ptr, scale_ptr, scratch_row, k_lo, k_hi, stride_xb, thr, BATCH, SCAN_BLOCK,
                          HAS_SCALE, INVERT)
    return _gather_rows_product(x_ptr, wt_ptr, scratch_row, count, n_offs, n_mask, b_offs, b_mask, N, stride_xb,
                                BATCH_PAD, BLOCK_N, BLOCK_K, USE_DOT)


@triton.jit
def _dense_rows_product(acc, ex_ptr, ewt_ptr, r_lo, r_hi, R, N, n_offs, n_mask, b_offs, b_mask,
                        BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    """acc += ex[:, r_lo:r_hi] @ ewt[r_lo:r_hi, stripe] (ex fp32 [B, R], all rows kept)."""
    for r0 in range(r_lo, r_hi, BLOCK_K):
        r_offs = r0 + tl.arange(0, BLOCK_K)
        r_in = r_offs < r_hi
        w = tl.load(ewt_ptr + r_offs.to(tl.int64)[:, None] * N + n_offs[None, :],
                    mask=r_in[:, None] & n_mask[None, :], other=0.0)
        zv = tl.load(ex_ptr + b_offs[:, None] * R + r_offs[None, :], mask=b_mask[:, None] & r_in[None, :], other=0.0,
                     cache_modifier=".cg")
        if USE_DOT:  # z rounded to the weight dtype: an fp32 "ieee" dot here spills the whole kernel
            acc = tl.dot(zv.to(w.dtype), w, acc, input_precision="ieee")
        else:
            acc += tl.sum(zv[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _write_out(acc, y_ptr, partial_ptr, counter_ptr, pid_n, pid_s, n_splits, N, n_offs, n_mask, b_offs, b_mask,
               BATCH: tl.constexpr, BATCH_PAD: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE: tl.constexpr):
    """Store the stripe directly, or through fp32 partials summed (fixed order) by the last program to arrive.
    Returns whether this program wrote the stripe."""
    out_mask = b_mask[:, None] & n_mask[None, :]
    out_offs = b_offs[:, None] * N + n_offs[None, :]
    wrote = pid_s >= 0
    if REDUCE:
        tl.store(partial_ptr + pid_s * BATCH * N + out_offs, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is stored before the arrival is published
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        wrote = arrived == n_splits - 1
        if wrote:
            total = tl.zeros([BATCH_PAD, BLOCK_N], dtype=tl.float32)
            for s in range(0, n_splits):  # fixed order: deterministic result
                total += tl.load(partial_ptr + s * BATCH * N + out_offs, mask=out_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptr + out_offs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed")
    else:
        tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    return wrote


@triton.jit
def _sparse_gemv_kernel(
    x_ptr,  # [B, K] activations, row stride stride_xb
    wt_ptr,  # [K, N] transposed weight, row-major
    y_ptr,  # [B, N] output (written exactly once per element)
    scale_ptr,  # [K] fp32 score scale (read only if HAS_SCALE)
    scratch_ptr,  # [grid, k_split] int32 compacted channel indices, one private row per program
    partial_ptr,  # [n_splits, B, N] fp32 partial sums (used only if n_splits > 1)
    counter_ptr,  # [n_stripes] int32 arrival counters, zero at rest
    extra_x_ptr,  # [B, R] fp32 dense extra inputs (read only if HAS_EXTRA)
    extra_wt_ptr,  # [R, N] extra weight rows, same dtype as wt
    K, N, R, stride_xb,
    k_split,  # input channels per K split
    r_split,  # extra rows per K split
    n_splits,
    thr0, thr1, thr2,
    seg1,  # first column of segment 1 (threshold thr1); N if absent
    seg2,  # first column of segment 2 (threshold thr2); N if absent
    BATCH: tl.constexpr,
    BATCH_PAD: tl.constexpr,  # next power of two of BATCH (16 when USE_DOT)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    INVERT: tl.constexpr,  # keep the channels *below* the threshold (the R-Sparse low-rank branch)
    HAS_EXTRA: tl.constexpr,
    USE_DOT: tl.constexpr,  # tensor-core tl.dot with the batch padded to 16 rows, else FMA
    REDUCE: tl.constexpr,  # n_splits > 1
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_start = pid_n * BLOCK_N
    n_offs = n_start + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    b_offs = tl.arange(0, BATCH_PAD)
    b_mask = b_offs < BATCH
    thr = tl.where(n_start >= seg2, thr2, tl.where(n_start >= seg1, thr1, thr0))  # this stripe's segment
    k_lo = pid_s * k_split
    scratch_row = scratch_ptr + (pid_n * n_splits + pid_s).to(tl.int64) * k_split
    acc = _kept_rows_product(
        x_ptr, wt_ptr, scale_ptr, scratch_row, n_offs, n_mask, b_offs, b_mask, k_lo,
        tl.minimum(k_lo + k_split, K), N, stride_xb, thr,
        BATCH, BATCH_PAD, BLOCK_N, BLOCK_K, SCAN_BLOCK, HAS_SCALE, INVERT, USE_DOT,
    )
    if HAS_EXTRA:  # dense extra rows of this split: acc += extra_x[:, r] @ extra_wt[r, stripe]
        r_lo = pid_s * r_split
        acc = _dense_rows_product(acc, extra_x_ptr, extra_wt_ptr, r_lo, tl.minimum(r_lo + r_split, R), R, N,
                                  n_offs, n_mask, b_offs, b_mask, BLOCK_K, USE_DOT)
    _write_out(acc, y_ptr, partial_ptr, counter_ptr, pid_n, pid_s, n_splits, N, n_offs, n_mask, b_offs, b_mask,
               BATCH, BATCH_PAD, BLOCK_N, REDUCE)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch parameters. n_splits=0 means: choose so that the grid covers the GPU about `waves` times."""

    block_n: int = 128
    block_k: int = 32
    n_splits: int = 0
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False
    scan_block: int = 1024


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


# Best (block_n, block_k, n_splits, num_warps, num_stages, use_dot) per (K, N, batch) measured on the H100 at
# s = 0 and 0.5 by `studies/kernel_bench.py tune` (fp16, batch 1). Other GPUs: rerun the tune and load_tuned().
TUNED_CONFIGS: dict[tuple[int, int, int], GemvConfig] = {
    (4096, 4096, 1): GemvConfig(64, 32, 16, 1, 2, False),  # 4096x4096
    (4096, 6144, 1): GemvConfig(128, 128, 8, 4, 3, True),  # 6144x4096
    (4096, 14336, 1): GemvConfig(256, 64, 4, 8, 4, True),  # 14336x4096
    (14336, 4096, 1): GemvConfig(256, 64, 16, 8, 4, True),  # 4096x14336
    (4096, 11008, 1): GemvConfig(128, 64, 4, 4, 3, True),  # 11008x4096
    (11008, 4096, 1): GemvConfig(256, 64, 16, 8, 4, True),  # 4096x11008
    (576, 576, 1): GemvConfig(128, 128, 4, 4, 3, True),  # 576x576
    (576, 1536, 1): GemvConfig(128, 128, 4, 4, 3, True),  # 1536x576
    (1536, 576, 1): GemvConfig(32, 32, 16, 1, 2, False),  # 576x1536
    (4096, 28672, 1): GemvConfig(256, 64, 2, 8, 4, True),  # 28672x4096
    (4096, 22016, 1): GemvConfig(256, 64, 4, 8, 4, True),  # 22016x4096
    (4096, 12288, 1): GemvConfig(128, 64, 4, 4, 3, True),  # 12288x4096
    (576, 960, 1): GemvConfig(128, 128, 4, 4, 3, True),  # 960x576
    (576, 3072, 1): GemvConfig(128, 128, 4, 4, 3, True),  # 3072x576
}


def default_config(K: int, N: int, batch: int, device: torch.device, segments: tuple[int, ...] = ()) -> GemvConfig:
    """Launch parameters: the tuned entry for this shape if any, else a heuristic (see kernels/NOTES.md)."""
    tuned = TUNED_CONFIGS.get((K, N, batch))
    if tuned is None and (K, N, 1) in TUNED_CONFIGS:  # batch-1 tile, fewer rows per step for the FMA path
        tuned = TUNED_CONFIGS[(K, N, 1)]
        if batch > 2 and not tuned.use_dot:
            tuned = dataclasses.replace(tuned, block_k=max(16, tuned.block_k // 2))
    if tuned is not None and all(b % tuned.block_n == 0 for b in segments):
        return tuned
    block_n = 128
    # segment boundaries (fused q|k|v) must fall on stripe boundaries
    while block_n > 16 and any(b % block_n for b in segments):
        block_n //= 2
    if N <= 1024:
        block_n = min(block_n, 64)
    block_k = 32 if batch <= 2 else 16
    return GemvConfig(block_n=block_n, block_k=block_k)


def _pick_splits(K: int, N: int, cfg: GemvConfig, device: torch.device) -> int:
    if cfg.n_splits > 0:
        return max(1, min(cfg.n_splits, triton.cdiv(K, 16)))
    stripes = triton.cdiv(N, cfg.block_n)
    target = 2 * _sm_count(device)
    splits = max(1, round(target / stripes))
    splits = min(splits, max(1, K // 256))  # keep at least 256 channels per split
    return splits


class _Workspace:
    """Scratch, partials and arrival counters reused across calls (counters are zeroed once, reset by the
    kernel itself). One per device; calls on one stream are serialized so sharing is safe. Do not run two
    sparse GEMVs concurrently on different streams of one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.scratch = torch.empty(0, dtype=torch.int32, device=device)
        self.partial = torch.empty(0, dtype=torch.float32, device=device)
        self.counters = torch.zeros(0, dtype=torch.int32, device=device)

    def get(self, n_scratch: int, n_partial: int, n_counters: int):
        if self.scratch.numel() < n_scratch:
            self.scratch = torch.empty(n_scratch, dtype=torch.int32, device=self.device)
        if self.partial.numel() < n_partial:
            self.partial = torch.empty(n_partial, dtype=torch.float32, device=self.device)
        if self.counters.numel() < n_counters:
            self.counters = torch.zeros(max(n_counters, 1024), dtype=torch.int32, device=self.device)
        return self.scratch, self.partial, self.counters


_WORKSPACES: dict[torch.device, _Workspace] = {}


def _workspace(device: torch.device) -> _Workspace:
    if device not in _WORKSPACES:
        _WORKSPACES[device] = _Workspace(device)
    return _WORKSPACES[device]


def reserve_workspace(device: torch.device, K: int, N: int, batch: int = MAX_BATCH) -> None:
    """Allocate the workspace for a shape ahead of CUDA-graph capture (allocation during capture is
    allowed by PyTorch's graph pool, but growing a cached buffer inside a capture would not persist)."""
    ws = _workspace(torch.device(device))
    ws.get(4 * 1024 * (K + 1024), 64 * batch * N, 1024 + N)


def sparse_gemv_triton(
    x: torch.Tensor,  # [B, K] or [K]
    wt: torch.Tensor,  # [K, N]
    thresholds: float | list[float] | tuple[float, ...] = 0.0,
    segments: tuple[int, ...] = (),  # column starts of segments 1 and 2 (fused q|k|v), multiples of block_n
    col_scale: torch.Tensor | None = None,  # [K] fp32
    invert: bool = False,
    extra_x: torch.Tensor | None = None,  # [B, R] fp32
    extra_wt: torch.Tensor | None = None,  # [R, N]
    out_dtype: torch.dtype | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Launch the sparse GEMV kernel; returns y [B, N] (or [N] for a 1-D x)."""
    squeeze = x.dim() == 1
    x2 = x.unsqueeze(0) if squeeze else x
    B, K = x2.shape
    K2, N = wt.shape
    assert K == K2, f"x has {K} channels, wt has {K2} rows"
    assert 1 <= B <= MAX_BATCH, f"batch {B} > {MAX_BATCH}: use the dense path"
    assert wt.is_contiguous() and x2.stride(1) == 1
    thr = [float(thresholds)] if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
    assert 1 <= len(thr) <= 3 and len(segments) == len(thr) - 1
    thr = thr + [thr[-1]] * (3 - len(thr))
    seg = list(segments) + [N] * (2 - len(segments))
    cfg = config or default_config(K, N, B, x.device, tuple(segments))
    assert all(s % cfg.block_n == 0 for s in segments), "segment boundaries must be multiples of block_n"
    n_splits = _pick_splits(K, N, cfg, x.device)
    k_split = triton.cdiv(K, n_splits)
    stripes = triton.cdiv(N, cfg.block_n)
    R = 0 if extra_x is None else extra_x.shape[1]
    r_split = triton.cdiv(R, n_splits) if R else 0
    if extra_x is not None:
        assert extra_wt is not None and extra_wt.shape == (R, N) and extra_x.shape[0] == B
        assert extra_x.dtype == torch.float32 and extra_x.is_contiguous() and extra_wt.is_contiguous()

    ws = _workspace(x.device)
    scratch, partial, counters = ws.get(stripes * n_splits * k_split, n_splits * B * N if n_splits > 1 else 0, stripes)
    y = torch.empty((B, N), dtype=out_dtype or x.dtype, device=x.device)
    batch_pad = 16 if cfg.use_dot else triton.next_power_of_2(B)
    scan_block = min(cfg.scan_block, triton.next_power_of_2(k_split))
    dummy = scratch
    _sparse_gemv_kernel[(stripes, n_splits)](
        x2,
        wt,
        y,
        col_scale if col_scale is not None else dummy,
        scratch,
        partial if n_splits > 1 else dummy,
        counters,
        extra_x if extra_x is not None else dummy,
        extra_wt if extra_wt is not None else dummy,
        K,
        N,
        R,
        x2.stride(0),
        k_split,
        r_split,
        n_splits,
        thr[0],
        thr[1],
        thr[2],
        seg[0],
        seg[1],
        BATCH=B,
        BATCH_PAD=batch_pad,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SCAN_BLOCK=scan_block,
        HAS_SCALE=col_scale is not None,
        INVERT=invert,
        HAS_EXTRA=extra_x is not None,
        USE_DOT=cfg.use_dot,
        REDUCE=n_splits > 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y[0] if squeeze else y


def keep_mask(
    x: torch.Tensor,  # [B, K]
    threshold: float,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Union over the batch of score > threshold, as the kernel computes it (fp32 scores). -> [K] bool"""
    score = x.float().abs().reshape(-1, x.shape[-1]).amax(dim=0)
    if col_scale is not None:
        score = score * col_scale.float()
    return score > threshold


def sparse_gemv_reference(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresholds: float | list[float] | tuple[float, ...] = 0.0,
    segments: tuple[int, ...] = (),
    col_scale: torch.Tensor | None = None,
    invert: bool = False,
    extra_x: torch.Tensor | None = None,
    extra_wt: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PyTorch reference of `sparse_gemv_triton` (fp32 arithmetic, any batch size)."""
    thr = [float(thresholds)] if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
    N = wt.shape[1]
    bounds = [0, *segments, N]
    xf = x.float().reshape(-1, x.shape[-1])
    outs = []
    for i, t in enumerate(thr):
        m = keep_mask(xf, t, col_scale)
        if invert:
            m = ~m
        outs.append((xf * m) @ wt[:, bounds[i] : bounds[i + 1]].float())
    y = torch.cat(outs, dim=1)
    if extra_x is not None:
        y = y + extra_x.float() @ extra_wt.float()
    y = y.to(out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], N)
