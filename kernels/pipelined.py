"""Decode-step kernels that hand the kept-channel list from the kernel producing x to the sparse GEMV.

Why: the standalone sparse GEMV (gemv.py) pays a fixed chain of ~9 us per call against cuBLAS's ~3 us
(kernels/NOTES.md, variant 4). Two links of that chain disappear when x comes from one of our own kernels:

* **compaction in the producer**: the kernel that computes x (add + RMSNorm, SiLU * up) already holds it, so
  it also writes, for each K split of the consuming GEMV, the kept channel indices and their count. A GEMV
  program then starts with one count load instead of x load + threshold scan + scratch round trip.
* **atomic split-K accumulation into a buffer that is zero at rest**: each GEMV program adds its fp32 partial
  into `acc` with relaxed atomics and ends; the kernel that consumes y (RoPE + cache write, add + RMSNorm,
  SiLU * up) reads `acc` and rounds it to the model dtype as the reference does. A consumer that is one
  program per element range clears what it read; one whose programs each read all of `acc` (the norm: every
  program needs the whole row for the RMS) leaves it to the next GEMV (`clear=`), which runs after it. No
  memset launch and no last-arriver reduction; the order of the fp32 additions across splits is not fixed.

Protocol of one GEMV site with `n_splits` K splits of `k_split` channels: `idx` int32 holds the kept channel
indices of split s at `idx[s * k_split:]`, `cnt[s]` their number, `acc` [N] fp32 is zero at rest. A site
whose input comes from elsewhere (attention output into o) compacts in the GEMV as before (`scan=True`,
private index rows per program) and still accumulates atomically. Batch 1 (decode).

Column segments (fused q|k|v, gate|up with a threshold per projection): a site planned with `segments`
(the first column of segments 1, 2; multiples of its BLOCK_N) holds up to three kept lists per K split, list l
of split s at `idx[(l * n_splits + s) * k_split:]`, count `cnt[l * n_splits + s]`. The norm producer writes one
list per threshold it is given (one more compaction of the split it already holds: no extra read of x), and
each GEMV program reads the list of its stripe's segment, as the standalone kernel picks its stripe's
threshold. One threshold: one list, the segments unused (the geometry of the unsegmented site). References: the
all-PyTorch step in llama_decode.py; tests compare against it. Measured: kernels/NOTES.md, variants 9-12.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import triton
import triton.language as tl

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .decode_ops import _add_rms_norm_kernel, _rope_cache_kernel
from .gemv import GemvConfig, _compact_kept, _gather_rows_product, _interpreting, default_config

# Programmatic dependent launch (Hopper): each kernel of the fused step is launched while its predecessor
# finishes and waits (griddepcontrol.wait) before touching memory. Off in the interpreter.
USE_PDL = False


def _pdl() -> dict:
    on = USE_PDL and not _interpreting()
    return {"PDL": on, "launch_pdl": on}

# Launch parameters (tile and K splits) of the producer-indexed GEMV per (K, N), measured on the H100 by
# `studies/kernel_bench.py indexed`; more splits are cheap here (no serial reduction). Absent shapes: the
# standalone kernel's tile with at least 8 splits.
INDEXED_CONFIGS: dict[tuple[int, int], GemvConfig] = {  # (K, N): (block_n, block_k, n_splits, warps, stages, dot)
    (4096, 6144): GemvConfig(128, 64, 8, 4, 3, True),  # 6144x4096 (Llama-3-8B q|k|v)
    (4096, 4096): GemvConfig(64, 32, 16, 1, 2, False),  # 4096x4096
    (4096, 28672): GemvConfig(128, 128, 8, 4, 3, True),  # 28672x4096 (Llama-3-8B gate|up)
    (14336, 4096): GemvConfig(128, 128, 16, 4, 3, True),  # 4096x14336
    (4096, 14336): GemvConfig(64, 32, 4, 1, 2, False),  # 14336x4096
    (4096, 11008): GemvConfig(128, 64, 8, 4, 3, True),  # 11008x4096
    (11008, 4096): GemvConfig(64, 32, 16, 1, 2, False),  # 4096x11008
    (4096, 22016): GemvConfig(256, 64, 4, 8, 4, True),  # 22016x4096 (Llama-2-7B gate|up)
    (4096, 12288): GemvConfig(256, 64, 8, 8, 4, True),  # 12288x4096 (Llama-2-7B q|k|v)
}


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """Launch geometry of one GEMV site; the producer compacts with the same `k_split`."""

    K: int
    N: int
    cfg: GemvConfig
    n_splits: int
    segments: tuple[int, ...] = ()  # first columns of segments 1, 2 (each list its own threshold); () one list

    @property
    def n_lists(self) -> int:
        return len(self.segments) + 1

    @property
    def k_split(self) -> int:
        return triton.cdiv(self.K, self.n_splits)

    @property
    def stripes(self) -> int:
        return triton.cdiv(self.N, self.cfg.block_n)


def plan_site(K: int, N: int, device: torch.device, n_splits: int | None = None,
              config: GemvConfig | None = None, segments: tuple[int, ...] = ()) -> SitePlan:
    """The site's tile and K splits; with `segments` (column starts of segments 1, 2) the tile width is halved
    until it divides every boundary (a stripe never straddles two thresholds)."""
    segments = tuple(int(b) for b in segments)
    if len(segments) > 2 or any(not 0 < b < N for b in segments) or list(segments) != sorted(set(segments)):
        raise ValueError(f"segments {segments}: at most two increasing column starts inside (0, {N})")
    if config is None and (K, N) not in INDEXED_CONFIGS:
        base = default_config(K, N, 1, device, segments)
        config = dataclasses.replace(base, n_splits=max(base.n_splits, 8))
    cfg = _fit_segments(config or INDEXED_CONFIGS[(K, N)], segments, N)
    n_splits = n_splits or cfg.n_splits or 8
    return SitePlan(K, N, cfg, max(1, min(n_splits, K // 16)), segments)


def _fit_segments(cfg: GemvConfig, segments: tuple[int, ...], N: int) -> GemvConfig:
    block_n = cfg.block_n
    while block_n > 16 and any(b % block_n for b in segments):
        block_n //= 2
    if any(b % block_n for b in segments):
        raise ValueError(f"column segments {segments} of a {N}-column site are not multiples of 16: one GEMV "
                         "stripe would straddle two thresholds; give the site one threshold")
    return cfg if block_n == cfg.block_n else dataclasses.replace(cfg, block_n=block_n)


class SiteBuffers:
    """idx / cnt / acc of one site (acc zeroed once here, then kept at zero by its consumer). `lists`: how many
    kept lists per split the producer last wrote (1, or one per column segment), read by `indexed_gemv`."""

    def __init__(self, plan: SitePlan, device: torch.device, scan: bool = False):
        if scan and plan.segments:
            raise ValueError("a scanning site (input from elsewhere) compacts with one threshold: plan it "
                             "without segments")
        self.plan, self.scan, self.lists = plan, scan, 1
        rows = plan.stripes * plan.n_splits if scan else plan.n_lists * plan.n_splits
        self.idx = torch.empty(rows * plan.k_split, dtype=torch.int32, device=device)
        self.cnt = torch.zeros(plan.n_lists * plan.n_splits, dtype=torch.int32, device=device)
        self.acc = torch.zeros(plan.N, dtype=torch.float32, device=device)


@triton.jit
def _indexed_gemv_kernel(x_ptr, wt_ptr, acc_ptr, idx_ptr, cnt_ptr, clear_ptr, scale_ptr, K, N, k_split, thr,
                         clear_n, seg1, seg2, BATCH_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SCAN_BLOCK: tl.constexpr, USE_DOT: tl.constexpr, SCAN: tl.constexpr,
                         CLEAR_BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()  # everything below reads what the previous kernel wrote
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    b_offs = tl.arange(0, BATCH_PAD)
    b_mask = b_offs < 1
    if CLEAR_BLOCK > 0:  # zero an accumulator that the previous (multi-program) kernel finished reading
        co = (pid_n * tl.num_programs(1) + pid_s) * CLEAR_BLOCK + tl.arange(0, CLEAR_BLOCK)
        tl.store(clear_ptr + co, tl.zeros([CLEAR_BLOCK], dtype=tl.float32), mask=co < clear_n)
    if SCAN:  # input not from our producer: compact here, into this program's private index row
        row = idx_ptr + (pid_n * tl.num_programs(1) + pid_s).to(tl.int64) * k_split
        k_lo = pid_s * k_split
        count = _compact_kept(x_ptr, x_ptr, row, k_lo, tl.minimum(k_lo + k_split, K), K, thr, 1, SCAN_BLOCK,
                              False, False)
    else:  # the list of this stripe's column segment (list 0 when the producer wrote one: seg1 = seg2 = N)
        n_start = pid_n * BLOCK_N
        lst = (n_start >= seg1).to(tl.int32) + (n_start >= seg2).to(tl.int32)
        row = idx_ptr + (lst * tl.num_programs(1) + pid_s).to(tl.int64) * k_split
        count = tl.load(cnt_ptr + lst * tl.num_programs(1) + pid_s)
    acc = _gather_rows_product(x_ptr, wt_ptr, row, count, n_offs, n_mask, b_offs, b_mask, N, K,
                               BATCH_PAD, BLOCK_N, BLOCK_K, USE_DOT)
    if PDL:
        gdc_launch_dependents()  # the next kernel may launch now; it waits for this grid before reading
    out = tl.sum(acc, axis=0)  # only row 0 is real (the batch is padded for tl.dot)
    if HAS_SCALE:  # INT8 / FP8 codes: one scale per output column, applied to the split's partial sum
        out = out * tl.load(scale_ptr + n_offs, mask=n_mask, other=0.0)
    tl.atomic_add(acc_ptr + n_offs, out, mask=n_mask, sem="relaxed")


def indexed_gemv(x: torch.Tensor, wt: torch.Tensor, site: SiteBuffers, threshold: float = 0.0,
                 clear: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> None:
    """site.acc += (x * m) @ wt for one row x [K] / [1, K]; m from the producer's lists (one per column segment
    when it wrote several), or from |x| > threshold when the site scans. `clear` (fp32) is zeroed on the way
    (see add_rms_norm_split). `scales` (fp32 [N]): wt holds INT8 / FP8 codes (lowbit_gemv's per-column layout),
    column n of the product is scaled by scales[n]: the low-bit weight read in the fused step."""
    p = site.plan
    assert x.numel() == p.K and wt.shape == (p.K, p.N) and wt.is_contiguous() and x.is_contiguous()
    assert (scales is None) == (wt.dtype == x.dtype), "16-bit weights in x's dtype, or codes with their scales"
    segs = list(p.segments) + [p.N] * (2 - len(p.segments)) if site.lists > 1 else [p.N, p.N]
    n_programs = p.stripes * p.n_splits
    clear_block = triton.next_power_of_2(triton.cdiv(clear.numel(), n_programs)) if clear is not None else 0
    _indexed_gemv_kernel[(p.stripes, p.n_splits)](
        x, wt, site.acc, site.idx, site.cnt, clear if clear is not None else site.acc,
        scales if scales is not None else site.acc, p.K, p.N, p.k_split,
        float(threshold), clear.numel() if clear is not None else 0, segs[0], segs[1],
        BATCH_PAD=16 if p.cfg.use_dot else 1, BLOCK_N=p.cfg.block_n, BLOCK_K=p.cfg.block_k,
        SCAN_BLOCK=min(p.cfg.scan_block, triton.next_power_of_2(p.k_split)), USE_DOT=p.cfg.use_dot, SCAN=site.scan,
        CLEAR_BLOCK=clear_block, HAS_SCALE=scales is not None, **_pdl(), num_warps=p.cfg.num_warps, num_stages=p.cfg.num_stages,
    )


@triton.jit
def _compact_segment(v, offs, valid, thr, idx_ptr, cnt_ptr, seg, k_split):
    """Kept channels (|v| > thr) of one segment -> idx[seg * k_split + rank], cnt[seg]."""
    keep = (tl.abs(v.to(tl.float32)) > thr) & valid
    keep_i = keep.to(tl.int32)
    pos = tl.cumsum(keep_i, axis=0) - 1
    tl.store(idx_ptr + seg * k_split + pos, offs, mask=keep)
    tl.store(cnt_ptr + seg, tl.sum(keep_i, axis=0))


def add_rms_norm_from_acc(h: torch.Tensor, delta: SiteBuffers, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += round(delta.acc) in place (delta.acc cleared: one program reads and clears it); returns
    rms_norm(h) * weight. The last norm of the fused step, before the dense LM head."""
    H = h.shape[-1]
    out = torch.empty_like(h)
    _add_rms_norm_kernel[(1,)](h, delta.acc, weight, out, H, eps, HAS_DELTA=True, BLOCK=triton.next_power_of_2(H),
                               FROM_ACC=True, **_pdl(), num_warps=4)
    return out


@triton.jit
def _add_rms_norm_split_kernel(h_in_ptr, h_out_ptr, acc_ptr, w_ptr, out_ptr, idx_ptr, cnt_ptr, H, eps, thr0, thr1,
                               thr2, k_split, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, SEG_BLOCK: tl.constexpr,
                               N_LISTS: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    seg = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    h = tl.load(h_in_ptr + offs, mask=m, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(acc_ptr + offs, mask=m, other=0.0).to(h.dtype).to(tl.float32)).to(h.dtype)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)  # every program reduces the whole row (8-16 KB)
    so = seg * k_split + tl.arange(0, SEG_BLOCK)
    valid = (so < seg * k_split + k_split) & (so < H)
    hs = tl.load(h_in_ptr + so, mask=valid, other=0.0)
    if HAS_DELTA:
        d = tl.load(acc_ptr + so, mask=valid, other=0.0)
        hs = (hs.to(tl.float32) + d.to(hs.dtype).to(tl.float32)).to(hs.dtype)
    tl.store(h_out_ptr + so, hs, mask=valid)
    ws = tl.load(w_ptr + so, mask=valid, other=0.0).to(tl.float32)
    x = ((hs.to(tl.float32) * inv).to(hs.dtype).to(tl.float32) * ws).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + so, x, mask=valid)
    _compact_segment(x, so, valid, thr0, idx_ptr, cnt_ptr, seg, k_split)
    n_splits = tl.num_programs(0)
    if N_LISTS > 1:  # the kept list of column segment 1 (its own threshold on the same x), then of segment 2
        _compact_segment(x, so, valid, thr1, idx_ptr + n_splits * k_split, cnt_ptr + n_splits, seg, k_split)
    if N_LISTS > 2:
        _compact_segment(x, so, valid, thr2, idx_ptr + 2 * n_splits * k_split, cnt_ptr + 2 * n_splits, seg,
                         k_split)


