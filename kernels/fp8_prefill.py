"""FP8 (W8A8, format ``w8a8-fp8``) linear layers for prefill: per-token dynamic activation scales, per-output-
channel weight scales, the GEMM through ``torch._scaled_mm`` with rowwise scales.

    y = (q_x * s_x) @ (q_w * s_w)^T (+ bias)    q_x = e4m3(x / s_x), s_x = max|x_row| / 448  (one per token)
                                                q_w = e4m3(w / s_w), s_w = max|w_row| / 448  (one per output channel)

* ``quantize_rows_fp8(x) -> (x_fp8, scales)``: one Triton pass per row (token): the row's amax, its scale
  ``amax / 448`` (1 for an all-zero row), then ``e4m3(clamp(x / scale, +-448))`` with round-to-nearest-even;
  fp16 / bf16 / fp32 in, ``float8_e4m3fn`` codes and fp32 scales ``[..., 1]`` out. The rule and the numbers are
  those of the accuracy path's fake quantization (``evaluators.quantize.quantize_activation(x, "fp8")``:
  ``x_hat = codes * scales``), bit for bit on the device it runs on: ``x / scale`` is the IEEE quotient
  (``div_rn``), the cast RNE with subnormals, and the scale is torch's ``amax / 448`` there (on CUDA torch
  multiplies by the fp32 reciprocal of a Python-scalar divisor, on the CPU it divides: the last bit can differ).
  A row of up to 8192 channels is read once (held in registers, BLOCK / 1024 warps); longer rows are read twice
  (amax pass, then quantize pass, the second mostly from L2) in tiles of 2048 with 8 warps: the launches measured
  fastest on the H200 at 2048 tokens (K = 4096: one pass, 4 warps, 8.0 us; K = 14336: 35.3 us against 45.2 us
  for the one-pass 16384-wide row; ``studies/results/prefill_h200.quant_tune.csv``). Cost: one read of x (2 bytes
  per element for bf16), one write of the codes (1 byte) and 4 bytes per row.
* ``fp8_linear(x, w, bias, out_dtype)``: ``quantize_rows_fp8`` then ``fp8_gemm``: ``torch._scaled_mm(x_fp8,
  w.codes.t(), scale_a=[M, 1] fp32, scale_b=[1, N] fp32, bias, out_dtype)`` (rowwise scaling: CUTLASS on sm_90,
  fp32 accumulation, the scales and the bias applied in the epilogue, one rounding to out_dtype). The second
  operand must be column-major: ``Fp8Weight.codes`` is the ``[N, K]`` row-major weight (nn.Linear's layout), so
  ``codes.t()`` is the ``[K, N]`` column-major view, no copy. Rowwise ``_scaled_mm`` takes bf16 outputs only on
  some torch builds: another out_dtype is probed once and, where refused, computed in bf16 and cast (the bias
  then added in fp32 before that cast). Off CUDA, without FP8 tensor cores (sm < 8.9), or where K or N is not
  a multiple of 16 (``_scaled_mm``'s alignment), the GEMM is the reference's (dequantize, fp32 matmul).
* ``Fp8Weight`` (codes ``[N, K]`` e4m3, scale ``[1, N]`` fp32): ``pack_fp8_weight(w)`` from a ``(d_out, d_in)``
  weight with the accuracy path's RTN rule (``evaluators.quantize.quantize_weight_rtn(w, "w8a8-fp8")``: scale
  max|w_row| / 448 rounded to bf16 *before* the codes are taken, so codes * scale is the fake-quant weight);
  ``fp8_weight_from_codes(codes, scales)`` from that function's ``QuantizedWeight.codes`` / ``.scales`` (the very
  numbers the accuracy path multiplies by, so the runtime's logits match it).
* ``fp8_linear_reference(x, w, bias)``: the PyTorch reference every test compares with: eager per-token
  quantization (``quantize_rows_fp8_reference``, the accuracy path's rule), dequantize both operands exactly in
  fp32, fp32 matmul, bias, one rounding.

Measured on the H200 (``studies/results/prefill_h200.md``; Llama-3-8B's four projections summed per layer, over
cuBLAS bf16 ``F.linear``): at 512 / 2048 / 4096 / 8192 tokens the GEMM alone 1.51x / 1.61x / 1.68x / 1.53x,
``fp8_linear`` (our quantization + GEMM) 1.31x / 1.38x / 1.45x / 1.46x, eager PyTorch quantization + GEMM
0.70x / 0.76x / 0.84x / 0.85x; the quantization pass costs 23 / 64 / 112 / 200 us per layer (8% / 6% / 5% / 4%
of the bf16 time), a tenth to a thirteenth of the eager one.

Not here: quantizing x inside the kernel that produces it (the RMSNorm, SiLU * up), which would save the
separate pass (its measured cost is the ``quant_triton`` column of ``studies/prefill_bench.py``); a Triton FP8
GEMM (``_scaled_mm``'s CUTLASS kernel is the one measured).

Sources: the per-token dynamic FP8 scheme is vLLM's ``fp8`` / compressed-tensors ``FP8_DYNAMIC`` (per-channel
weight scales, per-token activation scales, ``torch._scaled_mm`` with rowwise scales); e4m3's largest finite
value 448 (OCP FP8 spec, ``torch.finfo(torch.float8_e4m3fn).max``).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .gemv import _interpreting

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.bfloat16  # the accuracy path rounds weight scales to bf16 (evaluators.quantize.SCALE_DTYPE)
ONE_PASS_MAX = 8192  # rows up to this many channels are held in registers (read once)
TWO_PASS_BLOCK, TWO_PASS_WARPS = 2048, 8


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Launch of ``quantize_rows_fp8`` for one row width: ``block`` None = one pass over next_pow2(K) channels held
    in registers (up to 16384), else the tile of the two-pass loop; ``num_warps`` None = the default's."""

    block: int | None = None
    num_warps: int | None = None


