"""Registered evaluators: measure a (possibly compressed) model and return numbers with their provenance.

``perplexity`` and ``kl`` run the windows once each through the compressed and (temporarily restored) dense
model; ``flops`` / ``bytes`` price the applied allocation with the core's analytic cost model on the model's real
projection shapes; ``memory`` counts weights plus low-rank factors; ``zeroshot`` (in ``zeroshot.py``) wraps lm-eval.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
from torch import nn

from allocator.costs import projection_costs

from .models import find_projections, model_id
from .plan import allocation_targets, is_compressed, temporarily_dense
from .wrappers import ThresholdLinear
from .text import windows_hash

logger = logging.getLogger(__name__)

EVALUATORS: dict[str, Callable] = {}


def register_evaluator(name: str) -> Callable:
    def deco(fn):
        EVALUATORS[name] = fn
        return fn
    return deco


def evaluate(name: str, model: nn.Module, **kwargs) -> dict:
    if name not in EVALUATORS:
        raise KeyError(f"unknown evaluator '{name}'; registered: {sorted(EVALUATORS)}")
    return EVALUATORS[name](model, **kwargs)


# ---------------------------------------------------------------------------------------------- forward
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits (batch, T, vocab)."""
    return model(input_ids=ids.to(_device(model)), use_cache=False).logits.float()


def token_losses(logits: torch.Tensor, ids: torch.Tensor, ref_logprobs: torch.Tensor | None = None,
                 score_last: float = 1.0) -> tuple[float, float, int]:
    """Summed next-token NLL, summed KL(ref || model) and the token count over the scored positions.

    ``score_last`` < 1 scores only the last fraction of each window's predictions (the papers' protocols)."""
    logprobs = logits[:, :-1].log_softmax(-1)
    targets = ids[:, 1:].to(logprobs.device)
    start = 0 if score_last >= 1 else logprobs.shape[1] - max(1, math.ceil(score_last * logprobs.shape[1]))
    logprobs, targets = logprobs[:, start:], targets[:, start:]
    nll = -logprobs.gather(-1, targets[..., None]).sum().item()
    kl = 0.0
    if ref_logprobs is not None:
        ref = ref_logprobs[:, start:]
        kl = (ref.exp() * (ref - logprobs)).sum().item()
    return nll, kl, targets.numel()


@torch.no_grad()
def measure(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, score_last: float = 1.0) -> dict:
    """Perplexity of the model as it is, and (when compressed) its KL to the dense model, on the same windows."""
    nll = kl = dense_nll = 0.0
    count = 0
    t0 = time.perf_counter()
    compressed = is_compressed(model)
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        ref = None
        if compressed:
            with temporarily_dense(model):
                dense_logits = logits_of(model, ids)
            dense_nll += token_losses(dense_logits, ids, score_last=score_last)[0]
            ref = dense_logits[:, :-1].log_softmax(-1)
            del dense_logits
        a, b, n = token_losses(logits_of(model, ids), ids, ref, score_last)
        nll, kl, count = nll + a, kl + b, count + n
    out = {"perplexity": math.exp(nll / count), "kl": kl / count, "nll": nll / count, "tokens": count,
           "seconds": time.perf_counter() - t0, "windows": list(windows.shape), "data_hash": windows_hash(windows),
           "model": model_id(model)}
    out["dense_perplexity"] = math.exp(dense_nll / count) if compressed else out["perplexity"]
    return out


@register_evaluator("perplexity")
def perplexity(model, *, windows, batch_size: int = 4, score_last: float = 1.0, **_) -> dict:
    res = measure(model, windows, batch_size, score_last)
    return {k: res[k] for k in ("perplexity", "nll", "tokens", "data_hash", "model", "seconds")}


@register_evaluator("kl")
def kl(model, *, windows, batch_size: int = 4, score_last: float = 1.0, **_) -> dict:
    """KL(dense || compressed) per scored token; 0 for an uncompressed model."""
    res = measure(model, windows, batch_size, score_last)
    return {k: res[k] for k in ("kl", "perplexity", "dense_perplexity", "tokens", "data_hash", "model", "seconds")}


# ---------------------------------------------------------------------------------------------- costs / memory
def allocation_cost(model: nn.Module, allocation, kind: str = "bytes_decode", tokens: int = 2048) -> dict:
    """Cost of the projections under ``allocation`` (unlisted projections dense) and its ratio to dense, priced by
    the core's analytic model on the loaded model's projection shapes (reports read the solver's Tables instead)."""
    rows = find_projections(model)
    level_of = {p.name: level for target, level in allocation_targets(allocation or []) for p in target.projections(rows)}
    total = dense = 0.0
    for p in (p for row in rows for p in row):
        lv = level_of.get(p.name)
        total += projection_costs(p.d_out, p.d_in, *((lv.s, lv.rho, lv.bits) if lv else (0.0, 1.0, 16)), tokens)[kind]
        dense += projection_costs(p.d_out, p.d_in, 0.0, 1.0, 16, tokens)[kind]
    return {kind: total, f"dense_{kind}": dense, "ratio": total / dense, "model_sparsity": 1 - total / dense}


@register_evaluator("flops")
def flops(model, *, allocation=None, tokens: int = 2048, **_) -> dict:
    return {"decode": allocation_cost(model, allocation, "flops_decode"),
            "prefill": allocation_cost(model, allocation, "flops_prefill", tokens)}


@register_evaluator("bytes")
def bytes_moved(model, *, allocation=None, **_) -> dict:
    return allocation_cost(model, allocation, "bytes_decode")


@register_evaluator("memory")
def memory(model, **_) -> dict:
    """Bytes of the weights (tied tensors once) plus the low-rank factors the wrappers hold."""
    seen, weights = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weights += p.numel() * p.element_size()
    factors = sum(m.lr_down.numel() * m.lr_down.element_size() + m.lr_up.numel() * m.lr_up.element_size()
                  for m in model.modules() if isinstance(m, ThresholdLinear) and m.lr_down is not None)
    return {"weight_bytes": weights, "low_rank_bytes": factors, "total_bytes": weights + factors}


@register_evaluator("zeroshot")
def zeroshot(model, *, tokenizer, tasks, **options) -> dict:
    from .zeroshot import run_zeroshot
    return run_zeroshot(model, tokenizer, tasks, **options)
