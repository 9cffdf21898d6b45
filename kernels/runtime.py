"""A Llama-family decoder over GIVEN weights: dense prefill, decode steps through the sparse kernels, greedy
generation from one CUDA graph. No Hugging Face knowledge here: `evaluators/runtime.py` turns a loaded HF
causal LM and a compression plan into `DecoderWeights` + per-site thresholds (the dependency flows one way,
evaluators -> kernels); `Decoder.random` gives the random weights of the timing studies.

Algorithm (pre-norm Llama block, as HF's LlamaForCausalLM computes it; Qwen2's q|k|v bias included):

    h = embed[ids] * embed_scale
    per layer:  x = rms(h) * attn_norm;  q|k|v = x @ qkv (+ qkv_bias);  RoPE(q, k) at the positions;  k, v -> cache
                h = h + softmax(q k^T / sqrt(hd), causal, GQA) v @ o
                x = rms(h) * mlp_norm;   gate|up = x @ gate_up;  h = h + (silu(gate) * up) @ down
    logits = (rms(h) * final_norm) @ lm_head^T                    rms(h) = (h_f32 * rsqrt(mean h_f32^2 + eps)).to(dtype)

* `prefill(ids [B, T])`: the whole prompt in plain PyTorch, dense (no masking: prefill is compute bound and
  activation sparsity does not pay there); writes cache positions 0..T-1, then causal SDPA over those T positions
  (`is_causal`, so the flash kernel applies; the cache beyond T is not read). Projections given FP8 weights
  (`prefill_fp8[i][kind]`, kind one of q k v o gate up down: format w8a8-fp8) run as W8A8 through
  `fp8_prefill.fp8_linear` (per-token dynamic e4m3 activations from one Triton pass, `torch._scaled_mm` with
  rowwise scales, the q|k|v bias in its epilogue); the others bf16 as before. In a fused site (q|k|v, gate|up)
  consecutive FP8 projections are one GEMM and consecutive bf16 ones one F.linear on their columns; the outputs
  are concatenated in column order. Attention, norms, RoPE and the LM head stay in the model dtype, and decode
  steps never use the FP8 weights.
* `decode_step(tokens [B], pos [1])`: one token per row. Each of the four projection inputs of a layer
  (q|k|v, o, gate|up, down: the sites TEAL / R-Sparse sparsify) keeps channel j iff |x_j| > threshold.
  The fused sites may carry one threshold per projection (`thresholds[i]["qkv"] = (t_q, t_k, t_v)`,
  `["gate_up"] = (t_gate, t_up)`): column segment p of the fused GEMV keeps |x_j| > t_p, the rule of separate
  q, k, v (gate, up) modules reading the same x. Every mode honours them: "reference" masks each segment of
  the product, "sparse" passes them to the GEMV as column segments (each stripe compacts with its segment's
  threshold; the tile width divides the segment boundaries), "fused*" has the norm producer write one kept
  list per segment and each GEMV stripe read its segment's list, "dense" ignores every threshold. Equal
  thresholds run as one (the unsegmented launch).
  Modes: "reference" (the same graph in plain PyTorch, masks per row, fp32 accumulate: the accuracy path's
  rule, any batch), "dense" (no masking; F.linear on row-major copies when `keep_dense_weights`, else
  `x @ Wt`), "sparse" (`torch.ops.allocator.sparse_gemv` per site: the batch shares the union of its rows'
  masks), "fused" / "fused_pdl" (kernels/pipelined.py: the kernel that produces x writes the kept lists,
  split-K partials are added atomically into accumulators their consumer reads and re-zeroes; "_pdl" also
  launches every kernel with programmatic dependent launch). At batch 1 "dense" / "sparse" / "fused*" run
  the fused Triton norm / RoPE + cache / SiLU * up / split-KV attention kernels (decode_ops.py); "dense" and
  "sparse" at batch > 1 (or on a CPU without the Triton interpreter) run the PyTorch elementwise ops around
  their projections; "fused*" is batch 1 only (ValueError otherwise).
* Low-bit decode (`decode_lowbit[i][kind]`: a `DecodeWeight`, the projection's `lowbit_gemv.LowbitWeight` and its
  input type): the site's 16-bit weight is replaced by the dequantized one (prefill, "reference" and "dense" without
  the kernel multiply by it), and each site decodes as column runs of one format and one threshold (a q|k|v with q, v
  in INT4 and k in bf16, or with per-projection thresholds, is three runs). "sparse" / "dense" call the low-bit GEMV
  per run (`decode_lowbit_gemv`: threshold 0 takes its dense path; FP8-input formats mask, then round x to e4m3 per
  token, as the accuracy path's threshold-then-fake-quant), bf16 runs `sparse_gemv`; "fused*" reads INT8 codes with
  their column scales (`pipelined.indexed_gemv(scales=)`) when every low-bit projection is w8a16, and refuses other
  low-bit sites. Cost: the low-bit bytes of each run's kept rows (lowbit_gemv.py).
* q|k|v bias (`LayerWeights.qkv_bias`, Qwen2): added to the projection output, unmasked (the masks apply to x
  only), as nn.Linear does: y = (x * m) W + b. "dense" / prefill: F.linear(x, W, b) (cuBLAS addmm, one
  rounding); "reference": added to the fp32 accumulator before its rounding; "fused*": added to the fp32
  accumulator inside the RoPE + cache kernel (one rounding, as addmm); "sparse": added to the rounded GEMV
  output in fp32 and rounded again (inside the RoPE + cache kernel at batch 1). No bias, no extra work.
* `generate`: greedy; the prompt through `prefill`, then `decode_step` + argmax + position increment captured
  once in a CUDA graph (token and position are device tensors, so one graph serves every step) and replayed.

What runs where: prefill, the reference mode, the embedding lookup and the LM head (cuBLAS, dense: every
vocabulary row is needed) are PyTorch; the decode step's projections, norms, RoPE, cache writes and
attention are Triton kernels (interpreted on a CPU under TRITON_INTERPRET=1, for tests).

Cost per decode step at position p, batch 1, L layers, sparsity s of the projection inputs: weight bytes
read ~ (1 - s) * L * (H (nh + 2 nkv) hd + nh hd H + 3 H I) * itemsize + V H * itemsize (LM head, dense);
attention reads the cache up to p: 2 L nkv p hd * itemsize; ~10 kernels per layer, one graph launch per
token. Prefill of T tokens: O(T (weights) + T * max_len * nh * hd * L) flops (SDPA over the masked cache).
KV cache: L * 2 * max_batch * nkv * max_len * hd elements, allocated once.

Sources: the model / generate split, static KV cache and the one-graph decode step follow gpt-fast
(pytorch-labs/gpt-fast, `model.py` / `generate.py`: prefill, `decode_one_token` under CUDA graphs); the split
of TEAL (Liu et al., 2024, "Training-Free Activation Sparsity in Large Language Models") between an accuracy
path (the HF model with magnitude masks) and a speed path (the same thresholds in sparse GEMV kernels),
joined here by the per-layer, per-site thresholds a compression plan gives (`thresholds[i][site]`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from allocator.costs import ModelShape, load_model_config, model_shape

from . import ops as _ops  # noqa: F401  (registers torch.ops.allocator.sparse_gemv)
from . import pipelined
from .decode_ops import add_rms_norm, decode_attention, rope_and_cache, silu_mul
from .fp8_prefill import Fp8Weight, fp8_linear, pack_fp8_weight, quantize_rows_fp8
from .gemv import _interpreting
from .lowbit_gemv import LowbitWeight, dequantize, lowbit_gemv_triton
from .pipelined import (SiteBuffers, add_rms_norm_from_acc, add_rms_norm_split, indexed_gemv, plan_site,
                        rope_and_cache_from_acc, silu_mul_compact)

SITES = ("qkv", "o", "gate_up", "down")
SEGMENTED_SITES = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}  # one threshold per projection allowed
MODES = ("reference", "dense", "sparse", "fused", "fused_pdl")
BATCHED_MODES = ("reference", "dense", "sparse")
PROJECTIONS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}  # column order


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The core's `ModelShape` (sizes, in the kernels' names) plus what only a decode step needs (RoPE, norm eps).

    Build it from a HF config with `DecoderShape.from_config` (one shape model: `allocator.costs.model_shape`
    validates the sizes); the positional constructor stays for small test shapes.
    """

    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    vocab: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int | None = None  # None: hidden // n_heads

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)

    @classmethod
    def from_model_shape(cls, shape: ModelShape, rope_theta: float = 10000.0, norm_eps: float = 1e-5) -> "DecoderShape":
        return cls(hidden=shape.hidden, intermediate=shape.intermediate, n_heads=shape.heads,
                   n_kv_heads=shape.kv_heads, n_layers=shape.layers, vocab=shape.vocab, rope_theta=rope_theta,
                   norm_eps=norm_eps, head_dim=shape.head_dim)

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        """From a HF config (dict, config object, config.json path, or a shipped name such as "llama-3-8b")."""
        cfg = load_model_config(config)
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return cls.from_model_shape(model_shape(cfg), rope_theta=float(theta),
                                    norm_eps=float(cfg.get("rms_norm_eps") or 1e-5))

    @property
    def qkv_out(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def segment_starts(self, site: str) -> tuple[int, ...]:
        """First output column of each projection after the first in the fused site (q|k|v: k, v; gate|up: up)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"qkv": (q, q + kv), "gate_up": (self.intermediate,)}.get(site, ())

    def site_dims(self) -> dict[str, tuple[int, int]]:
        """(K, N) of each projection site's transposed weight."""
        q_out = self.n_heads * self.head_dim
        return {"qkv": (self.hidden, self.qkv_out), "o": (q_out, self.hidden),
                "gate_up": (self.hidden, 2 * self.intermediate), "down": (self.intermediate, self.hidden)}


@dataclasses.dataclass
class LayerWeights:
    """One decoder layer; projections stored transposed [K, N] contiguous for the kernels."""

    attn_norm: torch.Tensor  # [H]
    mlp_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [H, (nh + 2 nkv) * hd]  (q | k | v fused along N)
    o: torch.Tensor  # [nh * hd, H]
    gate_up: torch.Tensor  # [H, 2 * I]  (gate | up fused along N)
    down: torch.Tensor  # [I, H]
    qkv_bias: torch.Tensor | None = None  # [(nh + 2 nkv) * hd] (q | k | v; Qwen2), None: no bias


@dataclasses.dataclass
class DecoderWeights:
    embed: torch.Tensor  # [V, H]
    lm_head: torch.Tensor  # [V, H] (may be the same tensor as embed: tied)
    final_norm: torch.Tensor  # [H]
    layers: list[LayerWeights]
    # [hd / 2] fp32 RoPE inverse frequencies as the HF model computed them (rope scaling included); None: rope_theta
    inv_freq: torch.Tensor | None = None
    attention_scaling: float = 1.0  # HF's rotary attention_scaling (cos / sin are multiplied by it)
    embed_scale: float = 1.0  # the embedding rows are multiplied by this (1 for Llama-family models)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Default (unscaled) RoPE inverse frequencies, as HF computes them: theta^(-2i / hd), fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def random_weights(shape: DecoderShape, dtype: torch.dtype, device, generator: torch.Generator) -> DecoderWeights:
    """Projections drawn N(0, 1/fan_in), embedding rows N(0, 1) (scaled by sqrt(H)), norm weights 1."""
    H, I = shape.hidden, shape.intermediate
    dims = shape.site_dims()

    def rand(n_out: int, n_in: int) -> torch.Tensor:  # row-major [n_out, n_in]
        w = torch.randn(n_out, n_in, generator=generator, device=device, dtype=torch.float32)
        return w.mul_(1.0 / math.sqrt(n_in)).to(dtype)

    def ones() -> torch.Tensor:
        return torch.ones(H, device=device, dtype=dtype)

    embed = rand(shape.vocab, H).mul_(math.sqrt(H))
    lm_head = rand(shape.vocab, H)
    layers = [LayerWeights(ones(), ones(), **{site: rand(n, k).T.contiguous() for site, (k, n) in dims.items()})
              for _ in range(shape.n_layers)]
    return DecoderWeights(embed, lm_head, ones(), layers, rope_inv_freq(shape.head_dim, shape.rope_theta, device))


def projection_columns(shape: DecoderShape, site: str) -> list[tuple[str, int, int]]:
    """(kind, first, end) output columns of each projection of `site` in its fused weight (`PROJECTIONS` order)."""
    starts = (0, *shape.segment_starts(site), shape.site_dims()[site][1])
    return list(zip(PROJECTIONS[site], starts, starts[1:]))


ACTS = ("bf16", "fp8")


@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A projection's low-bit decode weight: ``weight`` in the low-bit GEMV's layout (INT4 groups, INT8 / FP8 per
    column) and ``act``, its format's per-token activation type: "bf16" (weight-only formats) or "fp8" (w8a8-fp8:
    the masked input is rounded to e4m3 with one scale per token before the GEMV, the accuracy path's rule)."""

    weight: LowbitWeight
    act: str = "bf16"

    def __post_init__(self):
        if self.act not in ACTS:
            raise ValueError(f"activation type {self.act!r}: the runtime quantizes decode inputs to {ACTS} only")


@dataclasses.dataclass(frozen=True)
class _Run:
    """Consecutive output columns [first, end) of a site that decode runs as one GEMV: one low-bit format (or
    bf16: ``weight`` None, ``wt`` the columns' transposed weight when the site is split) and one threshold."""

    kinds: tuple[str, ...]
    first: int
    end: int
    weight: DecodeWeight | None
    wt: torch.Tensor | None = None


def rtn_fp8_prefill(shape: DecoderShape, weights: DecoderWeights, kinds=None,
                    layers=None) -> list[dict[str, Fp8Weight]]:
    """FP8 weights for `Decoder(prefill_fp8=...)` from the given bf16 ones by RTN (`fp8_prefill.pack_fp8_weight`,
    the accuracy path's rule): projection kinds `kinds` (default all seven) of layers `layers` (default all)."""
    kinds = set(kinds) if kinds is not None else {k for ks in PROJECTIONS.values() for k in ks}
    layers = set(layers) if layers is not None else set(range(shape.n_layers))
    out = []
    for i, lw in enumerate(weights.layers):
        out.append({kind: pack_fp8_weight(getattr(lw, site)[:, a:b].T)
                    for site in SITES for kind, a, b in projection_columns(shape, site)
                    if i in layers and kind in kinds})
    return out


def _check_weights(shape: DecoderShape, w: DecoderWeights) -> None:
    H, V = shape.hidden, shape.vocab
    want = {"embed": (V, H), "lm_head": (V, H), "final_norm": (H,), "inv_freq": (shape.head_dim // 2,)}
    got = {name: getattr(w, name) for name in want if getattr(w, name) is not None}
    if len(w.layers) != shape.n_layers:
        raise ValueError(f"{len(w.layers)} layers given for a shape of {shape.n_layers}")
    layer_want = {"attn_norm": (H,), "mlp_norm": (H,), **shape.site_dims()}
    for i, layer in enumerate(w.layers):
        want.update({f"layers[{i}].{k}": v for k, v in layer_want.items()})
        got.update({f"layers[{i}].{k}": getattr(layer, k) for k in layer_want})
        if layer.qkv_bias is not None:
            want[f"layers[{i}].qkv_bias"] = (shape.qkv_out,)
            got[f"layers[{i}].qkv_bias"] = layer.qkv_bias
    for name, t in got.items():
        if tuple(t.shape) != tuple(want[name]):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(want[name])} "
                             "(projections are stored transposed, [in, out])")


def decode_lowbit_gemv(x: torch.Tensor, weight: DecodeWeight, threshold: float | None) -> torch.Tensor:
    """One low-bit decode GEMV as the runtime runs it, x [..., K] (at most 4 rows): threshold None or <= 0 takes
    the dense low-bit path (no scan); FP8-input formats mask first, then round to e4m3 per token and keep the
    nonzero channels (the accuracy path: threshold, then fake quantization)."""
    dense = threshold is None or threshold <= 0
    thr = None if dense else float(threshold)
    if weight.act != "bf16":
        x, thr = _fake_quant(x if dense else x * (x.abs() > thr), weight.act), None if dense else 0.0
    y = lowbit_gemv_triton(x.reshape(-1, x.shape[-1]), weight.weight, thr)
    return y.view(*x.shape[:-1], -1)


def _fake_quant(x: torch.Tensor, act: str) -> torch.Tensor:
    """Per-token e4m3 rounding of x (``act`` "fp8"), same dtype out; x itself for "bf16"."""
    if act == "bf16":
        return x
    codes, scales = quantize_rows_fp8(x.contiguous())
    return (codes.float() * scales).to(x.dtype)


class Decoder:
    """Prefill, decode steps and greedy generation over given weights (module docstring: algorithm, costs).

    thresholds[i][site], site in SITES: channel j of the site's input is kept iff |x_j| > threshold; None or
    0.0 keeps every nonzero channel (dense). "qkv" and "gate_up" also take one threshold per projection (a
    sequence of 3 / 2, `SEGMENTED_SITES` order): each column segment of the fused GEMV has its own mask.
    prefill_fp8[i][kind] (kind in q k v o gate up down): that projection's `fp8_prefill.Fp8Weight` ([out, in] e4m3
    codes, one fp32 scale per output channel; `rtn_fp8_prefill` makes them from the bf16 weights, the converter
    from the accuracy path's codes and scales): prefill runs it W8A8 (`fp8_linear`); a kind left out runs bf16.
    decode_lowbit[i][kind]: that projection's `DecodeWeight` for decode steps (module docstring, "Low-bit decode").
    Attributes read by the studies: `layers` (one dict per layer: the LayerWeights fields, plus `<site>_dense`
    row-major copies with keep_dense_weights), `kv` [L, 2, max_batch, nkv, max_len, hd], `rope_cos` /
    `rope_sin` [max_len, hd/2] fp32, `thresholds`.
    """

    def __init__(self, shape: DecoderShape, weights: DecoderWeights, *,
                 thresholds: list[dict[str, float]] | None = None, max_len: int = 2048, max_batch: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 keep_dense_weights: bool = False, prefill_fp8: list[dict[str, Fp8Weight]] | None = None,
                 decode_lowbit: list[dict[str, DecodeWeight]] | None = None):
        _check_weights(shape, weights)
        self.shape, self.max_len, self.max_batch = shape, max_len, max_batch
        self.device = torch.device(device) if device is not None else weights.embed.device
        self.dtype = dtype or weights.embed.dtype

        def cast(t: torch.Tensor) -> torch.Tensor:  # no copy when already on the device, in the dtype, contiguous
            return t.to(device=self.device, dtype=self.dtype).contiguous()

        self.embed = cast(weights.embed)
        self.lm_head = self.embed if weights.lm_head is weights.embed else cast(weights.lm_head)
        self.final_norm = cast(weights.final_norm)
        self.layers = []
        for lw in weights.layers:
            self.layers.append({f.name: None if getattr(lw, f.name) is None else cast(getattr(lw, f.name))
                                for f in dataclasses.fields(lw)})
        self.embed_scale = float(weights.embed_scale)
        self._embed_scale = torch.tensor(self.embed_scale, dtype=self.dtype, device=self.device)
        s = shape
        self.kv = torch.zeros(s.n_layers, 2, max_batch, s.n_kv_heads, max_len, s.head_dim, dtype=self.dtype,
                              device=self.device)
        inv_freq = weights.inv_freq if weights.inv_freq is not None else rope_inv_freq(s.head_dim, s.rope_theta)
        angles = torch.arange(max_len, device=self.device).float()[:, None] * inv_freq.to(self.device).float()[None]
        scale = float(weights.attention_scaling)
        self.rope_cos, self.rope_sin = angles.cos() * scale, angles.sin() * scale  # [max_len, hd/2] fp32
        if thresholds is not None and len(thresholds) != s.n_layers:
            raise ValueError(f"thresholds for {len(thresholds)} layers, the model has {s.n_layers}")
        self.thresholds = [{**dict.fromkeys(SITES, 0.0), **(thresholds[i] if thresholds else {})}
                           for i in range(s.n_layers)]
        self.record: list[dict[str, torch.Tensor]] | None = None  # set to [{}] * L to record each site's input
        self._sites: dict[str, SiteBuffers] | None = None
        self._site_splits: dict[str, int] = {}
        self._graphs: dict = {}
        self._triton = self.device.type == "cuda" or _interpreting()
        self._prefill_runs = self._plan_prefill_fp8(prefill_fp8)
        self._lowbit_runs = self._plan_decode_lowbit(decode_lowbit)
        self._fused_lowbit: list[dict[str, LowbitWeight | None]] | None = None  # built on first fused use
        if keep_dense_weights:  # row-major [N, K], what nn.Linear holds (cuBLAS baseline of "dense")
            for layer in self.layers:
                layer.update({site + "_dense": layer[site].T.contiguous() for site in SITES})

    def _plan_prefill_fp8(self, prefill_fp8) -> list[dict[str, list[tuple[int, int, Fp8Weight | None]]]]:
        """Per layer, per site with an FP8 projection: its column runs (first, end, FP8 weight or None for bf16),
        consecutive projections of one format merged (one GEMM each)."""
        L = self.shape.n_layers
        if prefill_fp8 is None:
            return [{} for _ in range(L)]
        if len(prefill_fp8) != L:
            raise ValueError(f"prefill_fp8 for {len(prefill_fp8)} layers, the model has {L}")
        kinds = {k for ks in PROJECTIONS.values() for k in ks}
        plans = []
        for i, given in enumerate(prefill_fp8):
            unknown = set(given) - kinds
            if unknown:
                raise ValueError(f"prefill_fp8[{i}] has {sorted(unknown)}: projection kinds are {sorted(kinds)}")
            runs_of = {}
            for site in SITES:
                K = self.shape.site_dims()[site][0]
                runs: list[list] = []
                for kind, a, b in projection_columns(self.shape, site):
                    w = given.get(kind)
                    if w is not None:
                        if not isinstance(w, Fp8Weight) or (w.n, w.k) != (b - a, K):
                            got = (w.n, w.k) if isinstance(w, Fp8Weight) else type(w).__name__
                            raise ValueError(f"prefill_fp8[{i}][{kind!r}]: an Fp8Weight [{b - a}, {K}] "
                                             f"([out, in]) is needed, got {got}")
                        w = w.to(self.device)
                    if runs and (runs[-1][2] is None) == (w is None):
                        runs[-1][1] = b
                        if w is not None:
                            runs[-1][3].append(w)
                    else:
                        runs.append([a, b, w, [w]])
                if any(r[2] is not None for r in runs):
                    runs_of[site] = [(a, b, None if w is None else Fp8Weight.cat(parts)) for a, b, w, parts in runs]
            plans.append(runs_of)
        return plans

    def _plan_decode_lowbit(self, decode_lowbit) -> list[dict[str, list[_Run]]]:
        """Per layer, per site with a low-bit projection: its column runs (consecutive projections of one format
        and one threshold merged into one GEMV). The site's bf16 weight is replaced by the dequantized one, so
        prefill, "reference" and the LM-side checks multiply by what the low-bit kernel multiplies by."""
        L = self.shape.n_layers
        if decode_lowbit is None:
            return [{} for _ in range(L)]
        if len(decode_lowbit) != L:
            raise ValueError(f"decode_lowbit for {len(decode_lowbit)} layers, the model has {L}")
        kinds = {k for ks in PROJECTIONS.values() for k in ks}
        plans = []
        for i, given in enumerate(decode_lowbit):
            if set(given) - kinds:
                raise ValueError(f"decode_lowbit[{i}] has {sorted(set(given) - kinds)}: kinds are {sorted(kinds)}")
            runs_of = {}
            for site in SITES:
                columns = projection_columns(self.shape, site)
                if not any(kind in given for kind, _, _ in columns):
                    continue
                self._dequantize_into(i, site, given, columns)
                runs_of[site] = self._site_runs(i, site, given, columns)
            plans.append(runs_of)
        return plans

    def _dequantize_into(self, i: int, site: str, given: dict, columns) -> None:
        K = self.shape.site_dims()[site][0]
        layer = self.layers[i]
        layer[site] = layer[site].clone()  # the caller's tensor stays as it was
        for kind, a, b in columns:
            w = given.get(kind)
            if w is None:
                continue
            if not isinstance(w, DecodeWeight) or (w.weight.n, w.weight.k) != (b - a, K):
                got = (w.weight.n, w.weight.k) if isinstance(w, DecodeWeight) else type(w).__name__
                raise ValueError(f"decode_lowbit[{i}][{kind!r}]: a DecodeWeight of a [{K}, {b - a}] weight "
                                 f"([in, out]) is needed, got {got}")
            layer[site][:, a:b] = dequantize(w.weight.to(self.device)).to(self.dtype)

    def _site_runs(self, i: int, site: str, given: dict, columns) -> list[_Run]:
        thresholds = self.kind_thresholds(i, site)
        runs: list[list] = []
        for kind, a, b in columns:
            w = given.get(kind)
            key = None if w is None else (w.weight.fmt, w.weight.group, w.act)
            if runs and runs[-1][0] == key and thresholds[runs[-1][1][-1]] == thresholds[kind]:
                runs[-1][1].append(kind)
                runs[-1][3] = b
                runs[-1][4].append(w)
            else:
                runs.append([key, [kind], a, b, [w]])
        out = []
        for key, kinds, a, b, parts in runs:
            if key is None:
                wt = self.layers[i][site][:, a:b].contiguous() if len(runs) > 1 else None
                out.append(_Run(tuple(kinds), a, b, None, wt))
            else:
                weight = LowbitWeight.cat([p.weight.to(self.device) for p in parts])
                out.append(_Run(tuple(kinds), a, b, DecodeWeight(weight, parts[0].act)))
        return out

    def _fused_codes(self) -> list[dict[str, LowbitWeight | None]]:
        """Per layer and low-bit site, the whole site's weight for the fused step: INT8 codes in every projection
        (weight-only), its runs' weights in column order (the one run's weight itself when the site is one run);
        None where the fused step cannot read it (INT4, FP8 inputs, bf16 columns beside low-bit ones). Built once,
        on first use: a Decoder that never runs the fused step holds no second copy."""
        if self._fused_lowbit is None:
            def fused(runs: list[_Run]) -> LowbitWeight | None:
                if not all(r.weight is not None and r.weight.weight.fmt == "int8" and r.weight.act == "bf16"
                           for r in runs):
                    return None
                return LowbitWeight.cat([r.weight.weight for r in runs])
            self._fused_lowbit = [{site: fused(runs) for site, runs in row.items()} for row in self._lowbit_runs]
        return self._fused_lowbit

    @property
    def fused_lowbit(self) -> bool:
        """Whether the fused step runs every low-bit site (all INT8 weight-only; see `_fused_codes`)."""
        return all(w is not None for row in self._fused_codes() for w in row.values())

    def kind_thresholds(self, i: int, site: str) -> dict[str, float]:
        """Layer i's threshold of each projection kind of `site`."""
        values, _ = self.site_threshold(i, site)
        kinds = PROJECTIONS[site]
        return dict(zip(kinds, values if len(values) == len(kinds) else values * len(kinds)))

    def decode_weight_bytes(self) -> int:
        """Bytes of the projection weights a decode step reads with every row kept: each low-bit run's packed
        codes and scales, the 16-bit columns at their element size (the LM head and embedding not counted)."""
        total = 0
        for i, layer in enumerate(self.layers):
            for site in SITES:
                w = layer[site]
                runs = self._lowbit_runs[i].get(site) or [_Run((), 0, w.shape[1], None)]
                total += sum(r.weight.weight.nbytes if r.weight is not None else
                             (r.end - r.first) * w.shape[0] * w.element_size() for r in runs)
        return total

    @property
    def has_lowbit(self) -> bool:
        """Whether any projection decodes through the low-bit GEMV."""
        return any(self._lowbit_runs)

    def prefill_fp8_kinds(self, i: int) -> list[str]:
        """The projection kinds of layer i that prefill runs in FP8."""
        return [kind for site, runs in self._prefill_runs[i].items() for kind, a, b in
                projection_columns(self.shape, site) if any(w is not None and r0 <= a < r1 for r0, r1, w in runs)]

    @classmethod
    def random(cls, shape: DecoderShape, dtype: torch.dtype, device, max_len: int = 512, seed: int = 0) -> "Decoder":
        """Random weights (`random_weights`), empty cache."""
        g = torch.Generator(device=torch.device(device)).manual_seed(seed)
        return Decoder(shape, random_weights(shape, dtype, device, g), max_len=max_len, dtype=dtype, device=device)

    def reset(self) -> None:
        """Empty the KV cache (in place: captured graphs keep pointing at it)."""
        self.kv.zero_()

    # -- pieces (PyTorch) --
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed[ids]  # a fresh buffer (the kernel paths update it in place)
        return h * self._embed_scale if self.embed_scale != 1.0 else h

    def _rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.shape.norm_eps)).to(self.dtype) * w

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x [..., T, hd]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(self.dtype)

    def site_threshold(self, i: int, site: str) -> tuple[list[float], tuple[int, ...]]:
        """Layer i's thresholds of `site` and the column starts of their segments: ([t], ()) for one threshold
        (equal per-projection thresholds included), ([t_q, t_k, t_v], (k0, v0)) / ([t_g, t_u], (u0,)) else."""
        value = self.thresholds[i][site]
        if value is None or isinstance(value, (int, float)):
            return [0.0 if value is None else float(value)], ()
        values = [0.0 if v is None else float(v) for v in value]
        kinds = SEGMENTED_SITES.get(site, (site,))
        if len(values) != len(kinds):
            raise ValueError(f"thresholds[{i}][{site!r}] = {value!r}: give one number or one per projection "
                             f"{kinds} ({len(kinds)})")
        if all(v == values[0] for v in values):
            return values[:1], ()
        return values, self.shape.segment_starts(site)

    def _linear(self, x: torch.Tensor, layer: dict, site: str, mode: str, i: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """(x * mask) @ W (+ bias, not masked) as `mode` computes it (module docstring: where the bias rounds);
        one mask per column segment when the site has per-projection thresholds."""
        if self.record is not None:
            self.record[i][site] = x.detach().clone()
        if mode == "prefill":  # dense, or the site's FP8 / bf16 column runs (module docstring)
            runs = self._prefill_runs[i].get(site)
            if runs is not None:
                return self._prefill_fp8_linear(x, layer, site, runs, bias)
            return self._dense_linear(x, layer, site, bias)  # low-bit sites: their dequantized weights, bf16
        runs = self._lowbit_runs[i].get(site)
        if runs is not None:
            return self._lowbit_linear(x, layer, site, mode, i, runs, bias)
        if mode == "dense":
            return self._dense_linear(x, layer, site, bias)
        thr, starts = self.site_threshold(i, site)
        if mode == "sparse":
            y = torch.ops.allocator.sparse_gemv(x, layer[site], thr, list(starts), None, None)
            return y if bias is None else y + bias  # fp32 add of the rounded output, rounded again
        xf = x.float()  # reference: each row its own mask, fp32 accumulate, rounded like a GEMV output
        w, bounds = layer[site], (0, *starts, layer[site].shape[1])
        y = torch.cat([(xf * (xf.abs() > t)) @ w[:, a:b].float() for t, a, b in zip(thr, bounds, bounds[1:])], -1)
        return (y if bias is None else y + bias.float()).to(x.dtype)

    @staticmethod
    def _dense_linear(x: torch.Tensor, layer: dict, site: str, bias: torch.Tensor | None) -> torch.Tensor:
        dense = layer.get(site + "_dense")
        if bias is not None:  # addmm: the bias joins the accumulator before the one rounding (nn.Linear)
            return F.linear(x, dense if dense is not None else layer[site].T, bias)
        return F.linear(x, dense) if dense is not None else x @ layer[site]

    def _lowbit_linear(self, x: torch.Tensor, layer: dict, site: str, mode: str, i: int, runs: list[_Run],
                       bias: torch.Tensor | None) -> torch.Tensor:
        """A site with low-bit projections at decode: one GEMV per column run, concatenated. "sparse": the
        low-bit GEMV (bf16 runs: sparse_gemv); "dense": the same without masks; "reference": per-row masks, the
        dequantized weight in fp32. FP8-activation runs mask first, then round the kept values to e4m3 per token
        (the accuracy path: threshold, then fake quantization), and keep the nonzero channels (threshold 0)."""
        thresholds = self.kind_thresholds(i, site)
        parts = []
        for run in runs:
            t = thresholds[run.kinds[0]]
            if any(thresholds[k] != t for k in run.kinds):
                raise ValueError(f"layer {i} {site}: thresholds of {run.kinds} now differ, but they were merged into one "
                                 "low-bit GEMV when the Decoder was built; build a new Decoder")
            act = "bf16" if run.weight is None else run.weight.act
            if mode == "reference":
                xf = x.float()
                xm = _fake_quant(xf * (xf.abs() > t), act)
                parts.append(xm @ layer[site][:, run.first:run.end].float())
                continue
            thr = t if mode == "sparse" else None
            if run.weight is not None:
                parts.append(decode_lowbit_gemv(x, run.weight, thr))
            else:
                wt = run.wt if run.wt is not None else layer[site]
                parts.append(torch.ops.allocator.sparse_gemv(x, wt, [thr], [], None, None) if thr is not None
                             else x @ wt)
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if mode == "reference":
            return (y if bias is None else y + bias.float()).to(x.dtype)
        return y if bias is None else y + bias

    def _prefill_fp8_linear(self, x: torch.Tensor, layer: dict, site: str, runs, bias: torch.Tensor | None):
        parts = []
        for a, b, w in runs:
            part_bias = None if bias is None else bias[a:b]
            if w is not None:
                parts.append(fp8_linear(x, w, part_bias, out_dtype=self.dtype))
            else:
                dense = layer.get(site + "_dense")
                parts.append(F.linear(x, dense[a:b] if dense is not None else layer[site][:, a:b].T, part_bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _forward_torch(self, ids: torch.Tensor, pos: torch.Tensor, mode: str) -> torch.Tensor:
        """ids [B, T] at positions pos..pos+T-1 (pos [1] on the device) -> logits [B, T, V] fp32; plain PyTorch,
        projections as `mode` says; writes the cache at those positions of rows 0..B-1. mode "prefill" (pos = 0):
        the prefill projections (dense or FP8) and causal attention over the T positions written."""
        s = self.shape
        hd, nh, nkv = s.head_dim, s.n_heads, s.n_kv_heads
        B, T = ids.shape
        positions = pos + torch.arange(T, device=self.device)  # [T]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [T, hd/2]
        visible = (None if mode == "prefill" else
                   torch.arange(self.max_len, device=self.device)[None, :] <= positions[:, None])  # [T, max_len]
        h = self._embed(ids)  # [B, T, H]
        for i, layer in enumerate(self.layers):
            x = self._rms_norm(h, layer["attn_norm"])
            qkv = self._linear(x, layer, "qkv", mode, i, layer["qkv_bias"])
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = self._rope(q.view(B, T, nh, hd).transpose(1, 2), cos, sin)
            k_cache, v_cache = self.kv[i, 0, :B], self.kv[i, 1, :B]  # [B, nkv, max_len, hd]
            k_cache.index_copy_(2, positions, self._rope(k.view(B, T, nkv, hd).transpose(1, 2), cos, sin))
            v_cache.index_copy_(2, positions, v.view(B, T, nkv, hd).transpose(1, 2))
            if visible is None:  # prefill from position 0: positions 0..T-1 are the whole visible cache
                attn = F.scaled_dot_product_attention(q, k_cache[:, :, :T], v_cache[:, :, :T], is_causal=True,
                                                      enable_gqa=nkv != nh)
            else:
                attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible, enable_gqa=nkv != nh)
            h = h + self._linear(attn.transpose(1, 2).reshape(B, T, nh * hd), layer, "o", mode, i)
            x = self._rms_norm(h, layer["mlp_norm"])
            gate, up = self._linear(x, layer, "gate_up", mode, i).chunk(2, dim=-1)
            h = h + self._linear(F.silu(gate) * up, layer, "down", mode, i)
        return F.linear(self._rms_norm(h, self.final_norm), self.lm_head).float()

    # -- prefill and one decode step --
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] fp32, plain PyTorch (the projections given FP8 weights in W8A8, the
        rest dense); writes cache positions 0..T-1 of rows 0..B-1."""
        B, T = ids.shape
        if not (1 <= B <= self.max_batch and 1 <= T <= self.max_len):
            raise ValueError(f"prefill of [{B}, {T}] ids: batch must be 1..{self.max_batch}, length 1..{self.max_len}")
        return self._forward_torch(ids.to(self.device), torch.zeros(1, dtype=torch.long, device=self.device),
                                   "prefill")

    def _step_reference(self, tokens: torch.Tensor, pos: torch.Tensor, mode: str) -> torch.Tensor:
        return self._forward_torch(tokens.view(-1, 1), pos, mode)[:, -1]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, mode: str = "fused_pdl") -> torch.Tensor:
        """tokens [B] int64, pos [1] int64 (the cache position written, one for the batch) -> logits [B, V] fp32."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        B = tokens.shape[0]
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"batch {B} outside 1..max_batch={self.max_batch}")
        if mode == "reference" or self.record is not None or (mode in BATCHED_MODES and (B > 1 or not self._triton)):
            return self._step_reference(tokens, pos, mode)
        if mode in ("fused", "fused_pdl"):
            if B > 1:
                raise ValueError(f"mode {mode!r} supports batch 1 only; for batch {B} use one of {BATCHED_MODES}")
            if not self._triton:
                raise ValueError(f"mode {mode!r} needs a CUDA device or TRITON_INTERPRET=1")
            if not self.fused_lowbit:
                raise ValueError(f"mode {mode!r} runs bf16 / fp16 and INT8 (w8a16) weights; these low-bit "
                                 "projections decode through mode 'sparse' (or 'dense', 'reference')")
            previous, pipelined.USE_PDL = pipelined.USE_PDL, mode == "fused_pdl" and not _interpreting()
            try:
                return self._step_fused(tokens, pos)
            finally:
                pipelined.USE_PDL = previous
        return self._step_kernels(tokens, pos, mode)

    def _step_kernels(self, token: torch.Tensor, pos: torch.Tensor, mode: str) -> torch.Tensor:
        """Batch 1, "dense" / "sparse": fused elementwise kernels (decode_ops.py) around the projections."""
        s = self.shape
        h = self._embed(token)  # [1, H], updated in place below
        delta = None
        for i, layer in enumerate(self.layers):
            x = add_rms_norm(h, delta, layer["attn_norm"], s.norm_eps)
            # the bias: in cuBLAS's epilogue for "dense", in the RoPE kernel (fp32 add, rounded again) for "sparse"
            bias, kernel_bias = (layer["qkv_bias"], None) if mode == "dense" else (None, layer["qkv_bias"])
            qkv = self._linear(x, layer, "qkv", mode, i, bias)[0]
            cache = self.kv[i, :, 0]
            q = rope_and_cache(qkv, self.rope_cos, self.rope_sin, pos, cache[0], cache[1], s.n_heads, s.n_kv_heads,
                               bias=kernel_bias)
            attn = decode_attention(q, cache[0], cache[1], pos)
            o = self._linear(attn, layer, "o", mode, i)
            x = add_rms_norm(h, o, layer["mlp_norm"], s.norm_eps)
            delta = self._linear(silu_mul(self._linear(x, layer, "gate_up", mode, i)), layer, "down", mode, i)
        return F.linear(add_rms_norm(h, delta, self.final_norm, s.norm_eps), self.lm_head).float()

    def fused_sites(self, splits: dict[str, int] | None = None) -> dict[str, SiteBuffers]:
        """The buffers of the "fused" step, one set per site shared by all layers (built on first use, rebuilt
        when `splits` is given or a site gains per-projection thresholds: it is then planned with segments)."""
        segmented = {site for site in SEGMENTED_SITES for i in range(len(self.layers))
                     if self.site_threshold(i, site)[1]}
        planned = {site for site, b in (self._sites or {}).items() if b.plan.segments}
        if self._sites is None or splits is not None or not segmented <= planned:
            self._site_splits = dict(splits) if splits is not None else self._site_splits
            self._sites = {site: SiteBuffers(plan_site(k, n, self.device, self._site_splits.get(site),
                                                       segments=self.shape.segment_starts(site)
                                                       if site in segmented | planned else ()),
                                             self.device, scan=site == "o")
                           for site, (k, n) in self.shape.site_dims().items()}
            self._graphs.clear()  # captured graphs point at the old buffers
        return self._sites

    def _step_fused(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        s, sites = self.shape, self.fused_sites()
        h = self._embed(token)  # [1, H], a fresh buffer; the residual alternates between h and h_next
        h_next = torch.empty_like(h)
        for i, layer in enumerate(self.layers):
            thr = {site: self.site_threshold(i, site)[0] for site in SITES}  # one per column segment, or one
            x = add_rms_norm_split(h, h_next, sites["down"] if i else None, layer["attn_norm"], s.norm_eps,
                                   thr["qkv"], sites["qkv"])
            h, h_next = h_next, h
            w = {site: self._fused_weight(i, site) for site in SITES}
            indexed_gemv(x, w["qkv"][0], sites["qkv"], clear=sites["down"].acc if i else None, scales=w["qkv"][1])
            cache = self.kv[i, :, 0]
            q = rope_and_cache_from_acc(sites["qkv"], self.rope_cos, self.rope_sin, pos, cache[0], cache[1],
                                        s.n_heads, s.n_kv_heads, bias=layer["qkv_bias"])
            attn = decode_attention(q, cache[0], cache[1], pos, pdl=pipelined.USE_PDL)
            indexed_gemv(attn, w["o"][0], sites["o"], thr["o"][0], scales=w["o"][1])
            x = add_rms_norm_split(h, h_next, sites["o"], layer["mlp_norm"], s.norm_eps, thr["gate_up"],
                                   sites["gate_up"])
            h, h_next = h_next, h
            indexed_gemv(x, w["gate_up"][0], sites["gate_up"], clear=sites["o"].acc, scales=w["gate_up"][1])
            a = silu_mul_compact(sites["gate_up"], self.dtype, thr["down"][0], sites["down"])
            indexed_gemv(a, w["down"][0], sites["down"], clear=sites["gate_up"].acc, scales=w["down"][1])
        x = add_rms_norm_from_acc(h, sites["down"], self.final_norm, s.norm_eps)
        return F.linear(x, self.lm_head).float()

    def _fused_weight(self, i: int, site: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [K, N], scales or None) the fused step reads for layer i's site: INT8 codes and their column
        scales for a low-bit site, else the 16-bit weight."""
        packed = self._fused_codes()[i].get(site)
        return (self.layers[i][site], None) if packed is None else (packed.qweight, packed.scales)

    # -- greedy generation --
    def _greedy_step(self, token: torch.Tensor, pos: torch.Tensor, mode: str) -> None:
        """One step on device tensors only: token <- argmax(logits at pos), pos += 1 (what the graph holds)."""
        token.copy_(self.decode_step(token, pos, mode).argmax(-1))
        pos.add_(1)

    def _graphed_greedy_step(self, batch: int, mode: str) -> tuple[Callable[[], None], torch.Tensor, torch.Tensor]:
        """(replay, token, pos): `_greedy_step` captured once per (batch, mode, thresholds). The warm-up run
        writes cache position 0: call before prefill."""
        key = (batch, mode, tuple(tuple(tuple(self.site_threshold(i, site)[0]) for site in SITES)
                                  for i in range(len(self.thresholds))))
        if key not in self._graphs:
            token = torch.zeros(batch, dtype=torch.long, device=self.device)
            pos = torch.zeros(1, dtype=torch.long, device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # compile the kernels and fill the workspaces outside the capture
                self._greedy_step(token, pos, mode)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._greedy_step(token, pos, mode)
            self._graphs[key] = (graph.replay, token, pos)
        return self._graphs[key]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, mode: str = "fused_pdl",
                 cuda_graph: bool = True) -> torch.Tensor:
        """Greedy decoding: prompt [B, T] -> [B, T + max_new_tokens]. Prefill dense, then one decode step per
        token, replayed from one CUDA graph when `cuda_graph` and the device is CUDA."""
        B, T = prompt.shape
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}")
        if mode not in BATCHED_MODES and B > 1:
            raise ValueError(f"mode {mode!r} supports batch 1 only; for batch {B} use one of {BATCHED_MODES}")
        out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :T] = prompt
        if max_new_tokens == 0:
            return out
        if cuda_graph and self.device.type == "cuda":
            step, token, pos = self._graphed_greedy_step(B, mode)
        else:
            token = torch.zeros(B, dtype=torch.long, device=self.device)
            pos = torch.zeros(1, dtype=torch.long, device=self.device)

            def step():
                self._greedy_step(token, pos, mode)
        self.reset()
        token.copy_(self.prefill(prompt)[:, -1].argmax(-1))
        pos.fill_(T)
        out[:, T] = token
        for t in range(T + 1, T + max_new_tokens):
            step()
            out[:, t] = token
        return out
