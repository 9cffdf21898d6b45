"""torch custom ops around the Triton kernels, with fake (meta) implementations and a dense fallback.

Why custom ops: `torch.compile` and CUDA-graph capture treat them as opaque nodes with a known output
shape (the fake implementation), so a model using them compiles and captures without graph breaks.

Dispatch, per call:
* `w_dense` given (the usual row-major W [N, K]; `sparse_linear` passes it below the measured crossover
  sparsity, see `kernel_pays`): the same function through cuBLAS, y = F.linear(x * m, W), so switching path
  never changes the numbers beyond rounding. Measured on the H100, cuBLAS on the transposed Wt is 1.25-4x
  slower than our kernel even at s = 0, so a dense fallback only pays when the row-major W is kept too.
* more than `MAX_BATCH` rows (prefill), or a CPU tensor without `TRITON_INTERPRET=1`: the PyTorch reference.
* otherwise the Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rsparse import rsparse_gemv_reference, rsparse_gemv_triton
from .gemv import MAX_BATCH, _interpreting, keep_mask, sparse_gemv_reference, sparse_gemv_triton

# Sparsity below which cuBLAS on the row-major W beats the kernel, measured on the H100
# (studies/results/kernel_bench_h100.md, batch 1). Large shapes (>= 8 MiB of weights): the kernel is at
# 0.89-0.98x of cuBLAS at s = 0 and 1.01-1.18x at s = 0.25, so the crossover is ~0.1. SmolLM2-sized
# shapes are launch-bound (cuBLAS 3.5-5 us, ours >= 4 us even with every channel dropped): never.
CROSSOVER_SPARSITY_H100 = {"large": 0.1, "small": 1.0}
_SMALL_BYTES = 8 * 2**20


def kernel_pays(sparsity: float, d_out: int, d_in: int, itemsize: int = 2) -> bool:
    """True when the sparse kernel is expected to beat cuBLAS on the row-major W at this (static) level."""
    key = "small" if d_out * d_in * itemsize < _SMALL_BYTES else "large"
    return sparsity >= CROSSOVER_SPARSITY_H100[key]


def _use_triton(x: torch.Tensor, rows: int) -> bool:
    return rows <= MAX_BATCH and (x.is_cuda or _interpreting())


@torch.library.custom_op("allocator::sparse_gemv", mutates_args=())
def sparse_gemv(
    x: torch.Tensor,  # [..., K]
    wt: torch.Tensor,  # [K, N]
    thresholds: list[float],
    segments: list[int],
    col_scale: torch.Tensor | None,
    w_dense: torch.Tensor | None,
) -> torch.Tensor:
    """y = (x * m) @ wt with m = score(x) > threshold (per column segment). Returns [..., N].
    w_dense: optional row-major W [N, K] = wt.T; when given, the dense cuBLAS path is used."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w_dense is not None:
        bounds = [0, *segments, wt.shape[1]]
        y = torch.cat(
            [
                F.linear(x2 * keep_mask(x2, t, col_scale), w_dense[bounds[i] : bounds[i + 1]])
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
def _sparse_gemv_fake(x, wt, thresholds, segments, col_scale, w_dense):
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


@torch.library.custom_op("allocator::rsparse_gemv", mutates_args=())
def rsparse_gemv(
    x: torch.Tensor,  # [..., K]
    wt: torch.Tensor,  # [K, N]
    at: torch.Tensor,  # [K, r]
    bt: torch.Tensor,  # [r, N]
    threshold: float,
    col_scale: torch.Tensor | None,
    w_dense: torch.Tensor | None,
) -> torch.Tensor:
    """y = (x * m) @ wt + ((x * (1 - m)) @ at) @ bt. Returns [..., N]. w_dense as in sparse_gemv."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w_dense is not None:
        m = keep_mask(x2, threshold, col_scale)
        z = (x2 * ~m).float() @ at.float()
        y = (F.linear(x2 * m, w_dense).float() + z @ bt.float()).to(x.dtype)
    elif _use_triton(x2, x2.shape[0]):
        y = rsparse_gemv_triton(x2.contiguous(), wt, at, bt, threshold, col_scale)
    else:
        y = rsparse_gemv_reference(x2, wt, at, bt, threshold, col_scale)
    return y.reshape(*lead, wt.shape[1])


@rsparse_gemv.register_fake
def _rsparse_gemv_fake(x, wt, at, bt, threshold, col_scale, w_dense):
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


def sparse_linear(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresholds: float | list[float],
    segments: tuple[int, ...] = (),
    col_scale: torch.Tensor | None = None,
    sparsity: float | None = None,
    w_dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convenience front end: uses the row-major `w_dense` through cuBLAS when it is given and `sparsity`
    (the layer's calibrated level) is below the measured crossover, else the kernel."""
    thr = [float(thresholds)] if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
    use_dense = w_dense is not None and (
        sparsity is None or not kernel_pays(sparsity, wt.shape[1], wt.shape[0], wt.element_size())
    )
    return torch.ops.allocator.sparse_gemv(x, wt, thr, list(segments), col_scale, w_dense if use_dense else None)
