"""Registered evaluators: measure a (possibly compressed) model and return numbers with their provenance.

``perplexity`` and ``kl`` run the windows once each through the compressed and (temporarily restored) dense
model; ``flops`` / ``bytes`` price the applied allocation with the core's analytic cost model on the model's real
projection shapes; ``memory`` counts weights plus low-rank factors; ``zeroshot`` (in ``zeroshot.py``) wraps lm-eval.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from allocator.costs import projection_costs
from allocator.levels import Level

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


@dataclass(frozen=True)
class TopKReference:
    """The dense model's next-token distribution kept as its ``k`` most likely tokens per position plus one tail
    bucket holding the rest of its mass: (b, T, k) indices and log-probabilities, (b, T) log tail mass.

    KL against it (``token_losses``) is exact on the kept tokens and merges the tail: ``sum_K p log(p/q) +
    P_T log(P_T/Q_T)``, a lower bound of the full KL (log-sum inequality: ``sum_T p log(p/q) >= P_T log(P_T/Q_T)``),
    equal to it when the compressed model keeps the dense model's relative tail probabilities. It costs k, not the
    vocabulary, per position, and holds k numbers per position instead of a (b, T, vocab) tensor."""

    index: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor

    def __getitem__(self, key) -> "TopKReference":
        """Rows / positions, as a (b, T, vocab) log-prob tensor would be sliced (``ref[:take]``, ``ref[:, s:]``)."""
        return TopKReference(self.index[key], self.logprobs[key], self.tail[key])

    def __len__(self) -> int:
        return len(self.index)

    @property
    def k(self) -> int:
        return self.index.shape[-1]


def reference_logprobs(logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor | TopKReference:
    """The reference ``token_losses`` scores KL against, from the dense model's (b, T, vocab) logits of a batch:
    the full log-probabilities of positions ``0..T-2`` (``top_k`` None, 0 or >= the vocabulary), else their
    ``TopKReference``. Its tail mass is summed over the tokens not kept (one masked pass, once per reference), not
    taken as 1 - kept: that difference rounds a small tail to noise, whose log then dominates the KL."""
    logits = logits[:, :-1]
    if not top_k or top_k >= logits.shape[-1]:
        return logits.log_softmax(-1)
    logits = logits.float()
    index = logits.topk(int(top_k), dim=-1).indices
    kept = logits.gather(-1, index).double()
    tail = logits.scatter(-1, index, -math.inf).logsumexp(-1).double()
    lse = torch.logaddexp(kept.logsumexp(-1), tail)
    return TopKReference(index, kept - lse[..., None], tail - lse)


def kl_top_k_for(vocab: int | nn.Module, top_k: int | str | None = "auto",
                 exact_vocab: int | None = None) -> int | None:
    """The k of the top-k KL for a vocabulary size or a model (``None``: the exact full-vocabulary KL): exact up
    to ``exact_vocab`` tokens, top-``top_k`` above; ``"auto"`` / ``None`` take the defaults of
    ``allocator.config.ProfileConfig`` (``kl_top_k``, ``kl_exact_vocab``); ``top_k=0`` is always exact."""
    from allocator.config import ProfileConfig
    if isinstance(vocab, nn.Module):
        vocab = vocab.get_output_embeddings().weight.shape[0]
    top_k = ProfileConfig.kl_top_k if top_k in (None, "auto") else int(top_k)
    exact_vocab = ProfileConfig.kl_exact_vocab if exact_vocab is None else int(exact_vocab)
    return None if top_k <= 0 or vocab <= exact_vocab or top_k >= vocab else top_k


def token_losses(logits: torch.Tensor, ids: torch.Tensor,
                 ref_logprobs: torch.Tensor | TopKReference | None = None,
                 score_last: float = 1.0) -> tuple[float, float, int]:
    """Summed next-token NLL, summed KL(ref || model) and the token count over the scored positions.

    ``ref_logprobs``: the dense model's full log-probabilities (exact KL) or a ``TopKReference`` (top-k KL plus a
    tail bucket, ``reference_logprobs(logits, k)``). ``score_last`` < 1 scores only the last fraction of each
    window's predictions (the papers' protocols)."""
    if isinstance(ref_logprobs, TopKReference):
        return _top_k_losses(logits, ids, ref_logprobs, score_last)
    logprobs = logits[:, :-1].log_softmax(-1)
    targets = ids[:, 1:].to(logprobs.device)
    start = _first_scored(logprobs.shape[1], score_last)
    logprobs, targets = logprobs[:, start:], targets[:, start:]
    nll = -logprobs.gather(-1, targets[..., None]).sum().item()
    kl = 0.0
    if ref_logprobs is not None:
        ref = ref_logprobs[:, start:]
        kl = (ref.exp() * (ref - logprobs)).sum().item()
    return nll, kl, targets.numel()


def window_losses(logits: torch.Tensor, ids: torch.Tensor, ref_logprobs=None, score_last: float = 1.0):
    """``token_losses`` of every window of a batch: an (n_windows, 3) array of summed NLL, summed KL, tokens (what
    paired error bars and the search solvers' paired validation need)."""
    import numpy as np

    return np.array([token_losses(logits[r:r + 1], ids[r:r + 1], None if ref_logprobs is None else ref_logprobs[r:r + 1],
                                  score_last) for r in range(len(ids))], dtype=float).reshape(-1, 3)


def _first_scored(positions: int, score_last: float) -> int:
    return 0 if score_last >= 1 else positions - max(1, math.ceil(score_last * positions))


#: the smallest tail mass the compressed model is given (its 1 - kept can round to 0 or below)
_MIN_TAIL = 1e-30


def _top_k_losses(logits, ids, ref: TopKReference, score_last: float) -> tuple[float, float, int]:
    """``token_losses`` against a top-k reference: one log-normaliser pass over the vocabulary, then the target's
    and the k kept tokens' log-probabilities (float64); no (b, T, vocab) log-probability tensor is built. The
    compressed model's tail is 1 - its kept mass: where that rounds badly the reference tail is tiny too (both
    models put nearly all mass on the same k tokens), so its term stays negligible."""
    logits = logits[:, :-1]
    targets = ids[:, 1:].to(logits.device)
    start = _first_scored(logits.shape[1], score_last)
    logits, targets, ref = logits[:, start:], targets[:, start:], ref[:, start:]
    lse = logits.float().logsumexp(-1).double()
    nll = -(logits.gather(-1, targets[..., None])[..., 0].double() - lse).sum().item()
    p, p_tail = ref.logprobs.to(lse.device), ref.tail.to(lse.device)
    q = logits.gather(-1, ref.index.to(logits.device)).double() - lse[..., None]
    q_tail = (-torch.expm1(q.logsumexp(-1).clamp(max=0.0))).clamp(min=_MIN_TAIL).log()
    tail_kl = torch.where(p_tail > -math.inf, p_tail.exp() * (p_tail - q_tail), 0.0)   # an empty tail adds 0
    return nll, ((p.exp() * (p - q)).sum(-1) + tail_kl).sum().item(), targets.numel()


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
        total += projection_costs(p.d_out, p.d_in, lv or Level(), tokens)[kind]
        dense += projection_costs(p.d_out, p.d_in, Level(), tokens)[kind]
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
