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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .methods import Method, apply_allocation_, remove_compression_
from .metrics import token_losses
from .models import cache_dir, decoder_layers, find_projections, model_id, unit_projections
from .text import windows_hash

logger = logging.getLogger(__name__)
BASE = "__base__"
MODES = ("isolated", "operating_point")


class ProfileCacheError(RuntimeError):
    """The on-disk profile cache is unreadable or belongs to another run; the message says which file to delete."""


# ---------------------------------------------------------------------------------------------- partial forward
@dataclass
class LayerInputs:
    """Per batch: the hidden state entering each decoder layer and the keyword arguments it was called with."""

    hidden: list[list[torch.Tensor]]     # [batch][layer] -> (b, T, d)
    kwargs: list[list[dict]]             # [batch][layer]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> tuple[LayerInputs, list]:
    """One full forward per batch with pre-hooks on every layer; returns the inputs and the float32 logits."""
    layers = decoder_layers(model)
    store: dict[int, tuple] = {}

    def pre_hook(module, args, kwargs, index):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        store[index] = (hidden.detach(), rest)

    hooks = [layer.register_forward_pre_hook(lambda m, a, k, i=i: pre_hook(m, a, k, i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hidden, kwargs, logits = [], [], []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(windows), batch_size):
            store.clear()
            out = model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            hidden.append([store[i][0] for i in range(len(layers))])
            kwargs.append([store[i][1] for i in range(len(layers))])
            logits.append(out.logits.float())
    finally:
        for h in hooks:
            h.remove()
    return LayerInputs(hidden, kwargs), logits


def _final_norm(model: nn.Module) -> nn.Module:
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
    logits = model.get_output_embeddings()(_final_norm(model)(h)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# ---------------------------------------------------------------------------------------------- cache
class RowCache:
    """Append-only JSON-lines file of finished rows, next to a meta.json holding the key it was made for."""

    def __init__(self, directory: Path, key: dict):
        self.dir = directory
        self.rows_path = directory / "rows.jsonl"
        self.key = key
        directory.mkdir(parents=True, exist_ok=True)
        meta = directory / "meta.json"
        if meta.exists():
            try:
                stored = json.loads(meta.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ProfileCacheError(f"corrupt profile cache {meta} ({exc}); delete {directory} to re-profile") from exc
            if stored != key:
                raise ProfileCacheError(f"profile cache {directory} was written for another run; delete it")
        else:
            meta.write_text(json.dumps(key, indent=1, sort_keys=True))

    def load(self, valid_units: set[str], n_levels: int) -> dict[tuple[str, int], dict]:
        if not self.rows_path.exists():
            return {}
        raw = self.rows_path.read_bytes()
        lines = raw.split(b"\n")
        done = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            last = number == len(lines)                  # no newline after it: a write cut short by a kill
            try:
                row = json.loads(line)
                unit, level = row["unit"], int(row["level"])
                if unit not in valid_units or not 0 <= level < n_levels or not all(
                        isinstance(row[k], (int, float)) and math.isfinite(row[k]) for k in ("kl", "nll")):
                    raise ValueError(f"unexpected row {row}")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                if last:
                    logger.warning("ignoring a half-written last row in %s", self.rows_path)
                    break
                raise ProfileCacheError(f"corrupt profile cache {self.rows_path}, line {number} ({exc}); delete "
                                        f"{self.dir} to re-profile") from exc
            done[(unit, level)] = row
        if raw and not raw.endswith(b"\n"):
            self.rows_path.write_bytes(raw[:raw.rfind(b"\n") + 1])   # drop the fragment before appending
        return done

    def append(self, row: dict) -> None:
        with open(self.rows_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


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


def _unit_first_layer(projections, unit: str) -> int:
    return min(p.layer for p in unit_projections(projections, unit))


def _level_dicts(levels: pd.DataFrame) -> list[dict]:
    return [{"s": float(r.s), "rho": float(getattr(r, "rho", 1.0)), "bits": int(getattr(r, "bits", 16))}
            for r in levels.itertuples()]


def profile(model: nn.Module, method: Method, windows: torch.Tensor, levels: pd.DataFrame, units: list[str], *,
            mode: str = "isolated", operating_level: dict | None = None, batch_size: int = 8,
            score_last: float = 1.0, cache: Path | str | bool | None = True, progress: bool = True,
            on_row: Callable[[str, int], None] | None = None) -> Profile:
    """Measure every (unit, level) row; ``cache=True`` uses ``~/.cache/allocator/profiles/<key>``."""
    if mode not in MODES:
        raise ValueError(f"unknown profiling mode '{mode}'; use one of {MODES}")
    if mode == "operating_point" and operating_level is None:
        raise ValueError("mode='operating_point' needs operating_level={'s': ..., 'rho': ...}")
    level_dicts = _level_dicts(levels)
    projections = find_projections(model)
    first_layer = {u: _unit_first_layer(projections, u) for u in units}
    key = {"model": model_id(model), "dtype": str(next(model.parameters()).dtype), "method": method.options(),
           "calibration": getattr(method, "calibration_hash", None), "levels": level_dicts, "units": units,
           "mode": mode, "operating_level": operating_level if mode == "operating_point" else None,
           "data": windows_hash(windows), "windows": list(windows.shape), "score_last": score_last,
           "batch_size": batch_size}
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
    logger.info("profiling %s (%s): %d units x %d levels, %d rows to compute, %d cached", method.name, mode,
                len(units), len(level_dicts), len(todo), len(done))

    remove_compression_(model)
    try:
        if todo or need_base:
            dense_inputs, dense_logits = capture_layer_inputs(model, windows, batch_size)
            ref = [l[:, :-1].log_softmax(-1) for l in dense_logits]
            batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
            dense_nll = _sum_losses(dense_logits, batches, None, score_last)[0]
            inputs, base_nll, base_kl = dense_inputs, dense_nll, 0.0
            if base:                                   # operating point: cache the uniformly compressed run
                del dense_inputs.hidden[:]
                apply_allocation_(model, base, method)
                inputs, base_logits = capture_layer_inputs(model, windows, batch_size)
                base_nll, base_kl = _sum_losses(base_logits, batches, ref, score_last)
                del base_logits
            del dense_logits
            if need_base:
                row = {"unit": BASE, "level": 0, "kl": base_kl, "nll": base_nll, "dense_nll": dense_nll}
                done[(BASE, 0)] = row
                if rows:
                    rows.append(row)
            for unit, j in tqdm(todo, desc=f"profile {method.name}/{mode}", disable=not progress):
                apply_allocation_(model, {unit: level_dicts[j]}, method)
                logits = [run_from_layer(model, first_layer[unit], inputs, b) for b in range(len(batches))]
                nll, kl = _sum_losses(logits, batches, ref, score_last)
                remove_compression_(model, [p.name for p in unit_projections(projections, unit)])
                if unit in base:
                    apply_allocation_(model, {unit: base[unit]}, method)
                row = {"unit": unit, "level": j, "kl": kl, "nll": nll}
                done[(unit, j)] = row
                if rows:
                    rows.append(row)
                if on_row is not None:
                    on_row(unit, j)
    finally:
        remove_compression_(model)

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
                  "operating_level": key["operating_level"], "seed": method.seed}
    return Profile(units, levels, kl, nll, b["kl"], b["nll"], b["dense_nll"], mode, provenance)


def group_degradation(model: nn.Module, method: Method, windows: torch.Tensor, levels: pd.DataFrame,
                      spans: list[tuple[int, int]], metric: str = "kl", **options) -> dict[tuple[int, int], np.ndarray]:
    """Measured rows for groups of consecutive layers ``(first, last)`` sharing one level, in the form
    ``Problem(group_degradation=...)`` takes (interactions inside a group are measured, not summed)."""
    units = [f"layers.{a}-{b}" if a != b else f"layers.{a}" for a, b in spans]
    table = profile(model, method, windows, levels, units, **options).table(metric)
    return {span: table[i] for i, span in enumerate(spans)}


def _is_base_level(level: dict, mode: str, operating_level: dict | None) -> bool:
    if mode == "isolated":
        return level["s"] <= 0
    return all(abs(level.get(k, d) - operating_level.get(k, d)) < 1e-9 for k, d in (("s", 0.0), ("rho", 1.0)))


def _sum_losses(logits: list, batches: list, ref: list | None, score_last: float) -> tuple[float, float]:
    nll = kl = 0.0
    count = 0
    for b, (lg, ids) in enumerate(zip(logits, batches)):
        a, k, n = token_losses(lg, ids, None if ref is None else ref[b], score_last)
        nll, kl, count = nll + a, kl + k, count + n
    return nll / count, kl / count
