"""Rotations that keep a causal LM's function exact: QuaRot's computational invariance and a per-layer PCA.

Row-vector convention: a linear computes ``y = x W^T + b`` with ``W`` of shape ``(out, in)``. For an orthogonal
``R``, rotating a linear's input (``x -> x R``) is undone by ``W -> W R``, and rotating its output (``y -> y R``)
is ``W -> R^T W``, ``b -> b R``. Every matrix product is taken in float64 and cast back to the model's dtype.

``kind="hadamard"`` (QuaRot, Ashkboos et al. 2024, ``spcl/QuaRot`` ``fake_quant/rotation_utils.py``):

1. untie the LM head from the embeddings; fold every RMSNorm scale ``g`` into the linears that read it
   (``input_layernorm -> q k v``, ``post_attention_layernorm -> gate up``, final norm ``-> lm_head``:
   ``W -> W diag(g)``) and set ``g = 1``. An RMSNorm with unit scale commutes with any orthogonal ``Q``.
2. rotate the residual stream by ``Q = random_hadamard(hidden, seed)``: embeddings ``E -> E Q``; the readers
   ``q k v gate up lm_head``: ``W -> W Q``; the writers ``o down``: ``W -> Q^T W``.
3. per head, ``v``'s output by ``H_hd`` (head_dim Hadamard; ``W_v -> (I (x) H_hd)^T W_v``), undone in ``o``'s
   input (``W_o -> W_o (I (x) H_hd)``): exact and offline, since attention mixes tokens, not channels.
4. ``online=True``: the online Hadamards. ``down``'s input ``z -> z H_ff`` and, on ``o``'s input, the
   cross-head ``H_heads (x) I_hd`` (a random orthogonal matrix where no Hadamard of the head count exists, e.g.
   SmolLM2's 9 heads), each applied by a ``RotatedLinear`` wrapper and folded into the weight (``W -> W R``).
   Without them ``down`` and ``o`` see the raw, outlier-heavy activations (QuaRot issue #4: W4A4 breaks).

``kind="pca"`` (LaRoSA, Liu et al. 2025, arXiv 2507.01299, as read from its abstract: "layerwise orthogonal
rotations" of the input activations, then Top-K on the rotated activations): per layer and per projection
input (``q|k|v``, ``o``, ``gate|up``, ``down``), ``R`` = the eigenvectors of the calibration second moment
``E[x x^T]`` (by decreasing eigenvalue), applied online (``x -> x R``, ``W -> W R``), so activation sparsity
later acts on the principal coordinates. Only LaRoSA's abstract was at hand: how the paper treats the residual
stream (fusing the rotations into neighbouring weights, or online) is not reproduced; here every PCA rotation
is online and exact, and PCA is applied alone (no residual Hadamard).

Not done here: QuaRot's online Hadamard on Q and K after RoPE (only needed to quantize the KV cache).

Order with the other axes: rotate -> sparsify -> quantize. A sparsity wrapper wraps the rotated linear, i.e.
becomes ``RotatedLinear.inner``; ``find_projections`` sees through both.

Cost: folding is ``O(d_in d_out d)`` per linear in float64 (``O(V d^2)`` for the embeddings); the online
rotations are dense matrix products, ``O(d^2)`` per token (``O(d n_heads)`` for the cross-head one); PCA
calibration is ``O(N d^2)`` for the moments and ``O(d^3)`` per eigendecomposition. The original parameters are
kept (one model's worth of memory) so that ``AppliedRotation.restore_`` gives them back bit for bit.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .hadamard import has_hadamard, hadamard, orthogonal
from .models import FAMILIES, ModelError, decoder_layers, find_projections
from .wrappers import CompressionWrapper, register_wrapper

logger = logging.getLogger(__name__)

KINDS = ("none", "hadamard", "pca")
ROTATION_ATTR = "allocator_rotation"     # on model.config: the applied rotation's tag (model_id, plans)
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
#: projection-input groups of one layer: the projections that share an input share its PCA rotation
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


@dataclass(frozen=True)
class RotationConfig:
    """``kind``: none | hadamard (QuaRot) | pca (LaRoSA); ``seed`` of the random Hadamard / fallback
    rotations; ``online``: QuaRot's online Hadamards on down's and o's inputs (PCA is always online)."""

    kind: str = "hadamard"
    seed: int = 0
    online: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"RotationConfig.kind={self.kind!r}; expected one of {KINDS}")
        if self.kind == "pca" and not self.online:
            raise ValueError("RotationConfig(kind='pca', online=False): a per-layer PCA rotation is only exact "
                             "online (the residual stream is shared by all layers)")


