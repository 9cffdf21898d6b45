"""The hybrid allocation's within-block stage: per unit and unit sparsity, the best split over its projections.

TEAL's greedy (``evaluators.teal_greedy``) wins by splitting a block's sparsity unevenly over q, k, v, o, gate,
up and down on the block's own output error; this project's dp wins by trading sparsity between layers on the
model's output KL. The hybrid does both, in two stages with two objectives:

1. **within a unit** (a decoder layer, or its attention / MLP block): a block-local table, the block's output
   error (TEAL's objective: mean squared difference to the dense block output over the last
   ``error_fraction`` of tokens, dense inputs) with one projection at a time on a fine s grid
   (``block_errors``); for each unit sparsity ``t`` the split minimising the summed block errors subject to the
   unit's byte-weighted sparsity >= ``t`` is solved exactly with this library's ``milp`` on that small table
   (``BlockSplit.split``);
2. **across units** (``stages``): the model's KL is profiled with each unit at each level ``t`` applied as its
   split (``profiling.profile(expand=...)``), the costs are re-priced by the splits actually applied
   (``BlockSplit.price``), and the configured cross-layer solver (dp, milp, ...) allocates the unit sparsities;
   the result is expanded to one level per projection (``BlockSplit.on_projections``).

Cost: stage 1 takes ``n_layers x n_kinds x (n_s - 1)`` block forwards on the calibration windows (SmolLM2-135M,
7 kinds, 0.05 steps to 0.9: 3,780, against TEAL's greedy ~26,000), cached on disk per layer; each split is one
milp over ``n_kinds x n_s`` binaries (milliseconds), memoised.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from allocator import Allocation, Problem, Tables, minimize
from allocator.cache import cache_dir
from allocator.costs import COST_KINDS, analytic_tables, projection_costs
from allocator.levels import Level, make_levels
from allocator.tables import TablesError, Unit

from .methods import Method
from .models import ModelError, decoder_layers, find_projections, model_id, weights_fingerprint
from .plan import Target, temporarily_dense
from .profiling import capture_layer_inputs
from .teal_greedy import BlockError
from .text import windows_hash

logger = logging.getLogger(__name__)
SPLIT_SOLVERS = ("milp",)


@dataclass
class BlockErrors:
    """``error[i, k, j]``: block ``i``'s output error with only projection ``kinds[k]`` at ``s_grid[j]``."""

    kinds: tuple[str, ...]
    s_grid: np.ndarray                  # (n_s,), starts at 0
    sizes: np.ndarray                   # (n_layers, n_kinds) weight elements
    shapes: list[dict]                  # per layer: kind -> (d_out, d_in)
    error: np.ndarray                   # (n_layers, n_kinds, n_s)
    template: Level = Level()
    provenance: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        n_l, n_k, n_s = self.error.shape
        return pd.DataFrame({"layer": np.repeat(np.arange(n_l), n_k * n_s),
                             "kind": np.tile(np.repeat(list(self.kinds), n_s), n_l),
                             "s": np.tile(self.s_grid, n_l * n_k), "error": self.error.ravel()})


def _check_grid(step: float, max_s: float) -> np.ndarray:
    if not 0 < step <= 0.5:
        raise ValueError(f"profile.split_step={step} must lie in (0, 0.5] (e.g. 0.05)")
    if not step <= max_s < 1:
        raise ValueError(f"profile.split_max={max_s} must lie in [split_step, 1) (e.g. 0.9)")
    n = int(np.floor(max_s / step + 1e-9))
    return np.round(np.arange(n + 1) * step, 9)


