"""A random-weight Llama-shaped decoder for one-token decode steps, dense or through the sparse kernels.

Why: the end-to-end speedup of activation sparsity is bounded by what stays dense (LM head, attention,
norms, launch gaps), and only a whole decode step shows it. No weights are downloaded: the shapes are
what matter for time, and for the logits check both paths see the same random weights.

Each layer sparsifies the four inputs TEAL / R-Sparse sparsify: the attention input (fused q|k|v), the
attention output (o), the MLP input (fused gate|up) and the down-projection input. Modes of `step`:
* "dense": standard row-major nn.Linear weights through cuBLAS (the baseline; no masking);
* "sparse": the Triton kernels on the transposed weights (`torch.ops.allocator.sparse_gemv`);
* "reference": the same masked function through the PyTorch reference (fp32 accumulate);
* "fused" / "fused_pdl" (launched with programmatic dependent launch): the same kernels with the kept-channel lists written by the kernel that produces x and split-K
  partials accumulated atomically into buffers their consumer reads and re-zeroes (pipelined.py).
The step takes a token id tensor and a position tensor, so one CUDA graph replays every decode step. Outside
"reference", norms, RoPE + cache write and SiLU * up run as fused Triton kernels (decode_ops.py) in both the
dense and the sparse step, as a compiled inference engine would; the comparison stays like for like.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from allocator.costs import ModelShape, load_model_config, model_shape

from .decode_ops import add_rms_norm, decode_attention, rope_and_cache, silu_mul
from . import pipelined
from .gemv import sparse_gemv_reference
from .pipelined import (SiteBuffers, add_rms_norm_from_acc, add_rms_norm_split, indexed_gemv, plan_site,
                        rope_and_cache_from_acc, silu_mul_compact)

SITES = ("qkv", "o", "gate_up", "down")


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
        """From a HF config (dict, config.json path, or a shipped name such as "llama-3-8b")."""
        cfg = load_model_config(config)
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        return cls.from_model_shape(model_shape(cfg), rope_theta=float(cfg.get("rope_theta") or 10000.0),
                                    norm_eps=float(cfg.get("rms_norm_eps") or 1e-5))


LLAMA3_8B = DecoderShape.from_config("llama-3-8b")
LLAMA2_7B = DecoderShape.from_config("llama-2-7b")
SMOLLM2_135M = DecoderShape.from_config("smollm2-135m")


class RandomLlamaDecoder:
    """Weights drawn N(0, 1/fan_in); KV cache of `max_len` positions pre-filled with random keys/values."""

    def __init__(
        self,
        shape: DecoderShape,
        dtype: torch.dtype,
        device: torch.device | str,
        max_len: int = 512,
        keep_dense_weights: bool = True,
        seed: int = 0,
    ):
        self.shape, self.dtype, self.device, self.max_len = shape, dtype, torch.device(device), max_len
        g = torch.Generator(device=self.device).manual_seed(seed)
        H, I, hd = shape.hidden, shape.intermediate, shape.head_dim
        q_out, kv_out = shape.n_heads * hd, shape.n_kv_heads * hd

        def rand(n_out: int, n_in: int) -> torch.Tensor:  # row-major [n_out, n_in]
            w = torch.randn(n_out, n_in, generator=g, device=self.device, dtype=torch.float32)
            return w.mul_(1.0 / math.sqrt(n_in)).to(dtype)

        self.embed = rand(shape.vocab, H).mul_(math.sqrt(H))
        self.lm_head = rand(shape.vocab, H)
        self.final_norm = torch.ones(H, device=self.device, dtype=dtype)
        self.layers = []
        for _ in range(shape.n_layers):
            w_qkv, w_o = rand(q_out + 2 * kv_out, H), rand(H, q_out)
            w_gu, w_down = rand(2 * I, H), rand(H, I)
            layer = {
                "attn_norm": torch.ones(H, device=self.device, dtype=dtype),
                "mlp_norm": torch.ones(H, device=self.device, dtype=dtype),
                # transposed [K, N] weights for the kernels
                "qkv": w_qkv.T.contiguous(),
                "o": w_o.T.contiguous(),
                "gate_up": w_gu.T.contiguous(),
                "down": w_down.T.contiguous(),
            }
            if keep_dense_weights:  # row-major [N, K], what nn.Linear holds
                layer.update(qkv_dense=w_qkv, o_dense=w_o, gate_up_dense=w_gu, down_dense=w_down)
            del w_qkv, w_o, w_gu, w_down
            self.layers.append(layer)
        # KV cache [layers, 2, kv_heads, max_len, head_dim] with random content (a long prompt already seen)
        self.kv = torch.randn(
            shape.n_layers, 2, shape.n_kv_heads, max_len, hd, generator=g, device=self.device, dtype=torch.float32
        ).to(dtype)
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, device=self.device).float() / hd))
        angles = torch.arange(max_len, device=self.device).float()[:, None] * inv_freq[None, :]
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()  # [max_len, hd/2]
        # per-layer, per-site thresholds (0: keep every nonzero channel)
        self.thresholds = [dict.fromkeys(SITES, 0.0) for _ in range(shape.n_layers)]
        self.record: list[dict[str, torch.Tensor]] | None = None

    # -- pieces --
    def _rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.shape.norm_eps)).to(self.dtype) * w

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x [heads, hd]
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [1, hd/2]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(self.dtype)

    def _linear(self, x: torch.Tensor, layer: dict, site: str, mode: str, i: int) -> torch.Tensor:
        if self.record is not None:
            self.record[i][site] = x.detach().clone()
        if mode == "dense":
            return F.linear(x, layer[site + "_dense"])
        thr = [self.thresholds[i][site]]
        if mode == "sparse":
            return torch.ops.allocator.sparse_gemv(x, layer[site], thr, [], None, None)
        return sparse_gemv_reference(x, layer[site], thr)

    # -- one decode step --
    def step(self, token: torch.Tensor, pos: torch.Tensor, mode: str = "sparse") -> torch.Tensor:
        """token [1] int64, pos [1] int64 (position written into the KV cache) -> logits [1, vocab] fp32.

        "dense" and "sparse" run the fused elementwise kernels (decode_ops.py) around the projections;
        "reference" runs everything as plain PyTorch ops (the reference of both)."""
        if mode == "reference" or self.record is not None:
            return self._step_reference(token, pos, mode)
        if mode in ("fused", "fused_pdl"):
            previous, pipelined.USE_PDL = pipelined.USE_PDL, mode == "fused_pdl"
            try:
                return self._step_fused(token, pos)
            finally:
                pipelined.USE_PDL = previous
        s = self.shape
        nh, nkv = s.n_heads, s.n_kv_heads
        h = self.embed[token]  # [1, H], a fresh buffer: updated in place below
        delta = None
        for i, layer in enumerate(self.layers):
            x = add_rms_norm(h, delta, layer["attn_norm"], s.norm_eps)
            qkv = self._linear(x, layer, "qkv", mode, i)[0]
            cache = self.kv[i]
            q = rope_and_cache(qkv, self.rope_cos, self.rope_sin, pos, cache[0], cache[1], nh, nkv)
            attn = decode_attention(q, cache[0], cache[1], pos)
            o = self._linear(attn, layer, "o", mode, i)
            x = add_rms_norm(h, o, layer["mlp_norm"], s.norm_eps)
            delta = self._linear(silu_mul(self._linear(x, layer, "gate_up", mode, i)), layer, "down", mode, i)
        return F.linear(add_rms_norm(h, delta, self.final_norm, s.norm_eps), self.lm_head).float()

    def fused_sites(self, splits: dict[str, int] | None = None) -> dict:
        """The buffers of the "fused" step, one set per site shared by all layers (built on first use)."""
        if getattr(self, "_sites", None) is None or splits is not None:
            s, splits = self.shape, splits or {}
            q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
            dims = {"qkv": (s.hidden, q_out + 2 * kv_out), "o": (q_out, s.hidden),
                    "gate_up": (s.hidden, 2 * s.intermediate), "down": (s.intermediate, s.hidden)}
            self._sites = {site: SiteBuffers(plan_site(k, n, self.device, splits.get(site)), self.device,
                                             scan=site == "o") for site, (k, n) in dims.items()}
        return self._sites

    def _step_fused(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        s, sites = self.shape, self.fused_sites()
        nh, nkv = s.n_heads, s.n_kv_heads
        h = self.embed[token]  # [1, H], a fresh buffer; the residual alternates between h and h_next
        h_next = torch.empty_like(h)
        for i, layer in enumerate(self.layers):
            thr = self.thresholds[i]
            x = add_rms_norm_split(h, h_next, sites["down"] if i else None, layer["attn_norm"], s.norm_eps,
                                   thr["qkv"], sites["qkv"])
            h, h_next = h_next, h
            indexed_gemv(x, layer["qkv"], sites["qkv"], clear=sites["down"].acc if i else None)
            cache = self.kv[i]
            q = rope_and_cache_from_acc(sites["qkv"], self.rope_cos, self.rope_sin, pos, cache[0], cache[1], nh, nkv)
            attn = decode_attention(q, cache[0], cache[1], pos, pdl=pipelined.USE_PDL)
            indexed_gemv(attn, layer["o"], sites["o"], thr["o"])
            x = add_rms_norm_split(h, h_next, sites["o"], layer["mlp_norm"], s.norm_eps, thr["gate_up"],
                                   sites["gate_up"])
            h, h_next = h_next, h
            indexed_gemv(x, layer["gate_up"], sites["gate_up"], clear=sites["o"].acc)
            a = silu_mul_compact(sites["gate_up"], self.dtype, thr["down"], sites["down"])
            indexed_gemv(a, layer["down"], sites["down"], clear=sites["gate_up"].acc)
        x = add_rms_norm_from_acc(h, sites["down"], self.final_norm, s.norm_eps)
        return F.linear(x, self.lm_head).float()

    def _step_reference(self, token: torch.Tensor, pos: torch.Tensor, mode: str) -> torch.Tensor:
        s = self.shape
        hd, nh, nkv = s.head_dim, s.n_heads, s.n_kv_heads
        h = self.embed[token]  # [1, H]
        visible = (torch.arange(self.max_len, device=self.device) <= pos).view(1, 1, 1, -1)
        for i, layer in enumerate(self.layers):
            x = self._rms_norm(h, layer["attn_norm"])
            qkv = self._linear(x, layer, "qkv", mode, i)[0]  # [(nh + 2 nkv) hd]
            q = self._rope(qkv[: nh * hd].view(nh, hd), pos)
            k = self._rope(qkv[nh * hd : (nh + nkv) * hd].view(nkv, hd), pos)
            v = qkv[(nh + nkv) * hd :].view(nkv, hd)
            cache = self.kv[i]
            cache[0].index_copy_(1, pos, k.unsqueeze(1))
            cache[1].index_copy_(1, pos, v.unsqueeze(1))
            attn = F.scaled_dot_product_attention(
                q.view(1, nh, 1, hd), cache[0].unsqueeze(0), cache[1].unsqueeze(0), attn_mask=visible,
                enable_gqa=nkv != nh,
            )  # [1, nh, 1, hd]
            h = h + self._linear(attn.reshape(1, nh * hd), layer, "o", mode, i)
            x = self._rms_norm(h, layer["mlp_norm"])
            gate, up = self._linear(x, layer, "gate_up", mode, i).chunk(2, dim=-1)
            h = h + self._linear(F.silu(gate) * up, layer, "down", mode, i)
        return F.linear(self._rms_norm(h, self.final_norm), self.lm_head).float()

    def _recorded_steps(self, steps: int, start_pos: int, mode: str):
        """Per step on a random token, each site's input per layer (``record``: the inputs the projections saw)."""
        for t in range(steps):
            self.record = [{} for _ in self.layers]
            token = torch.randint(0, self.shape.vocab, (1,), device=self.device)
            self.step(token, torch.tensor([start_pos + t], device=self.device), mode=mode)
            record, self.record = self.record, None
            yield record

    @torch.no_grad()
    def calibrate(self, sparsity: float, steps: int = 4, start_pos: int = 0) -> None:
        """Set each site's threshold to the `sparsity` quantile of |input| over a few dense steps."""
        samples = [{site: [] for site in SITES} for _ in self.layers]
        for record in self._recorded_steps(steps, start_pos, "dense"):
            for i, rec in enumerate(record):
                for site in SITES:
                    samples[i][site].append(rec[site].float().abs().flatten())
        for i in range(len(self.layers)):
            for site in SITES:
                values = torch.cat(samples[i][site])
                self.thresholds[i][site] = 0.0 if sparsity <= 0 else float(torch.quantile(values, sparsity))

    @torch.no_grad()
    def measured_sparsity(self, steps: int = 4, start_pos: int = 0) -> float:
        """Parameter-weighted fraction of input channels below threshold on fresh steps (reference path)."""
        dropped = total = 0.0
        for record in self._recorded_steps(steps, start_pos, "reference"):
            for i, rec in enumerate(record):
                for site in SITES:
                    w = self.layers[i][site]
                    frac = (rec[site].float().abs() <= self.thresholds[i][site]).float().mean().item()
                    dropped += frac * w.numel()
                    total += w.numel()
        self.record = None
        return dropped / total