# ------------------------------------------------------------------------------------------- the wrapper
def online_matrix(n: int, seed: int) -> torch.Tensor:
    """The online rotation of order ``n``: the plain Hadamard where one exists, else the stated fallback
    ``random_orthogonal(n, seed)`` (e.g. SmolLM2's 9 heads). Float64."""
    return hadamard(n) if has_hadamard(n) else orthogonal(n, seed, kind="random")


@register_wrapper
class RotatedLinear(CompressionWrapper):
    """``inner(x (R (x) I_m))``: the input rotated online, ``R`` of order ``k`` acting on ``k`` blocks of ``m``
    channels (``k = d_in``: a full rotation; ``k = n_heads``: QuaRot's cross-head Hadamard). ``inner``'s weight
    already holds ``W (R (x) I_m)``, so the output is the unrotated layer's. Computed in float32.

    ``spec``: how ``R`` is rebuilt for a saved state: ``{"rotation": "hadamard", "size": k, "seed": s}``
    (``online_matrix``), or ``{"rotation": "matrix"}`` with ``R`` stored as the tensor ``rotation``."""

    permanent = True     # a model transform: plans wrap inside it, AppliedRotation.restore_ removes it

    def __init__(self, inner: nn.Linear, rotation: torch.Tensor, spec: dict):
        super().__init__(inner)
        k = rotation.shape[0]
        if inner.in_features % k:
            raise ValueError(f"RotatedLinear: a rotation of order {k} does not divide d_in={inner.in_features}")
        self.spec = dict(spec)
        self.register_buffer("rotation", rotation.to(device=inner.weight.device, dtype=torch.float32),
                             persistent=False)

    @property
    def linear(self) -> nn.Module:     # through the wrappers put inside (rotate -> sparsify -> quantize)
        module = self.inner
        while isinstance(module, CompressionWrapper):
            module = module.inner
        return module

    def forward(self, x):
        k = self.rotation.shape[0]
        xf = x.float()
        if k == x.shape[-1]:
            xr = xf @ self.rotation
        else:                                                   # (..., k, m): mix the k blocks
            xr = torch.einsum("...kj,kl->...lj", xf.unflatten(-1, (k, -1)), self.rotation).flatten(-2)
        return self.inner(xr.to(x.dtype))

    def state(self):
        tensors = {"rotation": self.rotation} if self.spec["rotation"] == "matrix" else {}
        return dict(self.spec), tensors

    @classmethod
    def from_state(cls, inner, params, tensors):
        if params["rotation"] == "matrix":
            return cls(inner, tensors["rotation"], params)
        return cls(inner, online_matrix(params["size"], params["seed"]), params)


