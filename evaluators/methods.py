"""Compression methods applied in place through removable wrapper modules.

A method is calibrated once on calibration windows (activation statistics per projection), then
``apply_allocation_(model, allocation, method)`` swaps each projection named by the allocation for a wrapper
module that holds the original ``nn.Linear`` (``wrapper.linear``); ``remove_compression_(model)`` puts the
originals back, so outputs return bit-identical. No ``forward`` is monkey-patched.

Methods (``get_method(name)``):

- ``teal``: zero input channels with ``|x_j| <= thr``; ``thr`` is the calibrated ``s`` quantile of ``|x|`` per tensor.
- ``rsparse``: R-Sparse. Score ``|x_j| * ||W[:, j]||``; keep channels above the ``1 - (1-s) rho`` score quantile
  exactly, approximate the dropped ones by a rank-``r`` SVD of W, with ``k = d_in (1-s) rho``,
  ``B = d_in d_out (1-s)``, ``r = (B - k d_out) / (d_in + d_out)`` on the real (GQA) shapes.
- ``cats``: zero MLP neurons with ``|act(gate x)|`` below the calibrated quantile (the MLP only).
- ``griffin``: per sequence, keep the top ``(1-s)`` MLP neurons by their prompt statistic (the MLP only).
- ``oracle_topk``: per token exact top-k input channels by ``|x|`` (the Deja Vu oracle upper bound).

The evaluation protocol (``Protocol.sparse_fraction``) compresses every token (1.0, the default: what sparse
decoding of the text does) or only the last fraction of each sequence (R-Sparse used 0.1, TEAL 0.5).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from allocator.costs import rsparse_split

from .models import ModelError, Projection, find_projections, unit_projections

logger = logging.getLogger(__name__)

METHODS: dict[str, type["Method"]] = {}
SAMPLES_PER_TENSOR = 1 << 16


def register_method(name: str) -> Callable:
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def get_method(name: str, **options) -> "Method":
    if name not in METHODS:
        raise KeyError(f"unknown compression method '{name}'; registered: {sorted(METHODS)}")
    return METHODS[name](**options)


@dataclass(frozen=True)
class Protocol:
    """Which tokens of a multi-token forward run compressed: the last ``sparse_fraction`` of each sequence."""

    sparse_fraction: float = 1.0

    def split(self, seq_len: int) -> int:
        """Index of the first compressed token."""
        if self.sparse_fraction >= 1.0 or seq_len == 1:
            return 0
        return seq_len - max(1, math.ceil(self.sparse_fraction * seq_len))


# ---------------------------------------------------------------------------------------------- wrappers
class _ProtocolWrapper(nn.Module):
    """Runs ``self.inner`` (the original module) densely on the prefix and ``self.compressed`` on the rest."""

    def __init__(self, inner: nn.Module, protocol: Protocol):
        super().__init__()
        self.inner = inner
        self.protocol = protocol

    @property
    def linear(self) -> nn.Module:    # projection discovery sees through wrappers
        return self.inner

    def forward(self, x):
        cut = self.protocol.split(x.shape[-2]) if x.dim() > 1 else 0
        if cut == 0:
            return self.compressed(x)
        return torch.cat([self.inner(x[..., :cut, :]), self.compressed(x[..., cut:, :])], dim=-2)

    def compressed(self, x):
        raise NotImplementedError


class ThresholdLinear(_ProtocolWrapper):
    """``W (x * [|x| * scale > thr])``: TEAL when ``scale`` is None, the R-Sparse score otherwise; plus an optional
    low-rank term ``((x * dropped) @ V_r S_r) @ U_r^T`` for the dropped channels (R-Sparse)."""

    def __init__(self, linear: nn.Linear, threshold: float, protocol: Protocol, scale: torch.Tensor | None = None,
                 down: torch.Tensor | None = None, up: torch.Tensor | None = None):
        super().__init__(linear, protocol)
        self.threshold = float(threshold)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("lr_down", down, persistent=False)   # (d_in, r) = V_r S_r
        self.register_buffer("lr_up", up, persistent=False)       # (r, d_out) = U_r^T

    @property
    def rank(self) -> int:
        return 0 if self.lr_down is None else self.lr_down.shape[1]

    def compressed(self, x):
        score = x.abs() if self.scale is None else x.abs() * self.scale
        keep = score > self.threshold
        y = self.inner(x * keep)
        if self.lr_down is not None:
            y = y + (x * ~keep) @ self.lr_down @ self.lr_up
        return y


class TopKLinear(_ProtocolWrapper):
    """Per token, keep exactly the ``k`` input channels with the largest ``|x|``."""

    def __init__(self, linear: nn.Linear, k: int, protocol: Protocol):
        super().__init__(linear, protocol)
        self.k = int(k)

    def compressed(self, x):
        if self.k >= x.shape[-1]:
            return self.inner(x)
        idx = x.abs().topk(self.k, dim=-1).indices
        mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
        return self.inner(x * mask)


class ThresholdActivation(_ProtocolWrapper):
    """CATS: ``act(g) * [|act(g)| > thr]`` around the MLP's activation module."""

    def __init__(self, act: nn.Module, threshold: float, protocol: Protocol):
        super().__init__(act, protocol)
        self.threshold = float(threshold)

    def compressed(self, g):
        a = self.inner(g)
        return a * (a.abs() > self.threshold)


