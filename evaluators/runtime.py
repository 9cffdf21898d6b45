"""The speed path: a loaded HF causal LM and a compression plan, converted for the kernels' decode runtime.

``decoder_from_hf(model, plan)`` is the only place where HF meets ``allocator.kernels.runtime``: it copies the
weights (q|k|v and gate|up fused, transposed for the GEMV kernels), the RoPE frequencies the HF model computed
(rope scaling included) and, from the plan, the thresholds of each decode site and layer (the q|k|v input, the
attention output, the gate|up input, the down input). The accuracy path (``compressed(model, plan)``) and the
speed path then apply the same masks: a channel is kept iff ``|x| > threshold``. A fused site (q|k|v, gate|up)
whose projections carry different thresholds (projection units: q, k, v at their own levels; TEAL with
``shared_inputs=True`` keeps one |x| statistic per input, so the levels become different thresholds on it) gets
one threshold per projection, and every decode mode applies each to its own column segment
(``kernels.runtime``: reference, sparse, fused, fused_pdl; dense ignores thresholds). A projection the plan
leaves out of a fused site runs dense there (threshold 0).

Formats (``quantized_projections``): a projection the plan quantizes decodes through the low-bit GEMV
(``kernels/lowbit_gemv.py``) with the accuracy path's own codes and scales (w4a16 per channel or in groups, w8a16,
w8a8-fp8 with its input rounded to e4m3 per token after the mask), and w8a8-fp8 projections prefill in W8A8
(``kernels/fp8_prefill.py``); weight-only formats prefill as bf16 GEMMs on their dequantized weights. Formats
without a kernel (INT activations, 3-bit weights) are ``RuntimeUnsupported``. ``decode_speed`` times low-bit plans
in mode "sparse" (per-site kernels): the fused step also runs w8a16-only plans, but measured slower on the H200
(Llama-3-8B at 50%: 1.42x vs 1.50x over dense, ``studies/results/lowbit_decode_h200.md``).

``decode_speed(model, plans)`` (the ``decode_speed`` evaluator) times greedy decode steps under CUDA graphs for
the dense model and each plan, plus its prefill, with ``triton.testing.do_bench``.

Supported: Llama-family decoders (llama, mistral, qwen2 / qwen2.5, qwen3; olmo2-like naming is not) with RMSNorm,
SiLU gated MLP, full causal attention (no sliding-window layers) and no projection biases except on q, k, v (Qwen2's
attention bias, copied as ``LayerWeights.qkv_bias``); TEAL-style plans (plain thresholds, every token sparse), over
fake-quant linears in the formats above.
Anything else is a ``RuntimeUnsupported`` error naming what the runtime lacks.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from allocator.formats import PER_CHANNEL, decode_kernel, get_format

from .metrics import register_evaluator
from .models import decoder_layers, find_projections
from .plan import CompressionPlan, WrapperState, unwrapped
from .quantize import FakeQuantLinear
from .wrappers import ThresholdLinear

RUNTIME_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SITE_KINDS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


class RuntimeUnsupported(ValueError):
    """The model or the plan needs something the decode runtime does not run; the message says what."""


def _check_model(model: nn.Module) -> None:
    cfg = model.config
    if cfg.model_type not in RUNTIME_FAMILIES:
        raise RuntimeUnsupported(f"the decode runtime runs {RUNTIME_FAMILIES} decoders, not '{cfg.model_type}' "
                                 "(Gemma's GELU MLP, (1 + w) norms and embedding scale are not in the kernels yet); "
                                 "measure accuracy without evaluator.speed")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise RuntimeUnsupported(f"the runtime's MLP is SiLU-gated; this model uses {cfg.hidden_act}")
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        raise RuntimeUnsupported("the runtime's attention is full causal; this model has sliding-window layers "
                                 "(use_sliding_window)")
    qkv = {id(unwrapped(getattr(p.parent, p.attr))) for row in find_projections(model) for p in row
           if p.kind in SITE_KINDS["qkv"]}
    for i, layer in enumerate(decoder_layers(model)):
        biased = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
                  and id(m) not in qkv]
        if biased:
            raise RuntimeUnsupported(f"the runtime adds a bias to the q, k, v projections only (Qwen2); layer {i} "
                                     f"has biases in {biased}")


def _transposed(*linears: nn.Linear) -> torch.Tensor:
    return torch.cat([l.weight for l in linears], dim=0).T.contiguous()


def _layer_weights(layer: nn.Module, row) -> "object":
    from allocator.kernels.runtime import LayerWeights

    by_kind = {p.kind: unwrapped(getattr(p.parent, p.attr)) for p in row}
    q, k, v = (by_kind[kind] for kind in SITE_KINDS["qkv"])
    bias = None
    if any(l.bias is not None for l in (q, k, v)):  # q|k|v bias (Qwen2); a missing one is zero
        bias = torch.cat([l.bias.detach() if l.bias is not None else l.weight.new_zeros(l.out_features)
                          for l in (q, k, v)])
    return LayerWeights(attn_norm=layer.input_layernorm.weight.detach(), mlp_norm=layer.post_attention_layernorm.weight
                        .detach(), qkv=_transposed(q, k, v), o=_transposed(by_kind["o"]),
                        gate_up=_transposed(by_kind["gate"], by_kind["up"]), down=_transposed(by_kind["down"]),
                        qkv_bias=bias)


def _rotary(model: nn.Module) -> tuple[torch.Tensor, float]:
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise RuntimeUnsupported("the model has no model.rotary_emb.inv_freq (RoPE) the runtime can copy")
    return rotary.inv_freq.detach().float(), float(getattr(rotary, "attention_scaling", 1.0))


@torch.no_grad()
def decoder_weights(model: nn.Module):
    """The HF model's weights in the runtime's layout (tensors shared where the layout allows)."""
    from allocator.kernels.runtime import DecoderWeights

    _check_model(model)
    layers = [_layer_weights(layer, row) for layer, row in zip(decoder_layers(model), find_projections(model))]
    inv_freq, scaling = _rotary(model)
    return DecoderWeights(embed=model.model.embed_tokens.weight.detach(), lm_head=model.lm_head.weight.detach(),
                          final_norm=model.model.norm.weight.detach(), layers=layers, inv_freq=inv_freq,
                          attention_scaling=scaling)


def site_thresholds(model: nn.Module, plan: CompressionPlan | None) -> list[dict[str, float | tuple[float, ...]]]:
    """Per layer and decode site, the plan's threshold (0.0 where the site runs dense), or for q|k|v and gate|up
    one threshold per projection (a tuple in ``SITE_KINDS`` order) when they differ."""
    entries = {e.path: e for e in plan.entries} if plan is not None else {}
    out = []
    for row in find_projections(model):
        by_kind = {p.kind: p for p in row}
        out.append({site: _site_threshold(site, [by_kind[k] for k in kinds], entries)
                    for site, kinds in SITE_KINDS.items()})
    return out


def _site_threshold(site: str, projections, entries: dict) -> float | tuple[float, ...]:
    """One number when the site's projections share it, else one per projection (a left-out one: 0.0, dense)."""
    values = [_plain_threshold(entries.get(p.name)) for p in projections]
    return values[0] if len(set(values)) == 1 else tuple(values)


