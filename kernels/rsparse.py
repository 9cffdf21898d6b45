"""Fused R-Sparse layer: y = W (x * m) + U_r S_r V_r^T (x * (1 - m)), in two launches.

R-Sparse (arXiv 2504.19449) keeps the input channels whose score |x_j| * ||W[:, j]|| passes the threshold and
approximates the dropped ones through a rank-r SVD of W. Its public kernel has the low-rank branch commented
out (../shared/research/activation_sparsity.md, section 1.7); this is the fused version.

With A = S_r V_r^T [r, K] and B = U_r [N, r], stored transposed as At [K, r] and Bt [r, N]:

1. z = (x * (1 - m)) @ At   -> [B, r] fp32. This is the sparse GEMV on the *complement* mask (INVERT), so it
   reads only the dropped rows of At: r (1 - kept) K elements.
2. y = (x * m) @ Wt + z @ Bt. The sparse GEMV over the kept rows of Wt with the r rows of Bt appended as
   extra dense rows of the same reduction (HAS_EXTRA): no third launch, no extra pass over y.

The low-rank branch needs the full reduction of z before it can be used, a grid-wide dependency, hence two
launches rather than one. Bytes: kept K N + r K (1 - kept) + r N, against K N dense.
"""

from __future__ import annotations

import torch

from .gemv import GemvConfig, sparse_gemv_reference, sparse_gemv_triton


def rsparse_rank(d_in: int, d_out: int, s: float, rho: float) -> tuple[int, int]:
    """R-Sparse's mapping (utils/setup.py): kept channels k and rank r for budget s and sparse ratio rho."""
    kept = max(int(d_in * (1 - s) * rho), 1)
    budget = d_in * d_out * (1 - s)
    rank = max(int((budget - kept * d_out) / (d_in + d_out)), 1)
    return kept, rank


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
