"""Thresholds calibrated on the compressed model (sequential calibration), and the sparsity a model realizes.

Dense calibration (``Method.calibrate``) takes each threshold from the dense model's activations. Once earlier
layers are sparse, later inputs shrink and the same thresholds zero more than their target share (SmolLM2 at
s = 0.6 everywhere: 0.654 realized). ``calibrate_sequential(model, method, allocation)`` re-takes the statistics
layer by layer on the activations of the model whose earlier layers (and earlier projections of the same layer)
already run at their allocated levels, so each projection realizes its own level on calibration-like text.

Per decoder layer the projections are grouped into stages by the tensor they read (Llama: q|k|v, o, gate|up,
down); each stage is sampled with the earlier stages wrapped, and a pass aborts as soon as its stage is sampled.
Cost per allocation: about four layer forwards per layer on the calibration windows (~ four model forwards),
starting from the embeddings cached once per method.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math

import torch
from torch import nn

from .methods import SAMPLES_PER_TENSOR, Method, _Sampler
from .models import decoder_layers, find_projections
from .plan import CompressionPlan, Target, allocation_targets, apply_levels, compressed, restore_, temporarily_dense
from .profiling import capture_layer_inputs
from .wrappers import ThresholdLinear

logger = logging.getLogger(__name__)
CALIBRATIONS = ("dense", "sequential")


class _StageSampled(Exception):
    """Raised from a hook once the current stage is sampled: the rest of the layer need not run."""


def _levels_by_projection(model: nn.Module, allocation) -> dict[str, object]:
    rows = find_projections(model)
    return {p.name: level for target, level in allocation_targets(allocation) for p in target.projections(rows)}


def allocation_key(allocation) -> str:
    """Content hash of an allocation (``Allocation`` or ``(Target, Level)`` pairs)."""
    pairs = [(t.members, lv.key()) for t, lv in allocation_targets(allocation)]
    return hashlib.sha256(json.dumps(pairs, default=list).encode()).hexdigest()[:16]


def _layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, list[dict]]]:
    """Per batch: the hidden state entering layer 0 and the keyword arguments each layer receives."""
    inputs, _ = capture_layer_inputs(model, windows, batch_size, logits=False, first_only=True)
    return [(hidden[0], kwargs) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def calibrate_sequential(model: nn.Module, method: Method, allocation, windows: torch.Tensor | None = None,
                         batch_size: int = 4) -> Method:
    """A copy of ``method`` whose statistics were sampled on the model compressed by ``allocation`` (layer by layer,
    stage by stage); its ``wrap`` then gives thresholds that realize each projection's level. ``windows`` defaults
    to the method's own calibration windows. The model is left uncompressed."""
    windows = getattr(method, "calibration_windows", None) if windows is None else windows
    if windows is None:
        raise RuntimeError(f"method '{method.name}' has no calibration windows: call method.calibrate(model, windows)")
    if not method.needs_calibration:
        return method
    level_of = _levels_by_projection(model, allocation)
    tuned = copy.copy(method)
    tuned.stats = dict(method.stats)
    tuned.calibration_hash = f"{getattr(method, 'calibration_hash', None)}+seq:{allocation_key(allocation)}"
    gen = torch.Generator().manual_seed(method.seed)
    per_call = SAMPLES_PER_TENSOR // math.ceil(len(windows) / batch_size) + 1
    restore_(model)
    batches = _layer_inputs(model, windows, batch_size)     # (hidden entering layer i, every layer's kwargs)
    layers = decoder_layers(model)
    try:
        for i, row in enumerate(find_projections(model)):
            targets = [(key, module, on_output, value, proj) for proj in row
                       for key, module, on_output, value in method.stat_targets(proj)]
            for stage in _stages(layers[i], targets, (batches[0][0], batches[0][1][i])):
                samplers = {key: _Sampler(per_call, gen, value) for key, _, _, value, _ in stage}
                last = stage[-1][0]
                hooks = []
                for key, module, on_output, _, _ in stage:
                    def hook(mod, args, out, k=key, o=on_output):
                        samplers[k].add(out if o else args[0])
                        if k == last:
                            raise _StageSampled
                    hooks.append(module.register_forward_hook(hook))
                try:
                    for hidden, kwargs in batches:
                        try:
                            _run_layer(layers[i], hidden, kwargs[i])
                        except _StageSampled:
                            pass
                finally:
                    for h in hooks:
                        h.remove()
                for key, s in samplers.items():
                    tuned.stats[key] = s.sorted()
                # the next stage reads this stage's compressed outputs
                apply_levels(model, tuned, _own_levels([proj for *_, proj in stage], level_of))
            apply_levels(model, tuned, _own_levels(row, level_of))
            batches = [(_run_layer(layers[i], hidden, kwargs[i]), kwargs) for hidden, kwargs in batches]
    finally:
        restore_(model)
    logger.info("%s: sequential calibration of %d tensors on %d x %d tokens", method.name, len(tuned.stats),
                *windows.shape)
    return tuned


def _own_levels(projections, level_of: dict) -> list:
    """(Target, Level) for each projection that the allocation compresses, one projection per target."""
    return [(Target.of(p.layer, (p.kind,)), level_of[p.name]) for p in projections if p.name in level_of]