# ------------------------------------------------------------------------------------------- what was done
@dataclass
class AppliedRotation:
    """A rotation applied to one model: its config and PCA matrices (the saved state) and the original
    parameters (kept in memory, never saved) that ``restore_`` puts back."""

    config: RotationConfig
    pca: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)   # "layers.3.qkv" -> R (d, d)
    _original: list = field(default_factory=list, repr=False)                 # (module, attr, Parameter)
    _tied: bool = False

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able params, tensors): kind + seed rebuild a Hadamard rotation; PCA stores its ``R``s."""
        params = {"kind": self.config.kind, "seed": self.config.seed, "online": self.config.online}
        return params, {k: v.detach().cpu() for k, v in self.pca.items()}

    def tag(self) -> str:
        """A short name of this rotation (cache keys, reports, the plan's check that it fits the model)."""
        c = self.config
        tag = f"{c.kind}:{c.seed}" + ("" if c.online else ":offline")
        if self.pca:
            h = hashlib.sha256()
            for key in sorted(self.pca):
                h.update(key.encode()); h.update(self.pca[key].detach().float().cpu().numpy().tobytes())
            tag += ":" + h.hexdigest()[:10]
        return tag

    def restore_(self, model: nn.Module) -> nn.Module:
        """Remove the online wrappers and put the original parameters (and the embedding tie) back."""
        for parent, name, wrapper in _rotated_slots(model):
            setattr(parent, name, wrapper.inner)
        for module, attr, param in reversed(self._original):
            setattr(module, attr, param)
        if self._tied:
            model.config.tie_word_embeddings = True
        self._original.clear()
        if hasattr(model.config, ROTATION_ATTR):
            delattr(model.config, ROTATION_ATTR)
        return model


def _rotated_slots(model: nn.Module) -> list[tuple[nn.Module, str, RotatedLinear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, RotatedLinear)]


# ------------------------------------------------------------------------------------------- entry points
def rotate_(model: nn.Module, config: RotationConfig, calibration_windows: torch.Tensor | None = None,
            batch_size: int = 4) -> AppliedRotation:
    """Rotate ``model`` in place (its logits unchanged up to rounding); PCA needs ``calibration_windows``
    (token ids ``(n, T)``)."""
    if config.kind == "pca" and calibration_windows is None:
        raise ValueError("rotate_(kind='pca') needs calibration_windows (token ids, n x T) for E[x x^T]")
    pca = _pca_matrices(model, calibration_windows, batch_size) if config.kind == "pca" else {}
    return apply_state_(model, {"kind": config.kind, "seed": config.seed, "online": config.online}, pca)


def apply_state_(model: nn.Module, params: dict, tensors: dict[str, torch.Tensor]) -> AppliedRotation:
    """Apply a saved ``AppliedRotation.state()`` to a fresh copy of the model: the same rotated model."""
    config = RotationConfig(params["kind"], int(params.get("seed", 0)), bool(params.get("online", True)))
    applied = AppliedRotation(config, dict(tensors))
    if config.kind == "none":
        return applied
    _check_model(model)
    with torch.no_grad():
        if config.kind == "hadamard":
            _quarot_(model, applied)
        else:
            _pca_(model, applied)
    setattr(model.config, ROTATION_ATTR, applied.tag())
    logger.info("rotated the model: %s, %d online rotations", config, len(_rotated_slots(model)))
    return applied


def rotation_of(model: nn.Module) -> str | None:
    """The tag of the rotation applied to ``model`` (``AppliedRotation.tag``), or None."""
    return getattr(model.config, ROTATION_ATTR, None)


def pca_rotation(inputs: torch.Tensor) -> torch.Tensor:
    """``R`` (d, d), orthogonal: the eigenvectors of ``E[x x^T]`` over the rows of ``inputs`` (N, d), by
    decreasing eigenvalue, each signed so that its largest entry is positive. Float32."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return _eigenbasis(x.T @ x / max(1, x.shape[0]))


def _eigenbasis(moment: torch.Tensor) -> torch.Tensor:
    """Eigenvectors by decreasing eigenvalue, sign-fixed; float32 (``eigh`` in float32 is several times faster
    than in float64 at d = 1536; the online rotation runs in float32 anyway, and the fold uses the same R)."""
    _, vectors = torch.linalg.eigh(moment.float())             # ascending eigenvalues
    vectors = vectors.flip(-1)
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    return vectors * torch.where(signs == 0, 1.0, signs)[None, :]


# ------------------------------------------------------------------------------------------- checks
def _check_model(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", "?")
    if model_type.startswith("gemma"):
        raise ModelError(f"rotation of a '{model_type}' model is not supported yet: Gemma's post-attention and "
                         "post-feedforward norms act on the residual branch outputs (and its norms scale by "
                         "1 + w), so a residual-stream rotation does not commute with them")
    if model_type not in SUPPORTED:
        raise ModelError(f"rotation supports the families {SUPPORTED}, not '{model_type}'")
    if any(isinstance(m, CompressionWrapper) for m in model.modules()):
        raise ModelError("rotate_ needs an uncompressed, unrotated model: rotate first, then sparsify and "
                         "quantize (restore the model, or load a fresh one)")


# ------------------------------------------------------------------------------------------- folding
def _set_param(applied: AppliedRotation, module: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Replace ``module.attr`` by a new Parameter (the original is kept for ``restore_``)."""
    old = getattr(module, attr)
    applied._original.append((module, attr, old))
    setattr(module, attr, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))


def _transform(applied: AppliedRotation, linear: nn.Linear, right: torch.Tensor | None = None,
               left: torch.Tensor | None = None) -> None:
    """``W -> left^T W right`` and ``b -> b left`` in float64 (``right``: input side, ``left``: output side)."""
    w = linear.weight.double()
    if right is not None:
        w = w @ right.to(w.device)
    if left is not None:
        left = left.to(w.device)
        w = left.T @ w
        if linear.bias is not None:
            _set_param(applied, linear, "bias", linear.bias.double() @ left)
    _set_param(applied, linear, "weight", w)


