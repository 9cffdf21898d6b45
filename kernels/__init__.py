"""Triton kernels for activation-sparse decode (imported as `allocator.kernels`; needs torch and triton).

- `sparse_gemv_triton` / `sparse_gemv_reference`: y = (x * m) @ Wt, m = score(x) > threshold, Wt [K, N].
- `rsparse_gemv_triton` / `rsparse_gemv_reference`: the R-Sparse layer, sparse + low-rank of the dropped part.
- `lowbit_gemv_triton` / `lowbit_gemv_reference`: y = (x * m) @ dequant(Wq), INT4-g128 / INT8 / FP8 weights
  (`pack_int4`, `pack_int8`, `pack_fp8`), sparse or dense (threshold None).
- `torch.ops.allocator.sparse_gemv` / `rsparse_gemv`: the same as custom ops (CUDA graphs, torch.compile).
- `allocator.kernels.latency`: the latency evaluator and `latency_cost_matrix` (cost kind `latency_decode`).
- `allocator.kernels.runtime`: `Decoder` over given weights (`DecoderWeights`, `LayerWeights`): dense prefill,
  decode steps through the sparse kernels, greedy `generate` from one CUDA graph (HF-free; evaluators convert).
- `allocator.kernels.llama_decode`: a random-weight Llama-shaped decoder for end-to-end decode timing.

See kernels/README.md for layouts and measured numbers.
"""

from .ops import kernel_pays, rsparse_gemv, sparse_gemv, sparse_linear
from .rsparse import (
    low_rank_factors,
    rsparse_gemv_reference,
    rsparse_gemv_triton,
    rsparse_gemv_two_launch_triton,
)
from .gemv import GemvConfig, keep_mask, sparse_gemv_reference, sparse_gemv_triton
from .lowbit_gemv import (
    LowbitConfig,
    LowbitWeight,
    lowbit_gemv_reference,
    lowbit_gemv_triton,
    pack_fp8,
    pack_int4,
    pack_int8,
)
from .runtime import Decoder, DecoderShape, DecoderWeights, LayerWeights
from .fp8_prefill import Fp8Weight, fp8_linear, fp8_linear_reference, pack_fp8_weight, quantize_rows_fp8

__all__ = [
    "Fp8Weight",
    "fp8_linear",
    "fp8_linear_reference",
    "pack_fp8_weight",
    "quantize_rows_fp8",
    "Decoder",
    "DecoderShape",
    "DecoderWeights",
    "GemvConfig",
    "LayerWeights",
    "LowbitConfig",
    "LowbitWeight",
    "keep_mask",
    "kernel_pays",
    "low_rank_factors",
    "lowbit_gemv_reference",
    "lowbit_gemv_triton",
    "pack_fp8",
    "pack_int4",
    "pack_int8",
    "rsparse_gemv",
    "rsparse_gemv_reference",
    "rsparse_gemv_triton",
    "rsparse_gemv_two_launch_triton",
    "sparse_gemv",
    "sparse_gemv_reference",
    "sparse_gemv_triton",
    "sparse_linear",
]