def add_rms_norm_split(h_in: torch.Tensor, h_out: torch.Tensor, delta: SiteBuffers | None, weight: torch.Tensor,
                       eps: float, threshold: float | Sequence[float], consumer: SiteBuffers) -> torch.Tensor:
    """One program per K split of `consumer`: h_out = h_in + round(delta.acc) and x = rms_norm(h_out) * weight
    for its split, plus that split's kept list: one per threshold when `threshold` lists one per column segment
    of the consumer (its plan's `segments`). Every program reads all of h_in and delta.acc, so h is not
    updated in place (h_in -> h_out, the caller alternates two buffers) and delta.acc is not cleared here:
    pass it as `clear` to the consumer's indexed_gemv, which runs after this kernel has finished."""
    thr = [float(threshold)] if isinstance(threshold, (int, float)) else [float(t) for t in threshold]
    if len(thr) > 1 and len(thr) != consumer.plan.n_lists:
        raise ValueError(f"{len(thr)} thresholds for a site planned with {consumer.plan.n_lists} column segment(s) "
                         f"(segments {consumer.plan.segments}); plan the site with plan_site(..., segments=)")
    assert not consumer.scan
    consumer.lists = len(thr)
    thr += [thr[-1]] * (3 - len(thr))
    H = h_in.shape[-1]
    out = torch.empty_like(h_in)
    ks = consumer.plan.k_split
    _add_rms_norm_split_kernel[(consumer.plan.n_splits,)](
        h_in, h_out, delta.acc if delta is not None else h_in, weight, out, consumer.idx, consumer.cnt, H, eps,
        thr[0], thr[1], thr[2], ks, HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(H),
        SEG_BLOCK=triton.next_power_of_2(ks), N_LISTS=consumer.lists, **_pdl(), num_warps=4,
    )
    return out


