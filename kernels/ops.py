"""torch custom ops around the Triton kernels, with fake (meta) implementations and a dense fallback.

Why custom ops: `torch.compile` and CUDA-graph capture treat them as opaque nodes with a known output
shape (the fake implementation), so a model using them compiles and captures without graph breaks.

Dispatch, per call:
* `dense=True` (chosen statically by `kernel_pays`, below the measured crossover sparsity): the same
  function through cuBLAS, y = (x * m) @ Wt, so switching path never changes the numbers beyond rounding.
* more than `MAX_BATCH` rows (prefill), or a CPU tensor without `TRITON_INTERPRET=1`: the PyTorch reference.
* otherwise the Triton kernel.
"""

from __future__ import annotations

import torch

from .rsparse import rsparse_gemv_reference, rsparse_gemv_triton
from .gemv import MAX_BATCH, _interpreting, keep_mask, sparse_gemv_reference, sparse_gemv_triton

# Sparsity below which the dense cuBLAS path is faster than the kernel, measured on the H100
# (studies/results/kernel_bench_h100.md). The kernel at s=0 is within a few percent of cuBLAS on the large
# shapes, so the crossover is small; tiny shapes (SmolLM2) are launch-bound and cross over later.
CROSSOVER_SPARSITY_H100 = {"large": 0.0, "small": 0.0}
_SMALL_BYTES = 8 * 2**20


def kernel_pays(sparsity: float, d_out: int, d_in: int, itemsize: int = 2) -> bool:
    """True when the sparse kernel is expected to beat the dense path at this (static) sparsity level."""
    key = "small" if d_out * d_in * itemsize < _SMALL_BYTES else "large"
    return sparsity > CROSSOVER_SPARSITY_H100[key] or sparsity >= 1.0


def _use_triton(x: torch.Tensor, rows: int) -> bool:
    return rows <= MAX_BATCH and (x.is_cuda or _interpreting())


@torch.library.custom_op("allocator::sparse_gemv", mutates_args=())
def sparse_gemv(
    x: torch.Tensor,  # [..., K]
    wt: torch.Tensor,  # [K, N]
    thresholds: list[float],
    segments: list[int],
    col_scale: torch.Tensor | None,
    dense: bool,
) -> torch.Tensor:
    """y = (x * m) @ wt with m = score(x) > threshold (per column segment). Returns [..., N]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if dense:
        bounds = [0, *segments, wt.shape[1]]
        if len(thresholds) == 1:
            y = (x2 * keep_mask(x2, thresholds[0], col_scale)) @ wt
        else:
            y = torch.cat(
                [
                    (x2 * keep_mask(x2, t, col_scale)) @ wt[:, bounds[i] : bounds[i + 1]]
                    for i, t in enumerate(thresholds)
                ],
                dim=1,
            )
    elif _use_triton(x2, x2.shape[0]):
        y = sparse_gemv_triton(x2.contiguous(), wt, thresholds, tuple(segments), col_scale)
    else:
        y = sparse_gemv_reference(x2, wt, thresholds, tuple(segments), col_scale)
    return y.reshape(*lead, wt.shape[1])


@sparse_gemv.register_fake
def _sparse_gemv_fake(x, wt, thresholds, segments, col_scale, dense):
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


@torch.library.custom_op("allocator::rsparse_gemv", mutates_args=())
def rsparse_gemv(
    x: torch.Tensor,  # [..., K]
    wt: torch.Tensor,  # [K, N]
    at: torch.Tensor,  # [K, r]
    bt: torch.Tensor,  # [r, N]
    threshold: float,
    col_scale: torch.Tensor | None,
    dense: bool,
) -> torch.Tensor:
    """y = (x * m) @ wt + ((x * (1 - m)) @ at) @ bt. Returns [..., N]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if dense:
        m = keep_mask(x2, threshold, col_scale)
        z = ((x2 * ~m).float() @ at.float())
        y = (x2 * m) @ wt + (z @ bt.float()).to(x.dtype)
    elif _use_triton(x2, x2.shape[0]):
        y = rsparse_gemv_triton(x2.contiguous(), wt, at, bt, threshold, col_scale)
    else:
        y = rsparse_gemv_reference(x2, wt, at, bt, threshold, col_scale)
    return y.reshape(*lead, wt.shape[1])


@rsparse_gemv.register_fake
def _rsparse_gemv_fake(x, wt, at, bt, threshold, col_scale, dense):
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


def sparse_linear(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresholds: float | list[float],
    segments: tuple[int, ...] = (),
    col_scale: torch.Tensor | None = None,
    sparsity: float | None = None,
) -> torch.Tensor:
    """Convenience front end: picks the dense fallback when `sparsity` (the layer's calibrated level) is
    below the measured crossover."""
    thr = [float(thresholds)] if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
    dense = sparsity is not None and not kernel_pays(sparsity, wt.shape[1], wt.shape[0], wt.element_size())
    return torch.ops.allocator.sparse_gemv(x, wt, thr, list(segments), col_scale, dense)
