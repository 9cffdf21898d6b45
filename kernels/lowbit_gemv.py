"""Activation-sparse low-bit decode GEMV: y = (x * m) @ dequant(Wq), m = |x| > threshold (union over the batch).

Why. At decode the GEMV reads every weight byte once, so its time is the bytes it reads. 4-bit weights read a
quarter of bf16's bytes, and activation sparsity skips the rows of the dropped input channels on top of that:
at 50% sparsity an INT4-g128 GEMV needs ~1/7.5 of the bf16 bytes. PyTorch's best low-bit decode GEMV
(`torch.ops.aten._weight_int4pack_mm`, tinygemm) is dense only and reaches 1.84x over cuBLAS bf16 on the H200
(issue 12); a fused activation-sparse + INT4 GEMV is what TEAL users asked for (TEAL issue #16).

Layout (everything transposed along the input channel, as in gemv.py, so a dropped channel is a skipped row):

* ``int4``: ``qweight`` uint8 [K, ceil(N / 2)], row j = input channel j. Byte (j, c) holds output columns 2c
  (low nibble) and 2c + 1 (high nibble) as ``code + 8`` with ``code`` in [-8, 7] (symmetric). ``scales`` fp16
  [ceil(K / group), N]: input channels [g * group, (g + 1) * group) of column n share ``scales[g, n]``;
  w[n, j] = code * scale. **Packing along N** (not K) keeps a kept row's bytes contiguous and its own: a row is
  N / 2 consecutive bytes that no other row shares. Packing two input channels per byte would tie each channel
  to its neighbour: with a random mask most kept rows would sit in a byte pair whose other half is dropped, so
  the kernel would read ~2x the kept bytes at s = 0.5 (and a row gather would need a nibble select per row).
* ``int8`` / ``fp8`` (e4m3): ``qweight`` [K, N], one fp32 scale per output column (``scales`` [N]); applied once
  to the fp32 accumulator at the end (scales per output column commute with the sum over input channels).

Algorithm (gemv.py's, with the dequantization in registers). Grid (N stripes, K splits), program (n, s):

1. Compaction of the kept channels of its K range into a private scratch row (fused |x| > t test on
   max_b |x_b|, a cumsum and a scatter). INT4 compacts one scale group at a time and pads each group's list to
   a multiple of BLOCK_K with -1, so a tile of BLOCK_K kept rows never straddles two groups: the tile needs one
   scale row [BLOCK_N] (loaded once per tile, not per element), and the scale is applied to the tile's fp32
   partial product after the dot (exact: codes times activations are exact in fp32). The padding costs masked
   lanes, not bytes. INT8 / FP8 reuse gemv.py's ``_compact_kept``. Dense path (``threshold=None``): no scan, no
   scratch, rows in order.
2. Loop over the kept rows in tiles of BLOCK_K: gather the packed bytes [BLOCK_K, BLOCK_N / 2] of the stripe
   (one contiguous run per row), unpack the low and high nibbles into two half-tiles of codes in the activation
   dtype by the exponent trick (``(nibble | 0x6400)`` read as fp16 is 1024 + nibble; bf16: 0x4300, 128 + nibble:
   no int-to-float conversion, used by FasterTransformer's and Marlin's dequantizers), and accumulate the even
   and odd output columns separately, through tensor cores (``tl.dot``, batch padded to 16; ``swap_ab``: the
   weight tile as the MMA's A operand, y^T = W^T x^T) or FMAs. The two halves are interleaved once, after
   the loop.
3. Split-K reduction by the last program to arrive, deterministic (gemv.py's ``_write_out``, same workspace).

Batch 1 (INT4 group 128 / INT8, rows of whole 32-bit words): the word-FMA kernel ``_word_gemv_kernel``
(``LowbitConfig(kernel="words")``), no tensor cores. Each thread loads 16-byte vectors of packed words and
dequantizes every field exactly in fp32 with one LOP3 ((w & mask) | 0x4B000000, magic passed at run time so it
stays in a register) and one FADD (minus 2**23 + offset, a power-of-two factor folded into the scale), then one
FFMA with x: ~3.6 SASS instructions per weight in the loop (Triton 3.6, counted on the cubin). The
accumulators keep the rows dimension (no reduction inside the loop), per scale group t_i, scaled into a_i when the
group ends. Two loop forms: per-group loops (INT4 sparse: compaction per group, then its kept rows) or one flat
loop software-pipelined by Triton (``pipe``: tl.range num_stages, cp.async into shared memory; the compaction
stores each kept row's x beside its index and pads each group to whole steps; dense 16-bit x is read as 4-byte
pairs so it is pipelined too). K splits reduce by fp32 atomics into a zeroed accumulator whose last program
writes y and re-zeroes it (``reduce="ordered"``: gemv.py's deterministic last-arriver sum instead). Measured
variants, winners and losers: kernels/NOTES.md, "lowbit GEMV on the H200".

Complexity per call: weight bytes (1 - s) K N b / 8 (b = 4 or 8) + scale bytes 2 N ceil(K / 128) (INT4, every
group touched unless all its channels are dropped) + O(K B) for the scan + 8 B N n_splits for the partials;
arithmetic 2 (1 - s) K N B (negligible: the kernel is bound by bytes and latency). Same per-call latency chain
as gemv.py (kernels/NOTES.md, variant 4).

Reference: ``lowbit_gemv_reference`` dequantizes (``dequantize``) and runs gemv.py's ``sparse_gemv_reference``
in fp32. Quantizers: ``pack_int4`` (scale = amax / 7.5 per group and column, codes round-to-nearest clamped to
[-8, 7], the symmetric GPTQ grid), ``pack_int8`` (amax / 127), ``pack_fp8`` (amax / 448). Batch 1..4 shares the
union mask. Measured on the GPU by studies/lowbit_bench.py.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .gemv import (MAX_BATCH, GemvConfig, _compact_kept, _pick_splits, _sm_count, _workspace, _write_out,
                   sparse_gemv_reference)

GROUP = 128
FORMATS = ("int4", "int8", "fp8")


@dataclasses.dataclass(frozen=True)
class LowbitConfig(GemvConfig):
    """gemv.py's launch parameters plus swap_ab: with use_dot, compute y^T = W^T x^T so that the dequantized
    weight tile is the MMA's A operand (Hopper's wgmma takes A from registers and needs M >= 64; with the
    batch as M = 16 Triton uses the Ampere MMA); and the word-FMA kernel's (kernel="words", batch 1): block_n
    output columns (block_n / 8 INT4 or / 4 INT8 words), block_k rows per step in ``sub`` loads of
    block_k / sub rows (one 16-byte vector per thread when (block_k / sub) * words = 128 * num_warps), num_stages
    the pipeline depth with ``pipe``; n_splits 0: about four programs per SM, K splits of whole 128-row groups."""

    swap_ab: bool = False
    kernel: str = "tile"  # "tile": _int4 / _channel_gemv_kernel; "words": _word_gemv_kernel (batch 1, FMA)
    sub: int = 1  # words: independent 16-byte loads per thread per step (block_k / sub rows per load)
    reduce: str = "atomic"  # words, K splits > 1: "atomic" (fp32 atomics, self-cleaning) | "ordered"
    prefetch: bool = False  # words, rows in order: the next step's loads issued before this step's FMAs
    pipe: bool = False  # words: one flat loop pipelined by Triton (num_stages deep) instead of per-group loops
    spre: bool = False  # words, pipe, one group per K split: the group's scales loaded before the loop
    pairx: bool = True  # words, pipe, dense, 16-bit x, even sub: x of two rows per 4-byte load (pipelined)


INT4_GPU_CONFIG = LowbitConfig(block_n=256, block_k=64, use_dot=True, num_warps=4, num_stages=3)
CHANNEL_GPU_CONFIG = LowbitConfig(block_n=128, block_k=64, use_dot=True, num_warps=4, num_stages=3)
# Batch 1 untuned defaults (kernels/NOTES.md, "lowbit GEMV on the H200"): INT4 sparse and INT8 run the word-FMA
# kernel (INT4: per-group compaction loops; INT8: the flat loop software-pipelined by Triton); INT4 dense keeps the
# tensor-core tile, which the word kernel did not beat.
INT4_WORD_CONFIG = LowbitConfig(block_n=512, block_k=32, num_warps=4, num_stages=1, kernel="words", sub=4)
INT8_WORD_CONFIG = LowbitConfig(block_n=256, block_k=16, num_warps=4, num_stages=4, kernel="words", sub=2, pipe=True)
WORD_CHUNK = 128  # words kernel: rows per scale flush (the INT4 group; INT8: a chunk) and K-split unit

# Launch parameters per (fmt, dense, K, N, batch), measured by `studies/lowbit_bench.py` (its `tuned.json`;
# `load_tuned` fills this). Absent shapes: INT4_GPU_CONFIG / CHANNEL_GPU_CONFIG with automatic K splits.
TUNED_CONFIGS: dict[tuple[str, bool, int, int, int], LowbitConfig] = {}


@dataclasses.dataclass(frozen=True)
class LowbitWeight:
    """A quantized weight in the kernel's layout (see the module docstring): transposed along the input channel."""

    fmt: str  # "int4" | "int8" | "fp8"
    qweight: torch.Tensor  # int4: uint8 [K, ceil(N/2)]; int8: int8 [K, N]; fp8: float8_e4m3fn [K, N]
    scales: torch.Tensor  # int4: fp16 [ceil(K/group), N]; int8 / fp8: fp32 [N]
    n: int  # output channels
    k: int  # input channels
    group: int = 0  # int4: input channels per scale

    def to(self, device) -> LowbitWeight:
        return dataclasses.replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device))

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()

    @staticmethod
    def cat(parts: list[LowbitWeight]) -> LowbitWeight:
        """Concatenated along N (output columns): a fused projection (q|k|v, gate|up) from its parts, one format,
        group and K (INT4 parts of even N, so no part ends in a padding nibble)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if any((p.fmt, p.k, p.group) != (first.fmt, first.k, first.group) for p in parts):
            raise ValueError(f"cannot fuse {[(p.fmt, p.k, p.group) for p in parts]}: one format, K and group needed")
        if first.fmt == "int4" and any(p.n % 2 for p in parts):
            raise ValueError(f"INT4 parts of odd width {[p.n for p in parts]} cannot be fused (packed along N)")
        dim = 1 if first.fmt == "int4" else 0
        return dataclasses.replace(first, qweight=torch.cat([p.qweight for p in parts], 1).contiguous(),
                                   scales=torch.cat([p.scales for p in parts], dim).contiguous(),
                                   n=sum(p.n for p in parts))


def lowbit_from_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int | None = None) -> LowbitWeight:
    """The kernel layout of an already quantized weight, codes unchanged: ``codes`` [N, K] (integers on the
    symmetric grid, int8 storage, or float8_e4m3fn), ``scales`` [N, G] (G = 1: one per output channel, else one
    per ``group`` input channels, the last group possibly shorter), any float dtype (the accuracy path's
    ``QuantizedWeight`` tensors). 4-bit per-channel scales are repeated over groups of ``GROUP`` (exact)."""
    N, K = codes.shape
    scales = scales.detach().reshape(N, -1)
    if codes.dtype == torch.float8_e4m3fn or bits == 8:
        if scales.shape[1] != 1:
            raise ValueError(f"{bits}-bit weights need one scale per output channel, got {scales.shape[1]} groups")
        fmt = "fp8" if codes.dtype == torch.float8_e4m3fn else "int8"
        q = codes.T.contiguous() if fmt == "fp8" else codes.to(torch.int8).T.contiguous()
        return LowbitWeight(fmt, q, scales[:, 0].float().contiguous(), N, K)
    if bits != 4:
        raise ValueError(f"no {bits}-bit decode kernel: the low-bit GEMV runs INT4, INT8 and FP8 weights")
    if int(codes.min()) < -8 or int(codes.max()) > 7:
        raise ValueError("INT4 codes must lie in [-8, 7]")
    per_channel = scales.shape[1] == 1
    group = GROUP if per_channel else group
    if group is None or group < 16 or group & (group - 1) or (not per_channel and triton.cdiv(K, group) !=
                                                              scales.shape[1]):
        raise ValueError(f"INT4 groups: a power of two >= 16 with ceil(K / group) = {scales.shape[1]} scales "
                         f"(K = {K}, group = {group})")
    s16 = scales.float().to(torch.float16)
    if not torch.isfinite(s16).all() or bool(((s16 == 0) & (scales != 0)).any()):
        raise ValueError("INT4 scales out of fp16 range (the kernel keeps fp16 scales)")
    if per_channel:
        s16 = s16.expand(N, triton.cdiv(K, group))
    return _int4_weight(codes.T, s16.T, group)


def pack_int4(w: torch.Tensor, group: int = GROUP) -> LowbitWeight:
    """w [N, K] float -> INT4 with one fp16 scale per (group of `group` input channels, output column)."""
    assert w.dim() == 2 and group >= 16 and group & (group - 1) == 0, "group: a power of two >= 16"
    N, K = w.shape
    ng = triton.cdiv(K, group)
    wt = torch.nn.functional.pad(w.detach().float().T, (0, 0, 0, ng * group - K)).reshape(ng, group, N)
    scales = (wt.abs().amax(dim=1) / 7.5).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)  # [ng, N]
    assert torch.isfinite(scales).all(), "weights too large for fp16 scales"
    codes = torch.round(wt / scales.float()[:, None, :]).clamp_(-8, 7).reshape(ng * group, N)[:K]
    return _int4_weight(codes, scales, group)


def _int4_weight(codes_t: torch.Tensor, scales: torch.Tensor, group: int) -> LowbitWeight:
    """The INT4 layout from codes [K, N] in [-8, 7] (any dtype) and fp16 scales [ceil(K / group), N]: code + 8
    two per byte along N (an odd N gets a code-0 padding column)."""
    K, N = codes_t.shape
    u = (codes_t.to(torch.int16) + 8).to(torch.uint8)
    if N % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)  # a code-0 column
    q = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
    return LowbitWeight("int4", q, scales.contiguous(), N, K, group)


def _pack_channel(w: torch.Tensor, fmt: str, qmax: float, dtype: torch.dtype) -> LowbitWeight:
    assert w.dim() == 2
    N, K = w.shape
    wt = w.detach().float().T  # [K, N]
    scales = (wt.abs().amax(dim=0) / qmax).clamp_min(1e-12)
    q = wt / scales
    q = torch.round(q).clamp_(-qmax, qmax) if fmt == "int8" else q.clamp_(-qmax, qmax)
    return LowbitWeight(fmt, q.to(dtype).contiguous(), scales.contiguous(), N, K)


def pack_int8(w: torch.Tensor) -> LowbitWeight:
    """w [N, K] float -> INT8 [K, N] (symmetric, codes in [-127, 127]) with one fp32 scale per output column."""
    return _pack_channel(w, "int8", 127.0, torch.int8)


def pack_fp8(w: torch.Tensor) -> LowbitWeight:
    """w [N, K] float -> FP8 e4m3 [K, N] with one fp32 scale per output column (amax -> 448)."""
    return _pack_channel(w, "fp8", 448.0, torch.float8_e4m3fn)


def dequantize(packed: LowbitWeight) -> torch.Tensor:
    """The weight the kernel multiplies by, transposed: Wt [K, N] fp32 (exact: codes times scales)."""
    if packed.fmt == "int4":
        q = packed.qweight
        codes = torch.stack([(q & 15), (q >> 4)], dim=-1).reshape(q.shape[0], -1)[:, : packed.n].float() - 8
        rows = torch.arange(packed.k, device=q.device) // packed.group
        return codes * packed.scales.float()[rows]
    return packed.qweight.float() * packed.scales.float()[None, :]


def lowbit_gemv_reference(x: torch.Tensor, packed: LowbitWeight, threshold: float | None = None,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize, then gemv.py's reference in fp32 (threshold None: the dense product, no mask)."""
    wt = dequantize(packed.to(x.device))
    if threshold is None:
        return (x.float() @ wt).to(out_dtype or x.dtype)
    return sparse_gemv_reference(x, wt, threshold, out_dtype=out_dtype)


