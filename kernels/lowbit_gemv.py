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

from .gemv import MAX_BATCH, GemvConfig, _compact_kept, _pick_splits, _workspace, _write_out, sparse_gemv_reference

GROUP = 128
FORMATS = ("int4", "int8", "fp8")


@dataclasses.dataclass(frozen=True)
class LowbitConfig(GemvConfig):
    """gemv.py's launch parameters plus swap_ab: with use_dot, compute y^T = W^T x^T so that the dequantized
    weight tile is the MMA's A operand (Hopper's wgmma takes A from registers and needs M >= 64; with the
    batch as M = 16 Triton uses the Ampere MMA)."""

    swap_ab: bool = False


INT4_GPU_CONFIG = LowbitConfig(block_n=256, block_k=64, use_dot=True, num_warps=4, num_stages=3)
CHANNEL_GPU_CONFIG = LowbitConfig(block_n=128, block_k=64, use_dot=True, num_warps=4, num_stages=3)

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


def pack_int4(w: torch.Tensor, group: int = GROUP) -> LowbitWeight:
    """w [N, K] float -> INT4 with one fp16 scale per (group of `group` input channels, output column)."""
    assert w.dim() == 2 and group >= 16 and group & (group - 1) == 0, "group: a power of two >= 16"
    N, K = w.shape
    ng = triton.cdiv(K, group)
    wt = torch.nn.functional.pad(w.detach().float().T, (0, 0, 0, ng * group - K)).reshape(ng, group, N)
    scales = (wt.abs().amax(dim=1) / 7.5).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)  # [ng, N]
    assert torch.isfinite(scales).all(), "weights too large for fp16 scales"
    codes = torch.round(wt / scales.float()[:, None, :]).clamp_(-8, 7).reshape(ng * group, N)[:K]
    u = (codes + 8).to(torch.uint8)
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


def default_lowbit_config(fmt: str, K: int, N: int, batch: int, dense: bool) -> LowbitConfig:
    """Tuned launch parameters if measured, else a tensor-core tile (block_n halved for narrow outputs)."""
    tuned = TUNED_CONFIGS.get((fmt, dense, K, N, batch)) or TUNED_CONFIGS.get((fmt, dense, K, N, 1))
    if tuned is not None:
        return tuned
    cfg = INT4_GPU_CONFIG if fmt == "int4" else CHANNEL_GPU_CONFIG
    if N <= 1024:
        cfg = dataclasses.replace(cfg, block_n=64)
    return cfg


def load_tuned(path) -> None:
    """Fill TUNED_CONFIGS from a `tuned.json` written by studies/lowbit_bench.py."""
    import json
    import pathlib

    for key, cfg in json.loads(pathlib.Path(path).read_text()).items():
        fmt, dense, K, N, batch = key.split(",")
        TUNED_CONFIGS[(fmt, dense == "dense", int(K), int(N), int(batch))] = LowbitConfig(**cfg)


def launch_geometry(packed: LowbitWeight, cfg: GemvConfig, device: torch.device) -> tuple[int, int]:
    """(n_splits, k_split): K splits as gemv.py picks them, each a whole number of scale groups (int4) or tiles."""
    unit = packed.group if packed.fmt == "int4" else cfg.block_k
    units = triton.cdiv(packed.k, unit)
    n_splits = min(_pick_splits(packed.k, packed.n, cfg, device), units)
    k_split = triton.cdiv(units, n_splits) * unit
    return triton.cdiv(packed.k, k_split), k_split


def lowbit_gemv_triton(
    x: torch.Tensor,  # [B, K] or [K], fp16 / bf16 / fp32
    packed: LowbitWeight,
    threshold: float | None = None,  # None: the dense low-bit path (no mask, no scan)
    config: GemvConfig | None = None,  # LowbitConfig (or gemv.py's GemvConfig: swap_ab off); None: tuned / default
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Launch the low-bit (sparse) GEMV; returns y [B, N] (or [N] for a 1-D x) in x's dtype."""
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
    if packed.fmt == "int4":
        assert packed.group % cfg.block_k == 0, f"block_k {cfg.block_k} must divide the group {packed.group}"
        assert cfg.block_n >= (32 if cfg.use_dot else 2), "block_n too small"
    n_splits, k_split = launch_geometry(packed, cfg, x.device)
    stripes = triton.cdiv(N, cfg.block_n)
    scratch, partial, counters = _workspace(x.device).get(0 if dense else stripes * n_splits * k_split,
                                                          n_splits * B * N if n_splits > 1 else 0, stripes)
    y = torch.empty((B, N), dtype=out_dtype or x.dtype, device=x.device)
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