@torch.no_grad()
def block_errors(model: nn.Module, method: Method, windows: torch.Tensor, *, step: float = 0.05, max_s: float = 0.9,
                 error_fraction: float = 0.25, template: Level = Level(), batch_size: int = 4,
                 cache: Path | str | bool | None = True, progress: bool = True) -> BlockErrors:
    """The block-local table of stage 1 (module docstring) on calibration ``windows``, for every layer; finished
    layers are cached (``~/.cache/allocator/block_errors/<key>.npz`` for ``cache=True``) and never recomputed."""
    s_grid = _check_grid(step, max_s)
    if not 0 < error_fraction <= 1:
        raise ValueError(f"profile.split_error_fraction={error_fraction} must lie in (0, 1] (TEAL: 0.25)")
    if not template.format.is_dense:
        raise ValueError(f"the within-block split measures sparsity alone; level format '{template.fmt}' is "
                         "quantized: use a grid of one dense format (method.levels.fmt=[bf16]) with profile.split")
    start = time.perf_counter()
    with temporarily_dense(model):
        rows = find_projections(model)
        kinds = tuple(p.kind for p in rows[0])
        if any(tuple(p.kind for p in row) != kinds for row in rows):
            raise ModelError("the within-block split needs the same projection kinds in every layer")
        shapes = [{p.kind: (p.d_out, p.d_in) for p in row} for row in rows]
        sizes = np.array([[p.d_out * p.d_in for p in row] for row in rows], dtype=float)
        key = {"model": model_id(model), "weights": weights_fingerprint(model), "method": method.options(),
               "calibration": getattr(method, "calibration_hash", None), "data": windows_hash(windows),
               "windows": list(windows.shape), "s": s_grid.tolist(), "error_fraction": error_fraction,
               "template": template.to_dict(), "batch_size": batch_size}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = None if not cache else (cache_dir() / "block_errors" if cache is True else Path(cache)) / f"{digest}.npz"
        error, done = _load(path, (len(rows), len(kinds), len(s_grid)))
        todo = [i for i in range(len(rows)) if not done[i]]
        if todo:
            inputs, _ = capture_layer_inputs(model, windows, batch_size, logits=False)
            blocks = decoder_layers(model)
            for i in tqdm(todo, desc="block errors", disable=not progress):
                error_of = BlockError(method, blocks[i], rows[i], inputs, i, error_fraction, template)
                for k in range(len(kinds)):
                    for j, s in enumerate(s_grid[1:], start=1):
                        trial = np.zeros(len(kinds))
                        trial[k] = s
                        error[i, k, j] = error_of(trial)
                done[i] = True
                if path is not None:
                    _save(path, error, done, key)
    return BlockErrors(kinds, s_grid, sizes, shapes, error, template,
                       {"key": digest, "block_forwards": len(todo) * len(kinds) * (len(s_grid) - 1),
                        "cached_layers": len(rows) - len(todo), "seconds": time.perf_counter() - start,
                        "tokens": int(windows.numel()), "error_fraction": error_fraction})