def _plain_threshold(entry) -> float:
    if entry is None or entry.wrapper == FakeQuantLinear.__name__:   # dense, or quantized without sparsity
        _quantized_state(entry)
        return 0.0
    if entry.wrapper != ThresholdLinear.__name__ or entry.tensors or entry.params.get("sparse_fraction", 1.0) < 1.0:
        raise RuntimeUnsupported(f"{entry.path}: the runtime applies plain thresholds on every token (teal); this "
                                 f"entry is {entry.wrapper} with {sorted(entry.tensors) or entry.params}")
    _quantized_state(entry)
    value = entry.params["threshold"]
    return 0.0 if not math.isfinite(value) or value < 0 else float(value)


def _quantized_state(entry):
    """The entry's fake-quant state (a ``WrapperState`` of ``FakeQuantLinear``), None for a bf16 entry; a format
    the decode kernels do not run is a ``RuntimeUnsupported`` naming it."""
    if entry is None:
        return None
    states = [WrapperState(entry.wrapper, entry.params, entry.tensors), *entry.inner]
    quant = [st for st in states if st.wrapper == FakeQuantLinear.__name__]
    others = [st.wrapper for st in states if st.wrapper not in (FakeQuantLinear.__name__, ThresholdLinear.__name__)]
    if others or len(quant) > 1:
        raise RuntimeUnsupported(f"{entry.path}: wrappers {[st.wrapper for st in states]}; the runtime runs a "
                                 "threshold over a fake-quant linear at most")
    if not quant:
        return None
    fmt = quant[0].params["fmt"]
    if decode_kernel(fmt) is None:
        raise RuntimeUnsupported(f"{entry.path}: format {fmt} has no decode kernel (the low-bit GEMV runs "
                                 "w4a16 (per channel or g >= 16), w8a16 and w8a8-fp8; INT activations and 3-bit "
                                 "weights do not); use those formats or measure accuracy only")
    return quant[0]


def quantized_projections(model: nn.Module, plan: CompressionPlan | None) -> tuple[list[dict], list[dict]]:
    """From the plan's fake-quant states, per layer and projection kind: the low-bit decode weight
    (``kernels.runtime.DecodeWeight``, the accuracy path's codes and scales unchanged) and, for w8a8-fp8, the
    FP8 prefill weight (``kernels.fp8_prefill.Fp8Weight``)."""
    entries = {e.path: e for e in plan.entries} if plan is not None else {}

    def state_of(p):
        state = _quantized_state(entries.get(p.name))
        return None if state is None else (state.params["fmt"], state.tensors["codes"], state.tensors["scales"])
    return _kernel_weights(model, state_of)


