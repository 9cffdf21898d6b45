"""Solver results and the versioned ``allocation.json`` they are saved as."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .tables import _jsonable

ALLOCATION_FORMAT_VERSION = 1


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("layer-allocator")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


@dataclass
class Allocation:
    """The chosen level per unit: what ``apply_allocation_`` consumes and ``allocation.json`` stores."""

    units: list[str]
    layers: list[int]
    level_index: list[int]
    levels: list[dict]                  # per unit: {"s": .., "rho": .., "bits": ..}
    kinds: list[list[str]] = field(default_factory=list)
    groups: list[list[int]] | None = None  # [first_layer, last_layer] per group, when grouped
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_levels(cls, tables, unit_levels, groups=None, **metadata) -> "Allocation":
        unit_levels = np.asarray(unit_levels, dtype=int).ravel()
        rows = tables.levels.iloc[unit_levels]
        return cls(units=tables.unit_names, layers=tables.layers.tolist(), level_index=unit_levels.tolist(),
                   levels=[{"s": float(r.s), "rho": float(r.rho), "bits": int(r.bits)} for r in rows.itertuples()],
                   kinds=[list(u.kinds) for u in tables.units], groups=groups,
                   metadata={"tables_hash": tables.content_hash(),
                             "tables_provenance": _jsonable({k: v for k, v in tables.provenance.items()
                                                             if k not in ("dense_costs", "fixed_costs")}),
                             **_jsonable(metadata)})

    def __len__(self) -> int:
        return len(self.units)

    def level_of(self, unit: str) -> dict:
        return self.levels[self.units.index(unit)]

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({"unit": self.units, "layer": self.layers, "level": self.level_index})
        return pd.concat([frame, pd.DataFrame(self.levels)], axis=1)

    def to_dict(self) -> dict:
        return {"_type": "allocator.Allocation", "_version": ALLOCATION_FORMAT_VERSION,
                "package_version": package_version(),
                "_data": {"units": self.units, "layers": self.layers, "level_index": self.level_index,
                          "levels": self.levels, "kinds": self.kinds, "groups": self.groups,
                          "metadata": _jsonable(self.metadata)}}

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, payload: dict) -> "Allocation":
        if payload.get("_type") != "allocator.Allocation":
            raise ValueError("not an allocator.Allocation document (missing _type)")
        if int(payload.get("_version", 0)) > ALLOCATION_FORMAT_VERSION:
            raise ValueError(f"allocation.json version {payload['_version']} is newer than this package reads "
                             f"({ALLOCATION_FORMAT_VERSION}); upgrade layer-allocator")
        d = payload["_data"]
        return cls(units=list(d["units"]), layers=[int(v) for v in d["layers"]],
                   level_index=[int(v) for v in d["level_index"]], levels=[dict(v) for v in d["levels"]],
                   kinds=[list(k) for k in d.get("kinds", [])], groups=d.get("groups"),
                   metadata=dict(d.get("metadata", {})))

    @classmethod
    def from_json(cls, path) -> "Allocation":
        try:
            payload = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); re-run the solver to write it again") from exc
        return cls.from_dict(payload)


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

    def summary(self) -> str:
        p = self.problem
        return (f"{self.solver}: {'feasible' if self.feasible else 'INFEASIBLE'}, cost ({p.get('cost')}) "
                f"{self.cost:.6g}, degradation {self.degradation:.6g}, limit {p.get('limit'):.6g}, "
                f"{self.n_evals} evaluations, {self.solve_time * 1e3:.1f} ms")
