"""Solver results and the versioned ``allocation.json`` they are saved as."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .levels import Level, LevelError
from .tables import _jsonable

ALLOCATION_FORMAT_VERSION = 1
PER_UNIT_FIELDS = ("layers", "level_index", "levels")


class AllocationError(ValueError):
    """An allocation (or its ``allocation.json``) is malformed; the message names the file or field and the fix."""


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("layer-allocator")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


@dataclass
class Allocation:
    """The chosen level per unit: what ``apply_allocation_`` consumes and ``allocation.json`` stores.

    Every per-unit list has one entry per unit (``kinds`` may be empty: no module kinds recorded).
    """

    units: list[str]
    layers: list[int]
    level_index: list[int]
    levels: list[Level]
    kinds: list[list[str]] = field(default_factory=list)
    groups: list[list[int]] | None = None  # [first_layer, last_layer] per group, when grouped
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.units = [str(u) for u in self.units]
        duplicated = sorted(u for u, n in Counter(self.units).items() if n > 1)
        if duplicated:
            raise AllocationError(f"duplicated unit names {duplicated[:5]}; an allocation lists each unit once")
        lengths = {name: len(getattr(self, name)) for name in PER_UNIT_FIELDS + (("kinds",) if self.kinds else ())}
        wrong = {name: n for name, n in lengths.items() if n != len(self.units)}
        if wrong:
            raise AllocationError(f"{len(self.units)} units but {wrong} entries; every per-unit field "
                                  f"({', '.join(lengths)}) needs one entry per unit: re-run the solver")
        self.layers = _integers(self.layers, "layers")
        self.level_index = _integers(self.level_index, "level_index")
        self.levels = [_unit_level(u, lv) for u, lv in zip(self.units, self.levels)]
        self.kinds = [list(k) for k in self.kinds]

    @classmethod
    def from_levels(cls, tables, unit_levels, groups=None, **metadata) -> "Allocation":
        unit_levels = np.asarray(unit_levels, dtype=int).ravel()
        grid = tables.level_objects()
        return cls(units=tables.unit_names, layers=tables.layers.tolist(), level_index=unit_levels.tolist(),
                   levels=[grid[j] for j in unit_levels],
                   kinds=[list(u.kinds) for u in tables.units], groups=groups,
                   metadata={"tables_hash": tables.content_hash(),
                             "tables_provenance": _jsonable({k: v for k, v in tables.provenance.items()
                                                             if k not in ("dense_costs", "fixed_costs")}),
                             **_jsonable(metadata)})

    def __len__(self) -> int:
        return len(self.units)

    def __repr__(self) -> str:
        return f"Allocation({len(self)} units, levels {level_histogram(self.levels)})"

    def level_of(self, unit: str) -> Level:
        if unit not in self.units:
            raise AllocationError(f"no unit '{unit}' in this allocation; its units are {self.units[:5]}...")
        return self.levels[self.units.index(unit)]

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({"unit": self.units, "layer": self.layers, "level": self.level_index})
        return pd.concat([frame, pd.DataFrame([lv.to_dict() for lv in self.levels])], axis=1)

    def to_dict(self) -> dict:
        return {"_type": "allocator.Allocation", "_version": ALLOCATION_FORMAT_VERSION,
                "package_version": package_version(),
                "_data": {"units": self.units, "layers": self.layers, "level_index": self.level_index,
                          "levels": [lv.to_dict() for lv in self.levels], "kinds": self.kinds, "groups": self.groups,
                          "metadata": _jsonable(self.metadata)}}

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, payload: dict, source: str = "the allocation") -> "Allocation":
        """An Allocation from the ``to_dict`` document; ``source`` names it in errors (the file path)."""
        data = _allocation_data(payload, source)
        try:
            return cls(units=list(data["units"]), layers=list(data["layers"]), level_index=list(data["level_index"]),
                       levels=list(data["levels"]), kinds=list(data.get("kinds") or []), groups=data.get("groups"),
                       metadata=dict(data.get("metadata") or {}))
        except AllocationError as exc:
            raise AllocationError(f"{source}: {exc}") from exc
        except TypeError as exc:
            raise AllocationError(f"{source}: a field of _data has the wrong type ({exc}); units, layers, "
                                  "level_index, levels and kinds are lists, metadata an object") from exc

    @classmethod
    def from_json(cls, path) -> "Allocation":
        path = Path(path)
        try:
            payload = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError as exc:
            raise AllocationError(f"no allocation file {path}; give the allocation.json a solver run wrote") from exc
        except IsADirectoryError as exc:
            raise AllocationError(f"{path} is a folder; give the allocation.json file inside it") from exc
        except UnicodeDecodeError as exc:
            raise AllocationError(f"{path} is not UTF-8 text ({exc}); give the allocation.json a solver wrote") from exc
        except json.JSONDecodeError as exc:
            raise AllocationError(f"{path} is not valid JSON ({exc}); re-run the solver to write it again") from exc
        return cls.from_dict(payload, source=str(path))


def level_histogram(levels) -> str:
    """``s=0.5 x3, s=0.7/rho=0.9 x1``: how many units sit at each level, least compressed first."""
    counts = Counter(Level.from_mapping(lv) for lv in levels)
    return ", ".join(f"{_level_label(lv)} x{n}" for lv, n in sorted(counts.items())) or "none"


def _level_label(level: Level) -> str:
    parts = [f"s={level.s:g}"] + ([f"rho={level.rho:g}"] if level.rho < 1 else [])
    return "/".join(parts + ([f"{level.bits}b"] if level.bits != 16 else []))


def _integers(values, name: str) -> list[int]:
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or v != int(v)]
    if bad:
        raise AllocationError(f"{name} must hold integers, found {bad[:3]}; re-run the solver to write them")
    return [int(v) for v in values]


def _unit_level(unit: str, level) -> Level:
    try:
        return Level.from_mapping(level)
    except LevelError as exc:
        raise AllocationError(f"the level of unit '{unit}' is invalid: {exc}") from exc


def _allocation_data(payload, source: str) -> Mapping:
    """The ``_data`` object of an allocation document, after the envelope checks."""
    if not isinstance(payload, Mapping):
        raise AllocationError(f"{source} holds a JSON {type(payload).__name__}, not an object; an allocation.json "
                              "is an object with _type, _version and _data (Allocation.to_json writes one)")
    if payload.get("_type") != "allocator.Allocation":
        raise AllocationError(f"{source} is not an allocator.Allocation document (_type is "
                              f"{payload.get('_type')!r}); give an allocation.json written by Allocation.to_json")
    version = payload.get("_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise AllocationError(f"{source}: _version {version!r} is not an integer; write it as "
                              f"{ALLOCATION_FORMAT_VERSION}")
    if version > ALLOCATION_FORMAT_VERSION:
        raise AllocationError(f"{source}: allocation.json version {version} is newer than this package reads "
                              f"({ALLOCATION_FORMAT_VERSION}); upgrade layer-allocator")
    data = payload.get("_data")
    if not isinstance(data, Mapping):
        raise AllocationError(f"{source} has no _data object; an allocation.json keeps units, layers, "
                              "level_index and levels under _data")
    missing = [k for k in ("units", *PER_UNIT_FIELDS) if k not in data]
    if missing:
        raise AllocationError(f"{source}: _data lacks {missing}; re-run the solver to write a complete allocation")
    return data


@dataclass
class Result:
    """What every solver returns (pymoo-like X / F / CV plus provenance)."""

    solver: str
    allocation: Allocation
    x: np.ndarray                 # per-unit level indices
    cost: float
    degradation: float
    feasible: bool
    solve_time: float
    n_evals: int
    problem: dict
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def objective(self) -> float:
        return self.cost if self.problem.get("direction") == "min_cost" else self.degradation

    def to_dataframe(self) -> pd.DataFrame:
        """One row per unit: its level, and the run's totals repeated (tidy, for parquet and pandas)."""
        frame = self.allocation.to_frame()
        group_of = np.full(len(frame), -1)
        if self.allocation.groups:
            for g, (first, last) in enumerate(self.allocation.groups):
                group_of[(frame["layer"] >= first) & (frame["layer"] <= last)] = g
        frame["group"] = group_of
        frame.insert(0, "solver", self.solver)
        for key in ("cost", "degradation", "feasible", "solve_time", "n_evals"):
            frame[f"total_{key}" if key in ("cost", "degradation") else key] = getattr(self, key)
        for key in ("direction", "cost", "limit", "grouping"):
            frame[f"problem_{key}"] = self.problem.get(key)
        return frame

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)

    def __repr__(self) -> str:
        state = "feasible" if self.feasible else "INFEASIBLE"
        return (f"Result({self.solver}, {state}, cost {self.cost:.6g}, degradation {self.degradation:.6g}, "
                f"{len(self.allocation)} units, levels {level_histogram(self.allocation.levels)})")

    def summary(self) -> str:
        p = self.problem
        return (f"{self.solver}: {'feasible' if self.feasible else 'INFEASIBLE'}, cost ({p.get('cost')}) "
                f"{self.cost:.6g}, degradation {self.degradation:.6g}, limit {p.get('limit'):.6g}, "
                f"{self.n_evals} evaluations, {self.solve_time * 1e3:.1f} ms")