def _load(path: Path | None, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    error, done = np.zeros(shape), np.zeros(shape[0], dtype=bool)
    if path is None or not path.exists():
        return error, done
    try:
        with np.load(path) as saved:
            if saved["error"].shape == shape and saved["done"].shape == (shape[0],):
                return saved["error"].copy(), saved["done"].copy()
        logger.warning("block-error cache %s has other shapes; recomputing", path)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("block-error cache %s is unreadable (%s); recomputing it", path, exc)
    return error, done


def _save(path: Path, error: np.ndarray, done: np.ndarray, key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, error=error, done=done, key=json.dumps(key, sort_keys=True))
    tmp.replace(path)


class BlockSplit:
    """Stage 1's answer: ``split(layer, kinds, t) -> {kind: s}``, and the joins to stage 2 (profile, price,
    expand)."""

    def __init__(self, errors: BlockErrors, solver: str = "milp"):
        if solver not in SPLIT_SOLVERS:
            raise ValueError(f"unknown within-block split solver '{solver}'; use one of {SPLIT_SOLVERS}")
        self.errors, self.solver = errors, solver
        self._memo: dict[tuple, dict[str, float]] = {}
        self.seconds = 0.0

    @property
    def key(self) -> str:
        """What the profiling cache keys on: the block-error table and the split solver."""
        return f"{self.errors.provenance['key']}:{self.solver}"

    def split(self, layer: int, kinds, t: float) -> dict[str, float]:
        """The least summed block error split of ``kinds`` of ``layer`` with byte-weighted sparsity >= ``t``."""
        kinds = tuple(kinds) or self.errors.kinds
        key = (int(layer), kinds, round(float(t), 9))
        if key not in self._memo:
            start = time.perf_counter()
            self._memo[key] = self._solve(*key)
            self.seconds += time.perf_counter() - start
        return self._memo[key]

    def _solve(self, layer: int, kinds: tuple[str, ...], t: float) -> dict[str, float]:
        e = self.errors
        if not 0 <= layer < len(e.sizes):
            raise ModelError(f"the block-error table has layers 0..{len(e.sizes) - 1}, not {layer}")
        unknown = sorted(set(kinds) - set(e.kinds))
        if unknown:
            raise ModelError(f"unknown projection kinds {unknown}; the block-error table has {list(e.kinds)}")
        if t <= 1e-9:
            return {k: 0.0 for k in kinds}
        if t > e.s_grid[-1] + 1e-9:
            raise TablesError(f"unit sparsity {t} lies above the split grid's {e.s_grid[-1]}: raise "
                              "profile.split_max")
        idx = [e.kinds.index(k) for k in kinds]
        units = [Unit(f"{k}", layer, (k,), int(e.sizes[layer, i])) for k, i in zip(kinds, idx)]
        costs = np.array([[e.sizes[layer, i] * (1.0 - s) for s in e.s_grid] for i in idx])
        tables = Tables(units, make_levels(s=e.s_grid.tolist()), {"elements": costs}, e.error[layer][idx])
        quiet = logging.getLogger("allocator.solvers.base")      # hundreds of tiny solves: no line each
        was, quiet.disabled = quiet.disabled, True
        try:
            result = minimize(Problem(tables, "elements", sparsity=float(t)), self.solver)
        finally:
            quiet.disabled = was
        return {k: float(e.s_grid[j]) for k, j in zip(kinds, result.allocation.level_index)}

    # -------------------------------------------------------------------------------- joins to stage 2
    def expand(self, pairs) -> list[tuple[Target, Level]]:
        """(unit Target, unit Level) pairs -> one (projection Target, Level) pair per member projection."""
        out = []
        for target, level in pairs:
            level = Level.from_mapping(level)
            for layer, kinds in target.members:
                for kind, s in self.split(layer, kinds, level.s).items():
                    out.append((Target.of(layer, (kind,)), Level(s=s, rho=level.rho, fmt=level.fmt)))
        return out

    def price(self, tables: Tables, tokens: int) -> Tables:
        """``tables`` with every analytic cost (``COST_KINDS``) re-priced by the split each (unit, level) applies (a
        split's byte-weighted sparsity is >= its nominal level); measured kinds (latency) stay as measured."""
        priced = [[self._costs(u, lv, tokens) for lv in tables.level_objects()] for u in tables.units]
        costs = {kind: (np.array([[cell[kind] for cell in row] for row in priced]) if kind in COST_KINDS else matrix)
                 for kind, matrix in tables.costs.items()}
        return Tables(tables.units, tables.levels, costs, tables.degradation,
                      {**tables.provenance, "split": self.describe()})

    def _costs(self, unit: Unit, level: Level, tokens: int) -> dict[str, float]:
        shapes, out = self.errors.shapes[unit.layer], dict.fromkeys(COST_KINDS, 0.0)
        for k, s in self.split(unit.layer, unit.kinds, level.s).items():
            for kind, value in projection_costs(*shapes[k], Level(s=s, rho=level.rho, fmt=level.fmt), tokens).items():
                out[kind] += value
        return out

    def on_projections(self, model_config: dict, allocations: dict[str, Allocation],
                       budget_level: Level | None) -> tuple[dict[str, Allocation], Tables]:
        """The unit allocations as per-projection ones, priced by projection tables on the levels they use:
        "uniform" is every projection at ``budget_level`` (its nominal level, unsplit); every other allocation
        is expanded by its splits."""
        per = {}
        for name, alloc in allocations.items():
            pairs = [(Target.of(layer, kinds, unit), lv) for unit, layer, kinds, lv
                     in zip(alloc.units, alloc.layers, alloc.kinds, alloc.levels)]
            if name == "uniform" and budget_level is not None:
                per[name] = [(Target.of(layer, (kind,)), budget_level) for t, _ in pairs
                             for layer, kinds in t.members for kind in (kinds or self.errors.kinds)]
            else:
                per[name] = self.expand(pairs)
        grid = sorted({lv for pairs in per.values() for _, lv in pairs} | {Level()})
        levels = pd.DataFrame([lv.to_dict() for lv in grid])
        ptables = analytic_tables(model_config, levels, unit="projection", projections=self.errors.kinds)
        index = {u.name: i for i, u in enumerate(ptables.units)}
        out = {}
        for name, pairs in per.items():
            chosen = np.full(ptables.n_units, grid.index(Level()))
            for target, lv in pairs:
                chosen[index[target.name]] = grid.index(lv)
            meta = {k: v for k, v in allocations[name].metadata.items() if k not in ("tables_hash",)}
            out[name] = Allocation.from_levels(ptables, chosen, **meta, split=self.describe(),
                                               unit_allocation=allocations[name].to_frame().to_dict("records"))
        return out, ptables

    def describe(self) -> dict:
        e = self.errors
        return {"solver": self.solver, "objective": "block output error (TEAL), summed over projections",
                "s_step": float(e.s_grid[1]), "s_max": float(e.s_grid[-1]), **e.provenance,
                "split_seconds": round(self.seconds, 3)}

    def to_frame(self) -> pd.DataFrame:
        """Every split solved so far: layer, kinds, nominal t, the achieved byte-weighted sparsity, s_<kind>."""
        rows = []
        for (layer, kinds, t), split in sorted(self._memo.items()):
            size = {k: self.errors.sizes[layer, self.errors.kinds.index(k)] for k in kinds}
            achieved = sum(split[k] * size[k] for k in kinds) / sum(size.values())
            rows.append({"layer": layer, "kinds": "+".join(kinds), "t": t, "achieved": achieved,
                         **{f"s_{k}": v for k, v in split.items()}})
        return pd.DataFrame(rows)
