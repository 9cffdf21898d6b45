"""The compression plan: an allocation resolved to the model's modules, with the calibrated state to apply it.

``CompressionPlan.build(model, method, allocation)`` resolves every allocation unit to projections through its
structure (layer and kinds, ``Allocation.layers`` / ``Allocation.kinds`` or a table's ``Unit``; names are never
parsed) and asks the method for one wrapper per projection at its ``Level``. The plan's entries hold each
wrapper's state (thresholds, low-rank factors), so ``plan.save(dir)`` / ``CompressionPlan.load(dir)`` carry a
calibrated plan to another process. Two verbs use a plan:

- ``compress_(model, plan)`` puts the wrappers in place, all or nothing (every target is checked first);
- ``with compressed(model, plan): ...`` applies it and puts back exactly what was there before.

``restore_(model)`` removes every wrapper; the wrappers carry their originals, so no state lives on the model.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from allocator.levels import Level

from .models import ModelError, Projection, find_projections
from .wrappers import WRAPPERS, CompressionWrapper

PLAN_FORMAT_VERSION = 2          # 2: entries carry the wrappers nested inside them (rotate -> sparsify -> quantize)
READABLE_PLAN_VERSIONS = (1, 2)
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


@dataclass(frozen=True)
class Target:
    """What one allocation entry compresses: per member layer, the projection kinds (empty: the whole layer)."""

    name: str
    members: tuple[tuple[int, tuple[str, ...]], ...]

    @classmethod
    def of(cls, layer: int, kinds: Sequence[str] = (), name: str | None = None) -> "Target":
        kinds = tuple(kinds)
        return cls(name or f"layers.{layer}" + (f".{'+'.join(kinds)}" if kinds else ""), ((int(layer), kinds),))

    @classmethod
    def from_unit(cls, unit) -> "Target":
        """A table's ``Unit`` (its ``layer`` and ``kinds``)."""
        return cls.of(unit.layer, unit.kinds, unit.name)

    @classmethod
    def span(cls, first: int, last: int) -> "Target":
        """Whole layers ``first..last`` sharing one level (a consecutive group)."""
        name = f"layers.{first}" if first == last else f"layers.{first}-{last}"
        return cls(name, tuple((i, ()) for i in range(first, last + 1)))

    @property
    def first_layer(self) -> int:
        return min(layer for layer, _ in self.members)

    def projections(self, rows: list[list[Projection]]) -> list[Projection]:
        out = []
        for layer, kinds in self.members:
            if not 0 <= layer < len(rows):
                raise ModelError(f"unit '{self.name}' names layer {layer}; the model has {len(rows)} layers "
                                 "(was the allocation made for another model?)")
            hit = [p for p in rows[layer] if not kinds or p.kind in kinds or set(FUSED.get(p.kind, ())) & set(kinds)]
            if not hit:
                raise ModelError(f"unit '{self.name}' names kinds {list(kinds)}; layer {layer} has "
                                 f"{[p.kind for p in rows[layer]]}")
            out += hit
        return out


def allocation_targets(allocation) -> list[tuple[Target, Level]]:
    """(Target, Level) per unit of an ``Allocation`` (or an iterable of such pairs, passed through)."""
    if hasattr(allocation, "layers") and hasattr(allocation, "kinds"):
        kinds = allocation.kinds or [()] * len(allocation.units)
        return [(Target.of(layer, k, name), Level.from_mapping(level)) for name, layer, k, level
                in zip(allocation.units, allocation.layers, kinds, allocation.levels, strict=True)]
    return [(target, Level.from_mapping(level)) for target, level in allocation]


def uniform_targets(n_layers: int, level) -> list[tuple[Target, Level]]:
    """Every whole layer at one level."""
    return [(Target.of(i), Level.from_mapping(level)) for i in range(n_layers)]


@dataclass(frozen=True)
class WrapperState:
    """One wrapper of a nested stack, as saved: its class name, parameters and tensors."""

    wrapper: str
    params: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, module: CompressionWrapper) -> "WrapperState":
        params, tensors = module.state()
        return cls(type(module).__name__, params, tensors)


def _stack(module: CompressionWrapper) -> list[CompressionWrapper]:
    """The wrappers of a nested stack, outermost first (a sparsity wrapper around a fake-quant linear, ...)."""
    out = []
    while _removable(module):
        out.append(module)
        module = module.inner
    return out


@dataclass
class PlanEntry:
    """One module replacement: where (``path`` of the replaced module), which wrapper and its state; ``inner``
    holds the wrappers nested inside it, outermost first (e.g. the fake-quant linear under a threshold)."""

    path: str
    unit: str
    level: Level
    wrapper: str
    params: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    module: CompressionWrapper | None = field(default=None, repr=False, compare=False)   # built, not saved
    inner: tuple[WrapperState, ...] = ()

    @classmethod
    def of(cls, path: str, unit: str, level: Level, module: CompressionWrapper) -> "PlanEntry":
        outer, *nested = [WrapperState.of(m) for m in _stack(module)]
        return cls(path, unit, level, outer.wrapper, outer.params, outer.tensors, module, tuple(nested))

    def build(self, original: nn.Module) -> CompressionWrapper:
        if self.module is not None and unwrapped(self.module) is original:
            return self.module
        module = original
        for state in (*reversed(self.inner), WrapperState(self.wrapper, self.params, self.tensors)):
            module = WRAPPERS[state.wrapper].from_state(module, state.params, state.tensors)
        return module


