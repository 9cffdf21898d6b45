"""The measure stage: held-out perplexity, KL to dense and realized sparsity of each plan, the additivity audit
on the profiling windows, memory, and optional lm-eval tasks.

``compare(model, windows, plans)`` streams the windows once: per batch the dense logits are computed once and
every plan is scored against them (``metrics.token_losses``); a ``SparsityMeter`` counts what each plan zeroes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .calibration import SparsityMeter
from .metrics import logits_of, memory, window_losses
from .plan import CompressionPlan, compressed, temporarily_dense


@dataclass
class Measurements:
    frame: pd.DataFrame                      # one row per allocation (dense, uniform, the solver's)
    memory: dict = field(default_factory=dict)
    zeroshot: dict = field(default_factory=dict)
    speed: dict | str = ""                   # decode_speed's rows, or why it was not measured
    per_window: dict = field(default_factory=dict)   # {source: {allocation: (n_windows, 3) nll, kl, tokens}}


def decode_speed_or_reason(config, model, plans: dict[str, CompressionPlan]) -> dict | str:
    """Decode tokens/s of dense and every plan through the Triton runtime, when the model is on a GPU; else
    (or when the runtime cannot run the model or plan) the reason, said plainly in the report."""
    e = config.evaluator
    on_gpu = next(model.parameters()).device.type == "cuda"
    if e.speed == "off" or (e.speed == "auto" and not on_gpu):
        return "not measured: the model is not on a GPU (model.device=cuda measures decode tokens/s)" \
            if e.speed == "auto" else "not measured (evaluator.speed=off)"
    from .runtime import RuntimeUnsupported, decode_speed
    try:
        return decode_speed(model, plans=plans, prompt_len=e.speed_prompt)
    except RuntimeUnsupported as exc:
        if e.speed == "on":
            raise
        return f"not measured: {exc}"


@torch.no_grad()
def compare(model, windows: torch.Tensor, plans: dict[str, CompressionPlan], batch_size: int = 4,
            score_last: float = 1.0) -> dict[str, dict]:
    """``{name: {perplexity, kl, tokens, realized_sparsity, per_window}}`` for "dense" and every plan, on the same
    windows; ``per_window`` lists (summed NLL, summed KL, scored tokens) per window."""
    rows = {name: [] for name in ["dense", *plans]}
    meters = {name: None for name in plans}
    with temporarily_dense(model):
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size]
            dense = logits_of(model, ids)
            ref = dense[:, :-1].log_softmax(-1)
            rows["dense"].append(window_losses(dense, ids, None, score_last))
            del dense
            for name, plan in plans.items():
                meters[name] = meters[name] or SparsityMeter(model)
                with compressed(model, plan), meters[name]:
                    rows[name].append(window_losses(logits_of(model, ids), ids, ref, score_last))
    out = {}
    for name, parts in rows.items():
        per_window = np.concatenate(parts)
        nll, kl, n = per_window.sum(axis=0)
        out[name] = {"perplexity": math.exp(nll / n), "kl": kl / n, "tokens": int(n),
                     "per_window": per_window.tolist()}       # JSON-able (studies save these results)
    out["dense"]["realized_sparsity"] = 0.0
    for name, meter in meters.items():
        out[name]["realized_sparsity"] = meter.share() if meter is not None else float("nan")
    return out


def predicted_cost(tables, allocation, kind: str) -> float:
    """The table's sum for an allocation (None: dense) in cost kind ``kind``."""
    if allocation is None:
        known = kind in tables.provenance.get("dense_costs", {}) or tables.dense_level() is not None
        return float(tables.dense_cost(kind).sum()) if known else float("nan")
    return float(tables.cost(kind)[np.arange(tables.n_units), allocation.level_index].sum())


def model_sparsity(tables, allocation) -> float:
    """Share of the dense projection bytes the allocation does not read, priced by the solver's own Tables."""
    return 1.0 - predicted_cost(tables, allocation, "bytes_decode") / float(tables.dense_cost("bytes_decode").sum())


def measure(config, model, tokenizer, plans: dict[str, CompressionPlan], windows, tables, solution) -> Measurements:
    e, metric = config.evaluator, config.profile.metric
    audit = compare(model, windows.profile, plans, e.batch_size, e.score_last)
    held_out = {src: compare(model, w, plans, e.batch_size, e.score_last) for src, w in windows.evaluation.items()}
    rows = []
    for name in ["dense", *plans]:
        alloc = solution.allocations.get(name)
        row = {"allocation": name, "model_sparsity": model_sparsity(tables, alloc) if alloc else 0.0,
               "predicted": solution.predicted.get(name, 0.0),
               f"measured_{metric}_calib": audit[name]["kl"] if metric == "kl"
               else audit[name]["perplexity"] - audit["dense"]["perplexity"]}
        for src, res in held_out.items():
            row.update({f"ppl_{src}": res[name]["perplexity"], f"kl_{src}": res[name]["kl"],
                        f"realized_{src}": res[name]["realized_sparsity"]})
        rows.append(row)
    out = Measurements(pd.DataFrame(rows), per_window={src: {name: r["per_window"] for name, r in res.items()}
                                                       for src, res in held_out.items()})
    out.speed = decode_speed_or_reason(config, model, plans)
    if isinstance(out.speed, dict):
        for column in ("tokens_per_s", "speedup", "step_ms", "prefill_ms"):
            out.frame[column] = [out.speed[name][column] for name in out.frame["allocation"]]
    if "latency_decode" in tables.costs:     # the timing twin of the additivity audit: table sum vs measured
        out.frame["predicted_gemv_us"] = [predicted_cost(tables, solution.allocations.get(name), "latency_decode")
                                          for name in out.frame["allocation"]]
    if e.memory:
        with compressed(model, plans[config.solver.name]):
            out.memory = memory(model)
    if e.zeroshot.tasks:
        out.zeroshot = zeroshot_all(model, tokenizer, plans, e.zeroshot)
    return out


def zeroshot_all(model, tokenizer, plans: dict[str, CompressionPlan], zs) -> dict:
    """lm-eval tasks for the dense model and each plan (tasks need the hub unless they are custom)."""
    from .zeroshot import run_zeroshot

    def run():
        return run_zeroshot(model, tokenizer, list(zs.tasks), limit=zs.limit, include_path=zs.include_path)

    with temporarily_dense(model):
        out = {"dense": run()}
        for name, plan in plans.items():
            with compressed(model, plan):
                out[name] = run()
    return out