def model_quantized_projections(model: nn.Module) -> tuple[list[dict], list[dict]]:
    """``quantized_projections`` read from the model's own ``FakeQuantLinear`` modules (``quantize_model_``, or a
    plan applied with ``compressed``), outermost wrappers looked through."""
    def state_of(p):
        module = getattr(p.parent, p.attr)
        while not isinstance(module, FakeQuantLinear) and hasattr(module, "inner"):
            module = module.inner
        if not isinstance(module, FakeQuantLinear):
            return None
        if decode_kernel(module.qweight.fmt) is None:
            raise RuntimeUnsupported(f"{p.name}: format {module.qweight.fmt} has no decode kernel")
        return module.qweight.fmt, module.qweight.codes, module.qweight.scales
    return _kernel_weights(model, state_of)


def _kernel_weights(model: nn.Module, state_of) -> tuple[list[dict], list[dict]]:
    from allocator.kernels.fp8_prefill import fp8_weight_from_codes
    from allocator.kernels.lowbit_gemv import lowbit_from_codes
    from allocator.kernels.runtime import DecodeWeight

    decode, prefill = [], []
    for row in find_projections(model):
        decode.append({})
        prefill.append({})
        for p in row:
            state = state_of(p)
            if state is None:
                continue
            fmt, codes, scales = state
            f = get_format(fmt)
            weight = lowbit_from_codes(codes, scales, f.weight_bits, None if f.group == PER_CHANNEL else f.group)
            decode[-1][p.kind] = DecodeWeight(weight, f.act)
            if f.act == "fp8":
                prefill[-1][p.kind] = fp8_weight_from_codes(codes, scales)
    return decode, prefill


def decoder_from_hf(model: nn.Module, plan: CompressionPlan | None = None, *, max_len: int = 2048,
                    max_batch: int = 1, weights=None, keep_dense_weights: bool = False):
    """A ``kernels.runtime.Decoder`` running ``model`` with ``plan``'s thresholds (dense without a plan);
    ``keep_dense_weights``: row-major copies too, so mode "dense" is cuBLAS on nn.Linear's layout."""
    from allocator.kernels.llama_decode import DecoderShape
    from allocator.kernels.runtime import Decoder

    from .rotation import rotation_of
    rotation = rotation_of(model)
    if rotation:
        raise RuntimeUnsupported(f"the model is rotated ({rotation}): the runtime has no online rotations yet; "
                                 "measure speed on the unrotated model (method.rotation=none)")
    weights = decoder_weights(model) if weights is None else weights
    param = next(model.parameters())
    thresholds = site_thresholds(model, plan)
    decode, prefill = quantized_projections(model, plan)
    return Decoder(DecoderShape.from_config(model.config.to_dict()), weights, thresholds=thresholds,
                   max_len=max_len, max_batch=max_batch, dtype=param.dtype, device=param.device,
                   decode_lowbit=decode if any(decode) else None, prefill_fp8=prefill if any(prefill) else None,
                   keep_dense_weights=keep_dense_weights)


@register_evaluator("decode_speed")
def decode_speed(model: nn.Module, *, plans: dict[str, CompressionPlan] | None = None, prompt_len: int = 128,
                 batch: int = 1, mode: str = "fused_pdl", **_) -> dict[str, dict]:
    """Decode tokens/s (one CUDA-graph step, do_bench) and dense prefill ms, for "dense" and every plan."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise RuntimeUnsupported("decode_speed times the Triton kernels: load the model with model.device=cuda")
    weights = decoder_weights(model)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    out = {}
    for name, plan in {"dense": None, **(plans or {})}.items():
        decoder = decoder_from_hf(model, plan, max_len=prompt_len + 64, max_batch=batch, weights=weights)
        prefill_ms = timed_prefill_ms(decoder, prompt)
        used = "dense" if plan is None else ("sparse" if mode.startswith("fused") and decoder.has_lowbit else mode)
        step_ms = graph_step_ms(decoder, prompt, used)
        out[name] = {"tokens_per_s": batch * 1e3 / step_ms, "step_ms": step_ms, "prefill_ms": prefill_ms,
                     "mode": used, "batch": batch, "prompt_len": prompt_len}
    dense_ms = out["dense"]["step_ms"]
    for row in out.values():
        row["speedup"] = dense_ms / row["step_ms"]
    return out


def timed_prefill_ms(decoder, prompt: torch.Tensor, rep_ms: int = 40) -> float:
    """Median ms of ``decoder.prefill(prompt)`` (cache reset first; eager, as the runtime prefills)."""
    from triton.testing import do_bench
    return do_bench(lambda: (decoder.reset(), decoder.prefill(prompt)), warmup=5, rep=rep_ms, return_mode="median")


def graph_step_ms(decoder, prompt: torch.Tensor, mode: str) -> float:
    """Median ms of one decode step after ``prompt`` (prefilled), replayed from a CUDA graph
    (``kernels.latency.graph_time_us``: the project's one graph timing)."""
    from allocator.kernels.latency import graph_time_us

    decoder.reset()
    decoder.prefill(prompt)
    tokens = prompt[:, -1].contiguous()
    pos = torch.tensor([prompt.shape[1]], device=prompt.device)
    return graph_time_us([lambda: decoder.decode_step(tokens, pos, mode)], rep_ms=200) / 1e3
