"""Seeded synthetic degradation tables: realistic shapes for demos, tests and scaling studies (no model needed).

Per unit, degradation grows convexly with sparsity, scaled by a layer sensitivity that is U-shaped over depth
(first and last layers are the most sensitive, as measured by OWL / AlphaPruning and in our SmolLM2 profiles)
with log-normal noise; a sparse-rank ratio rho < 1 recovers part of the loss, fewer bits add a term that
doubles per bit removed.
"""
from __future__ import annotations

import numpy as np

from .tables import Tables


def synthetic_degradation(tables: Tables, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    rng = np.random.default_rng(seed)
    depth = tables.layers / max(1, tables.layers.max())
    sensitivity = scale * (1.0 + 2.5 * (2 * depth - 1) ** 4) * rng.lognormal(0.0, 0.35, tables.n_units)
    s = tables.levels["s"].to_numpy()
    rho = tables.levels["rho"].to_numpy()
    bits = tables.levels["bits"].to_numpy()
    sparsity_term = s ** 2 + 2.0 * s ** 6
    low_rank_relief = 1.0 - 0.35 * (1.0 - rho) * (rho > 0)
    bits_term = 0.02 * 2.0 ** (8 - np.clip(bits, 2, 16)) * (bits < 16)
    return sensitivity[:, None] * (sparsity_term * low_rank_relief + bits_term)[None, :]


def synthetic_tables(tables: Tables, seed: int = 0, scale: float = 0.01) -> Tables:
    return tables.with_degradation(synthetic_degradation(tables, seed, scale), metric="synthetic", seed=seed)