@dataclass
class CompressionPlan:
    """The entries, the method's options and the rotation the model had when the plan was built (its tag, and
    its state once ``attach_rotation`` is called, so a saved plan can rotate a fresh model: ``rotate_``)."""

    entries: list[PlanEntry]
    method: dict = field(default_factory=dict)
    rotation: dict = field(default_factory=dict)                  # {"tag", "kind", "seed", "online"} or {}
    rotation_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model: nn.Module, method, allocation) -> "CompressionPlan":
        """Resolve ``allocation`` (an ``Allocation`` or ``(Target, Level)`` pairs) and wrap each projection."""
        pairs = allocation_targets(allocation)
        names = {id(m): n for n, m in model.named_modules()}
        entries = []
        with temporarily_dense(model):
            rows = find_projections(model)
            for target, level in pairs:
                for proj in target.projections(rows):
                    for parent, attr, module in method.wrap(proj, level):
                        path = f"{names[id(parent)]}.{attr}" if names[id(parent)] else attr
                        entries.append(PlanEntry.of(path, target.name, level, module))
        tag = _rotation_tag(model)
        return cls(entries, method.options(), {"tag": tag} if tag else {})

    def attach_rotation(self, applied) -> "CompressionPlan":
        """Record the ``evaluators.rotation.AppliedRotation`` the plan was built on, so ``save`` carries it."""
        if applied is not None and applied.config.kind != "none":
            params, self.rotation_tensors = applied.state()
            if self.rotation.get("tag") not in (None, applied.tag()):
                raise ModelError(f"the plan was built on a model rotated by {self.rotation['tag']}, not by "
                                 f"{applied.tag()}")
            self.rotation = {**params, "tag": applied.tag()}
        return self

    def rotate_(self, model: nn.Module):
        """Apply the plan's rotation to a fresh, unrotated model (before ``compress_``); returns the
        ``AppliedRotation`` (its ``restore_`` undoes it), or None when the plan has no rotation."""
        if not self.rotation:
            return None
        if "kind" not in self.rotation:
            raise ModelError(f"the plan records rotation {self.rotation['tag']} but not its state: build it in the "
                             "main job (or call plan.attach_rotation(applied)) before saving")
        from .rotation import apply_state_
        return apply_state_(model, self.rotation, self.rotation_tensors)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        kinds = sorted({e.wrapper for e in self.entries})
        return f"CompressionPlan({len(self.entries)} modules, {len({e.unit for e in self.entries})} units, {kinds}, " \
               f"method={self.method.get('name')})"

    # ------------------------------------------------------------------ io
    def save(self, directory) -> Path:
        """``plan.json`` (entries, levels, method) and ``plan.safetensors`` (thresholds' tensors, factors)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{i}/{k}": t.detach().cpu().contiguous() for i, e in enumerate(self.entries)
                   for k, t in e.tensors.items()}
        tensors.update({f"{i}/inner{j}/{k}": t.detach().cpu().contiguous() for i, e in enumerate(self.entries)
                        for j, s in enumerate(e.inner) for k, t in s.tensors.items()})
        tensors.update({f"rotation/{k}": t.detach().cpu().contiguous() for k, t in self.rotation_tensors.items()})
        save_file(tensors, str(directory / "plan.safetensors"))
        meta = {"_type": "allocator.CompressionPlan", "_version": PLAN_FORMAT_VERSION, "method": self.method,
                "rotation": self.rotation, "entries": [{"path": e.path, "unit": e.unit, "level": e.level.to_dict(), "wrapper": e.wrapper,
                             "params": e.params, "tensors": sorted(e.tensors),
                             "inner": [{"wrapper": s.wrapper, "params": s.params, "tensors": sorted(s.tensors)}
                                       for s in e.inner]} for e in self.entries]}
        (directory / "plan.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory) -> "CompressionPlan":
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            meta = json.loads((directory / "plan.json").read_text())
            tensors = load_file(str(directory / "plan.safetensors"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"no readable compression plan in {directory} ({exc}); write one with plan.save(dir) "
                             "(the main job saves it as plan/ beside allocation.json)") from exc
        if meta.get("_type") != "allocator.CompressionPlan" or meta.get("_version") not in READABLE_PLAN_VERSIONS:
            raise ValueError(f"{directory}/plan.json is not an allocator.CompressionPlan of a version in "
                             f"{READABLE_PLAN_VERSIONS}")
        entries = []
        for i, e in enumerate(meta["entries"]):
            for w in [e["wrapper"]] + [s["wrapper"] for s in e.get("inner", [])]:
                if w not in WRAPPERS:
                    raise ValueError(f"{directory}/plan.json entry {i} uses unknown wrapper '{w}'; known: "
                                     f"{sorted(WRAPPERS)} (is the module that registers it imported?)")
            inner = tuple(WrapperState(s["wrapper"], s["params"], {k: tensors[f"{i}/inner{j}/{k}"] for k in s["tensors"]})
                          for j, s in enumerate(e.get("inner", [])))
            entries.append(PlanEntry(e["path"], e["unit"], Level.from_mapping(e["level"]), e["wrapper"], e["params"],
                                     {k: tensors[f"{i}/{k}"] for k in e["tensors"]}, inner=inner))
        rotation_tensors = {k.removeprefix("rotation/"): v for k, v in tensors.items() if k.startswith("rotation/")}
        return cls(entries, meta.get("method", {}), meta.get("rotation", {}), rotation_tensors)


# ---------------------------------------------------------------------------------------------- verbs
def _slot(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        getattr(parent, attr)
    except AttributeError:
        raise ModelError(f"the plan targets module '{path}', which this model does not have (was the plan built "
                         "for another model?)") from None
    return parent, attr


def _removable(module: nn.Module) -> bool:
    return isinstance(module, CompressionWrapper) and not module.permanent


def unwrapped(module: nn.Module) -> nn.Module:
    """The model's own module under any compression wrappers (a permanent transform stays)."""
    while _removable(module):
        module = module.inner
    return module