QUANT_CONFIGS: dict[int, QuantConfig] = {}  # by row width K, overrides the default (studies/prefill_bench.py
# tunes per K and fills it for its run)


# ---------------------------------------------------------------------------------------------- weights
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A (d_out, d_in) = (N, K) weight in FP8: ``codes`` float8_e4m3fn ``[N, K]`` row-major (``codes.t()`` is the
    column-major second operand ``_scaled_mm`` wants), ``scale`` fp32 ``[1, N]``: row n is
    ``codes[n] * scale[0, n]``."""

    codes: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self):
        if self.codes.dtype != FP8_DTYPE or self.codes.dim() != 2:
            raise ValueError(f"codes must be a 2-D {FP8_DTYPE} [N, K] tensor, got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        if tuple(self.scale.shape) != (1, self.codes.shape[0]) or self.scale.dtype != torch.float32:
            raise ValueError(f"scale must be fp32 [1, {self.codes.shape[0]}], got {self.scale.dtype} "
                             f"{tuple(self.scale.shape)}")

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self) -> torch.Tensor:
        """The weight the GEMM multiplies by, ``[N, K]`` fp32 (exact: an e4m3 code times an fp32 scale)."""
        return self.codes.float() * self.scale.T

    def to(self, device) -> "Fp8Weight":
        return Fp8Weight(self.codes.to(device).contiguous(), self.scale.to(device).contiguous())

    @staticmethod
    def cat(parts: list["Fp8Weight"]) -> "Fp8Weight":
        """Concatenated along N (output channels): a fused projection (q|k|v, gate|up) from its parts."""
        if len(parts) == 1:
            return parts[0]
        return Fp8Weight(torch.cat([p.codes for p in parts], 0), torch.cat([p.scale for p in parts], 1))


def fp8_weight_from_codes(codes: torch.Tensor, scales: torch.Tensor) -> Fp8Weight:
    """From e4m3 codes ``[N, K]`` and one scale per output channel (``[N, 1]`` or ``[N]``, any float dtype):
    ``evaluators.quantize.QuantizedWeight(codes, scales, "w8a8-fp8")``'s tensors, unchanged."""
    if scales.numel() != codes.shape[0]:
        raise ValueError(f"{scales.numel()} scales for {codes.shape[0]} output channels: FP8 weights have one scale "
                         "per output channel (format w8a8-fp8)")
    return Fp8Weight(codes.contiguous(), scales.detach().float().reshape(1, -1).contiguous())


