"""Compression methods: a config (what changes the numbers) and a handler (calibrate, then wrap per level).

A method is calibrated once on calibration windows (activation statistics per projection); ``wrap(proj, level)``
then returns the wrapper modules (``evaluators.wrappers``) for one projection at one ``Level``. Methods do not
touch the model: a ``CompressionPlan`` (``evaluators.plan``) collects their wrappers and applies them.

Methods (``get_method(name, sparse_fraction=..., seed=..., **options)``):

- ``teal``: zero input channels with ``|x_j| <= thr``; ``thr`` is the calibrated ``s`` quantile of ``|x|`` per tensor.
- ``rsparse``: R-Sparse. Score ``|x_j| * ||W[:, j]||``; keep channels above the ``1 - (1-s) rho`` score quantile
  exactly, approximate the dropped ones by a rank-``r`` SVD of W, ``(k, r)`` from ``allocator.costs.rsparse_split``
  (the cost model's own split, so costs and the applied method agree).
- ``cats``: zero MLP neurons with ``|act(gate x)|`` below the calibrated quantile (the MLP only).
- ``griffin``: per sequence, keep the top ``(1-s)`` MLP neurons by their prompt statistic (the MLP only).
- ``oracle_topk``: per token exact top-k input channels by ``|x|`` (the Deja Vu oracle upper bound).

Number formats (a level's ``fmt``: ``allocator.formats``): ``teal``, ``rsparse`` and ``oracle_topk`` put the
projection in its format under the sparsity wrapper (``ThresholdLinear(FakeQuantLinear(linear))``: the mask
first, then the quantized activations and weights, i.e. rotate -> sparsify -> quantize); the weights come from
the method's ``quantizer`` (``rtn``, or ``gptq`` with Hessians of the calibration inputs taken in the same pass
as the thresholds, on the dense model: one Hessian per distinct input, shared by q|k|v and by gate|up). R-Sparse's
low-rank factors stay in the activation dtype. ``cats`` and ``griffin`` apply dense formats only.

A new method is one registered handler: subclass ``Method``, give it an ``Options`` dataclass for its own
options, implement ``stat_targets`` (what calibration samples) and ``wrap``; ``@register_method("name")``.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
from torch import nn

from allocator.costs import rsparse_split
from allocator.levels import Level

from .models import ModelError, Projection, find_projections
from .wrappers import PromptSelectedLinear, Protocol, ThresholdActivation, ThresholdLinear, TopKLinear

logger = logging.getLogger(__name__)

METHODS: dict[str, type["Method"]] = {}
SAMPLES_PER_TENSOR = 1 << 16
QUANTIZERS = ("rtn", "gptq")    # evaluators.quantize.METHODS (imported late: quantize -> profiling -> methods)


class MethodError(ValueError):
    """An unknown method or method option; the message lists the valid ones."""


def register_method(name: str) -> Callable:
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


def get_method(name: str, *, sparse_fraction: float = 1.0, seed: int = 0, quantizer: str = "rtn",
               **options) -> "Method":
    """The handler of method ``name``; ``options`` are checked against its ``Options`` dataclass; ``quantizer``
    makes the weights of levels with a quantized format (rtn | gptq)."""
    if name not in METHODS:
        raise MethodError(f"unknown compression method '{name}'; registered: {sorted(METHODS)}")
    if quantizer not in QUANTIZERS:
        raise MethodError(f"unknown quantizer '{quantizer}'; use one of {list(QUANTIZERS)}")

    cls = METHODS[name]
    valid = [f.name for f in fields(cls.Options)]
    unknown = [k for k in options if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        raise MethodError(f"method '{name}' has no option '{unknown[0]}'" + (f" (did you mean '{close[0]}'?)" if close
                          else "") + f"; its options: {valid or 'none'}")
    return cls(protocol=Protocol(float(sparse_fraction)), seed=int(seed), config=cls.Options(**options),
               quantizer=quantizer)


# ---------------------------------------------------------------------------------------------- statistics
class _Sampler:
    """A fixed-size random sample of a tensor's values over many forwards, for quantiles at any level.

    ``value(sampled_entries, channel_index)`` maps sampled raw entries to the statistic (|x|, a score, ...), so
    only the sample is transformed."""

    def __init__(self, per_call: int, generator: torch.Generator, value: Callable):
        self.per_call, self.gen, self.value, self.parts = per_call, generator, value, []

    def add(self, tensor: torch.Tensor):
        flat = tensor.detach().reshape(-1)
        idx = torch.randint(flat.numel(), (min(self.per_call, flat.numel()),), generator=self.gen).to(flat.device)
        self.parts.append(self.value(flat[idx].float(), idx % tensor.shape[-1]).cpu())

    def sorted(self) -> torch.Tensor:
        return torch.cat(self.parts).sort().values


def quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile of an already sorted sample."""
    n = sorted_values.numel()
    pos = min(max(q, 0.0), 1.0) * (n - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


@dataclass
class Method:
    """Base handler: per-projection calibrated statistics and a ``wrap`` that builds the wrappers for one level."""

    protocol: Protocol = field(default_factory=Protocol)
    seed: int = 0
    config: object = field(default_factory=NoOptions)
    stats: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    quantizer: str = "rtn"
    hessians: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    qweights: dict[tuple[str, str], object] = field(default_factory=dict, repr=False)
    name = "base"
    needs_calibration = True
    quantizes = False             # puts projections in quantized formats (under its own wrapper)
    Options = NoOptions

    def options(self) -> dict:
        """What changes the method's numbers (cache keys, provenance)."""
        out = {"name": self.name, "sparse_fraction": self.protocol.sparse_fraction, "seed": self.seed,
               **{f.name: getattr(self.config, f.name) for f in fields(self.config)}}
        return out if self.quantizer == "rtn" else {**out, "quantizer": self.quantizer}

    # --- calibration: one pass over calibration windows with forward hooks
    def stat_targets(self, proj: Projection) -> list[tuple[str, nn.Module, bool, Callable]]:
        """(key, module to hook, sample its output (else its input), value(entries, channel) -> statistic)."""
        return []

    @torch.no_grad()
    def calibrate(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> "Method":
        from .plan import temporarily_dense
        from .quantize import HessianCollector
        from .text import windows_hash
        self.calibration_hash = windows_hash(windows)
        self.calibration_windows = windows          # for sequential calibration (evaluators.calibration)
        if not self.needs_calibration and self.quantizer != "gptq":
            return self
        gen = torch.Generator().manual_seed(self.seed)
        n_calls = math.ceil(len(windows) / batch_size)
        samplers, hooks = {}, []
        with temporarily_dense(model):
            rows = find_projections(model)
            for proj in (p for row in rows for p in row if self.needs_calibration):
                for key, module, on_output, value in self.stat_targets(proj):
                    sampler = samplers.setdefault(key, _Sampler(SAMPLES_PER_TENSOR // n_calls + 1, gen, value))
                    hooks.append(module.register_forward_hook(
                        lambda mod, args, out, s=sampler, o=on_output: s.add(out if o else args[0])))
            firsts = {input_key(p): getattr(p.parent, p.attr) for row in rows for p in reversed(row)}
            collector = HessianCollector(firsts if self.quantizer == "gptq" else {})
            try:
                device = next(model.parameters()).device
                for start in range(0, len(windows), batch_size):
                    model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            finally:
                collector.remove()
                for h in hooks:
                    h.remove()
        self.stats = {k: s.sorted() for k, s in samplers.items()}
        self.hessians, self.qweights = {k: h.cpu() for k, h in collector.hessians.items()}, {}
        logger.info("%s: calibrated %d tensors on %d x %d tokens", self.name, len(self.stats), *windows.shape)
        return self

    def _stat(self, key: str) -> torch.Tensor:
        if key not in self.stats:
            raise RuntimeError(f"method '{self.name}' is not calibrated for {key}: call method.calibrate(model, "
                               "windows) first")
        return self.stats[key]

    def check_level(self, level: Level) -> None:
        """A level this method cannot apply is an error (not a silently dense or mispriced unit)."""
        if not level.format.is_dense and not self.quantizes:
            raise MethodError(f"method '{self.name}' cannot apply the format {level.fmt} (it applies bf16 only); "
                              "remove it from method.levels.fmt / bits or use teal, rsparse or oracle_topk")

    def formatted(self, proj: Projection, linear: nn.Module, level: Level) -> nn.Module:
        """``linear`` in the level's number format: itself when dense, else a ``FakeQuantLinear`` (cached)."""
        from .quantize import FakeQuantLinear, gptq, quantize_weight_rtn
        fmt = level.format
        if fmt.is_dense:
            return linear
        key = (proj.name, fmt.name)
        if key not in self.qweights:
            if not fmt.quantizes_weights:
                raise MethodError(f"format {fmt.name} quantizes activations only; no such format is registered")
            self.qweights[key] = (gptq(linear.weight, self._hessian(proj), fmt) if self.quantizer == "gptq"
                                  else quantize_weight_rtn(linear.weight, fmt))
        return FakeQuantLinear(linear, self.qweights[key])

    def _hessian(self, proj: Projection) -> torch.Tensor:
        key = input_key(proj)
        if key not in self.hessians:
            raise RuntimeError(f"quantizer gptq has no Hessian for {key}: call method.calibrate(model, windows) "
                               "first")
        return self.hessians[key].to(getattr(proj.parent, proj.attr).weight.device)

    def wrap(self, proj: Projection, level: Level) -> list[tuple[nn.Module, str, nn.Module]]:
        """(parent, attribute, new module) replacements for one projection at one level."""
        raise NotImplementedError


def _kept(d_in: int, s: float) -> int:
    return d_in if s <= 0 else max(1, int(round(d_in * (1 - s))))


SHARED_INPUTS = (("q", "k", "v"), ("gate", "up"))


def input_key(proj: Projection) -> str:
    """One key for the projections that read the same tensor (q|k|v, gate|up), else the projection's name."""
    group = next((g for g in SHARED_INPUTS if proj.kind in g), None)
    return f"{proj.name.rpartition('.')[0]}:{'+'.join(group)}" if group else proj.name


@dataclass(frozen=True)
class TealOptions:
    shared_inputs: bool = True   # one |x| statistic, so one threshold and one mask, per input that q|k|v (gate|up)
                                 # share: what a fused decode GEMV applies (false: one statistic per projection)


@register_method("teal")
@dataclass
class Teal(Method):
    Options = TealOptions
    quantizes = True

    def _key(self, proj: Projection) -> str:
        return input_key(proj) if self.config.shared_inputs else proj.name

    def stat_targets(self, proj):
        linear = getattr(proj.parent, proj.attr)
        return [(self._key(proj), linear, False, lambda x, channel: x.abs())]

    def wrap(self, proj, level):
        self.check_level(level)
        thr = -math.inf if level.s <= 0 else quantile(self._stat(self._key(proj)), level.s)
        linear = self.formatted(proj, getattr(proj.parent, proj.attr), level)
        return [(proj.parent, proj.attr, ThresholdLinear(linear, thr, self.protocol))]


@register_method("rsparse")
@dataclass
class RSparse(Method):
    """The SVD of each weight is computed once per method object and truncated per level."""

    svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    quantizes = True

    def stat_targets(self, proj):
        linear = getattr(proj.parent, proj.attr)
        norms = linear.weight.float().norm(dim=0)                     # ||W[:, j]||, (d_in,)
        return [(proj.name, linear, False, lambda x, channel, n=norms: x.abs() * n.to(x.device)[channel])]

    def factors(self, name: str, weight: torch.Tensor):
        if name not in self.svd:
            u, s, vh = torch.linalg.svd(weight.detach().float().cpu(), full_matrices=False)
            self.svd[name] = (u, s, vh)
        return self.svd[name]

    def wrap(self, proj, level):
        self.check_level(level)
        linear = getattr(proj.parent, proj.attr)
        if level.s <= 0:
            return [(proj.parent, proj.attr, ThresholdLinear(self.formatted(proj, linear, level), -math.inf,
                                                             self.protocol))]
        scale = linear.weight.float().norm(dim=0).to(linear.weight.dtype)
        thr = quantile(self._stat(proj.name), 1 - (1 - level.s) * level.rho)
        _, rank = rsparse_split(d_out=proj.d_out, d_in=proj.d_in, s=level.s, rho=level.rho)
        down = up = None
        if rank > 0:
            u, sv, vh = self.factors(proj.name, linear.weight)
            dtype, device = linear.weight.dtype, linear.weight.device
            down = (vh[:rank].T * sv[:rank]).to(device, dtype)           # (d_in, r)
            up = u[:, :rank].T.contiguous().to(device, dtype)            # (r, d_out)
        return [(proj.parent, proj.attr, ThresholdLinear(self.formatted(proj, linear, level), thr, self.protocol,
                                                         scale, down, up))]


def _mlp_act(proj: Projection) -> tuple[nn.Module, str]:
    if not hasattr(proj.parent, "act_fn"):
        raise ModelError(f"{proj.name}: the MLP has no act_fn module; cats needs a gated MLP with act_fn")
    return proj.parent, "act_fn"


@register_method("cats")
@dataclass
class Cats(Method):
    """Acts on the MLP only, at the level of its ``gate`` projection (whole-layer units: the layer's level)."""

    def stat_targets(self, proj):
        if proj.kind != "gate":
            return []
        parent, attr = _mlp_act(proj)
        return [(proj.name, getattr(parent, attr), True, lambda a, channel: a.abs())]

    def wrap(self, proj, level):
        self.check_level(level)
        if proj.kind != "gate":
            return []
        parent, attr = _mlp_act(proj)
        thr = -math.inf if level.s <= 0 else quantile(self._stat(proj.name), level.s)
        return [(parent, attr, ThresholdActivation(getattr(parent, attr), thr, self.protocol))]


@dataclass(frozen=True)
class GriffinOptions:
    prompt_fraction: float = 0.5   # with every token sparse, the first half of each window is the prompt

    def __post_init__(self):
        if not 0.0 < float(self.prompt_fraction) < 1.0:
            raise MethodError(f"griffin prompt_fraction={self.prompt_fraction} must lie in (0, 1)")


@register_method("griffin")
@dataclass
class Griffin(Method):
    """Acts on the MLP only (at its ``down`` projection's level); needs no calibration. With every token sparse
    (``sparse_fraction=1``) the first ``prompt_fraction`` of each sequence is the prompt."""

    needs_calibration = False
    Options = GriffinOptions

    def wrap(self, proj, level):
        self.check_level(level)
        if proj.kind != "down":
            return []
        frac = self.config.prompt_fraction if self.protocol.sparse_fraction >= 1 else 1 - self.protocol.sparse_fraction
        linear = getattr(proj.parent, proj.attr)
        return [(proj.parent, proj.attr, PromptSelectedLinear(linear, _kept(proj.d_in, level.s), frac))]


@register_method("oracle_topk")
@dataclass
class OracleTopK(Method):
    needs_calibration = False
    quantizes = True

    def wrap(self, proj, level):
        self.check_level(level)
        linear = self.formatted(proj, getattr(proj.parent, proj.attr), level)
        return [(proj.parent, proj.attr, TopKLinear(linear, _kept(proj.d_in, level.s), self.protocol))]


# ---------------------------------------------------------------------------------------------- measured share
def measured_sparsity(model: nn.Module, windows: torch.Tensor, method: Method, level, batch_size: int = 4,
                      compounding: bool = True) -> dict[str, float]:
    """Share of input channels zeroed per projection (teal / rsparse thresholds) at ``level`` everywhere.

    ``compounding=True`` measures with every layer compressed (what inference sees); ``False`` measures the
    thresholds on the dense model's activations (what calibration promises)."""
    from .calibration import SparsityMeter
    from .plan import CompressionPlan, compressed, uniform_targets

    plan = CompressionPlan.build(model, method, uniform_targets(len(find_projections(model)), level))
    meter = SparsityMeter(model, plan=None if compounding else plan)
    with compressed(model, plan) if compounding else contextlib.nullcontext(model), meter, torch.no_grad():
        device = next(model.parameters()).device
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    return {k: v for k, v in meter.zeroed_share().items() if k in meter.seen}