def _rotation_tag(model: nn.Module) -> str | None:
    from .rotation import rotation_of
    return rotation_of(model) if hasattr(model, "config") else None


def _check_rotation(model: nn.Module, plan: CompressionPlan) -> None:
    """A plan built on a rotated model applies only to the same rotation (else a silently wrong model)."""
    want, have = plan.rotation.get("tag"), _rotation_tag(model)
    if want != have:
        fix = ("rotate it first: plan.rotate_(model)" if want and not have else
               "restore the model's rotation first (AppliedRotation.restore_)" if have and not want else
               "load a fresh model and plan.rotate_(model)")
        raise ModelError(f"the plan was built on a model {'rotated by ' + want if want else 'without rotation'}, "
                         f"this model is {'rotated by ' + have if have else 'not rotated'}: {fix}")


def compress_(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Put the plan's wrappers in place (a module already wrapped is first restored); all or nothing."""
    _check_rotation(model, plan)
    slots = [_slot(model, e.path) for e in plan.entries]          # every target checked before any change
    built = [e.build(unwrapped(getattr(parent, attr))) for e, (parent, attr) in zip(plan.entries, slots)]
    for (parent, attr), module in zip(slots, built):
        setattr(parent, attr, module)
    return model


def _wrapped_slots(model: nn.Module) -> list[tuple[nn.Module, str, CompressionWrapper]]:
    return [(parent, name, child) for parent in model.modules() if not _removable(parent)
            for name, child in parent.named_children() if _removable(child)]


def restore_(model: nn.Module) -> nn.Module:
    """Remove every wrapper: the model's own modules are back and its outputs bit-identical to before."""
    for parent, name, wrapper in _wrapped_slots(model):
        setattr(parent, name, unwrapped(wrapper))
    return model


def is_compressed(model: nn.Module) -> bool:
    return bool(_wrapped_slots(model))


@contextlib.contextmanager
def compressed(model: nn.Module, plan: CompressionPlan):
    """Apply ``plan`` within the block; afterwards every targeted module is what it was before."""
    _check_rotation(model, plan)
    slots = [_slot(model, e.path) for e in plan.entries]
    before = [(parent, attr, getattr(parent, attr)) for parent, attr in slots]
    compress_(model, plan)
    try:
        yield model
    finally:
        for parent, attr, module in reversed(before):
            setattr(parent, attr, module)


@contextlib.contextmanager
def temporarily_dense(model: nn.Module):
    """Within the block the original modules are back in place; the wrappers return afterwards."""
    swapped = _wrapped_slots(model)
    for parent, name, wrapper in swapped:
        setattr(parent, name, unwrapped(wrapper))
    try:
        yield model
    finally:
        for parent, name, wrapper in reversed(swapped):
            setattr(parent, name, wrapper)


def plans_for(model: nn.Module, methods: dict, allocations: dict) -> dict[str, CompressionPlan]:
    """``{name: plan}`` for several allocations (``methods``: one method per allocation name)."""
    return {name: CompressionPlan.build(model, methods[name], alloc) for name, alloc in allocations.items()}


def apply_levels(model: nn.Module, method, pairs: Iterable[tuple[Target, Level]]) -> CompressionPlan:
    """Build and apply in one step (profiling, sequential calibration); returns the applied plan."""
    plan = CompressionPlan.build(model, method, list(pairs))
    compress_(model, plan)
    return plan
