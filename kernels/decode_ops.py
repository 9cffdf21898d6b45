"""Fused kernels for one decode step (batch 1): residual add + RMSNorm, RoPE + KV-cache write, SiLU(gate) * up,
and split-KV attention of the one query token.

Why: in eager PyTorch these take ~40 small kernels per layer (~2 us each even inside a CUDA graph), about
3 ms per token on a 32-layer model, which is time that sparsity cannot remove and that dilutes the measured
speedup. gpt-fast / TEAL get the same effect from torch.compile. Each kernel reproduces the rounding of the
PyTorch reference in kernels/llama_decode.py (which is its reference implementation); tests compare them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _add_rms_norm_kernel(h_ptr, delta_ptr, w_ptr, out_ptr, H, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
                         FROM_ACC: tl.constexpr = False, PDL: tl.constexpr = False):
    """FROM_ACC: delta is a GEMV's fp32 accumulator (pipelined.py): rounded to the model dtype like a GEMV
    output, and cleared once read."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    m = offs < H
    h = tl.load(h_ptr + offs, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + offs, mask=m, other=0.0)
        if FROM_ACC:
            tl.store(delta_ptr + offs, tl.zeros_like(d), mask=m)
        h = (h.to(tl.float32) + d.to(h.dtype).to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + offs, h, mask=m)  # the residual stream is updated in place
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)
    normed = (hf * inv).to(h.dtype).to(tl.float32) * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, normed.to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta (in place, if given); returns rms_norm(h) * weight. h, delta: [1, H]."""
    H = h.shape[-1]
    out = torch.empty_like(h)
    _add_rms_norm_kernel[(1,)](
        h, delta if delta is not None else h, weight, out, H, eps,
        HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(H), num_warps=4,
    )
    return out


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, max_len, bias_ptr,
    NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, FROM_ACC: tl.constexpr = False, PDL: tl.constexpr = False,
    HAS_BIAS: tl.constexpr = False,
):
    """FROM_ACC: q|k|v is a GEMV's fp32 accumulator (pipelined.py): rounded to the model dtype like a GEMV output,
    and cleared once read (each program clears only the slices it read).

    HAS_BIAS: bias_ptr [(NH + 2 NKV) HD] (the q|k|v projection bias, Qwen2) is added to q, k and v before RoPE
    and the cache writes. FROM_ACC adds it to the fp32 accumulator before the one rounding to the model dtype
    (what a cuBLAS addmm bias epilogue does); otherwise q|k|v is an already rounded GEMV output and the bias is
    added in fp32 and rounded again, so that path rounds twice (as PyTorch's `F.linear(x, w) + b` does).
    HAS_BIAS=False reads no bias (bias_ptr is unused) and compiles the kernel it did before."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)  # 0..NH-1: query heads; NH..NH+NKV-1: key/value heads
    dt = q_out_ptr.dtype.element_ty
    half = tl.arange(0, HD // 2)
    pos = tl.load(pos_ptr)
    cos = tl.load(cos_ptr + pos * (HD // 2) + half)
    sin = tl.load(sin_ptr + pos * (HD // 2) + half)
    a1 = tl.load(qkv_ptr + pid * HD + half)
    a2 = tl.load(qkv_ptr + pid * HD + HD // 2 + half)
    if FROM_ACC:
        tl.store(qkv_ptr + pid * HD + half, tl.zeros_like(a1))
        tl.store(qkv_ptr + pid * HD + HD // 2 + half, tl.zeros_like(a2))
    if HAS_BIAS:  # fp32 sum, then one rounding: of the accumulator (FROM_ACC) or a second one (rounded input)
        a1 = a1.to(tl.float32) + tl.load(bias_ptr + pid * HD + half).to(tl.float32)
        a2 = a2.to(tl.float32) + tl.load(bias_ptr + pid * HD + HD // 2 + half).to(tl.float32)
    x1 = a1.to(dt).to(tl.float32)
    x2 = a2.to(dt).to(tl.float32)
    r1 = x1 * cos - x2 * sin
    r2 = x1 * sin + x2 * cos
    if pid < NH:
        tl.store(q_out_ptr + pid * HD + half, r1.to(dt))
        tl.store(q_out_ptr + pid * HD + HD // 2 + half, r2.to(dt))
    else:
        j = pid - NH
        row = (j * max_len + pos) * HD
        tl.store(k_cache_ptr + row + half, r1.to(k_cache_ptr.dtype.element_ty))
        tl.store(k_cache_ptr + row + HD // 2 + half, r2.to(k_cache_ptr.dtype.element_ty))
        full = tl.arange(0, HD)
        v = tl.load(qkv_ptr + (NH + NKV + j) * HD + full)
        if FROM_ACC:
            tl.store(qkv_ptr + (NH + NKV + j) * HD + full, tl.zeros_like(v))
        if HAS_BIAS:
            v = v.to(tl.float32) + tl.load(bias_ptr + (NH + NKV + j) * HD + full).to(tl.float32)
        tl.store(v_cache_ptr + row + full, v.to(v_cache_ptr.dtype.element_ty))


def rope_and_cache(
    qkv: torch.Tensor,  # [(nh + 2 nkv) hd]
    cos: torch.Tensor,  # [max_len, hd/2] fp32
    sin: torch.Tensor,
    pos: torch.Tensor,  # [1] int64
    k_cache: torch.Tensor,  # [nkv, max_len, hd]
    v_cache: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    bias: torch.Tensor | None = None,  # [(nh + 2 nkv) hd]: added to q|k|v first (in fp32, then rounded again)
) -> torch.Tensor:
    """Rotates q and k at `pos`, writes k and v into the caches; returns q [nh, hd]."""
    hd = k_cache.shape[-1]
    q = torch.empty((n_heads, hd), dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(n_heads + n_kv_heads,)](
        qkv, cos, sin, pos, q, k_cache, v_cache, k_cache.shape[1], bias if bias is not None else qkv,
        NH=n_heads, NKV=n_kv_heads, HD=hd, HAS_BIAS=bias is not None, num_warps=1
    )
    return q


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < inter
    g = tl.load(gu_ptr + offs, mask=m, other=0.0)
    u = tl.load(gu_ptr + inter + offs, mask=m, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (act * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [1, 2I] (gate | up) -> silu(gate) * up [1, I]."""
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(triton.cdiv(inter, 1024),)](gate_up, out, inter, BLOCK=1024, num_warps=4)
    return out


@triton.jit
def _decode_attn_chunk_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, o_ptr, max_len, scale,
                              GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HD: tl.constexpr, CHUNK: tl.constexpr,
                              PDL: tl.constexpr):
    """Split-KV attention of one query token: program (kv head, chunk) -> running max, sum and unnormalised
    output of the GROUP query heads sharing this kv head over positions [chunk * CHUNK, ...) <= pos."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    kvh = tl.program_id(0)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    pos = tl.load(pos_ptr)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HD)
    row = (kvh * n_chunks + c) * GROUP_PAD + g  # partials [NKV, n_chunks, GROUP_PAD]
    if c * CHUNK > pos:  # nothing visible in this chunk
        tl.store(m_ptr + row, tl.full([GROUP_PAD], float("-inf"), tl.float32))
        tl.store(l_ptr + row, tl.zeros([GROUP_PAD], dtype=tl.float32))
        tl.store(o_ptr + row[:, None] * HD + d[None, :], tl.zeros([GROUP_PAD, HD], dtype=tl.float32))
    else:
        t = c * CHUNK + tl.arange(0, CHUNK)
        visible = (t <= pos) & (t < max_len)
        q = tl.load(q_ptr + (kvh * GROUP + g)[:, None] * HD + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        kv_rows = (kvh * max_len + t)[:, None] * HD + d[None, :]
        k = tl.load(k_ptr + kv_rows, mask=visible[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GROUP_PAD, CHUNK] fp32
        s = tl.where(visible[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        v = tl.load(v_ptr + kv_rows, mask=visible[:, None], other=0.0)
        o = tl.dot(p.to(v.dtype), v, input_precision="ieee")  # [GROUP_PAD, HD]
        tl.store(m_ptr + row, m)
        tl.store(l_ptr + row, tl.sum(p, axis=1))
        tl.store(o_ptr + row[:, None] * HD + d[None, :], o)


@triton.jit
def _decode_attn_combine_kernel(m_ptr, l_ptr, o_ptr, out_ptr, n_chunks, GROUP: tl.constexpr,
                                GROUP_PAD: tl.constexpr, HD: tl.constexpr, CHUNKS_PAD: tl.constexpr,
                                PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    h = tl.program_id(0)  # query head
    kvh = h // GROUP
    c = tl.arange(0, CHUNKS_PAD)
    row = (kvh * n_chunks + c) * GROUP_PAD + h % GROUP
    in_c = c < n_chunks
    m = tl.load(m_ptr + row, mask=in_c, other=float("-inf"))
    w = tl.exp(m - tl.max(m, axis=0))
    w = tl.where(in_c & (m > float("-inf")), w, 0.0)
    l = tl.sum(w * tl.load(l_ptr + row, mask=in_c, other=0.0), axis=0)
    d = tl.arange(0, HD)
    o = tl.load(o_ptr + row[:, None] * HD + d[None, :], mask=in_c[:, None], other=0.0)
    tl.store(out_ptr + h * HD + d, (tl.sum(w[:, None] * o, axis=0) / l).to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     chunk: int = 64, pdl: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for one query token over cache positions <= pos (GQA), as
    F.scaled_dot_product_attention with that mask; q [nh, hd], caches [nkv, max_len, hd] -> [1, nh * hd].

    Why: for one query, cuDNN's flash kernel plus the mask handling take ~14 us per layer on the H100 for a
    ~2 MB cache; flash-decoding (split the positions over programs, then combine) is launch-bound instead."""
    nh, hd = q.shape
    nkv, max_len, _ = k_cache.shape
    group = nh // nkv
    n_chunks = triton.cdiv(max_len, chunk)
    gp = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    m = torch.empty((nkv, n_chunks, gp), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    o = torch.empty((nkv, n_chunks, gp, hd), dtype=torch.float32, device=q.device)
    _decode_attn_chunk_kernel[(nkv, n_chunks)](q, k_cache, v_cache, pos, m, l, o, max_len, hd**-0.5,
                                               GROUP=group, GROUP_PAD=gp, HD=hd, CHUNK=chunk, PDL=pdl,
                                               launch_pdl=pdl, num_warps=4)
    out = torch.empty((1, nh * hd), dtype=q.dtype, device=q.device)
    _decode_attn_combine_kernel[(nh,)](m, l, o, out, n_chunks, GROUP=group, GROUP_PAD=gp, HD=hd,
                                       CHUNKS_PAD=triton.next_power_of_2(n_chunks), PDL=pdl, launch_pdl=pdl,
                                       num_warps=1)
    return out
