"""The options ``evo`` and ``bayes`` share: the fitness, the search budget, warm start, repair and validation.

A budget must be positive: ``max_evals=0`` or ``max_time=0`` would end the search before any candidate is
scored, which is a mistake in the call, not an infeasible problem.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._warm_start import TABLE_STARTS
from .options import BOOL, CALLABLE, LEVEL_VECTORS, NONE, SolverOptions, integer, one_of, option, real


@dataclass(frozen=True)
class SearchOptions(SolverOptions):
    """Options common to the search solvers (each adds its own)."""

    RENAMED = {"objective": "fitness"}

    max_evals: int | None = option(None, NONE | integer(1), "objective evaluations; None: no count limit")
    max_time: float | None = option(None, NONE | real(0, low_open=True), "wall-clock seconds; None: no time limit")
    fitness: object = option("auto", one_of("auto", "table", "measured") | CALLABLE,
                             "what candidates are scored on: the tables or the Problem's measured_objective")
    fidelity: int | None = option(None, NONE | integer(1), "calibration windows per measured evaluation; None: all")
    warm_start: object = option(None, NONE | one_of(*TABLE_STARTS, "none") | LEVEL_VECTORS,
                                "a table solver's answer or explicit level vectors joins the first candidates")
    repair: bool = option(True, BOOL, "project over-budget candidates onto the budget")
    validation: object = option(None, NONE | CALLABLE, "callable(unit_levels) on held-aside windows picks the answer")
    validation_z: float = option(2.0, real(0), "standard errors a candidate must win by on per-window validation")
    validation_top: int = option(5, integer(1), "best candidates re-scored on validation")
    progress: bool = option(True, BOOL, "tqdm progress bar")
