"""The validation guard of the search solvers: keep the warm start unless a candidate beats it on held-aside windows.

A search of a few hundred evaluations on a few hundred tokens overfits its fitness windows, and elitism guards
only those. ``choose_by_validation`` re-scores the best few candidates and the warm starts on a *validation*
callable (other windows) and returns a start unless a candidate wins there, by more than ``z`` standard errors
of the per-window differences when the callable returns one value per window (a paired test).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)


def choose_by_validation(candidates, starts, validation: Callable, z: float = 2.0) -> tuple[np.ndarray, dict]:
    """Pick the answer on held-aside windows: a start unless a search candidate beats every start there.

    ``candidates``: the search's best few per-unit level vectors (best fitness first); ``starts``: the warm-start
    vectors (may be empty: then the best candidate on validation wins). Each distinct vector costs one
    ``validation`` call. A float-valued ``validation`` compares means. One that returns a value per validation
    window (an array) makes it a paired test: the best candidate (by mean) replaces the best start only if its
    mean improvement exceeds ``z`` standard errors of the per-window differences, so validation noise alone does
    not move the answer away from the start. Returns the chosen vector and a record of the decision.
    """
    t0 = time.perf_counter()
    scored: dict[bytes, np.ndarray] = {}

    def value(x):
        key = np.asarray(x, dtype=int).tobytes()
        if key not in scored:
            scored[key] = np.atleast_1d(np.asarray(validation(np.asarray(x, dtype=int).copy()), dtype=float))
        return scored[key]

    cand_vals = [value(x) for x in candidates]
    start_vals = [value(x) for x in starts]
    cand_values, start_values = [float(v.mean()) for v in cand_vals], [float(v.mean()) for v in start_vals]
    best_start = int(np.argmin(start_values)) if starts else None
    best_cand = int(np.argmin(cand_values)) if candidates else None
    margin = 0.0
    if best_start is not None and best_cand is not None and cand_vals[best_cand].size > 1:
        diff = start_vals[best_start] - cand_vals[best_cand]  # > 0 where the candidate is better
        margin = float(z * diff.std(ddof=1) / np.sqrt(diff.size))
    keep_start = best_start is not None and (
        best_cand is None or start_values[best_start] - cand_values[best_cand] <= margin)
    chosen = np.asarray(starts[best_start] if keep_start else candidates[best_cand], dtype=int)
    record = {"candidate_values": cand_values, "start_values": start_values, "margin": margin,
              "chosen": "start" if keep_start else f"candidate {best_cand}", "evals": len(scored),
              "seconds": time.perf_counter() - t0}
    logger.info("validation: candidates %s, starts %s, margin %.5f -> %s", np.round(cand_values, 5),
                np.round(start_values, 5), margin, record["chosen"])
    return chosen, record
