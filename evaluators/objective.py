"""The measured objective: apply a candidate allocation to the real model and measure it on calibration windows.

Search solvers (evolutionary, Bayesian) call it instead of, or beside, the additive table. The dense model's
log-probabilities are computed once; repeated candidates are answered from a memo. ``fidelity`` (the number of
windows to score, the first ones) lets a solver screen candidates cheaply (EvoPress's multi-step selection).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from allocator.levels import Level

from .methods import Method, get_method
from .metrics import kl_top_k_for, logits_of, reference_logprobs, token_losses, window_losses
from .plan import CompressionPlan, Target, allocation_targets, compressed, temporarily_dense

logger = logging.getLogger(__name__)


class MeasuredObjective:
    """``objective(allocation) -> float``: KL(dense || compressed) per token (``metric="kl"``) or perplexity.

    Accepts an ``Allocation``, ``(Target, Level)`` pairs, or a vector of level indices when ``tables`` is given
    (``objective.batch(X)`` for a population, shape (P, n_units)). ``objective(x, fidelity=k)`` scores the first
    ``k`` windows only (None: all); the memo keys include the fidelity. ``per_window=True`` returns one value per
    window (an array: what the search solvers' validation step uses for its paired test). Above ``kl_exact_vocab``
    tokens the KL is the top-``kl_top_k`` one of profiling (``metrics.kl_top_k_for``; defaults ``ProfileConfig``).
    ``expand`` (``block_split.BlockSplit``): each unit's level is applied as its within-block split.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, method: Method | str, metric: str = "kl", *,
                 tables=None, batch_size: int = 8, score_last: float = 1.0, per_window: bool = False,
                 kl_top_k="auto", kl_exact_vocab: int | None = None, expand=None):
        if metric not in ("kl", "ppl", "perplexity", "nll"):
            raise ValueError(f"unknown metric '{metric}'; use 'kl', 'ppl' or 'nll'")
        self.model, self.windows, self.metric, self.tables, self.expand = model, windows, metric, tables, expand
        self.method = get_method(method) if isinstance(method, str) else method
        self.batch_size, self.score_last, self.per_window = batch_size, score_last, per_window
        self.memo: dict[tuple, float] = {}   # (allocation key, windows used) -> value
        self.evaluations = self.hits = 0
        self.evaluations_by_fidelity: dict[int, int] = {}
        self.seconds = 0.0
        self._batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        with temporarily_dense(model):
            self.kl_top_k = kl_top_k_for(model, kl_top_k, kl_exact_vocab)   # None: the exact KL
            self._ref = [reference_logprobs(logits_of(model, ids), self.kl_top_k) for ids in self._batches]

    def _pairs(self, candidate) -> list[tuple[Target, Level]]:
        pairs = self._unit_pairs(candidate)
        return self.expand.expand(pairs) if self.expand is not None else pairs

    def _unit_pairs(self, candidate) -> list[tuple[Target, Level]]:
        if hasattr(candidate, "units") and hasattr(candidate, "levels") or isinstance(candidate, list) and \
                candidate and isinstance(candidate[0], tuple):
            return allocation_targets(candidate)
        if self.tables is None:
            raise TypeError("a level-index vector needs MeasuredObjective(..., tables=tables)")
        idx = np.asarray(candidate, dtype=int).ravel()
        if idx.shape != (self.tables.n_units,):
            raise ValueError(f"expected {self.tables.n_units} level indices, got shape {idx.shape}")
        rows = self.tables.levels.iloc[idx]
        return [(Target.from_unit(u), Level(float(r.s), float(r.rho), fmt=str(r.fmt)))
                for u, r in zip(self.tables.units, rows.itertuples())]

    @staticmethod
    def _key(pairs: list[tuple[Target, Level]]) -> tuple:
        return tuple(sorted((target.members, level.key()) for target, level in pairs))

    def _windows_used(self, fidelity: int | None) -> int:
        if fidelity is None:
            return len(self.windows)
        if not 1 <= int(fidelity) <= len(self.windows):
            raise ValueError(f"fidelity must be between 1 and the {len(self.windows)} windows, got {fidelity}")
        return int(fidelity)

    def __call__(self, candidate, fidelity: int | None = None) -> float | np.ndarray:
        pairs = self._pairs(candidate)
        n_windows = self._windows_used(fidelity)
        key = (self._key(pairs), n_windows)
        if key in self.memo:
            self.hits += 1
            return self.memo[key]
        t0 = time.perf_counter()
        parts = []  # (nll, kl, tokens) per window, or per batch when one value is wanted
        with compressed(self.model, CompressionPlan.build(self.model, self.method, pairs)):
            for start, ids, ref in zip(range(0, n_windows, self.batch_size), self._batches, self._ref):
                take = min(len(ids), n_windows - start)  # the last batch is cut at the fidelity
                logits = logits_of(self.model, ids[:take])
                if self.per_window:
                    parts += [tuple(row) for row in window_losses(logits, ids[:take], ref, self.score_last)]
                else:
                    parts.append(token_losses(logits, ids[:take], ref[:take], self.score_last))
        nll, kl, count = (np.array(col, dtype=float) for col in zip(*parts))
        if not self.per_window:
            nll, kl, count = nll.sum(), kl.sum(), count.sum()
        value = {"kl": kl / count, "nll": nll / count}.get(self.metric, np.exp(nll / count))
        value = value if self.per_window else float(value)
        self.memo[key] = value
        self.evaluations += 1
        self.evaluations_by_fidelity[n_windows] = self.evaluations_by_fidelity.get(n_windows, 0) + 1
        self.seconds += time.perf_counter() - t0
        return value

    def batch(self, population, fidelity: int | None = None) -> np.ndarray:
        """Values for a population of level-index vectors (P, n_units)."""
        return np.array([self(x, fidelity) for x in np.atleast_2d(population)])