@torch.no_grad()
def pack_fp8_weight(w: torch.Tensor, scale_dtype: torch.dtype | None = SCALE_DTYPE) -> Fp8Weight:
    """RTN of a (d_out, d_in) weight: scale max|w_row| / 448 (1 for a zero row), rounded to ``scale_dtype`` (bf16,
    as the accuracy path; None keeps fp32) before the codes ``e4m3(clamp(w / scale))`` are taken."""
    wf = w.detach().float()
    low, high = wf.aminmax(dim=-1)
    amax = torch.maximum(-low, high)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    codes = (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Weight(codes.contiguous(), scale.reshape(1, -1).contiguous())


# ---------------------------------------------------------------------------------------------- activations
@triton.jit
def _to_e4m3(x, scale, SOFT_ROUND: tl.constexpr):
    """e4m3(clamp(x / scale, +-448)), round to nearest even. SOFT_ROUND (the interpreter): round onto the e4m3 grid
    in fp32 first (exact: powers of two and one RNE add of 2^23), so the cast only meets representable values;
    the interpreter's own fp32 -> e4m3 cast is not RNE (ties, carries into the next binade)."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    if SOFT_ROUND:
        bits = v.to(tl.int32, bitcast=True)
        a = tl.abs(v)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # binade of |v|; below 2^-6: e4m3's subnormal step 2^-9
        inv_ulp = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e)
        ulp = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3): 3 mantissa bits
        r = ((a * inv_ulp + 8388608.0) - 8388608.0) * ulp
        v = tl.where(bits < 0, -r, r)  # the sign bit: -0.0 stays -0.0, as torch's cast
    return v.to(tl.float8e4nv)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                          SOFT_ROUND: tl.constexpr, RECIPROCAL: tl.constexpr):
    """One program per row: amax, scale = amax / 448 (1 if 0), codes; the row in registers when ONE_PASS.
    RECIPROCAL (CUDA tensors): amax * fp32(1 / 448), which is what torch computes for ``amax / 448`` on CUDA (a
    division by a Python scalar runs as a multiplication by its fp32 reciprocal there); else the IEEE quotient,
    torch's CPU result."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        top = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            top = tl.maximum(top, tl.abs(tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)))
        amax = tl.max(top, axis=0)
    if RECIPROCAL:
        scale = tl.where(amax > 0, amax * 0.002232142857142857, 1.0)
    else:
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    tl.store(s_ptr + row, scale)
    if ONE_PASS:
        tl.store(q_row + offs, _to_e4m3(x, scale, SOFT_ROUND), mask=mask)
    else:
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            xk = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + offs, _to_e4m3(xk, scale, SOFT_ROUND), mask=m)


