"""Fake quantization (accuracy, not speed): weights by RTN or GPTQ, activations per token, a wrapper, a model swap.

**Weights** (``allocator.formats``: ``weight`` "int" or "fp8", ``group`` PER_CHANNEL or g). Symmetric with a
max-abs scale (no clip search): per output channel, or per run of ``g`` consecutive input channels of an output
channel, ``s = max|w| / q_max``. INT b-bit: ``q_max = 2^(b-1) - 1``, codes ``round(w / s)`` clamped to
``[-2^(b-1), 2^(b-1) - 1]`` (int8 storage; the largest weight lands on ``+q_max``, so RTN's error is at most
``s / 2``). Where ``g`` does not divide d_in (SmolLM2's 576 at g = 128) the last group is shorter;
compressed-tensors cannot store that, so ``export`` refuses it. FP8: ``s = max|w| / 448`` per output channel,
codes ``(w / s)`` cast to ``torch.float8_e4m3fn``. Scales are rounded to ``SCALE_DTYPE`` (bf16: the two bytes the
cost model counts; fp16's range would put FP8 scales of small rows among its subnormals) *before* the codes are
taken, so ``dequantize`` is exactly ``codes * scale`` and a compressed-tensors checkpoint stores the same numbers.
RTN costs O(d_out d_in).

**GPTQ** (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323): the columns of ``W`` (input channels) are quantized one at a time and each
column's error is spread over the columns not yet quantized by the optimal-brain-surgeon update
``W[:, F] -= (w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j, F}`` for the layer loss ``||X W^T - X Q^T||^2`` with
``H = 2/n X^T X``. GPTQ's three changes to OBS: one column order for every row (a single inverse Hessian), lazy
batches (within a block of B columns updates are immediate, the rest of the matrix gets one GEMM per block) and
the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), whose row j is row j of the inverse after the
first j columns were eliminated, divided by its pivot's square root: no inverse is ever updated. Dampening
``damp * mean(diag H)`` on the diagonal; inputs that never fire (``H_jj = 0``) get weight 0. Group scales are
computed from the current, already error-updated weights when the group's first column comes up (as in the
reference implementation IST-DASLab/gptq); the block size is rounded to a multiple of the group so a group never
straddles two blocks. ``act_order`` quantizes columns by decreasing ``H_jj``; the scales are then computed up
front from the original weights (llm-compressor's "static groups" / actorder="weight"), so the stored format is
the plain grouped one. Cost: O(d_in^3) for the factorizations plus O(d_out d_in^2) for the updates.

**Activations**: per token (last dimension), symmetric, dynamic scale ``max|x| / q_max`` (FP8 e4m3: 448, cast
through ``float8_e4m3fn`` and back; INT8: 127; INT4: 7), the scale itself kept in fp32. This is what vLLM's
FP8-dynamic and W8A8-INT8 schemes do at run time.

``FakeQuantLinear`` computes ``F.linear(quantize_activation(x), dequantized W, bias)``; inside a sparsity wrapper
(``ThresholdLinear(FakeQuantLinear(linear), ...)``) the mask comes first, so the order is rotate -> sparsify ->
quantize. ``quantize_model_`` swaps a model's projections for it (GPTQ layer by layer, each layer's Hessians taken
on the outputs of the already-quantized layers before it); ``unquantize_model_`` undoes it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from allocator.formats import PER_CHANNEL, NumberFormat, get_format

from .models import decoder_layers, find_projections
from .profiling import capture_layer_inputs
from .wrappers import CompressionWrapper, register_wrapper

logger = logging.getLogger(__name__)

SCALE_DTYPE = torch.bfloat16
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max           # 448
ACT_QMAX = {"fp8": FP8_MAX, "int8": 127.0, "int4": 7.0}
METHODS = ("rtn", "gptq")


# ---------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized (d_out, d_in) weight: ``codes`` (int8, or float8_e4m3fn) and bf16 ``scales``
    (d_out, ceil(d_in / group)); per output channel the scales are (d_out, 1)."""

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: str                 # a registered format name (allocator.formats)

    @property
    def group_size(self) -> int:
        return _group(get_format(self.fmt), self.codes.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        d_out, d_in = self.codes.shape
        w = _grouped(self.codes.float(), self.group_size) * self.scales.float()[..., None]
        return w.view(d_out, -1)[:, :d_in].to(dtype)


def _weight_format(fmt: str | NumberFormat) -> NumberFormat:
    fmt = fmt if isinstance(fmt, NumberFormat) else get_format(fmt)
    if not fmt.quantizes_weights:
        raise ValueError(f"format '{fmt.name}' keeps its weights in bf16: there is nothing to quantize")
    return fmt


def _group(fmt: NumberFormat, d_in: int) -> int:
    return d_in if fmt.group == PER_CHANNEL else fmt.group


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """(d_out, d_in) -> (d_out, ceil(d_in / g), g), zero-padded: the last group of an input width that ``g``
    does not divide (SmolLM2's 576 at g = 128) is shorter."""
    pad = -w.shape[1] % g
    return (F.pad(w, (0, pad)) if pad else w).view(w.shape[0], -1, g)


def _scale(w: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Max-abs scale over the last dimension, rounded to SCALE_DTYPE (returned in ``w``'s dtype)."""
    top = FP8_MAX if fmt.weight == "fp8" else 2 ** (fmt.weight_bits - 1) - 1
    low, high = w.aminmax(dim=-1)
    amax = torch.maximum(-low, high)
    return torch.where(amax > 0, amax / top, torch.ones_like(amax)).to(SCALE_DTYPE).to(w.dtype)


def _round(x: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """``x`` (already divided by its scale, overwritten) on the format's grid: floats, or float8 for FP8."""
    if fmt.weight == "fp8":
        return x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    low = 2 ** (fmt.weight_bits - 1)
    return x.round_().clamp_(-low, low - 1)


def _pack(codes: torch.Tensor, scales: torch.Tensor, fmt: NumberFormat) -> QuantizedWeight:
    dtype = torch.float8_e4m3fn if fmt.weight == "fp8" else torch.int8
    return QuantizedWeight(codes.to(dtype).contiguous(), scales.to(SCALE_DTYPE).contiguous(), fmt.name)


@torch.no_grad()
def quantize_weight_rtn(w: torch.Tensor, fmt: str | NumberFormat) -> QuantizedWeight:
    """Round-to-nearest of a (d_out, d_in) weight in ``fmt`` (module docstring)."""
    fmt = _weight_format(fmt)
    d_out, d_in = w.shape
    wg = _grouped(w.detach().float(), _group(fmt, d_in))               # (d_out, groups, g)
    scales = _scale(wg, fmt)                                             # (d_out, groups)
    return _pack(_round(wg / scales[..., None], fmt).view(d_out, -1)[:, :d_in], scales, fmt)


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, fmt: str | NumberFormat, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False) -> QuantizedWeight:
    """GPTQ of a (d_out, d_in) weight given the (d_in, d_in) Hessian of its inputs (module docstring). Runs in
    the Hessian's precision when it is float64, else in float32."""
    fmt = _weight_format(fmt)
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype).clone()                 # (d_out, d_in), updated in place as columns are quantized
    H = hessian.detach().to(dtype).clone()           # (d_in, d_in)
    d_out, d_in = W.shape
    g = _group(fmt, d_in)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = act_order or g == d_in                  # scales known before the loop
    scales = _scale(_grouped(W, g), fmt) if static else W.new_empty(d_out, -(-d_in // g))
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(d_in)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)   # H^-1 = U^T U
    codes = torch.zeros_like(W)
    block = block_size if static else max(g, block_size // g * g)
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not static and col % g == 0:
                scales[:, col // g] = _scale(W1[:, i:i + g], fmt)
            s = scales[:, col // g]
            codes[:, i1 + i] = _round(W1[:, i] / s, fmt)            # (float8 codes cast back here)
            err[:, i] = (W1[:, i] - codes[:, i1 + i] * s) / U1[i, i]
            W1[:, i:] -= err[:, i:i + 1] * U1[i:i + 1, i:]
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return _pack(codes[:, torch.argsort(perm)], scales, fmt)


class HessianCollector:
    """``H = 2/n sum_t x_t x_t^T`` of each named module's input over every forward while it is installed (a
    running mean, so batches of any size add up). Use as a context manager, or call ``remove()``."""

    def __init__(self, modules: Mapping[str, nn.Module], dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._hooks = [m.register_forward_pre_hook(partial(self._add, name)) for name, m in modules.items()]

    def _add(self, name, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(self.dtype)    # (tokens, d_in)
        seen, n = self.counts.get(name, 0), x.shape[0]
        h = self.hessians.get(name)
        if h is None:
            h = self.hessians[name] = x.new_zeros(x.shape[1], x.shape[1])
        h.mul_(seen / (seen + n)).addmm_(x.T, x, alpha=2.0 / (seen + n))
        self.counts[name] = seen + n

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> "HessianCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ---------------------------------------------------------------------------------------------- activations
def quantize_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """Per-token symmetric fake quantization of ``x`` to ``act`` ("bf16": ``x`` itself); same dtype out."""
    if act == "bf16":
        return x
    if act not in ACT_QMAX:
        raise ValueError(f"unknown activation format '{act}'; use one of bf16, {', '.join(ACT_QMAX)}")
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / ACT_QMAX[act], torch.ones_like(amax))
    if act == "fp8":
        q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        q = (xf / s).round().clamp(-ACT_QMAX[act] - 1, ACT_QMAX[act])
    return (q * s).to(x.dtype)


# ---------------------------------------------------------------------------------------------- wrapper
@register_wrapper
class FakeQuantLinear(CompressionWrapper):
    """``F.linear(quantize_activation(x, act), W_hat, bias)``: ``W_hat`` the dequantized weight (a buffer in the
    linear's dtype), ``act`` the format's activation type. The saved state is the codes and scales."""

    def __init__(self, linear: nn.Linear, qweight: QuantizedWeight):
        super().__init__(linear)
        if qweight.codes.shape != linear.weight.shape:
            raise ValueError(f"quantized weight {tuple(qweight.codes.shape)} does not fit the linear "
                             f"{tuple(linear.weight.shape)}")
        self.qweight = qweight
        self.act = get_format(qweight.fmt).act
        w = linear.weight
        self.register_buffer("weight_hat", qweight.dequantize(w.dtype).to(w.device).contiguous(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:    # what this module multiplies by (R-Sparse's SVD, ThresholdLinear's dtype)
        return self.weight_hat

    @property
    def bias(self):
        return self.inner.bias

    def forward(self, x):
        return F.linear(quantize_activation(x, self.act), self.weight_hat, self.inner.bias)

    def extra_repr(self) -> str:
        return f"fmt={self.qweight.fmt}"

    def state(self):
        return {"fmt": self.qweight.fmt}, {"codes": self.qweight.codes, "scales": self.qweight.scales}

    @classmethod
    def from_state(cls, inner, params, tensors):
        return cls(inner, QuantizedWeight(tensors["codes"], tensors["scales"], params["fmt"]))


# ---------------------------------------------------------------------------------------------- whole model
def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _linear_at(proj) -> nn.Linear:
    module = getattr(proj.parent, proj.attr)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{proj.name} is already wrapped ({type(module).__name__}); quantize_model_ works on "
                         "plain linears (unquantize_model_ / plan.restore_ first)")
    return module


@torch.no_grad()
def quantize_model_(model: nn.Module, fmt: str | Mapping[str, str], method: str = "rtn",
                    calibration_windows: torch.Tensor | None = None, batch_size: int = 4,
                    **gptq_options) -> nn.Module:
    """Swap projections for ``FakeQuantLinear`` in place: every projection in format ``fmt``, or, with a mapping
    ``{module name: format}``, the named ones (bf16 entries are left alone). ``method="gptq"`` needs
    ``calibration_windows`` (token ids) and quantizes layer by layer."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method '{method}'; use one of {METHODS}")
    rows = find_projections(model)
    names = {p.name for row in rows for p in row}
    wanted = {n: fmt for n in names} if isinstance(fmt, str) else dict(fmt)
    unknown = sorted(set(wanted) - names)
    if unknown:
        raise ValueError(f"not projections of this model: {unknown[:4]}; names look like {min(names)}")
    wanted = {n: f for n, f in wanted.items() if get_format(f).quantizes_weights}
    if method == "gptq" and calibration_windows is None:
        raise ValueError("method='gptq' needs calibration_windows (token ids, e.g. text.token_windows(...))")
    batches = None
    if method == "gptq":
        inputs, _ = capture_layer_inputs(model, calibration_windows, batch_size, logits=False, first_only=True)
        batches = [(hidden[0], kwargs) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]
    layers = decoder_layers(model)
    for i, row in enumerate(rows):
        mine = [p for p in row if p.name in wanted]
        if batches is None:
            qweights = {p.name: quantize_weight_rtn(_linear_at(p).weight, wanted[p.name]) for p in mine}
        elif mine:
            with HessianCollector({p.name: _linear_at(p) for p in mine}) as hc:
                for hidden, kwargs in batches:
                    _run_layer(layers[i], hidden, kwargs[i])
            qweights = {p.name: gptq(_linear_at(p).weight, hc.hessians[p.name], wanted[p.name], **gptq_options)
                        for p in mine}
        for p in mine:
            setattr(p.parent, p.attr, FakeQuantLinear(_linear_at(p), qweights[p.name]))
        if batches is not None and i + 1 < len(layers):
            batches = [(_run_layer(layers[i], hidden, kwargs[i]), kwargs) for hidden, kwargs in batches]
    logger.info("quantized %d projections (%s)", len(wanted), method)
    return model


def unquantize_model_(model: nn.Module) -> nn.Module:
    """Put every ``FakeQuantLinear`` (also one nested inside another wrapper) back to its original linear."""
    slots = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, FakeQuantLinear)]
    for parent, name, child in slots:
        setattr(parent, name, child.inner)
    return model


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """``{module name: QuantizedWeight}`` of every ``FakeQuantLinear`` in the model (the export reads these)."""
    return {name: m.qweight for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
