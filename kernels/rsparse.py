"""Fused R-Sparse layer: y = W (x * m) + U_r S_r V_r^T (x * (1 - m)), in two launches.

R-Sparse (arXiv 2504.19449) keeps the input channels whose score |x_j| * ||W[:, j]|| passes the threshold and
approximates the dropped ones through a rank-r SVD of W. Its public kernel has the low-rank branch commented
out (../shared/research/activation_sparsity.md, section 1.7); this is the fused version.

With A = S_r V_r^T [r, K] and B = U_r [N, r], stored transposed as At [K, r] and Bt [r, N]:

1. z = (x * (1 - m)) @ At   -> [B, r] fp32. This is the sparse GEMV on the *complement* mask (INVERT), so it
   reads only the dropped rows of At: r (1 - kept) K elements.
2. y = (x * m) @ Wt + z @ Bt. The sparse GEMV over the kept rows of Wt with the r rows of Bt appended as
   extra dense rows of the same reduction (HAS_EXTRA): no third launch, no extra pass over y.

The low-rank branch needs the full reduction of z before it can be used, a grid-wide dependency.
`rsparse_gemv_triton` resolves it in ONE launch (`_rsparse_fused_kernel`): the z programs take the lowest
program ids, the Wt programs do their kept rows first and then spin on a counter until z is complete before
adding their share of z @ Bt. This relies on the z programs being dispatched first, which the hardware
does in program-id order; they never wait on anything, so no deadlock can arise from them.
`rsparse_gemv_two_launch_triton` is the plain two-launch version (z kernel, then the sparse GEMV with the
Bt rows appended), kept as a fallback and for comparison.
Bytes: kept K N + r K (1 - kept) + r N, against K N dense.
The (s, rho) -> (kept, rank) mapping is the core's `allocator.costs.rsparse_split`.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

from .gemv import (
    GemvConfig,
    _dense_rows_product,
    _kept_rows_product,
    _pick_splits,
    _workspace,
    _write_out,
    default_config,
    sparse_gemv_reference,
    sparse_gemv_triton,
)


@triton.jit
def _rsparse_fused_kernel(
    x_ptr, wt_ptr, at_ptr, bt_ptr, y_ptr, scale_ptr, scratch_ptr,
    partial_ptr,  # [n_splits, B, N] fp32
    counter_ptr,  # [n_stripes] int32, zero at rest
    z_ptr,  # [B, R] fp32 low-rank activations z = (x * (1 - m)) @ At
    z_partial_ptr,  # [z_splits, B, R] fp32
    z_counter_ptr,  # [z_stripes] int32, zero at rest
    sync_ptr,  # [2] int32: z stripes finished, main programs past the wait; zero at rest
    K, N, R, stride_xb, k_split, z_k_split, r_split, n_splits, z_splits, n_stripes, z_stripes, thr,
    BATCH: tl.constexpr, BATCH_PAD: tl.constexpr, Z_BATCH_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, Z_BLOCK_N: tl.constexpr, Z_BLOCK_K: tl.constexpr, SCAN_BLOCK: tl.constexpr, Z_SCAN_BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr, USE_DOT: tl.constexpr, REDUCE: tl.constexpr, BT_PREFETCH: tl.constexpr,
):
    """One launch for the R-Sparse layer. Programs [0, z_stripes * z_splits) compute z from the dropped rows
    of At; the rest compute the kept rows of Wt, then wait for z (a spin on a counter: the z programs have the
    lowest ids, so the hardware dispatches them first), then add z @ Bt for their share of the r rows."""
    pid = tl.program_id(0)
    b_offs = tl.arange(0, BATCH_PAD)
    b_mask = b_offs < BATCH
    n_z = z_stripes * z_splits
    if pid < n_z:
        zn = pid // z_splits
        zs = pid % z_splits
        zr_offs = zn * Z_BLOCK_N + tl.arange(0, Z_BLOCK_N)
        k_lo = zs * z_k_split
        row = scratch_ptr + pid.to(tl.int64) * k_split  # scratch rows are k_split >= z_k_split long
        zb_offs = tl.arange(0, Z_BATCH_PAD)
        zacc = _kept_rows_product(
            x_ptr, at_ptr, scale_ptr, row, zr_offs, zr_offs < R, zb_offs, zb_offs < BATCH, k_lo,
            tl.minimum(k_lo + z_k_split, K), R, stride_xb, thr,
            BATCH, Z_BATCH_PAD, Z_BLOCK_N, Z_BLOCK_K, Z_SCAN_BLOCK, HAS_SCALE, True, False,
        )
        wrote = _write_out(zacc, z_ptr, z_partial_ptr, z_counter_ptr, zn, zs, z_splits, R, zr_offs, zr_offs < R,
                           zb_offs, zb_offs < BATCH, BATCH, Z_BATCH_PAD, Z_BLOCK_N, True)
        tl.debug_barrier()  # the z stripe is stored by every thread before it is published
        if wrote:
            tl.atomic_add(sync_ptr, 1, sem="release")
    else:
        m = pid - n_z
        pid_n = m // n_splits
        pid_s = m % n_splits
        n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n_offs < N
        k_lo = pid_s * k_split
        acc = _kept_rows_product(
            x_ptr, wt_ptr, scale_ptr, scratch_ptr + pid.to(tl.int64) * k_split, n_offs, n_mask, b_offs, b_mask,
            k_lo, tl.minimum(k_lo + k_split, K), N, stride_xb, thr,
            BATCH, BATCH_PAD, BLOCK_N, BLOCK_K, SCAN_BLOCK, HAS_SCALE, False, USE_DOT,
        )
        r_lo = pid_s * r_split
        r_hi = tl.minimum(r_lo + r_split, R)
        if BT_PREFETCH:  # this split's Bt rows fit one tile: load it before waiting (it does not depend on z)
            r_offs = r_lo + tl.arange(0, BLOCK_K)
            r_in = r_offs < r_hi
            w_bt = tl.load(bt_ptr + r_offs.to(tl.int64)[:, None] * N + n_offs[None, :],
                           mask=r_in[:, None] & n_mask[None, :], other=0.0)
        done = tl.atomic_add(sync_ptr, 0, sem="acquire")
        while done < z_stripes:
            done = tl.atomic_add(sync_ptr, 0, sem="acquire")
        tl.debug_barrier()
        if tl.atomic_add(sync_ptr + 1, 1, sem="relaxed") == n_stripes * n_splits - 1:  # last one past the wait
            tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed")
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
        if BT_PREFETCH:
            zv = tl.load(z_ptr + b_offs[:, None] * R + r_offs[None, :], mask=b_mask[:, None] & r_in[None, :],
                         other=0.0, cache_modifier=".cg")
            if USE_DOT:
                acc = tl.dot(zv.to(w_bt.dtype), w_bt, acc, input_precision="ieee")
            else:
                acc += tl.sum(zv[:, :, None] * w_bt.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = _dense_rows_product(acc, z_ptr, bt_ptr, r_lo, r_hi, R, N, n_offs, n_mask, b_offs, b_mask,
                                      BLOCK_K, USE_DOT)
        _write_out(acc, y_ptr, partial_ptr, counter_ptr, pid_n, pid_s, n_splits, N, n_offs, n_mask, b_offs, b_mask,
                   BATCH, BATCH_PAD, BLOCK_N, REDUCE)


def low_rank_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At [K, r] = (S_r V_r^T)^T and Bt [r, N] = U_r^T from the SVD of W [N, K], in W's dtype."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    at = (vh[:rank].T * s[:rank]).contiguous()  # [K, r]
    bt = u[:, :rank].T.contiguous()  # [r, N]
    return at.to(w.dtype), bt.to(w.dtype)


def default_low_rank_config(K: int, rank: int) -> GemvConfig:
    """The z = x_dropped @ At GEMV has few columns (r ~ 100-800): many K splits keep the GPU busy
    (measured on the H100: 8 warps, 64 x 32 tiles, about 128 input channels per program)."""
    return GemvConfig(block_n=64, block_k=32, num_warps=8, n_splits=max(1, min(64, K // 128)))


def rsparse_gemv_triton(
    x: torch.Tensor,  # [B, K]
    wt: torch.Tensor,  # [K, N]
    at: torch.Tensor,  # [K, r]
    bt: torch.Tensor,  # [r, N]
    threshold: float,
    col_scale: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    low_rank_config: GemvConfig | None = None,
) -> torch.Tensor:
    """One-launch R-Sparse layer. Returns y [B, N] (or [N] for a 1-D x)."""
    squeeze = x.dim() == 1
    x2 = (x.unsqueeze(0) if squeeze else x).contiguous()
    B, K = x2.shape
    N, R = wt.shape[1], at.shape[1]
    assert wt.shape[0] == K and at.shape[0] == K and bt.shape == (R, N) and 1 <= B <= 4
    cfg = config or default_config(K, N, B, x.device)
    zcfg = low_rank_config or default_low_rank_config(K, R)
    n_splits = _pick_splits(K, N, cfg, x.device)
    z_splits = max(_pick_splits(K, R, zcfg, x.device), n_splits)  # z rows fit in the scratch rows
    k_split, z_k_split = triton.cdiv(K, n_splits), triton.cdiv(K, z_splits)
    n_stripes, z_stripes = triton.cdiv(N, cfg.block_n), triton.cdiv(R, zcfg.block_n)
    grid = z_stripes * z_splits + n_stripes * n_splits
    scratch, partial, counters = _workspace(x.device).get(
        grid * k_split, n_splits * B * N + z_splits * B * R + B * R, n_stripes + z_stripes + 2
    )
    z = partial[n_splits * B * N + z_splits * B * R :][: B * R]
    y = torch.empty((B, N), dtype=x.dtype, device=x.device)
    _rsparse_fused_kernel[(grid,)](
        x2, wt, at, bt, y, col_scale if col_scale is not None else scratch, scratch,
        partial, counters, z, partial[n_splits * B * N :], counters[n_stripes:], counters[n_stripes + z_stripes :],
        K, N, R, x2.stride(0), k_split, z_k_split, triton.cdiv(R, n_splits), n_splits, z_splits, n_stripes,
        z_stripes, float(threshold),
        BATCH=B, BATCH_PAD=16 if cfg.use_dot else triton.next_power_of_2(B),
        Z_BATCH_PAD=triton.next_power_of_2(B), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, Z_BLOCK_N=zcfg.block_n, Z_BLOCK_K=zcfg.block_k,
        SCAN_BLOCK=min(cfg.scan_block, triton.next_power_of_2(k_split)),
        Z_SCAN_BLOCK=min(zcfg.scan_block, triton.next_power_of_2(z_k_split)),
        HAS_SCALE=col_scale is not None, USE_DOT=cfg.use_dot, REDUCE=n_splits > 1,
        BT_PREFETCH=triton.cdiv(R, n_splits) <= cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y[0] if squeeze else y


def rsparse_gemv_two_launch_triton(x: torch.Tensor, wt: torch.Tensor, at: torch.Tensor, bt: torch.Tensor,
                                   threshold: float, col_scale: torch.Tensor | None = None,
                                   config: GemvConfig | None = None,
                                   low_rank_config: GemvConfig | None = None) -> torch.Tensor:
    """The same layer in two launches (the sparse GEMV, then the low-rank term): the variant the one-launch
    kernel is measured against. Arguments as ``rsparse_gemv_triton``."""
    squeeze = x.dim() == 1
    x2 = x.unsqueeze(0) if squeeze else x
    if low_rank_config is None:
        low_rank_config = default_low_rank_config(x2.shape[1], at.shape[1])
    z = sparse_gemv_triton(
        x2, at, threshold, col_scale=col_scale, invert=True, out_dtype=torch.float32, config=low_rank_config
    )  # [B, r]
    y = sparse_gemv_triton(x2, wt, threshold, col_scale=col_scale, extra_x=z, extra_wt=bt, config=config)
    return y[0] if squeeze else y


def rsparse_gemv_reference(
    x: torch.Tensor,
    wt: torch.Tensor,
    at: torch.Tensor,
    bt: torch.Tensor,
    threshold: float,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of `rsparse_gemv_triton` (fp32 arithmetic)."""
    z = sparse_gemv_reference(x, at, threshold, col_scale=col_scale, invert=True, out_dtype=torch.float32)
    z2 = z.reshape(-1, z.shape[-1])
    y = sparse_gemv_reference(
        x.reshape(-1, x.shape[-1]), wt, threshold, col_scale=col_scale, extra_x=z2, extra_wt=bt
    )
    return y.reshape(*x.shape[:-1], wt.shape[1])
