"""Cost and degradation tables over allocation units x compression levels (ASAF's tabulation).

A `Tables` object is what every solver reads: for each unit (a decoder layer, one projection, ...) and each
level (a row of sparsity ``s``, sparse-rank ratio ``rho``, weight ``bits``) it holds one number per cost kind
(``flops_prefill``, ``flops_decode``, ``bytes_decode``, measured ``latency_*``) and, once profiled, the
predicted degradation. Tables are validated on construction so that a solver never sees NaN, a negative cost
or a mismatched shape.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

LEVEL_COLUMNS = ("s", "rho", "bits")
LEVEL_DEFAULTS = {"s": 0.0, "rho": 1.0, "bits": 16}
TABLES_FORMAT_VERSION = 1


class TablesError(ValueError):
    """A table is malformed; the message names the problem and how to fix it."""


@dataclass(frozen=True)
class Unit:
    """One allocation unit: the projections that share one level.

    ``shapes`` holds ``(d_out, d_in)`` per projection, in ``kinds`` order.
    """

    name: str
    layer: int
    kinds: tuple[str, ...] = ()
    params: int = 0
    shapes: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": int(self.layer), "kinds": list(self.kinds),
                "params": int(self.params), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Unit":
        return cls(name=str(d["name"]), layer=int(d["layer"]), kinds=tuple(d.get("kinds", ())),
                   params=int(d.get("params", 0)), shapes=tuple(tuple(int(v) for v in s) for s in d.get("shapes", ())))


def make_levels(s=(0.0,), rho=(1.0,), bits=(16,)) -> pd.DataFrame:
    """The product grid of level options, least compressed first (s ascending, rho descending, bits descending)."""
    rows = [{"s": float(a), "rho": float(r), "bits": int(b)}
            for b in sorted(bits, reverse=True) for a in sorted(s) for r in sorted(rho, reverse=True)]
    return normalize_levels(pd.DataFrame(rows))


def normalize_levels(levels) -> pd.DataFrame:
    """Accept a DataFrame / list of dicts / 1-D array of sparsities and return a clean level frame."""
    if isinstance(levels, pd.DataFrame):
        frame = levels.copy()
    elif isinstance(levels, (list, tuple)) and levels and isinstance(levels[0], Mapping):
        frame = pd.DataFrame(list(levels))
    else:
        arr = np.asarray(levels, dtype=float).ravel()
        frame = pd.DataFrame({"s": arr})
    if len(frame) == 0:
        raise TablesError("the level grid is empty: give at least one level, e.g. levels=make_levels(s=[0, 0.25, 0.5])")
    unknown = [c for c in frame.columns if c not in LEVEL_COLUMNS]
    if unknown:
        raise TablesError(f"unknown level columns {unknown}; levels may only have columns {list(LEVEL_COLUMNS)}")
    for col, default in LEVEL_DEFAULTS.items():
        if col not in frame.columns:
            frame[col] = default
    frame = frame[list(LEVEL_COLUMNS)].reset_index(drop=True)
    frame["s"] = frame["s"].astype(float)
    frame["rho"] = frame["rho"].astype(float)
    frame["bits"] = frame["bits"].astype(int)
    if frame.isna().any().any():
        raise TablesError("the level grid has missing values; every level needs s, rho and bits")
    if ((frame["s"] < 0) | (frame["s"] > 1)).any() or ((frame["rho"] < 0) | (frame["rho"] > 1)).any():
        raise TablesError("level sparsity s and ratio rho must lie in [0, 1]")
    if (frame["bits"] <= 0).any():
        raise TablesError("level bits must be positive")
    return frame


def _check_matrix(name: str, matrix, shape: tuple[int, int], nonnegative: bool) -> np.ndarray:
    arr = np.asarray(matrix, dtype=float)
    if arr.shape != shape:
        raise TablesError(f"{name} has shape {arr.shape}, expected (n_units, n_levels) = {shape}")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise TablesError(f"{name} holds NaN or inf (first at unit {bad[0]}, level {bad[1]}); "
                          "re-run the profiling for that entry or drop the level")
    if nonnegative and (arr < 0).any():
        bad = np.argwhere(arr < 0)[0]
        raise TablesError(f"{name} holds a negative cost {arr[tuple(bad)]:.4g} at unit {bad[0]}, level {bad[1]}; "
                          "costs must be >= 0")
    return arr


@dataclass
class Tables:
    """Units x levels: cost matrices per cost kind, an optional degradation matrix, and provenance."""

    units: list[Unit]
    levels: pd.DataFrame
    costs: dict[str, np.ndarray] = field(default_factory=dict)
    degradation: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.units = [u if isinstance(u, Unit) else Unit.from_dict(u) for u in self.units]
        if not self.units:
            raise TablesError("tables need at least one unit")
        names = [u.name for u in self.units]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TablesError(f"duplicate unit names {dup[:5]}; every unit needs a unique name")
        self.levels = normalize_levels(self.levels)
        shape = (self.n_units, self.n_levels)
        self.costs = {str(k): _check_matrix(f"cost '{k}'", v, shape, nonnegative=True) for k, v in self.costs.items()}
        if self.degradation is not None:
            self.degradation = _check_matrix("degradation", self.degradation, shape, nonnegative=False)
        self.provenance = dict(self.provenance or {})

    # ------------------------------------------------------------------ shape
    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def layers(self) -> np.ndarray:
        return np.array([u.layer for u in self.units], dtype=int)

    def cost(self, kind: str) -> np.ndarray:
        if kind not in self.costs:
            raise TablesError(f"no cost kind '{kind}' in these tables; available: {sorted(self.costs)}")
        return self.costs[kind]

    def dense_level(self) -> int | None:
        """Index of the uncompressed level (s=0, bits>=16), if the grid has one."""
        hit = np.flatnonzero((self.levels["s"].to_numpy() == 0) & (self.levels["bits"].to_numpy() >= 16))
        return int(hit[0]) if hit.size else None

    def dense_cost(self, kind: str) -> np.ndarray:
        """Per-unit cost without compression: the dense level's column, else the provenance's record, else the max."""
        stored = self.provenance.get("dense_costs", {}).get(kind)
        if stored is not None:
            return np.asarray(stored, dtype=float)
        level = self.dense_level()
        matrix = self.cost(kind)
        return matrix[:, level] if level is not None else matrix.max(axis=1)

    # ------------------------------------------------------------------ derive
    def with_cost(self, name: str, matrix) -> "Tables":
        return Tables(self.units, self.levels, {**self.costs, name: matrix}, self.degradation, self.provenance)

    def with_degradation(self, matrix, **provenance) -> "Tables":
        return Tables(self.units, self.levels, self.costs, matrix, {**self.provenance, **provenance})

    def select_levels(self, index) -> "Tables":
        """A sub-grid of levels (used by the DP's coarse phase)."""
        index = np.asarray(index, dtype=int)
        deg = None if self.degradation is None else self.degradation[:, index]
        return Tables(self.units, self.levels.iloc[index].reset_index(drop=True),
                      {k: v[:, index] for k, v in self.costs.items()}, deg, self.provenance)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([u.to_dict() for u in self.units]).encode())
        h.update(self.levels.to_numpy().astype(float).tobytes())
        for k in sorted(self.costs):
            h.update(k.encode()); h.update(self.costs[k].tobytes())
        if self.degradation is not None:
            h.update(self.degradation.tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ io
    def to_frame(self) -> pd.DataFrame:
        """Tidy long frame: one row per (unit, level) with every cost kind and the degradation."""
        n, m = self.n_units, self.n_levels
        frame = pd.DataFrame({
            "unit": np.repeat(self.unit_names, m),
            "layer": np.repeat(self.layers, m),
            "level": np.tile(np.arange(m), n),
        })
        for col in LEVEL_COLUMNS:
            frame[col] = np.tile(self.levels[col].to_numpy(), n)
        for k, v in self.costs.items():
            frame[k] = v.ravel()
        if self.degradation is not None:
            frame["degradation"] = self.degradation.ravel()
        return frame

    def save(self, directory) -> Path:
        """Write ``tables.parquet`` (long format) and ``tables.json`` (units, levels, provenance)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_parquet(directory / "tables.parquet", index=False)
        meta = {"_type": "allocator.Tables", "_version": TABLES_FORMAT_VERSION,
                "units": [u.to_dict() for u in self.units],
                "levels": self.levels.to_dict(orient="records"),
                "cost_kinds": sorted(self.costs), "has_degradation": self.degradation is not None,
                "provenance": _jsonable(self.provenance)}
        (directory / "tables.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory) -> "Tables":
        directory = Path(directory)
        try:
            meta = json.loads((directory / "tables.json").read_text())
            frame = pd.read_parquet(directory / "tables.parquet")
        except FileNotFoundError as exc:
            raise TablesError(f"no saved tables in {directory} ({exc.filename} missing); save them with Tables.save") from exc
        except (json.JSONDecodeError, OSError, ValueError) as exc:
            raise TablesError(f"the saved tables in {directory} are corrupt ({exc}); delete the folder and re-profile") from exc
        if meta.get("_type") != "allocator.Tables" or meta.get("_version", 0) > TABLES_FORMAT_VERSION:
            raise TablesError(f"{directory}/tables.json is not an allocator.Tables file of a version this package reads")
        units = [Unit.from_dict(u) for u in meta["units"]]
        levels = pd.DataFrame(meta["levels"])
        n, m = len(units), len(levels)
        if len(frame) != n * m:
            raise TablesError(f"{directory}/tables.parquet has {len(frame)} rows, expected {n} units x {m} levels")
        frame = frame.sort_values(["unit", "level"], key=lambda c: c.map({u.name: i for i, u in enumerate(units)})
                                  if c.name == "unit" else c, kind="stable")
        costs = {k: frame[k].to_numpy().reshape(n, m) for k in meta["cost_kinds"]}
        deg = frame["degradation"].to_numpy().reshape(n, m) if meta["has_degradation"] else None
        return cls(units, levels, costs, deg, meta.get("provenance", {}))

    @classmethod
    def from_csv(cls, path, cost_columns=None) -> "Tables":
        """Tables from a long CSV a user wrote: columns ``unit, level`` (or ``s``/``rho``/``bits``), costs, ``degradation``.

        Optional columns ``layer`` and ``params``. Every (unit, level) pair must appear exactly once.
        """
        path = Path(path)
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise TablesError(f"{path} is not a readable CSV ({exc})") from exc
        if "unit" not in frame.columns:
            raise TablesError(f"{path} has no 'unit' column; expected columns: unit, s [, rho, bits], <cost columns>, degradation")
        level_cols = [c for c in LEVEL_COLUMNS if c in frame.columns]
        if not level_cols:
            raise TablesError(f"{path} has no level columns; give at least 's' (and optionally 'rho', 'bits')")
        reserved = {"unit", "layer", "params", "level", "degradation", *LEVEL_COLUMNS}
        cost_columns = list(cost_columns) if cost_columns else [c for c in frame.columns if c not in reserved]
        if not cost_columns:
            raise TablesError(f"{path} has no cost columns (e.g. flops_decode, bytes_decode)")
        for c in cost_columns + (["degradation"] if "degradation" in frame.columns else []):
            if not pd.api.types.is_numeric_dtype(frame[c]):
                raise TablesError(f"column '{c}' of {path} is not numeric")
        unit_names = list(dict.fromkeys(frame["unit"].astype(str)))
        levels = frame[level_cols].drop_duplicates().reset_index(drop=True)
        levels = normalize_levels(levels)
        frame = frame.assign(unit=frame["unit"].astype(str))
        merged = frame.merge(levels[level_cols].reset_index().rename(columns={"index": "_level"}), on=level_cols)
        counts = merged.groupby(["unit", "_level"]).size()
        n, m = len(unit_names), len(levels)
        if len(counts) != n * m or (counts != 1).any():
            raise TablesError(f"{path} must list every (unit, level) pair exactly once: {n} units x {m} levels "
                              f"= {n * m} rows expected, found {len(frame)} rows covering {len(counts)} pairs")
        pos = {u: i for i, u in enumerate(unit_names)}
        ui = merged["unit"].map(pos).to_numpy()
        li = merged["_level"].to_numpy()

        def grid(col):
            out = np.full((n, m), np.nan)
            out[ui, li] = merged[col].to_numpy(dtype=float)
            return out

        first = frame.drop_duplicates("unit").set_index("unit")
        units = [Unit(name=u, layer=int(first.loc[u, "layer"]) if "layer" in first else i,
                      params=int(first.loc[u, "params"]) if "params" in first else 0)
                 for i, u in enumerate(unit_names)]
        deg = grid("degradation") if "degradation" in frame.columns else None
        return cls(units, levels, {c: grid(c) for c in cost_columns}, deg, {"source": str(path)})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj
