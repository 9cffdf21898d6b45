"""Analytic cost model of a decoder-only transformer, from its Hugging Face config alone (no weights).

Per projection (q, k, v, o, gate, up, down; real GQA shapes) and per level (s, rho, fmt) it counts
FLOPs for a prefill of N tokens, FLOPs per decode token, weight bytes moved per decode token and an estimated
prefill time:

* dense: ``2 d_in d_out`` FLOPs per token, ``d_in d_out bits/8`` weight bytes;
* activation sparsity ``s`` (``rho = 1``): a share ``1 - s`` of the input channels (rows of W^T) is touched;
* R-Sparse ``(s, rho)`` (DESIGN.md section 2): ``k = floor(d_in (1 - s) rho)`` exact channels plus a rank
  ``r = floor((d_in d_out (1 - s) - k d_out) / (d_in + d_out))`` correction, i.e. ``k d_out + r (d_in + d_out)``
  weights touched per token;
* the level's number format (``allocator.formats``) sets the bytes per weight, scales included (one fp16 scale
  per group or per output channel); the low-rank factors are counted at the same format;
* ``time_prefill``: microseconds of the projection's prefill GEMM on an NVIDIA H200, from the measured bf16 rate
  and the format's measured GEMM speedup (``NumberFormat.prefill_speedup``). Prefill runs dense (a per-token
  mask saves no GEMM time), so this cost depends on the format only: the second constraint beside decode bytes.

Attention scores (``QK^T`` and ``AV``), activation reads / writes, KV-cache reads, norms, embeddings and the LM
head are fixed costs, reported in the
tables' provenance (``fixed_costs``) but not allocatable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np

from .formats import H200_BF16_PREFILL_TFLOPS
from .levels import Level, normalize_levels
from .tables import Tables, TablesError, Unit

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ACTIVATION_BYTES = 2  # fp16 / bf16 activations


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a HF config that decide linear-layer costs."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of each projection of one decoder layer."""
        d, f, q_out, kv_out = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q": (q_out, d), "k": (kv_out, d), "v": (kv_out, d), "o": (d, q_out),
                "gate": (f, d), "up": (f, d), "down": (d, f)}


def shipped_model_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("allocator.configs").iterdir() if p.name.endswith(".json"))


def load_model_config(config) -> dict:
    """A HF config as a dict, from a dict, a ``config.json`` path, a folder holding one, or a shipped name."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = Path(str(config))
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return _read_config_json(path.read_bytes(), str(path))
    shipped = resources.files("allocator.configs") / f"{str(config).lower()}.json"
    if shipped.is_file():
        return _read_config_json(shipped.read_bytes(), str(shipped))
    raise FileNotFoundError(f"no model config '{config}': give a dict, a config.json path, or one of the shipped "
                            f"configs {shipped_model_configs()}")


def _read_config_json(raw: bytes, where: str) -> dict:
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TablesError(f"the model config {where} is not valid UTF-8 JSON ({exc}); give the model's "
                          "config.json as saved by transformers (config.save_pretrained)") from exc
    if not isinstance(cfg, dict):
        raise TablesError(f"the model config {where} holds a JSON {type(cfg).__name__}, not an object; "
                          "give the model's config.json")
    return cfg


SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _config_int(cfg: Mapping, key: str, name: str, default=None, minimum: int = 1) -> int:
    value = cfg.get(key) if cfg.get(key) is not None else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise TablesError(f"model config '{name}': {key}={value!r} must be an integer >= {minimum}; "
                          "fix the config (a decoder-only HF config, LlamaConfig-like)")
    return int(value)


def model_shape(config) -> ModelShape:
    """The linear-layer shape of a decoder-only HF config; every size is checked to be a positive integer."""
    cfg = load_model_config(config)
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    name = str(cfg.get("_name_or_path", cfg.get("model_type", "model")))
    missing = [k for k in SIZE_KEYS if k not in cfg]
    if missing:
        raise TablesError(f"the model config '{name}' lacks {missing}; a decoder-only HF config (LlamaConfig-like) "
                          "is needed")
    hidden, intermediate, layers, heads = (_config_int(cfg, k, name) for k in SIZE_KEYS)
    kv_heads = _config_int(cfg, "num_key_value_heads", name, default=heads)
    if heads % kv_heads:
        raise TablesError(f"model config '{name}': num_attention_heads={heads} is not a multiple of "
                          f"num_key_value_heads={kv_heads}; fix the config")
    if cfg.get("head_dim") is None and hidden % heads:
        raise TablesError(f"model config '{name}': hidden_size={hidden} is not divisible by num_attention_heads="
                          f"{heads} and head_dim is absent; give head_dim in the config")
    head_dim = _config_int(cfg, "head_dim", name, default=hidden // heads)
    vocab = _config_int(cfg, "vocab_size", name, default=0, minimum=0)
    return ModelShape(name=name, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                      kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
                      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def rsparse_split(*, d_out: int, d_in: int, s: float, rho: float) -> tuple[int, int]:
    """(kept channels k, rank r) of an R-Sparse layer W [d_out, d_in] at sparsity budget s and sparse ratio rho.

    The one (s, rho) -> (k, r) mapping of the package (R-Sparse's utils/setup.py), read by the cost model, the
    compression method and the kernels. Keyword-only: (d_out, d_in) and (d_in, d_out) orders were both in use.
    ``s <= 0`` or ``rho >= 1`` means no low-rank part; the rank never exceeds min(d_in, d_out).
    """
    if s <= 0:
        return d_in, 0
    budget = d_in * d_out * (1.0 - s)
    kept = int(d_in * (1.0 - s) * rho)
    if rho >= 1.0:
        return kept, 0
    rank = max(int((budget - kept * d_out) / (d_in + d_out)), 0)
    return kept, min(rank, d_in, d_out)


def touched_weights(d_out: int, d_in: int, s: float, rho: float) -> float:
    """Weight elements read (= multiply-adds) per token at level (s, rho)."""
    kept, rank = rsparse_split(d_out=d_out, d_in=d_in, s=s, rho=rho)
    return kept * d_out + rank * (d_in + d_out)


COST_KINDS = ("flops_prefill", "flops_decode", "bytes_decode", "time_prefill")


def projection_costs(d_out: int, d_in: int, level: Level, tokens: int) -> dict[str, float]:
    """flops_prefill (N tokens), flops_decode, bytes_decode, time_prefill (us) of one projection at one level."""
    touched = touched_weights(d_out, d_in, level.s, level.rho)
    fmt = level.format
    return {
        "flops_prefill": 2.0 * tokens * touched,
        "flops_decode": 2.0 * touched,
        "bytes_decode": touched * fmt.bytes_per_weight(d_in),
        "time_prefill": 2.0 * tokens * d_in * d_out / (H200_BF16_PREFILL_TFLOPS * 1e6 * fmt.prefill_speedup),
    }


def fixed_costs(shape: ModelShape, tokens: int, context: int | None = None) -> dict[str, float]:
    """Non-allocatable costs: attention scores, LM head, embedding row, per model (not per layer)."""
    context = tokens if context is None else context
    attn_width = shape.heads * shape.head_dim
    kv_width = shape.kv_heads * shape.head_dim
    lm_head = 2.0 * shape.hidden * shape.vocab
    return {
        # QK^T and AV: 2 T^2 d each per layer (no causal halving, as in the ASAF notes)
        "flops_prefill": shape.layers * 4.0 * tokens * tokens * attn_width + tokens * lm_head,
        "flops_decode": shape.layers * 4.0 * context * attn_width + lm_head,
        # KV cache read at `context` tokens, projection inputs / outputs, LM head weights, one embedding row
        "bytes_decode": (shape.layers * 2.0 * context * kv_width * ACTIVATION_BYTES
                         + shape.layers * ACTIVATION_BYTES * sum(o + i for o, i in shape.projection_shapes().values())
                         + shape.hidden * shape.vocab * ACTIVATION_BYTES + shape.hidden * ACTIVATION_BYTES),
    }


def analytic_tables(config, levels, unit: str = "layer", tokens: int = 2048, context: int | None = None,
                    projections=PROJECTIONS) -> Tables:
    """Cost tables (``COST_KINDS``) for every layer or projection of a model.

    ``unit="layer"`` makes one unit per decoder layer (all seven projections share its level);
    ``unit="projection"`` one unit per projection; ``unit="block"`` one unit for attention (q,k,v,o) and one
    for the MLP (gate, up, down) per layer; ``unit="input"`` one unit per distinct input of a layer (q+k+v, o,
    gate+up, down: the four sparse GEMVs of a decode step, each with one mask).
    """
    shape = model_shape(config)
    levels = normalize_levels(levels)
    pshapes = shape.projection_shapes()
    unknown = [p for p in projections if p not in pshapes]
    if unknown:
        raise TablesError(f"unknown projections {unknown}; known: {list(PROJECTIONS)}")
    if unit == "layer":
        groups = [("", tuple(projections))]
    elif unit == "projection":
        groups = [(f".{p}", (p,)) for p in projections]
    elif unit == "block":
        groups = [(f".{name}", tuple(p for p in members if p in projections))
                  for name, members in (("attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down")))]
        groups = [g for g in groups if g[1]]
    elif unit == "input":
        groups = [("." + "+".join(m), m) for m in (tuple(p for p in members if p in projections)
                  for members in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))) if m]
    else:
        raise TablesError(f"unknown unit granularity '{unit}'; use 'layer', 'block', 'input' or 'projection'")

    grid = [Level(**row) for row in levels.to_dict(orient="records")]
    per_proj = {p: {kind: np.array([projection_costs(*pshapes[p], lv, tokens)[kind] for lv in grid])
                    for kind in COST_KINDS}
                for p in projections}
    units, rows = [], {k: [] for k in COST_KINDS}
    for layer in range(shape.layers):
        for suffix, members in groups:
            shapes = tuple(pshapes[p] for p in members)
            units.append(Unit(name=f"layers.{layer}{suffix}", layer=layer, kinds=members,
                              params=int(sum(o * i for o, i in shapes)), shapes=shapes))
            for kind in rows:
                rows[kind].append(sum(per_proj[p][kind] for p in members))
    dense = {kind: [projection_costs(*pshapes[p], Level(), tokens)[kind] for p in projections]
             for kind in rows}
    provenance = {"model": shape.name, "cost_model": "analytic", "tokens": tokens, "unit": unit,
                  "fixed_costs": fixed_costs(shape, tokens, context),
                  "dense_costs": {kind: [sum(v for p, v in zip(projections, dense[kind]) if p in u.kinds)
                                         for u in units] for kind in rows}}
    return Tables(units, levels, {k: np.vstack(v) for k, v in rows.items()}, None, provenance)
