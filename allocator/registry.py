"""Solver registry: built-ins register by decorator; third-party solvers through the ``allocator.solvers`` entry points."""
from __future__ import annotations

import difflib
import importlib
import logging
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "allocator.solvers"
BUILTIN_SOLVER_MODULES = {
    "dp": "allocator.solvers.dp",
    "milp": "allocator.solvers.milp",
    "greedy": "allocator.solvers.greedy",
    "uniform": "allocator.solvers.uniform",
    "brute": "allocator.solvers.brute",
    "evo": "allocator.solvers.evo",
    "bayes": "allocator.solvers.bayes",
}
_SOLVERS: dict[str, type] = {}


class UnknownSolver(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


def register_solver(name: str):
    """Class decorator: make a ``Solver`` subclass available as ``minimize(..., solver=name)``."""
    def decorate(cls):
        if name in _SOLVERS and _SOLVERS[name] is not cls:
            logger.warning("solver '%s' re-registered by %s", name, cls.__module__)
        cls.name = name
        _SOLVERS[name] = cls
        return cls
    return decorate


def _load_entry_points():
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _SOLVERS:
            try:
                _SOLVERS[ep.name] = ep.load()
                _SOLVERS[ep.name].name = ep.name
            except Exception as exc:  # a broken plugin must not break the built-ins
                logger.warning("could not load solver plugin '%s' (%s): %s", ep.name, ep.value, exc)


def available_solvers() -> list[str]:
    """Names of every registered solver: built-ins (whether or not their optional extras are installed) and plugins."""
    _load_entry_points()
    return sorted(set(BUILTIN_SOLVER_MODULES) | set(_SOLVERS))


def get_solver(name: str) -> type:
    """The solver class registered as ``name`` (its options: ``get_solver(name).Options``)."""
    if name in _SOLVERS:
        return _SOLVERS[name]
    if name in BUILTIN_SOLVER_MODULES:
        importlib.import_module(BUILTIN_SOLVER_MODULES[name])
        return _SOLVERS[name]
    _load_entry_points()
    if name in _SOLVERS:
        return _SOLVERS[name]
    names = available_solvers()
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    raise UnknownSolver(f"unknown solver '{name}'{hint} registered solvers: {', '.join(names)}")