class PromptSelectedLinear(nn.Module):
    """GRIFFIN around ``down_proj``: neurons ranked on the prompt by ``||Z / ||Z_t|| ||`` over tokens; the prompt
    runs dense, every later token uses only the top ``k`` neurons of its sequence."""

    def __init__(self, linear: nn.Linear, k: int, prompt_fraction: float):
        super().__init__()
        self.inner = linear
        self.k = int(k)
        self.prompt_fraction = prompt_fraction

    @property
    def linear(self) -> nn.Module:
        return self.inner

    def forward(self, z):                                      # z: (batch, T, d_ff)
        t = z.shape[-2]
        cut = min(t - 1, max(1, int(round(self.prompt_fraction * t))))
        if t == 1 or self.k >= z.shape[-1]:
            return self.inner(z)
        prompt = z[..., :cut, :].float()
        stat = (prompt / prompt.norm(dim=-1, keepdim=True).clamp_min(1e-12)).norm(dim=-2)   # (batch, d_ff)
        idx = stat.topk(self.k, dim=-1).indices
        mask = torch.zeros_like(stat, dtype=torch.bool).scatter_(-1, idx, True).unsqueeze(-2)
        return torch.cat([self.inner(z[..., :cut, :]), self.inner(z[..., cut:, :] * mask)], dim=-2)


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
    """Base: per-projection calibrated statistics and a ``wrap`` that builds the wrapper for one level."""

    protocol: Protocol = field(default_factory=Protocol)
    seed: int = 0
    stats: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    name = "base"
    needs_calibration = True

    def options(self) -> dict:
        """What changes the method's numbers (cache keys, provenance)."""
        return {"name": self.name, "sparse_fraction": self.protocol.sparse_fraction, "seed": self.seed}

    # --- calibration: one pass over calibration windows with forward hooks
    def stat_targets(self, proj: Projection) -> list[tuple[str, nn.Module, bool, Callable]]:
        """(key, module to hook, sample its output (else its input), value(entries, channel) -> statistic)."""
        return []

    @torch.no_grad()
    def calibrate(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> "Method":
        from .text import windows_hash
        self.calibration_hash = windows_hash(windows)
        self.calibration_windows = windows          # for sequential calibration (evaluators.calibration)
        if not self.needs_calibration:
            return self
        gen = torch.Generator().manual_seed(self.seed)
        remove_compression_(model)
        n_calls = math.ceil(len(windows) / batch_size)
        samplers, hooks = {}, []
        for row in find_projections(model):
            for proj in row:
                for key, module, on_output, value in self.stat_targets(proj):
                    sampler = samplers.setdefault(key, _Sampler(SAMPLES_PER_TENSOR // n_calls + 1, gen, value))
                    hooks.append(module.register_forward_hook(
                        lambda mod, args, out, s=sampler, o=on_output: s.add(out if o else args[0])))
        try:
            device = next(model.parameters()).device
            for start in range(0, len(windows), batch_size):
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self.stats = {k: s.sorted() for k, s in samplers.items()}
        logger.info("%s: calibrated %d tensors on %d x %d tokens", self.name, len(self.stats), *windows.shape)
        return self

    def _stat(self, key: str) -> torch.Tensor:
        if key not in self.stats:
            raise RuntimeError(f"method '{self.name}' is not calibrated for {key}: call method.calibrate(model, "
                               "windows) first")
        return self.stats[key]

    def wrap(self, proj: Projection, level: dict) -> list[tuple[nn.Module, str, nn.Module]]:
        """(parent, attribute, new module) replacements for one projection at one level."""
        raise NotImplementedError


def _level_s(level: dict) -> float:
    return float(level.get("s", 0.0))


@register_method("teal")
@dataclass
class Teal(Method):
    def stat_targets(self, proj):
        linear = getattr(proj.parent, proj.attr)
        return [(proj.name, linear, False, lambda x, channel: x.abs())]

    def wrap(self, proj, level):
        s = _level_s(level)
        thr = -math.inf if s <= 0 else quantile(self._stat(proj.name), s)
        linear = getattr(proj.parent, proj.attr)
        return [(proj.parent, proj.attr, ThresholdLinear(linear, thr, self.protocol))]


def rsparse_rank(d_out: int, d_in: int, s: float, rho: float) -> tuple[int, int]:
    """(kept channels k, rank r) of R-Sparse for one projection at (s, rho), on its real shape (the core's cost
    model, so that costs and the applied method agree)."""
    k, r = rsparse_split(d_out, d_in, s, rho)
    return k, min(r, min(d_in, d_out))


@register_method("rsparse")
@dataclass
class RSparse(Method):
    """The SVD of each weight is computed once per method object and truncated per level."""

    svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

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
        s, rho = _level_s(level), float(level.get("rho", 1.0))
        linear = getattr(proj.parent, proj.attr)
        if s <= 0:
            return [(proj.parent, proj.attr, ThresholdLinear(linear, -math.inf, self.protocol))]
        scale = linear.weight.float().norm(dim=0).to(linear.weight.dtype)
        thr = quantile(self._stat(proj.name), 1 - (1 - s) * rho)
        _, rank = rsparse_rank(proj.d_out, proj.d_in, s, rho)
        down = up = None
        if rank > 0:
            u, sv, vh = self.factors(proj.name, linear.weight)
            dtype, device = linear.weight.dtype, linear.weight.device
            down = (vh[:rank].T * sv[:rank]).to(device, dtype)           # (d_in, r)
            up = u[:, :rank].T.contiguous().to(device, dtype)            # (r, d_out)
        return [(proj.parent, proj.attr, ThresholdLinear(linear, thr, self.protocol, scale, down, up))]


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
        if proj.kind != "gate":
            return []
        s = _level_s(level)
        parent, attr = _mlp_act(proj)
        thr = -math.inf if s <= 0 else quantile(self._stat(proj.name), s)
        return [(parent, attr, ThresholdActivation(getattr(parent, attr), thr, self.protocol))]


@register_method("griffin")
@dataclass
class Griffin(Method):
    """Acts on the MLP only (at its ``down`` projection's level); needs no calibration. With every token sparse
    (``sparse_fraction=1``) the first ``prompt_fraction`` of each sequence is the prompt."""

    prompt_fraction: float = 0.5
    needs_calibration = False

    def options(self):
        return {**super().options(), "prompt_fraction": self.prompt_fraction}

    def wrap(self, proj, level):
        if proj.kind != "down":
            return []
        s = _level_s(level)
        frac = self.prompt_fraction if self.protocol.sparse_fraction >= 1 else 1 - self.protocol.sparse_fraction
        k = proj.d_in if s <= 0 else max(1, int(round(proj.d_in * (1 - s))))
        return [(proj.parent, proj.attr, PromptSelectedLinear(getattr(proj.parent, proj.attr), k, frac))]


@register_method("oracle_topk")
@dataclass
class OracleTopK(Method):
    needs_calibration = False

    def wrap(self, proj, level):
        s = _level_s(level)
        k = proj.d_in if s <= 0 else max(1, int(round(proj.d_in * (1 - s))))
        return [(proj.parent, proj.attr, TopKLinear(getattr(proj.parent, proj.attr), k, self.protocol))]


# ---------------------------------------------------------------------------------------------- apply / remove
def _as_unit_levels(allocation) -> dict[str, dict]:
    if isinstance(allocation, dict):
        return dict(allocation)
    return dict(zip(allocation.units, allocation.levels))


def apply_allocation_(model: nn.Module, allocation, method: Method | str) -> nn.Module:
    """Compress ``model`` in place: each unit of ``allocation`` (an ``Allocation`` or ``{unit: level}``) at its level.

    Units already compressed are first restored, so re-applying a unit moves it to the new level.
    """
    if isinstance(method, str):
        method = get_method(method)
    projections = find_projections(model)
    registry = model.__dict__.setdefault("_allocator_originals", {})
    for unit, level in _as_unit_levels(allocation).items():
        for proj in unit_projections(projections, unit):
            remove_compression_(model, [proj.name])
            for parent, attr, module in method.wrap(proj, level):
                registry.setdefault(proj.name, []).append((parent, attr, getattr(parent, attr)))
                setattr(parent, attr, module)
    return model


def remove_compression_(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Restore the original modules (all, or those of the given projection names)."""
    registry = model.__dict__.get("_allocator_originals", {})
    for name in list(registry) if names is None else names:
        for parent, attr, original in reversed(registry.pop(name, [])):
            setattr(parent, attr, original)
    return model


@contextlib.contextmanager
def temporarily_dense(model: nn.Module):
    """Within the block the original modules are back in place; the wrappers return afterwards."""
    registry = model.__dict__.get("_allocator_originals", {})
    swapped = []
    for entries in registry.values():
        for parent, attr, original in reversed(entries):
            swapped.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, original)
    try:
        yield model
    finally:
        for parent, attr, wrapper in reversed(swapped):
            setattr(parent, attr, wrapper)


def is_compressed(model: nn.Module) -> bool:
    return bool(model.__dict__.get("_allocator_originals"))


def uniform_allocation(units: list[str], level: dict) -> dict[str, dict]:
    return {u: dict(level) for u in units}


def measured_sparsity(model: nn.Module, windows: torch.Tensor, method: Method, level: dict, batch_size: int = 4,
                      compounding: bool = True) -> dict[str, float]:
    """Share of input channels zeroed per projection (teal / rsparse thresholds) at ``level`` everywhere.

    ``compounding=True`` measures with every layer compressed (what inference sees); ``False`` measures the
    thresholds on the dense model's activations (what calibration promises)."""
    projections = [p for row in find_projections(model) for p in row]
    zero, total, hooks = {}, {}, []
    wrappers = {p.name: method.wrap(p, level) for p in projections}
    if compounding:
        apply_allocation_(model, {f"layers.{i}": level for i in range(len(find_projections(model)))}, method)
    try:
        for p in projections:
            wrapper = next((m for _, _, m in wrappers[p.name] if isinstance(m, ThresholdLinear)), None)
            if wrapper is None:
                continue

            def hook(mod, args, out, name=p.name, w=wrapper):
                x = args[0]
                score = x.abs() if w.scale is None else x.abs() * w.scale
                zero[name] = zero.get(name, 0) + int((score <= w.threshold).sum())
                total[name] = total.get(name, 0) + x.numel()
            hooks.append(getattr(p.parent, p.attr).register_forward_hook(hook))
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        remove_compression_(model)
    return {k: zero[k] / total[k] for k in zero}