@triton.jit
def _compact_grouped(x_ptr, scratch_row, k_lo, k_hi, stride_xb, thr, BATCH: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Kept channels of [k_lo, k_hi) in order into scratch_row, one group at a time, each group's list padded
    with -1 to a multiple of BLOCK_K (k_lo is group-aligned): no tile of BLOCK_K slots spans two groups.
    -> number of slots."""
    count = 0
    lane = tl.arange(0, GROUP)
    for k0 in range(k_lo, k_hi, GROUP):
        k_offs = k0 + lane
        k_in = k_offs < k_hi
        score = tl.zeros([GROUP], dtype=tl.float32)
        for b in tl.static_range(BATCH):
            score = tl.maximum(score, tl.abs(tl.load(x_ptr + b * stride_xb + k_offs, mask=k_in, other=0.0)
                                             .to(tl.float32)))
        keep = (score > thr) & k_in
        keep_i = keep.to(tl.int32)
        n_keep = tl.sum(keep_i, axis=0)
        tl.store(scratch_row + count + tl.cumsum(keep_i, axis=0) - 1, k_offs, mask=keep)
        n_pad = tl.cdiv(n_keep, BLOCK_K) * BLOCK_K - n_keep
        tl.store(scratch_row + count + n_keep + lane, -1, mask=lane < n_pad)  # disjoint from the kept slots
        count += n_keep + n_pad
    tl.debug_barrier()  # scratch written by all threads of the program before any reads it
    return count


@triton.jit
def _tile_rows(scratch_row, t0, k_lo, k_hi, count, k_ar, DENSE: tl.constexpr, PADDED: tl.constexpr):
    """Rows (input channels) of the tile at slot t0 and which of them are real."""
    if DENSE:
        rows = k_lo + t0 + k_ar
        valid = rows < k_hi
    elif PADDED:  # int4: -1 marks padding
        rows = tl.load(scratch_row + t0 + k_ar)
        valid = rows >= 0
    else:
        valid = t0 + k_ar < count
        rows = tl.load(scratch_row + t0 + k_ar, mask=valid, other=0)
    return rows, valid


@triton.jit
def _nibbles_to(v, DTYPE: tl.constexpr):
    """Nibbles (0..15, any int type) -> nibble - 8 in DTYPE, exactly, without an int-to-float conversion."""
    if DTYPE == tl.float16:
        return (v.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0  # 1024 + v
    elif DTYPE == tl.bfloat16:
        return (v.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0  # 128 + v
    else:
        return (v.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2**23 + v


@triton.jit
def _channel_to(q, DTYPE: tl.constexpr):
    """int8 / fp8 codes -> DTYPE (exact). int8 through fp16's exponent trick: (q + 128) | 0x6400 is 1024 + q + 128."""
    if q.dtype == tl.int8:
        if DTYPE == tl.float32:
            return q.to(tl.float32)
        f = ((q.to(tl.uint8, bitcast=True).to(tl.int16) ^ 0x80) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
        return f.to(DTYPE)
    return q.to(DTYPE)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr, scratch_ptr, partial_ptr, counter_ptr,
    K, N, NB,  # NB = bytes per packed row = ceil(N / 2)
    stride_xb, k_split, n_splits, thr,
    BATCH: tl.constexpr, BATCH_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, DENSE: tl.constexpr, USE_DOT: tl.constexpr, SWAP_AB: tl.constexpr, REDUCE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_N // 2
    jb = pid_n * HALF + tl.arange(0, HALF)  # byte columns of this stripe
    m_lo = 2 * jb < N
    m_hi = 2 * jb + 1 < N
    b_offs = tl.arange(0, BATCH_PAD)
    b_mask = b_offs < BATCH
    k_ar = tl.arange(0, BLOCK_K)
    k_lo = pid_s * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    scratch_row = scratch_ptr + (pid_n * n_splits + pid_s).to(tl.int64) * k_split
    if DENSE:
        count = k_hi - k_lo
    else:
        count = _compact_grouped(x_ptr, scratch_row, k_lo, k_hi, stride_xb, thr, BATCH, GROUP, BLOCK_K)
    if SWAP_AB:  # transposed accumulators [HALF, BATCH_PAD]
        acc_lo = tl.zeros([HALF, BATCH_PAD], dtype=tl.float32)
        acc_hi = tl.zeros([HALF, BATCH_PAD], dtype=tl.float32)
    else:
        acc_lo = tl.zeros([BATCH_PAD, HALF], dtype=tl.float32)  # even output columns 2 jb
        acc_hi = tl.zeros([BATCH_PAD, HALF], dtype=tl.float32)  # odd output columns 2 jb + 1
    for t0 in range(0, count, BLOCK_K):
        rows, valid = _tile_rows(scratch_row, t0, k_lo, k_hi, count, k_ar, DENSE, True)
        if DENSE:
            g = (k_lo + t0) // GROUP
        else:
            g = tl.load(scratch_row + t0) // GROUP  # the first slot of a tile is always a kept row
        byte = tl.load(q_ptr + rows.to(tl.int64)[:, None] * NB + jb[None, :],
                       mask=valid[:, None] & (jb < NB)[None, :], other=0)  # [BLOCK_K, HALF] uint8
        xv = tl.load(x_ptr + b_offs[:, None] * stride_xb + rows[None, :], mask=b_mask[:, None] & valid[None, :],
                     other=0.0)  # [BATCH_PAD, BLOCK_K]; zero on padding rows, so their codes do not matter
        s_lo = tl.load(s_ptr + g * N + 2 * jb, mask=m_lo, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + g * N + 2 * jb + 1, mask=m_hi, other=0.0).to(tl.float32)
        w_lo = _nibbles_to(byte & 15, xv.dtype)
        w_hi = _nibbles_to(byte >> 4, xv.dtype)
        if SWAP_AB:
            xt = tl.trans(xv)
            acc_lo += tl.dot(tl.trans(w_lo), xt, input_precision="ieee") * s_lo[:, None]
            acc_hi += tl.dot(tl.trans(w_hi), xt, input_precision="ieee") * s_hi[:, None]
        elif USE_DOT:
            acc_lo += tl.dot(xv, w_lo, input_precision="ieee") * s_lo[None, :]
            acc_hi += tl.dot(xv, w_hi, input_precision="ieee") * s_hi[None, :]
        else:
            xf = xv.to(tl.float32)[:, :, None]
            acc_lo += tl.sum(xf * w_lo.to(tl.float32)[None, :, :], axis=1) * s_lo[None, :]
            acc_hi += tl.sum(xf * w_hi.to(tl.float32)[None, :, :], axis=1) * s_hi[None, :]
    if SWAP_AB:
        acc_lo = tl.trans(acc_lo)
        acc_hi = tl.trans(acc_hi)
    acc = tl.interleave(acc_lo, acc_hi)  # [BATCH_PAD, BLOCK_N], columns 2 jb, 2 jb + 1
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _write_out(acc, y_ptr, partial_ptr, counter_ptr, pid_n, pid_s, n_splits, N, n_offs, n_offs < N, b_offs, b_mask,
               BATCH, BATCH_PAD, BLOCK_N, REDUCE)


@triton.jit
def _channel_gemv_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr, scratch_ptr, partial_ptr, counter_ptr,
    K, N, stride_xb, k_split, n_splits, thr,
    BATCH: tl.constexpr, BATCH_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, DENSE: tl.constexpr, USE_DOT: tl.constexpr, SWAP_AB: tl.constexpr,
    REDUCE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    b_offs = tl.arange(0, BATCH_PAD)
    b_mask = b_offs < BATCH
    k_ar = tl.arange(0, BLOCK_K)
    k_lo = pid_s * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    scratch_row = scratch_ptr + (pid_n * n_splits + pid_s).to(tl.int64) * k_split
    if DENSE:
        count = k_hi - k_lo
    else:
        count = _compact_kept(x_ptr, x_ptr, scratch_row, k_lo, k_hi, stride_xb, thr, BATCH, SCAN_BLOCK, False, False)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BATCH_PAD], dtype=tl.float32)
    else:
        acc = tl.zeros([BATCH_PAD, BLOCK_N], dtype=tl.float32)
    for t0 in range(0, count, BLOCK_K):
        rows, valid = _tile_rows(scratch_row, t0, k_lo, k_hi, count, k_ar, DENSE, False)
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * N + n_offs[None, :], mask=valid[:, None] & n_mask[None, :],
                    other=0.0)
        xv = tl.load(x_ptr + b_offs[:, None] * stride_xb + rows[None, :], mask=b_mask[:, None] & valid[None, :],
                     other=0.0)
        w = _channel_to(q, xv.dtype)
        if SWAP_AB:
            acc = tl.dot(tl.trans(w), tl.trans(xv), acc, input_precision="ieee")
        elif USE_DOT:
            acc = tl.dot(xv, w, acc, input_precision="ieee")
        else:
            acc += tl.sum(xv.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if SWAP_AB:
        acc = tl.trans(acc)
    acc = acc * tl.load(s_ptr + n_offs, mask=n_mask, other=0.0)[None, :]
    _write_out(acc, y_ptr, partial_ptr, counter_ptr, pid_n, pid_s, n_splits, N, n_offs, n_mask, b_offs, b_mask,
               BATCH, BATCH_PAD, BLOCK_N, REDUCE)


@triton.jit
def _word_value(w, I: tl.constexpr, magic, INT8: tl.constexpr):
    """Field I (bits up to 19; the caller passes the word shifted for the high fields) of every 32-bit word of w,
    exactly, in fp32, times a power of two (`_word_factor`): the field is masked into the mantissa of 2**23
    (one LOP3: (w & mask) | magic, magic = 0x4B000000 passed at run time so that it stays in one register and
    the masks are immediates) and 2**23 + offset subtracted (one FADD); no integer-to-float conversion.
    INT4: nibble I -> (code) * 16**I (I <= 4); INT8 (w XOR 0x80808080: bytes = code + 128): byte I -> code * 256**I."""
    if INT8:
        if I == 0:
            return ((w & 0xFF) | magic).to(tl.float32, bitcast=True) - 8388736.0  # 2**23 + 128
        else:
            return ((w & 0xFF00) | magic).to(tl.float32, bitcast=True) - 8421376.0  # 2**23 + 128 * 256
    else:
        if I == 0:
            return ((w & 0xF) | magic).to(tl.float32, bitcast=True) - 8388616.0  # 2**23 + 8
        elif I == 1:
            return ((w & 0xF0) | magic).to(tl.float32, bitcast=True) - 8388736.0  # 2**23 + 8 * 16
        elif I == 2:
            return ((w & 0xF00) | magic).to(tl.float32, bitcast=True) - 8390656.0  # 2**23 + 8 * 16**2
        elif I == 3:
            return ((w & 0xF000) | magic).to(tl.float32, bitcast=True) - 8421376.0  # 2**23 + 8 * 16**3
        else:
            return ((w & 0xF0000) | magic).to(tl.float32, bitcast=True) - 8912896.0  # 2**23 + 8 * 16**4


@triton.jit
def _word_factor(I: tl.constexpr, INT8: tl.constexpr):
    """2**-shift undoing `_word_value`'s power of two for value I of a word (columns VALS * c + I)."""
    if INT8:
        if I % 2 == 0:
            return 1.0
        else:
            return 0.00390625  # 2**-8
    else:
        if I == 0:
            return 1.0
        elif I == 1 or I == 4:
            return 0.0625
        elif I == 2 or I == 5:
            return 0.00390625
        elif I == 3 or I == 6:
            return 0.000244140625
        else:
            return 1.52587890625e-05


@triton.jit
def _word_fma(w, xb, t0, t1, t2, t3, t4, t5, t6, t7, magic, INT8: tl.constexpr):
    """t_i += value_i(w) * x (per value: one LOP3, one FADD, one FFMA; per word one shift); INT8 uses t0..t3."""
    if INT8:
        w = w ^ -2139062144  # 0x80808080: signed bytes -> code + 128
        wh = w >> 16
        t0 += _word_value(w, 0, magic, True) * xb
        t1 += _word_value(w, 1, magic, True) * xb
        t2 += _word_value(wh, 0, magic, True) * xb
        t3 += _word_value(wh, 1, magic, True) * xb
    else:
        wh = w >> 12  # nibbles 4..7 at bits 4..19 (a mask at bits 0..3 after a shift becomes a bit-field extract)
        t0 += _word_value(w, 0, magic, False) * xb
        t1 += _word_value(w, 1, magic, False) * xb
        t2 += _word_value(w, 2, magic, False) * xb
        t3 += _word_value(w, 3, magic, False) * xb
        t4 += _word_value(wh, 1, magic, False) * xb
        t5 += _word_value(wh, 2, magic, False) * xb
        t6 += _word_value(wh, 3, magic, False) * xb
        t7 += _word_value(wh, 4, magic, False) * xb
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _word_scale(s_ptr, g, N, cw, c_in, I: tl.constexpr, VALS: tl.constexpr):
    """fp32 scale of value I of words cw in scale row g (INT4: fp16 [groups, N]; INT8: fp32 [N], g = 0),
    times `_word_factor`; 0 past N."""
    n = VALS * cw + I
    return tl.load(s_ptr + g * N + n, mask=c_in & (n < N), other=0.0).to(tl.float32) * _word_factor(I, VALS == 4)


@triton.jit
def _word_flush(a0, a1, a2, a3, a4, a5, a6, a7, t0, t1, t2, t3, t4, t5, t6, t7, s_ptr, g, N, cw, c_in,
                INT8: tl.constexpr):
    """End of a scale group: a_i += t_i * scale (INT4); INT8 (scale per column, applied at the end): a_i += t_i."""
    if INT8:
        a0 += t0
        a1 += t1
        a2 += t2
        a3 += t3
    else:
        a0 += t0 * _word_scale(s_ptr, g, N, cw, c_in, 0, 8)[None, :]
        a1 += t1 * _word_scale(s_ptr, g, N, cw, c_in, 1, 8)[None, :]
        a2 += t2 * _word_scale(s_ptr, g, N, cw, c_in, 2, 8)[None, :]
        a3 += t3 * _word_scale(s_ptr, g, N, cw, c_in, 3, 8)[None, :]
        a4 += t4 * _word_scale(s_ptr, g, N, cw, c_in, 4, 8)[None, :]
        a5 += t5 * _word_scale(s_ptr, g, N, cw, c_in, 5, 8)[None, :]
        a6 += t6 * _word_scale(s_ptr, g, N, cw, c_in, 6, 8)[None, :]
        a7 += t7 * _word_scale(s_ptr, g, N, cw, c_in, 7, 8)[None, :]
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _compact_chunks(x_ptr, scratch_row, ends_row, k_lo, k_hi, thr, CHUNK: tl.constexpr):
    """Kept channels (|x| > thr) of [k_lo, k_hi) in order into scratch_row, unpadded; ends_row[j] = number of
    slots up to the end of chunk j (chunks of CHUNK channels from k_lo)."""
    count = 0
    lane = tl.arange(0, CHUNK)
    for k0 in range(k_lo, k_hi, CHUNK):
        k_offs = k0 + lane
        k_in = k_offs < k_hi
        keep = (tl.abs(tl.load(x_ptr + k_offs, mask=k_in, other=0.0).to(tl.float32)) > thr) & k_in
        keep_i = keep.to(tl.int32)
        tl.store(scratch_row + count + tl.cumsum(keep_i, axis=0) - 1, k_offs, mask=keep)
        count += tl.sum(keep_i, axis=0)
        tl.store(ends_row + (k0 - k_lo) // CHUNK, count)
    tl.debug_barrier()  # scratch written by all threads of the program before any reads it


@triton.jit
def _compact_steps(x_ptr, idx_row, xs_row, gid_row, k_lo, k_hi, thr, CHUNK: tl.constexpr, STEP: tl.constexpr):
    """Kept channels (|x| > thr) of [k_lo, k_hi) in order: idx_row[slot] = channel, xs_row[slot] = its x (fp32
    bits); each chunk's list padded with (-1, 0) to a multiple of STEP slots, so that no step of STEP slots
    spans two chunks (scale groups); gid_row[step] = the chunk of each step, then -1. -> number of steps."""
    count = 0
    lane = tl.arange(0, CHUNK)
    for k0 in range(k_lo, k_hi, CHUNK):
        k_offs = k0 + lane
        k_in = k_offs < k_hi
        xv = tl.load(x_ptr + k_offs, mask=k_in, other=0.0).to(tl.float32)
        keep = (tl.abs(xv) > thr) & k_in
        keep_i = keep.to(tl.int32)
        pos = count + tl.cumsum(keep_i, axis=0) - 1
        tl.store(idx_row + pos, k_offs, mask=keep)
        tl.store(xs_row + pos, xv.to(tl.int32, bitcast=True), mask=keep)
        n_keep = tl.sum(keep_i, axis=0)
        n_steps = tl.cdiv(n_keep, STEP)
        pad = count + n_keep + lane
        pad_in = lane < n_steps * STEP - n_keep
        tl.store(idx_row + pad, -1, mask=pad_in)
        tl.store(xs_row + pad, 0, mask=pad_in)
        tl.store(gid_row + count // STEP + lane, k0 // CHUNK, mask=lane < n_steps)
        count += n_steps * STEP
    tl.store(gid_row + count // STEP, -1)
    tl.debug_barrier()  # scratch written by all threads of the program before any reads it
    return count // STEP


@triton.jit
def _rows_tile(q_ptr, x_ptr, rows, k_hi, NW, cw, c_in):
    """Words [rows, cw] and x[rows] (fp32, 0 on rows past k_hi, whose words are not read: masked lanes load
    nothing, and whatever they hold dequantizes to a finite value times x = 0)."""
    valid = rows < k_hi
    xv = tl.load(x_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(q_ptr + rows[:, None] * NW + cw[None, :], mask=valid[:, None] & c_in[None, :])
    return w, xv


@triton.jit
def _pair_half(xp, H: tl.constexpr, XDT: tl.constexpr):
    """Half H of int32 words holding two 16-bit activations (XDT 0: bf16, 1: fp16) -> fp32, exactly."""
    if XDT == 0:
        if H == 0:
            return (xp << 16).to(tl.float32, bitcast=True)
        else:
            return (xp & -65536).to(tl.float32, bitcast=True)
    else:
        if H == 0:
            v = xp & 0xFFFF
        else:
            v = (xp >> 16) & 0xFFFF
        return v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_pipe(x_ptr, q_ptr, s_ptr, scratch_ptr, K, N, NW, k_split, n_splits, scratch_stride, thr, magic, pid_n, pid_s,
               cw, c_in, rr, k_lo, k_hi, INT8: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
               SUB: tl.constexpr, CHUNK: tl.constexpr, DENSE: tl.constexpr, COMPACT: tl.constexpr,
               STAGES: tl.constexpr, ONE_GROUP: tl.constexpr, PAIRX: tl.constexpr,
               XDT: tl.constexpr, SPRE: tl.constexpr):
    """The main loop as one flat loop over steps of SUB tiles [ROWS, BLOCK_W], software-pipelined by Triton
    (tl.range num_stages: the weight tiles, and the kept-row lists, go through shared memory by cp.async, STAGES
    deep). A step never spans two scale groups; the group's sums t_i are scaled into a_i when the next step's
    group differs (known one step ahead). ONE_GROUP (the split is one group) or INT8 (scales per column, at the
    end): no a_i, no flush."""
    STEP: tl.constexpr = ROWS * SUB
    NO_FLUSH: tl.constexpr = ONE_GROUP or INT8
    if COMPACT:
        scratch_row = scratch_ptr + (pid_n * n_splits + pid_s).to(tl.int64) * scratch_stride
        R = k_split + (k_split // CHUNK) * STEP
        n_steps = _compact_steps(x_ptr, scratch_row, scratch_row + R, scratch_row + 2 * R, k_lo, k_hi, thr, CHUNK,
                                 STEP)
        g_this = tl.load(scratch_row + 2 * R)
    else:
        n_steps = tl.cdiv(k_hi - k_lo, STEP)
        g_this = k_lo // CHUNK
    if NO_FLUSH and SPRE and not INT8:  # the one group's scales, loaded while the first tiles are in flight
        g1 = k_lo // CHUNK
        s0 = _word_scale(s_ptr, g1, N, cw, c_in, 0, 8)
        s1 = _word_scale(s_ptr, g1, N, cw, c_in, 1, 8)
        s2 = _word_scale(s_ptr, g1, N, cw, c_in, 2, 8)
        s3 = _word_scale(s_ptr, g1, N, cw, c_in, 3, 8)
        s4 = _word_scale(s_ptr, g1, N, cw, c_in, 4, 8)
        s5 = _word_scale(s_ptr, g1, N, cw, c_in, 5, 8)
        s6 = _word_scale(s_ptr, g1, N, cw, c_in, 6, 8)
        s7 = _word_scale(s_ptr, g1, N, cw, c_in, 7, 8)
    t0 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    t1 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    t2 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    t3 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    t4 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    t5 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    t6 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    t7 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    if not NO_FLUSH:
        a0 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a1 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a2 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a3 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a4 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a5 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a6 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a7 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    for j in tl.range(0, n_steps, num_stages=STAGES):
        if not NO_FLUSH:
            if COMPACT:
                g_next = tl.load(scratch_row + 2 * R + j + 1)  # used after this step's FMAs
            else:
                g_next = tl.where(j + 1 < n_steps, (k_lo + (j + 1) * STEP) // CHUNK, -1)
        for r in tl.static_range(SUB):
            if COMPACT:
                slots = j * STEP + r * ROWS + rr
                rows = tl.load(scratch_row + slots)
                xv = tl.load(scratch_row + R + slots).to(tl.float32, bitcast=True)
                offs = rows[:, None] * NW + cw[None, :]
                wm = (rows >= 0)[:, None] & c_in[None, :]
                w = tl.load(q_ptr + offs, mask=wm)
            elif PAIRX:  # rows of sub-tiles (2q, 2q + 1) interleaved: x of both from one 4-byte (pipelined) load
                rows = k_lo + j * STEP + (r // 2) * (2 * ROWS) + 2 * rr + (r % 2)
                if r % 2 == 0:
                    xp = tl.load(x_ptr + (k_lo + j * STEP + (r // 2) * (2 * ROWS)) // 2 + rr,
                                 mask=rows < k_hi, other=0)
                xv = _pair_half(xp, r % 2, XDT)
                offs = rows[:, None] * NW + cw[None, :]
                wm = (rows < k_hi)[:, None] & c_in[None, :]
                w = tl.load(q_ptr + offs, mask=wm)
            else:
                w, xv = _rows_tile(q_ptr, x_ptr, k_lo + j * STEP + r * ROWS + rr, k_hi, NW, cw, c_in)
            t0, t1, t2, t3, t4, t5, t6, t7 = _word_fma(w, xv[:, None], t0, t1, t2, t3, t4, t5, t6, t7, magic, INT8)
        if not NO_FLUSH:
            if g_next != g_this:  # the last step of group g_this
                a0, a1, a2, a3, a4, a5, a6, a7 = _word_flush(a0, a1, a2, a3, a4, a5, a6, a7, t0, t1, t2, t3, t4,
                                                             t5, t6, t7, s_ptr, g_this, N, cw, c_in, INT8)
                t0 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t1 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t2 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t3 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t4 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t5 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t6 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t7 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
            g_this = g_next
    if NO_FLUSH:  # one scale group (INT4), or scales per column (INT8: applied by the caller)
        if SPRE and not INT8:  # scales loaded before the loop
            a0 = t0 * s0[None, :]
            a1 = t1 * s1[None, :]
            a2 = t2 * s2[None, :]
            a3 = t3 * s3[None, :]
            a4 = t4 * s4[None, :]
            a5 = t5 * s5[None, :]
            a6 = t6 * s6[None, :]
            a7 = t7 * s7[None, :]
        else:
            z = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7 = _word_flush(z, z, z, z, z, z, z, z, t0, t1, t2, t3, t4, t5, t6, t7,
                                                         s_ptr, k_lo // CHUNK, N, cw, c_in, INT8)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _word_gemv_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr, scratch_ptr, partial_ptr, acc_ptr, counter_ptr,
    K, N, NW,  # NW = 32-bit words per packed row
    k_split, n_splits, scratch_stride, thr, magic,  # magic = 0x4B000000 (run time: see _word_value)
    INT8: tl.constexpr, VALS: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr,
    CHUNK: tl.constexpr, DENSE: tl.constexpr, COMPACT: tl.constexpr, REDUCE: tl.constexpr,
    PREFETCH: tl.constexpr, PIPE: tl.constexpr, STAGES: tl.constexpr, ONE_GROUP: tl.constexpr,
    PAIRX: tl.constexpr, XDT: tl.constexpr, SPRE: tl.constexpr,
):
    """Batch-1 low-bit GEMV on 32-bit words with FMAs (see `lowbit_gemv_triton`). Program (n, s): words
    [n * BLOCK_W, (n + 1) * BLOCK_W) of every row (VALS * BLOCK_W output columns), input channels of K split s.
    Each step loads SUB tiles [ROWS, BLOCK_W] of words (one 16-byte load per thread each when
    ROWS * BLOCK_W = 4 * 32 * num_warps); the accumulators keep the ROWS dimension (no reduction in the loop):
    t_i per scale chunk, a_i over the split, reduced over ROWS once at the end."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cw = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
    c_in = cw < NW
    rr = tl.arange(0, ROWS)
    k_lo = pid_s * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    if PIPE:
        a0, a1, a2, a3, a4, a5, a6, a7 = _word_pipe(
            x_ptr, q_ptr, s_ptr, scratch_ptr, K, N, NW, k_split, n_splits, scratch_stride, thr, magic, pid_n, pid_s,
            cw, c_in, rr, k_lo, k_hi, INT8, BLOCK_W, ROWS, SUB, CHUNK, DENSE, COMPACT, STAGES, ONE_GROUP,
            PAIRX, XDT, SPRE)
    else:
        a0 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a1 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a2 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a3 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a4 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a5 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a6 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        a7 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        if COMPACT:
            scratch_row = scratch_ptr + (pid_n * n_splits + pid_s).to(tl.int64) * scratch_stride
            ends_row = scratch_row + k_split
            _compact_chunks(x_ptr, scratch_row, ends_row, k_lo, k_hi, thr, CHUNK)
            start = 0
            for g0 in range(k_lo, k_hi, CHUNK):
                end = tl.load(ends_row + (g0 - k_lo) // CHUNK)
                t0 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t1 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t2 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t3 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t4 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t5 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t6 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t7 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                for t in range(start, end, ROWS * SUB):
                    for r in tl.static_range(SUB):
                        slots = t + r * ROWS + rr
                        valid = slots < end
                        rows = tl.load(scratch_row + slots, mask=valid, other=0)
                        xv = tl.load(x_ptr + rows, mask=valid, other=0.0).to(tl.float32)
                        offs = rows[:, None] * NW + cw[None, :]
                        wm = valid[:, None] & c_in[None, :]
                        w = tl.load(q_ptr + offs, mask=wm)
                        t0, t1, t2, t3, t4, t5, t6, t7 = _word_fma(w, xv[:, None], t0, t1, t2, t3, t4, t5, t6, t7, magic,
                                                                    INT8)
                a0, a1, a2, a3, a4, a5, a6, a7 = _word_flush(a0, a1, a2, a3, a4, a5, a6, a7, t0, t1, t2, t3, t4, t5,
                                                             t6, t7, s_ptr, g0 // CHUNK, N, cw, c_in, INT8)
                start = end
        else:  # dense: rows in order
            STEP: tl.constexpr = ROWS * SUB
            if PREFETCH:  # the next step's SUB tiles are loaded before this step's FMAs (registers, distance 1)
                w0, x0 = _rows_tile(q_ptr, x_ptr, k_lo + rr, k_hi, NW, cw, c_in)
                if SUB >= 2:
                    w1, x1 = _rows_tile(q_ptr, x_ptr, k_lo + ROWS + rr, k_hi, NW, cw, c_in)
                if SUB >= 4:
                    w2, x2 = _rows_tile(q_ptr, x_ptr, k_lo + 2 * ROWS + rr, k_hi, NW, cw, c_in)
                    w3, x3 = _rows_tile(q_ptr, x_ptr, k_lo + 3 * ROWS + rr, k_hi, NW, cw, c_in)
            for g0 in range(k_lo, k_hi, CHUNK):
                t0 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t1 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t2 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t3 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t4 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t5 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t6 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                t7 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                for k0 in range(g0, g0 + CHUNK, STEP):
                    if PREFETCH:
                        kn = k0 + STEP + rr
                        n0, y0 = _rows_tile(q_ptr, x_ptr, kn, k_hi, NW, cw, c_in)
                        if SUB >= 2:
                            n1, y1 = _rows_tile(q_ptr, x_ptr, kn + ROWS, k_hi, NW, cw, c_in)
                        if SUB >= 4:
                            n2, y2 = _rows_tile(q_ptr, x_ptr, kn + 2 * ROWS, k_hi, NW, cw, c_in)
                            n3, y3 = _rows_tile(q_ptr, x_ptr, kn + 3 * ROWS, k_hi, NW, cw, c_in)
                        t0, t1, t2, t3, t4, t5, t6, t7 = _word_fma(w0, x0[:, None], t0, t1, t2, t3, t4, t5, t6, t7,
                                                                   magic, INT8)
                        w0, x0 = n0, y0
                        if SUB >= 2:
                            t0, t1, t2, t3, t4, t5, t6, t7 = _word_fma(w1, x1[:, None], t0, t1, t2, t3, t4, t5, t6, t7,
                                                                       magic, INT8)
                            w1, x1 = n1, y1
                        if SUB >= 4:
                            t0, t1, t2, t3, t4, t5, t6, t7 = _word_fma(w2, x2[:, None], t0, t1, t2, t3, t4, t5, t6, t7,
                                                                       magic, INT8)
                            t0, t1, t2, t3, t4, t5, t6, t7 = _word_fma(w3, x3[:, None], t0, t1, t2, t3, t4, t5, t6, t7,
                                                                       magic, INT8)
                            w2, x2 = n2, y2
                            w3, x3 = n3, y3
                    else:
                        for r in tl.static_range(SUB):
                            w, xv = _rows_tile(q_ptr, x_ptr, k0 + r * ROWS + rr, k_hi, NW, cw, c_in)
                            t0, t1, t2, t3, t4, t5, t6, t7 = _word_fma(w, xv[:, None], t0, t1, t2, t3, t4, t5, t6, t7,
                                                                       magic, INT8)
                a0, a1, a2, a3, a4, a5, a6, a7 = _word_flush(a0, a1, a2, a3, a4, a5, a6, a7, t0, t1, t2, t3, t4, t5,
                                                             t6, t7, s_ptr, g0 // CHUNK, N, cw, c_in, INT8)
    # reduce over ROWS, interleave the VALS values of each word into columns VALS * c + i
    if INT8:
        o0 = tl.sum(a0, axis=0) * _word_scale(s_ptr, 0, N, cw, c_in, 0, 4)
        o1 = tl.sum(a1, axis=0) * _word_scale(s_ptr, 0, N, cw, c_in, 1, 4)
        o2 = tl.sum(a2, axis=0) * _word_scale(s_ptr, 0, N, cw, c_in, 2, 4)
        o3 = tl.sum(a3, axis=0) * _word_scale(s_ptr, 0, N, cw, c_in, 3, 4)
        acc = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), [VALS * BLOCK_W])
    else:
        o0 = tl.sum(a0, axis=0)
        o1 = tl.sum(a1, axis=0)
        o2 = tl.sum(a2, axis=0)
        o3 = tl.sum(a3, axis=0)
        o4 = tl.sum(a4, axis=0)
        o5 = tl.sum(a5, axis=0)
        o6 = tl.sum(a6, axis=0)
        o7 = tl.sum(a7, axis=0)
        acc = tl.reshape(tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7))),
                         [VALS * BLOCK_W])
    n_offs = pid_n * (VALS * BLOCK_W) + tl.arange(0, VALS * BLOCK_W)
    n_mask = n_offs < N
    if REDUCE == 2:  # fp32 atomics into a zeroed accumulator; the last program to arrive writes y and re-zeroes it
        tl.atomic_add(acc_ptr + n_offs, acc, mask=n_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's atomics issued before the arrival is published
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            total = tl.load(acc_ptr + n_offs, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + n_offs, total.to(y_ptr.dtype.element_ty), mask=n_mask)
            tl.store(acc_ptr + n_offs, tl.zeros_like(total), mask=n_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed")
    elif REDUCE == 1:
        b_offs = tl.arange(0, 1)
        _write_out(acc[None, :], y_ptr, partial_ptr, counter_ptr, pid_n, pid_s, n_splits, N, n_offs, n_mask, b_offs,
                   b_offs < 1, 1, 1, VALS * BLOCK_W, True)
    else:
        tl.store(y_ptr + n_offs, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def words_apply(packed: LowbitWeight, batch: int) -> bool:
    """Whether the word-FMA kernel can run this call: batch 1, INT4 / INT8, rows a whole number of 32-bit words."""
    if batch != 1 or packed.fmt not in ("int4", "int8") or (packed.fmt == "int4" and packed.group != WORD_CHUNK):
        return False
    return packed.qweight.shape[1] % 4 == 0


def _tile_default(fmt: str, K: int, N: int, batch: int, dense: bool) -> LowbitConfig:
    for key in ((fmt, dense, K, N, batch), (fmt, dense, K, N, 1)):
        tuned = TUNED_CONFIGS.get(key)
        if tuned is not None and tuned.kernel == "tile":
            return tuned
    cfg = INT4_GPU_CONFIG if fmt == "int4" else CHANNEL_GPU_CONFIG
    if N <= 1024:
        cfg = dataclasses.replace(cfg, block_n=64)
    return cfg


def default_lowbit_config(fmt: str, K: int, N: int, batch: int, dense: bool) -> LowbitConfig:
    """Tuned launch parameters if measured (a batch-1 word config is not used at batch > 1), else at batch 1 the
    word-FMA kernel for INT4 sparse and INT8 (rows of whole 32-bit words; INT4 group 128, checked at launch), else a
    tensor-core tile (block_n halved for narrow outputs)."""
    tuned = TUNED_CONFIGS.get((fmt, dense, K, N, batch)) or TUNED_CONFIGS.get((fmt, dense, K, N, 1))
    if tuned is not None and (batch == 1 or tuned.kernel == "tile"):
        return tuned
    row_bytes = (N + 1) // 2 if fmt == "int4" else N
    if batch == 1 and (fmt == "int8" or (fmt == "int4" and not dense)) and row_bytes % 4 == 0:
        cfg = INT4_WORD_CONFIG if fmt == "int4" else INT8_WORD_CONFIG
        if N <= 1024:
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 4, block_k=cfg.block_k * 4)
        return cfg
    return _tile_default(fmt, K, N, batch, dense)


def load_tuned(path) -> None:
    """Fill TUNED_CONFIGS from a `tuned.json` written by studies/lowbit_bench.py."""
    import json
    import pathlib

    for key, cfg in json.loads(pathlib.Path(path).read_text()).items():
        fmt, dense, K, N, batch = key.split(",")
        TUNED_CONFIGS[(fmt, dense == "dense", int(K), int(N), int(batch))] = LowbitConfig(**cfg)


def launch_geometry(packed: LowbitWeight, cfg: GemvConfig, device: torch.device) -> tuple[int, int]:
    """(n_splits, k_split): K splits as gemv.py picks them, each a whole number of scale groups (int4), word
    chunks (words kernel) or tiles."""
    words = getattr(cfg, "kernel", "tile") == "words"
    unit = packed.group if packed.fmt == "int4" else (WORD_CHUNK if words else cfg.block_k)
    units = triton.cdiv(packed.k, unit)
    if words and cfg.n_splits <= 0:  # about four programs per SM
        stripes = triton.cdiv(packed.n, cfg.block_n)
        n_splits = max(1, min(units, round(4 * _sm_count(device) / stripes)))
    else:
        n_splits = min(_pick_splits(packed.k, packed.n, cfg, device), units)
    k_split = triton.cdiv(units, n_splits) * unit
    return triton.cdiv(packed.k, k_split), k_split


_ACCUMULATORS: dict[torch.device, torch.Tensor] = {}
_LAST_LAUNCH: list = [None]  # the last word-kernel launch handle (registers / spills, read by studies)


def _accumulator(device: torch.device, n: int) -> torch.Tensor:
    """fp32 zeros of the atomic split-K reduction, >= n long; zero at rest (the kernel's last program re-zeroes
    what it used). Grown outside CUDA-graph capture by the first (warm-up) call of a shape."""
    acc = _ACCUMULATORS.get(device)
    if acc is None or acc.numel() < n:
        acc = torch.zeros(max(n, 1 << 16), dtype=torch.float32, device=device)
        _ACCUMULATORS[device] = acc
    return acc


def _launch_words(x2: torch.Tensor, packed: LowbitWeight, threshold: float | None, cfg: LowbitConfig,
                  y: torch.Tensor) -> None:
    K, N = packed.k, packed.n
    int8 = packed.fmt == "int8"
    vals = 4 if int8 else 8
    q32 = packed.qweight.view(torch.int32)
    NW = q32.shape[1]
    assert K * NW < 2**31, "int32 offsets"
    assert cfg.block_n % vals == 0 and cfg.block_k % cfg.sub == 0, "block_n: whole words, block_k: sub loads"
    assert not cfg.prefetch or cfg.sub in (1, 2, 4), "prefetch: sub in 1, 2, 4"
    block_w, rows = cfg.block_n // vals, cfg.block_k // cfg.sub
    assert WORD_CHUNK % cfg.block_k == 0 and (not int8 or packed.group == 0) and (int8 or packed.group == WORD_CHUNK)
    n_splits, k_split = launch_geometry(packed, cfg, x2.device)
    stripes = triton.cdiv(NW, block_w)
    dense = threshold is None
    compact = not dense
    step = cfg.block_k
    if cfg.pipe:  # idx + x (each padded per chunk) + one group id per step
        r_len = k_split + (k_split // WORD_CHUNK) * step
        scratch_stride = 2 * r_len + r_len // step + 2
    else:
        scratch_stride = k_split + k_split // WORD_CHUNK + 1
    scratch, partial, counters = _workspace(x2.device).get(
        stripes * n_splits * scratch_stride if compact else 0,
        n_splits * N if n_splits > 1 and cfg.reduce == "ordered" else 0, stripes)
    reduce = 0 if n_splits == 1 else (2 if cfg.reduce == "atomic" else 1)
    acc = _accumulator(x2.device, stripes * cfg.block_n) if reduce == 2 else scratch
    pairx = (cfg.pipe and cfg.pairx and dense and x2.dtype in (torch.bfloat16, torch.float16) and K % 2 == 0 and cfg.sub % 2 == 0
             and x2.data_ptr() % 4 == 0)
    xk = x2.view(torch.int32) if pairx else x2
    _LAST_LAUNCH[0] = _word_gemv_kernel[(stripes, n_splits)](
        xk, q32, packed.scales, y, scratch, partial if reduce == 1 else scratch, acc, counters,
        K, N, NW, k_split, n_splits, scratch_stride, 0.0 if dense else float(threshold), 0x4B000000,
        INT8=int8, VALS=vals, BLOCK_W=block_w, ROWS=rows, SUB=cfg.sub, CHUNK=WORD_CHUNK, DENSE=dense,
        COMPACT=compact, REDUCE=reduce, PREFETCH=cfg.prefetch, PIPE=cfg.pipe,
        STAGES=cfg.num_stages, ONE_GROUP=k_split == WORD_CHUNK, PAIRX=pairx,
        XDT=0 if x2.dtype == torch.bfloat16 else 1, SPRE=cfg.spre, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def lowbit_gemv_triton(
    x: torch.Tensor,  # [B, K] or [K], fp16 / bf16 / fp32
    packed: LowbitWeight,
    threshold: float | None = None,  # None: the dense low-bit path (no mask, no scan)
    config: GemvConfig | None = None,  # LowbitConfig (or gemv.py's GemvConfig: swap_ab off); None: tuned / default
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Launch the low-bit (sparse) GEMV; returns y [B, N] (or [N] for a 1-D x) in x's dtype. A word-kernel
    config where that kernel does not apply (batch > 1, FP8, rows not whole words) runs the tile default."""
    assert packed.fmt in FORMATS, packed.fmt
    squeeze = x.dim() == 1
    x2 = x.unsqueeze(0) if squeeze else x
    B, K = x2.shape
    N = packed.n
    assert K == packed.k, f"x has {K} channels, the weight {packed.k}"
    assert 1 <= B <= MAX_BATCH, f"batch {B} > {MAX_BATCH}: use the dense path"
    assert x2.stride(1) == 1 and packed.qweight.is_contiguous() and packed.scales.is_contiguous()
    assert packed.qweight.device == x.device, "weight and x on different devices"
    dense = threshold is None
    cfg = config or default_lowbit_config(packed.fmt, K, N, B, dense)
    y = torch.empty((B, N), dtype=out_dtype or x.dtype, device=x.device)
    if getattr(cfg, "kernel", "tile") == "words":
        if words_apply(packed, B):
            _launch_words(x2, packed, threshold, cfg, y)
            return y[0] if squeeze else y
        cfg = _tile_default(packed.fmt, K, N, B, dense)
    if packed.fmt == "int4":
        assert packed.group % cfg.block_k == 0, f"block_k {cfg.block_k} must divide the group {packed.group}"
        assert cfg.block_n >= (32 if cfg.use_dot else 2), "block_n too small"
    n_splits, k_split = launch_geometry(packed, cfg, x.device)
    stripes = triton.cdiv(N, cfg.block_n)
    scratch, partial, counters = _workspace(x.device).get(0 if dense else stripes * n_splits * k_split,
                                                          n_splits * B * N if n_splits > 1 else 0, stripes)
    common = dict(BATCH=B, BATCH_PAD=16 if cfg.use_dot else triton.next_power_of_2(B), BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, DENSE=dense, USE_DOT=cfg.use_dot,
                  SWAP_AB=cfg.use_dot and getattr(cfg, "swap_ab", False), REDUCE=n_splits > 1,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x2, packed.qweight, packed.scales, y, scratch, partial if n_splits > 1 else scratch, counters)
    thr = 0.0 if dense else float(threshold)
    if packed.fmt == "int4":
        _int4_gemv_kernel[(stripes, n_splits)](*args, K, N, packed.qweight.shape[1], x2.stride(0), k_split,
                                               n_splits, thr, GROUP=packed.group, **common)
    else:
        scan_block = min(cfg.scan_block, triton.next_power_of_2(k_split))
        _channel_gemv_kernel[(stripes, n_splits)](*args, K, N, x2.stride(0), k_split, n_splits, thr,
                                                  SCAN_BLOCK=scan_block, **common)
    return y[0] if squeeze else y


def tinygemm_pack(packed: LowbitWeight, inner_k_tiles: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The same INT4 weight in the layout of `torch.ops.aten._weight_int4pack_mm` (tinygemm, CUDA, bf16): its
    dequantization (q - 8) * scale + zero with zero = 0 is ours, so both compute the same function (up to the
    bf16 rounding of the fp16 scales). -> (int4pack weight, scales_and_zeros [ceil(K/group), N, 2] bf16)."""
    assert packed.fmt == "int4"
    q = packed.qweight
    u = torch.stack([(q & 15), (q >> 4)], dim=-1).reshape(q.shape[0], -1)[:, : packed.n]  # [K, N] code + 8
    w = u.T.to(torch.int32)  # [N, K]
    w_uint8 = ((w[:, ::2] << 4) | w[:, 1::2]).to(torch.uint8).contiguous()  # even k in the high nibble
    w4 = torch.ops.aten._convert_weight_to_int4pack(w_uint8, inner_k_tiles)
    scales = packed.scales.to(torch.bfloat16)
    return w4, torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()
