"""TEAL's block-wise greedy split as a baseline: per-projection sparsities inside each decoder block.

Source: TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models", arXiv 2408.14690),
its greedy optimization (``teal/greedyopt.py`` in FasterDecoding/TEAL), re-implemented here from the algorithm on
this library's pieces: the ``teal`` method's calibrated thresholds (``shared_inputs=False``: one statistic per
projection, so q, k and v may sit at different levels), ``Method.wrap`` for the wrappers and the decoder-layer
input capture of ``evaluators.profiling``.

Algorithm, per decoder block ``i`` (independently; the inputs of every block are the dense model's):

1. the block's dense output on the calibration windows is the reference;
2. every projection ``p`` (q k v o gate up down) starts at ``s_p = 0``; its step is
   ``base_step / rel_p`` with ``rel_p = size_p / mean size`` (weight elements), so every step removes about
   ``base_step * mean size`` bytes, i.e. raises the block's byte-weighted sparsity by ``base_step / n_proj``;
3. repeatedly, for every projection that can still move, try its step alone and measure the block output error
   (mean squared difference to the dense output over the last ``error_fraction`` of each window's tokens); keep
   the step with the least error;
4. each time the block's byte-weighted sparsity ``sum_p s_p size_p / sum_p size_p`` reaches a target of the grid
   (0.05 ... 0.9), record the current split: the per-block lookup table ``target -> {kind: s}``.

The model-level allocation at a budget (``teal_greedy_allocation``) puts every block at the budget sparsity
(TEAL does not trade sparsity between blocks), with the block's split from its greedy path, linearly
interpolated between the two consecutive greedy states that bracket the budget (so the byte-weighted sparsity
is the budget exactly; ``interpolate=False`` takes TEAL's table entry, up to one step above the budget).

Complexity: per block about ``n_proj * max_target / base_step`` greedy steps (SmolLM2, 7 projections, 0.9 at
0.05: 126 steps), each trying up to ``n_proj`` candidates of one block forward on the calibration tokens:
``~ n_proj**2 * max_target / base_step`` block forwards per block (882), i.e. ~ that many model forwards over
the whole model (the issue's CPU run of TEAL's own code: 59 min on SmolLM2-135M at 8 x 256 tokens).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from allocator.levels import Level
from allocator.result import Allocation

from .methods import Method, get_method
from .models import ModelError, Projection, decoder_layers, find_projections
from .plan import temporarily_dense
from .profiling import LayerInputs, capture_layer_inputs

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = tuple(round(0.05 * k, 2) for k in range(1, 19))      # 0.05 ... 0.9
_EPS = 1e-9


@dataclass
class TealGreedyTable:
    """Per block, the greedy path (every accepted step) and the lookup table on the target grid.

    ``path_s[i]``: (steps + 1, n_kinds) per-projection sparsities after each step (row 0: dense);
    ``path_sparsity[i]`` / ``path_error[i]``: the block's byte-weighted sparsity and output error after each step;
    ``sparsity``: (n_layers, n_targets, n_kinds), the split recorded when the block first reached each target;
    ``achieved`` / ``error``: (n_layers, n_targets), its byte-weighted sparsity and block output error."""

    kinds: tuple[str, ...]
    targets: tuple[float, ...]
    sizes: np.ndarray                    # (n_layers, n_kinds) weight elements
    sparsity: np.ndarray
    achieved: np.ndarray
    error: np.ndarray
    path_s: list[np.ndarray]
    path_sparsity: list[np.ndarray]
    path_error: list[np.ndarray]
    provenance: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.path_s)

    def split(self, layer: int, sparsity: float, interpolate: bool = True) -> dict[str, float]:
        """``{kind: s}`` of block ``layer`` at byte-weighted block sparsity ``sparsity``."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"the table has blocks 0..{self.n_layers - 1}, not {layer}")
        sparsity = float(sparsity)
        if not interpolate:
            hit = [j for j, t in enumerate(self.targets) if t >= sparsity - _EPS]
            if not hit or not np.isfinite(self.achieved[layer, hit[0]]):
                raise ValueError(f"no table entry at or above sparsity {sparsity} (targets {list(self.targets)})")
            return dict(zip(self.kinds, self.sparsity[layer, hit[0]].tolist()))
        reached = self.path_sparsity[layer]
        if sparsity > reached[-1] + _EPS:
            raise ValueError(f"block {layer}'s greedy path reaches {reached[-1]:.4f}, not {sparsity}: build the "
                             "table with a larger target")
        k = int(np.searchsorted(reached, sparsity - _EPS))       # first state at or above the budget
        if k == 0:
            return dict(zip(self.kinds, self.path_s[layer][0].tolist()))
        lo, hi = reached[k - 1], reached[k]
        w = 0.0 if hi <= lo else (sparsity - lo) / (hi - lo)
        s = (1 - w) * self.path_s[layer][k - 1] + w * self.path_s[layer][k]
        return dict(zip(self.kinds, np.clip(s, 0.0, 1.0).tolist()))

    def to_frame(self) -> pd.DataFrame:
        """One row per (block, target): the achieved sparsity, the block output error and ``s_<kind>``."""
        rows = []
        for i in range(self.n_layers):
            for j, target in enumerate(self.targets):
                rows.append({"layer": i, "target": target, "achieved": float(self.achieved[i, j]),
                             "error": float(self.error[i, j]),
                             **{f"s_{k}": float(v) for k, v in zip(self.kinds, self.sparsity[i, j])}})
        return pd.DataFrame(rows)