def _stages(layer: nn.Module, targets: list, batch: tuple) -> list[list]:
    """Targets in the order the layer calls them, grouped by the tensor they read (one dense pass on one batch)."""
    order: list[tuple[torch.Tensor | None, tuple]] = []
    hooks = []
    for target in targets:
        _, module, on_output, _, _ = target

        def hook(mod, args, out, t=target, o=on_output):
            order.append((None if o else args[0], t))     # the tensor itself is kept: ids are not reused
        hooks.append(module.register_forward_hook(hook))
    try:
        _run_layer(layer, *batch)
    finally:
        for h in hooks:
            h.remove()
    seen, stages = set(), []
    for tensor, target in order:
        ident = (target[0], target[4].name)      # projections sharing one statistic are still separate targets
        if ident in seen:
            continue
        seen.add(ident)
        if stages and tensor is not None and stages[-1][0] is tensor:     # outputs never share a stage
            stages[-1][1].append(target)
        else:
            stages.append((tensor, [target]))
    return [group for _, group in stages]


def for_allocations(model: nn.Module, method: Method, allocations: dict, calibration: str = "dense",
                    batch_size: int = 4) -> dict[str, Method]:
    """``{name: method}`` for ``compare``: the method itself (dense calibration) or one sequentially calibrated
    copy per allocation."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration '{calibration}'; use one of {CALIBRATIONS}")
    if calibration == "dense":
        return {name: method for name in allocations}
    return {name: calibrate_sequential(model, method, alloc, batch_size=batch_size)
            for name, alloc in allocations.items()}


class SparsityMeter:
    """Counts, while active, the input channels the threshold wrappers zero; ``share()`` turns the counts into the
    share of dense projection bytes not read (zeroed channels minus the low-rank factors read, R-Sparse), weighted
    by weight size. Around forwards of a compressed model it counts the wrappers in place; given ``plan=`` it
    hooks the model's own modules and applies the plan's thresholds to what they see (the dense activations)."""

    def __init__(self, model: nn.Module, plan: CompressionPlan | None = None):
        self.model, self.plan = model, plan
        self.zeroed: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self._hooks = []

    def _wrappers(self) -> dict[str, tuple[nn.Module, ThresholdLinear]]:
        """projection name -> (module to hook, wrapper whose threshold counts)."""
        if self.plan is None:
            return {p.name: (w, w) for row in find_projections(self.model) for p in row
                    if isinstance(w := getattr(p.parent, p.attr), ThresholdLinear)}
        out = {}
        for entry in self.plan.entries:
            if isinstance(entry.module, ThresholdLinear):
                out[entry.path] = (self.model.get_submodule(entry.path), entry.module)
        return out

    def __enter__(self):
        projections = [p for row in find_projections(self.model) for p in row]
        self.sizes = {p.name: (p.d_in, p.d_out) for p in projections}
        wrappers = self._wrappers()
        self.ranks = {name: w.rank for name, (_, w) in wrappers.items()}
        for name, (module, wrapper) in wrappers.items():
            self._hooks.append(module.register_forward_hook(
                lambda mod, args, out, n=name, w=wrapper: self._count(n, w, args[0])))
        return self

    def _count(self, name: str, wrapper: ThresholdLinear, x: torch.Tensor):
        x = x[..., wrapper.protocol.split(x.shape[-2]):, :] if x.dim() > 1 else x
        score = x.abs() if wrapper.scale is None else x.abs() * wrapper.scale
        self.zeroed[name] = self.zeroed.get(name, 0) + int((score <= wrapper.threshold).sum())
        self.seen[name] = self.seen.get(name, 0) + x.numel()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def zeroed_share(self) -> dict[str, float]:
        """Per projection, the share of input channels zeroed (0 for projections without a threshold wrapper)."""
        return {name: self.zeroed[name] / self.seen[name] if self.seen.get(name) else 0.0 for name in self.sizes}

    def per_projection(self) -> dict[str, float]:
        """Per projection, the share of its weight bytes not read (zeroed channels minus low-rank factor bytes)."""
        return {name: share - self.ranks.get(name, 0) * sum(self.sizes[name]) / (self.sizes[name][0] * self.sizes[name][1])
                for name, share in self.zeroed_share().items()}

    def share(self) -> float:
        per = self.per_projection()
        sizes = {n: a * b for n, (a, b) in self.sizes.items()}
        return sum(per[n] * sizes[n] for n in per) / sum(sizes.values())


@torch.no_grad()
def realized_sparsity(model: nn.Module, windows: torch.Tensor, method: Method, allocation,
                      batch_size: int = 4) -> dict:
    """``{"model": share, "per_projection": {name: share}}`` of ``allocation`` applied with ``method`` on ``windows``
    (see ``SparsityMeter``); the model is left as it was."""
    plan = CompressionPlan.build(model, method, allocation)
    device = next(model.parameters()).device
    with temporarily_dense(model), compressed(model, plan), SparsityMeter(model) as meter:
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    return {"model": meter.share(), "per_projection": meter.per_projection()}