def quantize_rows_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager PyTorch, the accuracy path's rule: (codes e4m3 like x, scales fp32 [..., 1]); codes * scales is
    ``evaluators.quantize.quantize_activation(x, "fp8")`` before its rounding to x's dtype."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_rows_fp8(x: torch.Tensor, block: int | None = None,
                      config: QuantConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dimension) dynamic FP8 quantization in one Triton pass: x [..., K] fp16 / bf16 / fp32 ->
    (codes float8_e4m3fn [..., K], scales fp32 [..., 1]), bit-equal to ``quantize_rows_fp8_reference``.
    ``block`` (tests): the tile of the two-pass loop, forcing it for any K; ``config``: the launch (default
    ``QUANT_CONFIGS[K]``, else one pass up to 8192 channels, two passes of 2048 beyond). Off CUDA without the
    Triton interpreter: the reference."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"quantize_rows_fp8 takes fp16 / bf16 / fp32, got {x.dtype}")
    if x.device.type != "cuda" and not _interpreting():
        return quantize_rows_fp8_reference(x)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M and K:
        cfg = config or QUANT_CONFIGS.get(K)
        if cfg is None:
            cfg = QuantConfig() if K <= ONE_PASS_MAX else QuantConfig(TWO_PASS_BLOCK, TWO_PASS_WARPS)
        block = block or cfg.block
        one_pass = block is None and K <= 16384
        BLOCK = triton.next_power_of_2(K) if one_pass else (block or TWO_PASS_BLOCK)
        _quantize_rows_kernel[(M,)](x2, q, s, K, x2.stride(0), q.stride(0), BLOCK=BLOCK, ONE_PASS=one_pass,
                                    SOFT_ROUND=_interpreting(), RECIPROCAL=x.device.type == "cuda",
                                    num_warps=cfg.num_warps or max(1, min(16, BLOCK // 1024)))
    elif M:
        s.fill_(1.0)
    return q.view(*x.shape[:-1], K), s.view(*x.shape[:-1], 1)


# ---------------------------------------------------------------------------------------------- GEMM
_SCALED_MM_OUT: dict[tuple, bool] = {}  # (out dtype, has bias) -> _scaled_mm accepted it directly


def scaled_mm_fits(device: torch.device, k: int, n: int) -> bool:
    """Whether ``fp8_gemm`` runs ``torch._scaled_mm``: CUDA with FP8 tensor cores (sm_89+), K and N multiples of 16."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            and k % 16 == 0 and n % 16 == 0)


def _dequant_gemm(xq, sx, w, bias, out_dtype):
    y = (xq.float() * sx) @ w.dequantize().T
    return (y if bias is None else y + bias.float()).to(out_dtype)


def fp8_gemm(xq: torch.Tensor, sx: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.bfloat16, use_fast_accum: bool = False) -> torch.Tensor:
    """y [M, N] = (xq * sx) @ (w.codes * w.scale)^T (+ bias) from pre-quantized rows xq [M, K] e4m3, sx [M, 1] fp32:
    ``torch._scaled_mm`` with rowwise scales where it fits (``scaled_mm_fits``), else the reference GEMM."""
    if xq.shape[-1] != w.k:
        raise ValueError(f"x has {xq.shape[-1]} channels, the weight {w.k}")
    if not scaled_mm_fits(xq.device, w.k, w.n):
        return _dequant_gemm(xq, sx, w, bias, out_dtype)
    key = (out_dtype, bias is not None)
    if _SCALED_MM_OUT.get(key, True):
        try:
            y = torch._scaled_mm(xq, w.codes.t(), scale_a=sx, scale_b=w.scale,
                                 bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                                 use_fast_accum=use_fast_accum)
            _SCALED_MM_OUT[key] = True
            return y
        except (RuntimeError, ValueError, TypeError):  # e.g. "only bf16 ... output types ... for row-wise scaling"
            if key in _SCALED_MM_OUT:
                raise
            _SCALED_MM_OUT[key] = False
    y = torch._scaled_mm(xq, w.codes.t(), scale_a=sx, scale_b=w.scale, out_dtype=torch.bfloat16,
                         use_fast_accum=use_fast_accum)
    return (y if bias is None else y.float() + bias.float()).to(out_dtype)


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               use_fast_accum: bool = False) -> torch.Tensor:
    """W8A8 linear: x [..., K] -> [..., N] in out_dtype (default x's): ``quantize_rows_fp8`` + ``fp8_gemm``."""
    lead, K = x.shape[:-1], x.shape[-1]
    xq, sx = quantize_rows_fp8(x.reshape(-1, K))
    y = fp8_gemm(xq, sx, w, bias, out_dtype or x.dtype, use_fast_accum)
    return y.view(*lead, w.n)


def fp8_linear_reference(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Eager per-token quantization, both operands dequantized exactly in fp32, fp32 matmul (+ bias), one rounding."""
    lead, K = x.shape[:-1], x.shape[-1]
    xq, sx = quantize_rows_fp8_reference(x.reshape(-1, K))
    return _dequant_gemm(xq, sx, w.to(x.device), bias, out_dtype or x.dtype).view(*lead, w.n)