@triton.jit
def _silu_mul_compact_kernel(acc_ptr, out_ptr, idx_ptr, cnt_ptr, inter, thr, k_split, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    seg = tl.program_id(0)
    k_lo = seg * k_split
    offs = k_lo + tl.arange(0, BLOCK)
    m = (offs < k_lo + k_split) & (offs < inter)
    g32 = tl.load(acc_ptr + offs, mask=m, other=0.0)
    u32 = tl.load(acc_ptr + inter + offs, mask=m, other=0.0)
    dt = out_ptr.dtype.element_ty
    gf = g32.to(dt).to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
    a = (act * u32.to(dt).to(tl.float32)).to(dt)
    tl.store(out_ptr + offs, a, mask=m)
    _compact_segment(a, offs, m, thr, idx_ptr, cnt_ptr, seg, k_split)


def silu_mul_compact(gate_up: SiteBuffers, dtype: torch.dtype, threshold: float, consumer: SiteBuffers) -> torch.Tensor:
    """a = silu(gate) * up from gate_up.acc and the down projection's kept channel lists; gate_up.acc is left
    for the down projection's indexed_gemv to clear (`clear=gate_up.acc`)."""
    inter = gate_up.plan.N // 2
    assert consumer.plan.K == inter and not consumer.scan
    consumer.lists = 1
    out = torch.empty((1, inter), dtype=dtype, device=gate_up.acc.device)
    ks = consumer.plan.k_split
    _silu_mul_compact_kernel[(consumer.plan.n_splits,)](
        gate_up.acc, out, consumer.idx, consumer.cnt, inter, float(threshold), ks,
        BLOCK=triton.next_power_of_2(ks), **_pdl(), num_warps=4,
    )
    return out


def rope_and_cache_from_acc(qkv: SiteBuffers, cos, sin, pos, k_cache, v_cache, n_heads: int,
                            n_kv_heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As decode_ops.rope_and_cache, reading q|k|v from the GEMV accumulator (then zeroed); returns q [nh, hd].
    `bias` [(nh + 2 nkv) hd] is added to the fp32 accumulator before its one rounding (an addmm epilogue)."""
    hd = k_cache.shape[-1]
    q = torch.empty((n_heads, hd), dtype=k_cache.dtype, device=k_cache.device)
    _rope_cache_kernel[(n_heads + n_kv_heads,)](
        qkv.acc, cos, sin, pos, q, k_cache, v_cache, k_cache.shape[1], bias if bias is not None else qkv.acc,
        NH=n_heads, NKV=n_kv_heads, HD=hd, FROM_ACC=True, HAS_BIAS=bias is not None, **_pdl(), num_warps=1,
    )
    return q