def _fold_norm(applied: AppliedRotation, norm: nn.Module) -> torch.Tensor:
    """The norm's scale as ``diag(g)`` (float64), the norm's own scale set to ones."""
    g = norm.weight.detach().double()
    _set_param(applied, norm, "weight", torch.ones_like(g))
    return torch.diag(g.cpu())


def _wrap(model: nn.Module, layer: nn.Module, kind: str, rotation: torch.Tensor, spec: dict) -> None:
    """Put a ``RotatedLinear`` around projection ``kind`` of ``layer`` (its weight is folded separately)."""
    parent_path, _, attr = FAMILIES[model.config.model_type][kind].rpartition(".")
    parent = layer.get_submodule(parent_path)
    setattr(parent, attr, RotatedLinear(getattr(parent, attr), rotation, spec))


def _untie(applied: AppliedRotation, model: nn.Module) -> None:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embed.weight:
        applied._tied = True
        _set_param(applied, head, "weight", head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def _quarot_(model: nn.Module, applied: AppliedRotation) -> None:
    cfg, seed = model.config, applied.config.seed
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    q = orthogonal(cfg.hidden_size, seed, kind="hadamard")           # the residual rotation
    h_hd = online_matrix(head_dim, seed)                              # per head: v's output, o's input
    _untie(applied, model)
    embed = model.get_input_embeddings()
    _set_param(applied, embed, "weight", embed.weight.double() @ q.to(embed.weight.device))
    for layer, row in zip(decoder_layers(model), find_projections(model)):
        p = {proj.kind: getattr(proj.parent, proj.attr) for proj in row}
        qkv_in = _fold_norm(applied, layer.input_layernorm) @ q
        mlp_in = _fold_norm(applied, layer.post_attention_layernorm) @ q
        for kind in ("q", "k"):
            _transform(applied, p[kind], right=qkv_in)
        for kind in ("gate", "up"):
            _transform(applied, p[kind], right=mlp_in)
        v_out = torch.block_diag(*[h_hd] * (p["v"].out_features // head_dim))
        _transform(applied, p["v"], right=qkv_in, left=v_out)
        o_in, down_in = torch.block_diag(*[h_hd] * n_heads), None
        if applied.config.online:
            h_heads, down_in = online_matrix(n_heads, seed), online_matrix(p["down"].in_features, seed)
            o_in = o_in @ torch.kron(h_heads, torch.eye(head_dim, dtype=torch.float64))
            _wrap(model, layer, "o", h_heads, {"rotation": "hadamard", "size": n_heads, "seed": seed})
            _wrap(model, layer, "down", down_in, {"rotation": "hadamard", "size": down_in.shape[0], "seed": seed})
        _transform(applied, p["o"], right=o_in, left=q)
        _transform(applied, p["down"], right=down_in, left=q)
    head = model.get_output_embeddings()
    _transform(applied, head, right=_fold_norm(applied, model.model.norm) @ q)


# ------------------------------------------------------------------------------------------- PCA
def _pca_matrices(model: nn.Module, windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """``{"layers.i.group": R}`` from the second moments of each group's input over ``windows`` (one dense
    pass: the rotations are exact, so no layer's input depends on another's rotation)."""
    _check_model(model)
    moments, counts, hooks = {}, {}, []

    def hook(module, args, key):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        moments[key] = moments.get(key, 0) + x.T @ x
        counts[key] = counts.get(key, 0) + x.shape[0]

    for row in find_projections(model):
        for group, kinds in GROUPS.items():
            proj = next(p for p in row if p.kind == kinds[0])
            key = f"layers.{proj.layer}.{group}"
            hooks.append(getattr(proj.parent, proj.attr).register_forward_pre_hook(
                lambda m, a, k=key: hook(m, a, k)))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                model(windows[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {key: _eigenbasis(moments[key] / counts[key]).cpu() for key in moments}


def _pca_(model: nn.Module, applied: AppliedRotation) -> None:
    for layer, row in zip(decoder_layers(model), find_projections(model)):
        for group, kinds in GROUPS.items():
            key = f"layers.{row[0].layer}.{group}"
            if key not in applied.pca:
                raise ValueError(f"the PCA rotation state has no matrix '{key}' (was it made for another model?)")
            r = applied.pca[key].float()                     # one float32 R, shared by the group's wrappers
            for kind in kinds:
                proj = next(p for p in row if p.kind == kind)
                _transform(applied, getattr(proj.parent, proj.attr), right=r.double())
                _wrap(model, layer, kind, r, {"rotation": "matrix"})
