"""The modules a compression plan puts in place of a model's own: each holds the original as ``inner``.

Because every wrapper carries its original, restoring a model needs no registry: ``plan.restore_`` swaps each
wrapper for its ``inner``. Each wrapper also round-trips through ``state()`` / ``from_state(inner, ...)``, so a
plan (thresholds, low-rank factors) is saved beside ``allocation.json`` and applied later without calibrating.
No ``forward`` is monkey-patched.

- ``ThresholdLinear``: ``W (x * [|x| * scale > thr])`` (TEAL without ``scale``, R-Sparse's score with it), plus
  an optional rank-r term for the dropped channels (R-Sparse).
- ``TopKLinear``: per token the ``k`` largest ``|x|`` channels (the Deja Vu oracle).
- ``ThresholdActivation``: CATS, ``act(g) * [|act(g)| > thr]`` around the MLP activation.
- ``PromptSelectedLinear``: GRIFFIN, the top ``k`` neurons chosen per sequence on its prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

WRAPPERS: dict[str, type["CompressionWrapper"]] = {}


def register_wrapper(cls):
    WRAPPERS[cls.__name__] = cls
    return cls


@dataclass(frozen=True)
class Protocol:
    """Which tokens of a multi-token forward run compressed: the last ``sparse_fraction`` of each sequence."""

    sparse_fraction: float = 1.0

    def __post_init__(self):
        if not 0.0 < float(self.sparse_fraction) <= 1.0:
            raise ValueError(f"method.sparse_fraction={self.sparse_fraction} must lie in (0, 1] (1.0: every token "
                             "sparse; R-Sparse used 0.1, TEAL 0.5)")

    def split(self, seq_len: int) -> int:
        """Index of the first compressed token."""
        if self.sparse_fraction >= 1.0 or seq_len == 1:
            return 0
        return seq_len - max(1, math.ceil(self.sparse_fraction * seq_len))


class CompressionWrapper(nn.Module):
    """Base: ``inner`` is the module replaced; ``state()`` is what a saved plan stores for this wrapper.

    ``permanent`` wrappers are model transforms (the online rotations of ``evaluators.rotation``): plans do not
    remove them but wrap inside them (``find_projections`` puts the projection's slot at their ``inner``), so
    the order stays rotate -> sparsify -> quantize; only the transform's own ``restore_`` takes them out."""

    permanent = False

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def linear(self) -> nn.Module:
        """The model's own module under this wrapper and any nested inside it."""
        module = self.inner
        while isinstance(module, CompressionWrapper):
            module = module.inner
        return module

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able parameters, tensors) from which ``from_state`` rebuilds this wrapper."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, inner: nn.Module, params: dict, tensors: dict[str, torch.Tensor]) -> "CompressionWrapper":
        raise NotImplementedError


class _ProtocolWrapper(CompressionWrapper):
    """Runs ``inner`` densely on the prefix and ``compressed`` on the rest (the evaluation protocol). Its saved
    state is one scalar attribute ``PARAM`` and the protocol."""

    PARAM, CAST = "", float

    def __init__(self, inner: nn.Module, value, protocol: Protocol):
        super().__init__(inner)
        self.protocol = protocol
        setattr(self, self.PARAM, self.CAST(value))

    def forward(self, x):
        cut = self.protocol.split(x.shape[-2]) if x.dim() > 1 else 0
        if cut == 0:
            return self.compressed(x)
        return torch.cat([self.inner(x[..., :cut, :]), self.compressed(x[..., cut:, :])], dim=-2)

    def compressed(self, x):
        raise NotImplementedError

    def state(self):
        return {self.PARAM: getattr(self, self.PARAM), "sparse_fraction": self.protocol.sparse_fraction}, {}

    @classmethod
    def from_state(cls, inner, params, tensors):
        return cls(inner, params[cls.PARAM], Protocol(params["sparse_fraction"]))


def _to(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(like.device, like.dtype)


@register_wrapper
class ThresholdLinear(_ProtocolWrapper):
    PARAM = "threshold"

    def __init__(self, linear: nn.Linear, threshold: float, protocol: Protocol, scale: torch.Tensor | None = None,
                 down: torch.Tensor | None = None, up: torch.Tensor | None = None):
        super().__init__(linear, threshold, protocol)
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

    def state(self):
        tensors = {k: getattr(self, k) for k in ("scale", "lr_down", "lr_up") if getattr(self, k) is not None}
        return {"threshold": self.threshold, "sparse_fraction": self.protocol.sparse_fraction}, tensors

    @classmethod
    def from_state(cls, inner, params, tensors):
        w = (inner.linear if isinstance(inner, CompressionWrapper) else inner).weight
        return cls(inner, params["threshold"], Protocol(params["sparse_fraction"]), _to(tensors.get("scale"), w),
                   _to(tensors.get("lr_down"), w), _to(tensors.get("lr_up"), w))


@register_wrapper
class TopKLinear(_ProtocolWrapper):
    """``TopKLinear(linear, k, protocol)``."""

    PARAM, CAST = "k", int

    def compressed(self, x):
        if self.k >= x.shape[-1]:
            return self.inner(x)
        idx = x.abs().topk(self.k, dim=-1).indices
        mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
        return self.inner(x * mask)


@register_wrapper
class ThresholdActivation(_ProtocolWrapper):
    """``ThresholdActivation(act, threshold, protocol)``."""

    PARAM = "threshold"

    def compressed(self, g):
        a = self.inner(g)
        return a * (a.abs() > self.threshold)


@register_wrapper
class PromptSelectedLinear(CompressionWrapper):
    """Neurons ranked on the prompt by ``||Z / ||Z_t|| ||`` over tokens; the prompt runs dense, every later token
    uses only the top ``k`` neurons of its sequence."""

    def __init__(self, linear: nn.Linear, k: int, prompt_fraction: float):
        super().__init__(linear)
        self.k = int(k)
        self.prompt_fraction = prompt_fraction

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

    def state(self):
        return {"k": self.k, "prompt_fraction": self.prompt_fraction}, {}

    @classmethod
    def from_state(cls, inner, params, tensors):
        return cls(inner, params["k"], params["prompt_fraction"])