class BlockError:
    """The output error of one block with its projections at given sparsities, against its dense output: the mean
    squared difference over the last ``error_fraction`` of each window's tokens, the block's inputs dense.
    ``template``: the level whose rho and format every sparsity is applied with (default: rho 1, bf16)."""

    def __init__(self, method: Method, layer: nn.Module, row: list[Projection], inputs: LayerInputs, index: int,
                 error_fraction: float, template: Level = Level()):
        self.method, self.layer, self.row, self.index, self.template = method, layer, row, index, template
        self.batches = [(h[index], kw[index]) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        self.dense = [self._run(h, kw) for h, kw in self.batches]
        self.cut = [d.shape[-2] - max(1, math.ceil(error_fraction * d.shape[-2])) for d in self.dense]
        self.wrappers: dict[tuple[int, float], nn.Module] = {}
        self.calls = 0

    def _run(self, hidden, kwargs) -> torch.Tensor:
        out = self.layer(hidden, **kwargs)
        return (out[0] if isinstance(out, tuple) else out).float()

    def _wrapper(self, p: int, s: float) -> nn.Module:
        key = (p, round(float(s), 9))
        if key not in self.wrappers:                     # built while the slot holds the original linear
            proj = self.row[p]
            level = Level(s=float(s), rho=self.template.rho, fmt=self.template.fmt)
            (parent, attr, module), = self.method.wrap(proj, level)
            if (parent, attr) != (proj.parent, proj.attr):
                raise ModelError(f"method '{self.method.name}' wraps {attr}, not the projection {proj.name}; the "
                                 "TEAL greedy needs a method that wraps each projection (teal, rsparse)")
            self.wrappers[key] = module
        return self.wrappers[key]

    @torch.no_grad()
    def __call__(self, s: np.ndarray) -> float:
        self.calls += 1
        swap = [(self.row[p], self._wrapper(p, v)) for p, v in enumerate(s) if v > 0]
        originals = [(proj, getattr(proj.parent, proj.attr)) for proj, _ in swap]
        try:
            for proj, module in swap:
                setattr(proj.parent, proj.attr, module)
            total, count = 0.0, 0
            for (h, kw), dense, cut in zip(self.batches, self.dense, self.cut):
                diff = self._run(h, kw)[..., cut:, :] - dense[..., cut:, :]
                total += float(diff.double().pow(2).sum())
                count += diff.numel()
        finally:
            for proj, module in reversed(originals):
                setattr(proj.parent, proj.attr, module)
        return total / count


def _default_method(model: nn.Module, method, windows: torch.Tensor, batch_size: int) -> Method:
    if method is None:
        method = get_method("teal", shared_inputs=False)
    if method.needs_calibration and not method.stats:
        method.calibrate(model, windows, batch_size=batch_size)
    return method


def _check_options(targets, base_step: float, error_fraction: float, max_sparsity: float) -> tuple[float, ...]:
    targets = tuple(sorted(float(t) for t in targets))
    if not targets or targets[0] <= 0 or targets[-1] >= max_sparsity:
        raise ValueError(f"targets {list(targets)} must lie in (0, max_sparsity={max_sparsity})")
    if not 0 < base_step < 1:
        raise ValueError(f"base_step={base_step} must lie in (0, 1) (TEAL: 0.05)")
    if not 0 < error_fraction <= 1:
        raise ValueError(f"error_fraction={error_fraction} must lie in (0, 1] (TEAL: the last 25% of tokens)")
    return targets


@torch.no_grad()
def teal_greedy_table(model: nn.Module, method: Method | None, windows: torch.Tensor, *,
                      targets=DEFAULT_TARGETS, base_step: float = 0.05, error_fraction: float = 0.25,
                      max_sparsity: float = 0.99, batch_size: int = 4, layers=None) -> TealGreedyTable:
    """TEAL's greedy lookup table per block (see the module docstring) on calibration ``windows``.

    ``method``: a (calibrated) per-projection method, default ``get_method("teal", shared_inputs=False)``
    calibrated on ``windows`` (an uncalibrated one is calibrated on them). ``layers``: the blocks to optimize
    (default all; the others keep an empty path). The model is left as it was."""
    targets = _check_options(targets, base_step, error_fraction, max_sparsity)
    start = time.perf_counter()
    method = _default_method(model, method, windows, batch_size)
    blocks = decoder_layers(model)
    with temporarily_dense(model):
        rows = find_projections(model)
        kinds = tuple(p.kind for p in rows[0])
        if any(tuple(p.kind for p in row) != kinds for row in rows):
            raise ModelError("the TEAL greedy needs the same projection kinds in every block")
        inputs, _ = capture_layer_inputs(model, windows, batch_size)
        sizes = np.array([[p.d_in * p.d_out for p in row] for row in rows], dtype=float)
        n_l, n_t, n_k = len(rows), len(targets), len(kinds)
        table = TealGreedyTable(kinds, targets, sizes, np.full((n_l, n_t, n_k), np.nan), np.full((n_l, n_t), np.nan),
                                np.full((n_l, n_t), np.nan), [np.zeros((1, n_k)) for _ in rows],
                                [np.zeros(1) for _ in rows], [np.zeros(1) for _ in rows])
        calls = 0
        for i in (range(n_l) if layers is None else sorted(int(x) for x in layers)):
            error_of = BlockError(method, blocks[i], rows[i], inputs, i, error_fraction)
            share = sizes[i] / sizes[i].sum()
            steps = base_step * sizes[i].mean() / sizes[i]          # base_step / relative size
            s, t = np.zeros(n_k), 0
            path, spars, errs = [s.copy()], [0.0], [0.0]
            while t < n_t:
                best = None
                for p in range(n_k):
                    if s[p] >= max_sparsity - _EPS:
                        continue
                    trial = s.copy()
                    trial[p] = min(max_sparsity, s[p] + steps[p])
                    err = error_of(trial)
                    if best is None or err < best[0]:
                        best = (err, trial)
                if best is None:
                    break
                err, s = best
                reached = float(s @ share)
                path.append(s.copy())
                spars.append(reached)
                errs.append(err)
                while t < n_t and reached >= targets[t] - _EPS:
                    table.sparsity[i, t], table.achieved[i, t], table.error[i, t] = s, reached, err
                    t += 1
            table.path_s[i], table.path_sparsity[i] = np.array(path), np.array(spars)
            table.path_error[i] = np.array(errs)
            calls += error_of.calls
            logger.info("teal greedy: block %d, %d steps, %d block forwards", i, len(path) - 1, error_of.calls)
    table.provenance = {"algorithm": "teal_greedy (TEAL, arXiv 2408.14690)", "method": method.options(),
                        "windows": list(windows.shape), "base_step": base_step, "error_fraction": error_fraction,
                        "max_sparsity": max_sparsity, "block_forwards": calls,
                        "seconds": time.perf_counter() - start}
    return table


@torch.no_grad()
def block_output_error(model: nn.Module, method: Method, windows: torch.Tensor, layer: int,
                       sparsities: dict[str, float], *, error_fraction: float = 0.25, batch_size: int = 4) -> float:
    """The greedy's objective for one split: block ``layer``'s output error (mean squared difference to its dense
    output on the last ``error_fraction`` of tokens, dense inputs) with its projections at ``sparsities``."""
    with temporarily_dense(model):
        rows = find_projections(model)
        inputs, _ = capture_layer_inputs(model, windows, batch_size)
        error_of = BlockError(method, decoder_layers(model)[layer], rows[layer], inputs, layer, error_fraction)
        unknown = sorted(set(sparsities) - {p.kind for p in rows[layer]})
        if unknown:
            raise ValueError(f"unknown projection kinds {unknown}; block {layer} has {[p.kind for p in rows[layer]]}")
        return error_of(np.array([float(sparsities.get(p.kind, 0.0)) for p in rows[layer]]))


def teal_greedy_allocation(model: nn.Module, table: TealGreedyTable, sparsity: float, *,
                           interpolate: bool = True) -> Allocation:
    """Every block at byte-weighted sparsity ``sparsity``, split inside the block by ``table``: an ``Allocation``
    with one unit per projection (``layers.<i>.<kind>``), for ``CompressionPlan.build`` with a per-projection
    method (``get_method("teal", shared_inputs=False)``). ``level_index`` indexes ``metadata["level_grid"]``
    (the distinct sparsities used, ascending)."""
    rows = find_projections(model)
    if len(rows) != table.n_layers or tuple(p.kind for p in rows[0]) != table.kinds:
        raise ModelError(f"the table was built for {table.n_layers} blocks of {list(table.kinds)}; the model has "
                         f"{len(rows)} blocks of {[p.kind for p in rows[0]]}")
    units, layers, kinds, levels, removed = [], [], [], [], 0.0
    for i, row in enumerate(rows):
        split = table.split(i, sparsity, interpolate=interpolate)
        removed += sum(split[k] * size for k, size in zip(table.kinds, table.sizes[i]))
        for proj in row:
            units.append(f"layers.{i}.{proj.kind}")
            layers.append(i)
            kinds.append([proj.kind])
            levels.append(Level(s=round(split[proj.kind], 9)))
    grid = sorted(set(levels))
    achieved = removed / table.sizes.sum()
    return Allocation(units=units, layers=layers, level_index=[grid.index(lv) for lv in levels], levels=levels,
                      kinds=kinds, metadata={"solver": "teal_greedy", "budget_sparsity": float(sparsity),
                                             "byte_weighted_sparsity": float(achieved), "interpolate": interpolate,
                                             "level_grid": [lv.to_dict() for lv in grid],
                                             "table": {k: v for k, v in table.provenance.items()}})
