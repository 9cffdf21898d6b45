"""Plots that return a matplotlib Figure (never shown): the per-layer allocation and solver convergence."""
from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_allocation(allocations: dict, title: str = "per-layer allocation"):
    """One line per named allocation: sparsity s per unit over depth (rho and bits shown when they vary)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6), constrained_layout=True)
    for label, alloc in allocations.items():
        s = np.array([lv.s for lv in alloc.levels])
        x = np.arange(len(s)) if len(set(alloc.layers)) != len(s) else np.array(alloc.layers)
        ax.step(x, s, where="mid", label=label, linewidth=1.6)
        rho = np.array([lv.rho for lv in alloc.levels])
        if (rho < 1).any():
            ax.scatter(x[rho < 1], s[rho < 1], marker="v", s=14, label=f"{label}: rho < 1")
    ax.set_xlabel("layer" if all(len(set(a.layers)) == len(a.layers) for a in allocations.values()) else "unit")
    ax.set_ylabel("sparsity s")
    ax.set_ylim(-0.02, 1.0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_convergence(histories: dict, ylabel: str = "best objective", title: str = "convergence"):
    """Best-so-far value against evaluations, one line per solver: ``{name: (evals, values)}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    for label, (evals, values) in histories.items():
        ax.plot(evals, np.minimum.accumulate(np.asarray(values, dtype=float)), label=label, marker=".", markersize=3)
    ax.set_xlabel("evaluations")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
