"""Sensitivity profiling (ASAF's tabulation): a degradation table over units x levels, measured on a real model.

Each row compresses one unit at one level and measures, on calibration windows, the KL divergence to the dense
model's next-token distribution and the perplexity. Two modes:

- ``isolated``: the rest of the model dense (ASAF); entry = measured value (0 at the dense level).
- ``operating_point``: the rest at the budget's uniform level, only this unit moved (first-order interactions);
  entry = measured - base + base / n_units, so the entries of the uniform allocation sum to the measured base.

The hidden states entering every decoder layer (and the keyword arguments the layer received) are cached once,
so a row runs only from its unit's first layer on. Finished rows are appended to an on-disk cache keyed by
model, method, level grid, units, mode, data and seed; a restarted run recomputes no finished row.
Cost: rows x (layers after the unit) layer forwards on n x length tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from allocator.cache import cache_dir
from allocator.levels import Level, normalize_levels

from .distributed import resolve as resolve_ranks
from .methods import Method
from .metrics import kl_top_k_for, reference_logprobs, token_losses
from .models import decoder_layers, model_id, weights_fingerprint
from .plan import Target, apply_levels, restore_
from .profile_cache import ProfileCacheError, RowCache  # noqa: F401 - ProfileCacheError is re-exported
from .text import windows_hash

logger = logging.getLogger(__name__)
BASE = "__base__"
MODES = ("isolated", "operating_point")


# ---------------------------------------------------------------------------------------------- partial forward
@dataclass
class LayerInputs:
    """Per batch: the hidden state entering each decoder layer and the keyword arguments it was called with."""

    hidden: list[list[torch.Tensor]]     # [batch][layer] -> (b, T, d)
    kwargs: list[list[dict]]             # [batch][layer]


class _LastLayerReached(Exception):
    """Raised by the last layer's pre-hook when the logits are not wanted: the rest of the forward need not run."""


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, *, logits: bool = True,
                         first_only: bool = False) -> tuple[LayerInputs, list]:
    """One forward per batch with pre-hooks on every layer; returns the inputs and the float32 logits.

    ``logits=False`` stops each forward at the last layer's input (no logits returned); ``first_only`` keeps only
    the hidden state entering layer 0 (``hidden[batch] == [h0]``), with every layer's keyword arguments (they
    differ by layer type: Gemma's sliding-window and global layers get their own mask and rotary)."""
    layers = decoder_layers(model)
    store: dict[int, tuple] = {}

    def pre_hook(module, args, kwargs, index):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        store[index] = (hidden.detach() if index == 0 or not first_only else None, rest)
        if not logits and index == len(layers) - 1:
            raise _LastLayerReached

    hooks = [layer.register_forward_pre_hook(lambda m, a, k, i=i: pre_hook(m, a, k, i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hidden, kwargs, out_logits = [], [], []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(windows), batch_size):
            store.clear()
            try:
                out = model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
                out_logits.append(out.logits.float())
            except _LastLayerReached:
                pass
            hidden.append([store[i][0] for i in range(1 if first_only else len(layers))])
            kwargs.append([store[i][1] for i in range(len(layers))])
    finally:
        for h in hooks:
            h.remove()
    return LayerInputs(hidden, kwargs), out_logits


def _final_norm(model: nn.Module) -> nn.Module:
    """The norm the model's forward applies after its last layer (Gemma's RMSNorm scales by 1 + weight: the module
    is called as it is, so its own formula holds)."""
    inner = model.model
    for name in ("norm", "final_layernorm", "final_norm"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise AttributeError(f"cannot find the final norm of {type(model).__name__}")


@torch.no_grad()
def run_from_layer(model: nn.Module, first: int, inputs: LayerInputs, batch: int) -> torch.Tensor:
    """float32 logits of one batch, recomputing only layers ``first..L-1`` from the cached input of ``first``."""
    layers = decoder_layers(model)
    h = inputs.hidden[batch][first]
    for j in range(first, len(layers)):
        out = layers[j](h, **inputs.kwargs[batch][j])
        h = out[0] if isinstance(out, tuple) else out
    logits = model.get_output_embeddings()(_final_norm(model)(h))
    cap = getattr(model.config, "final_logit_softcapping", None)     # Gemma-2 (Gemma-3 configs: null)
    if cap:                                                          # in the model's dtype, as HF's forward does
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


# ---------------------------------------------------------------------------------------------- profile
@dataclass
class Profile:
    """Measured rows and the derived degradation tables (n_units x n_levels)."""

    units: list[str]
    levels: pd.DataFrame
    kl: np.ndarray               # measured KL(dense || compressed) per token
    nll: np.ndarray              # measured mean NLL
    base_kl: float
    base_nll: float
    dense_nll: float
    mode: str
    provenance: dict

    def table(self, metric: str = "kl") -> np.ndarray:
        """Additive degradation table: KL, or perplexity increase over dense."""
        n = len(self.units)
        if metric == "kl":
            return self.kl - self.base_kl + self.base_kl / n
        if metric in ("ppl", "perplexity"):
            ppl, base = np.exp(self.nll), math.exp(self.base_nll)
            return ppl - base + (base - math.exp(self.dense_nll)) / n
        raise ValueError(f"unknown profile metric '{metric}'; use 'kl' or 'ppl'")


def _level_dicts(levels: pd.DataFrame) -> list[dict]:
    return [Level(**row).to_dict() for row in normalize_levels(levels).to_dict(orient="records")]


def as_targets(units) -> list[Target]:
    """Profiling targets from table ``Unit`` objects or ``Target`` objects."""
    return [u if isinstance(u, Target) else Target.from_unit(u) for u in units]


def profile(model: nn.Module, method: Method, windows: torch.Tensor, levels: pd.DataFrame, units: list, *,
            mode: str = "isolated", operating_level: dict | None = None, batch_size: int = 8,
            score_last: float = 1.0, cache: Path | str | bool | None = True, progress: bool = True,
            on_row: Callable[[str, int], None] | None = None, distributed="off", kl_top_k="auto",
            kl_exact_vocab: int | None = None, expand=None) -> Profile:
    """Measure every (unit, level) row; ``units``: a table's ``Unit`` objects (or ``Target`` objects);
    ``cache=True`` uses ``~/.cache/allocator/profiles/<key>``. ``distributed``: "auto" / "on" (torchrun's ranks,
    ``evaluators.distributed``) or a ``Ranks``: row ``k`` of the rows to measure goes to rank ``k % world``, and
    the ranks exchange their rows, so each returns the single-process table (and each cache holds it).
    ``kl_top_k`` / ``kl_exact_vocab`` (``metrics.kl_top_k_for``; defaults ``ProfileConfig``): above that vocabulary
    the KL of every row is taken on the dense model's top-k tokens plus a tail bucket (``TopKReference``).
    ``expand``: an object whose ``expand(pairs)`` turns (unit, level) pairs into the pairs actually applied and whose
    ``key`` enters the cache key (``block_split.BlockSplit``: each unit level applied as its within-block split)."""
    if mode not in MODES:
        raise ValueError(f"unknown profiling mode '{mode}'; use one of {MODES}")
    if mode == "operating_point" and operating_level is None:
        raise ValueError("mode='operating_point' needs operating_level={'s': ..., 'rho': ...}")
    level_dicts = _level_dicts(levels)
    targets = {t.name: t for t in as_targets(units)}
    units = list(targets)
    first_layer = {name: t.first_layer for name, t in targets.items()}
    key = {"model": model_id(model), "dtype": str(next(model.parameters()).dtype), "method": method.options(),
           "calibration": getattr(method, "calibration_hash", None), "levels": level_dicts, "units": units,
           "mode": mode, "operating_level": operating_level if mode == "operating_point" else None,
           "data": windows_hash(windows), "windows": list(windows.shape), "score_last": score_last,
           "batch_size": batch_size, "weights": weights_fingerprint(model)}
    top_k = kl_top_k_for(model, kl_top_k, kl_exact_vocab)
    if top_k is not None:                              # exact-KL keys (every vocabulary up to 64k) stay as they were
        key["kl_top_k"] = top_k
    if expand is not None:
        key["expand"] = expand.key
    applied = expand.expand if expand is not None else list
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    rows = None
    if cache:
        root = cache_dir() / "profiles" if cache is True else Path(cache)
        rows = RowCache(root / f"{method.name}-{mode}-{digest}", key)
    done = rows.load(set(units) | {BASE}, len(level_dicts)) if rows else {}

    base = {u: dict(operating_level) for u in units} if mode == "operating_point" else {}
    todo = [(u, j) for u in units for j, lv in enumerate(level_dicts)
            if (u, j) not in done and not _is_base_level(lv, mode, operating_level)]
    need_base = (BASE, 0) not in done
    ranks = resolve_ranks(distributed)
    if ranks.active:                                   # rank 0's list, so the split agrees on every rank
        todo, need_base = ranks.broadcast((todo, need_base))
        todo = ranks.shard(todo)
    logger.info("profiling %s (%s): %d units x %d levels, %d rows to compute, %d cached", method.name, mode,
                len(units), len(level_dicts), len(todo), len(done))

    restore_(model)
    try:
        if todo or need_base:
            dense_inputs, dense_logits = capture_layer_inputs(model, windows, batch_size)
            ref = [reference_logprobs(l, top_k) for l in dense_logits]
            batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
            dense_nll = _sum_losses(dense_logits, batches, None, score_last)[0]
            inputs, base_nll, base_kl = dense_inputs, dense_nll, 0.0
            if base:                                   # operating point: cache the uniformly compressed run
                del dense_inputs.hidden[:]
                apply_levels(model, method, applied([(targets[u], operating_level) for u in units]))
                inputs, base_logits = capture_layer_inputs(model, windows, batch_size)
                base_nll, base_kl = _sum_losses(base_logits, batches, ref, score_last)
                del base_logits
            del dense_logits
            if need_base:
                row = {"unit": BASE, "level": 0, "kl": base_kl, "nll": base_nll, "dense_nll": dense_nll}
                done[(BASE, 0)] = row
                if ranks.main and rows:                # rank 0's base row is the one every rank keeps
                    rows.append(row)
            claimed = rows.claim_each(todo, done) if rows else todo    # rows another live run measures are awaited
            for unit, j in tqdm(claimed, total=len(todo), desc=f"profile {method.name}/{mode}", disable=not progress):
                apply_levels(model, method, applied([(targets[unit], level_dicts[j])]))
                logits = [run_from_layer(model, first_layer[unit], inputs, b) for b in range(len(batches))]
                nll, kl = _sum_losses(logits, batches, ref, score_last)
                if unit in base:
                    apply_levels(model, method, applied([(targets[unit], base[unit])]))
                else:
                    restore_(model)
                row = {"unit": unit, "level": j, "kl": kl, "nll": nll}
                done[(unit, j)] = row
                if rows:
                    rows.append(row)
                if on_row is not None:
                    on_row(unit, j)
    finally:
        restore_(model)
        if rows:
            rows.release_claims()                      # an interrupted row goes back to any other run
    if ranks.active:                                   # every rank's rows on every rank (and in every host's cache)
        mine = [done[r] for r in todo if r in done] + ([done[(BASE, 0)]] if ranks.main and need_base else [])
        done.update(exchange_rows(ranks, mine, rows))

    b = done[(BASE, 0)]
    kl = np.full((len(units), len(level_dicts)), b["kl"])
    nll = np.full_like(kl, b["nll"])
    for i, u in enumerate(units):
        for j, lv in enumerate(level_dicts):
            if _is_base_level(lv, mode, operating_level):
                continue
            kl[i, j], nll[i, j] = done[(u, j)]["kl"], done[(u, j)]["nll"]
    provenance = {"profile_mode": mode, "profile_key": digest, "model": key["model"], "method": key["method"],
                  "data_hash": key["data"], "tokens": int(windows.numel()), "windows": key["windows"],
                  "operating_level": key["operating_level"], "seed": method.seed,
                  **({"kl_top_k": top_k} if top_k is not None else {})}    # the KL is a top-k lower bound
    return Profile(units, levels, kl, nll, b["kl"], b["nll"], b["dense_nll"], mode, provenance)


def exchange_rows(ranks, mine: list[dict], rows: RowCache | None) -> dict:
    """The rows of each rank's share, merged in rank order on every rank; a host whose cache lacks some gets them."""
    merged = {}
    for part in ranks.gather(mine):
        for row in part:
            merged.setdefault((row["unit"], int(row["level"])), row)
    if rows:
        rows.extend(list(merged.values()))
    return merged


def group_degradation(model: nn.Module, method: Method, windows: torch.Tensor, levels: pd.DataFrame,
                      spans: list[tuple[int, int]], metric: str = "kl", **options) -> dict[tuple[int, int], np.ndarray]:
    """Measured rows for groups of consecutive layers ``(first, last)`` sharing one level, in the form
    ``Problem(group_degradation=...)`` takes (interactions inside a group are measured, not summed)."""
    table = profile(model, method, windows, levels, [Target.span(a, b) for a, b in spans], **options).table(metric)
    return {span: table[i] for i, span in enumerate(spans)}


def _is_base_level(level: dict, mode: str, operating_level: dict | None) -> bool:
    """The rows every unit shares: the dense level (isolated; a quantized format at s = 0 is not dense), or the
    operating level itself (operating point)."""
    level = Level.from_mapping(level)
    if mode == "isolated":
        return level.is_dense
    base = Level.from_mapping(operating_level)
    return abs(level.s - base.s) < 1e-9 and abs(level.rho - base.rho) < 1e-9 and level.fmt == base.fmt


def _sum_losses(logits: list, batches: list, ref: list | None, score_last: float) -> tuple[float, float]:
    nll = kl = 0.0
    count = 0
    for b, (lg, ids) in enumerate(zip(logits, batches)):
        a, k, n = token_losses(lg, ids, None if ref is None else ref[b], score_last)
        nll, kl, count = nll + a, kl + k, count + n
    return nll / count, kl / count
