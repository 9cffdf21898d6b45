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

from .formats import format_for_bits
from .levels import LEVEL_COLUMNS, Level, LevelError, make_levels, normalize_levels  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

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
        if not isinstance(d, Mapping) or "name" not in d or "layer" not in d:
            raise TablesError(f"a unit must be a mapping with at least 'name' and 'layer', got {d!r}; "
                              "write units as {'name': 'layers.0', 'layer': 0, ...} (Unit.to_dict)")
        try:
            return cls(name=str(d["name"]), layer=int(d["layer"]), kinds=tuple(d.get("kinds", ())),
                       params=int(d.get("params", 0)),
                       shapes=tuple(tuple(int(v) for v in s) for s in d.get("shapes", ())))
        except (TypeError, ValueError) as exc:
            raise TablesError(f"unit {d.get('name')!r} has a malformed field ({exc}); layer and params are "
                              "integers, shapes a list of [d_out, d_in]") from exc


def _check_matrix(name: str, matrix, shape: tuple[int, int], nonnegative: bool) -> np.ndarray:
    try:
        arr = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TablesError(f"{name} is not numeric ({exc}); give a float matrix of shape (n_units, n_levels) = "
                          f"{shape}") from exc
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
        try:
            self.levels = normalize_levels(self.levels)
        except LevelError as exc:
            raise TablesError(f"the tables' levels: {exc}") from exc
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

    def level(self, j: int) -> Level:
        """Level ``j`` of the grid as a Level object."""
        return Level(**self.levels.iloc[int(j)].to_dict())

    def level_objects(self) -> list[Level]:
        return [Level(**row) for row in self.levels.to_dict(orient="records")]

    def __repr__(self) -> str:
        metric = self.provenance.get("metric")
        degradation = "no degradation" if self.degradation is None else f"degradation ({metric or 'unnamed metric'})"
        model = self.provenance.get("model")
        return (f"Tables({self.n_units} units x {self.n_levels} levels, costs {sorted(self.costs)}, {degradation}"
                f"{f', model {model}' if model else ''})")

    def cost(self, kind: str) -> np.ndarray:
        if kind not in self.costs:
            raise TablesError(f"no cost kind '{kind}' in these tables; available: {sorted(self.costs)}")
        return self.costs[kind]

    def dense_level(self) -> int | None:
        """Index of the uncompressed level (s=0, a dense format), if the grid has one."""
        hit = np.flatnonzero([lv.is_dense for lv in self.level_objects()])
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

    def refine_levels(self, s_step: float, costs: "Tables | None" = None, space: str = "log") -> "Tables":
        """These tables on a grid of s steps ``s_step``: degradation interpolated (PCHIP in s per unit and (rho, fmt)
        slice, of log(d + eps) or of d), costs from ``costs`` or re-priced by their providers
        (``allocator.refine.refine_tables``)."""
        from .refine import refine_tables
        return refine_tables(self, s_step, costs, space)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([u.to_dict() for u in self.units]).encode())
        h.update(self.levels[["s", "rho", "bits"]].to_numpy().astype(float).tobytes())
        if any(f != format_for_bits(b) for b, f in zip(self.levels["bits"], self.levels["fmt"])):
            h.update(json.dumps(list(self.levels["fmt"])).encode())   # only non-default formats: old hashes hold
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
        """Tables saved by ``save``; parquet rows are matched to ``tables.json``'s units by name, not by order."""
        directory = Path(directory)
        meta, frame = _read_saved(directory)
        where = f"{directory}/tables.json"
        unit_dicts = _meta_field(meta, "units", list, where)
        try:
            units = [Unit.from_dict(u) for u in unit_dicts]
        except TablesError as exc:
            raise TablesError(f"{where}: {exc}") from exc
        levels = pd.DataFrame(_meta_field(meta, "levels", list, where))
        kinds = list(_meta_field(meta, "cost_kinds", list, where))
        columns = kinds + (["degradation"] if meta.get("has_degradation") else [])
        source = f"{directory}/tables.parquet"
        _require_columns(frame, ["unit", "level", *columns], source, "re-save the tables with Tables.save")
        ui, li = _pair_positions(frame["unit"].astype(str), _integer_column(frame, "level", source),
                                 [u.name for u in units], len(levels), source, f"the units of {where}")
        grids = {c: _fill_grid(frame, c, ui, li, (len(units), len(levels)), source) for c in columns}
        deg = grids.pop("degradation", None)
        return cls(units, levels, grids, deg, meta.get("provenance", {}))

    @classmethod
    def from_csv(cls, path, cost_columns=None) -> "Tables":
        """Tables from a long CSV a user wrote: columns ``unit``, ``s`` [``rho``, ``bits`` / ``fmt``], costs, ``degradation``.

        Optional columns ``layer`` and ``params``. Every (unit, level) pair must appear exactly once. Unit names
        are read as text (``01`` and ``1`` are two units).
        """
        path = Path(path)
        frame = _read_csv(path)
        level_cols = [c for c in LEVEL_COLUMNS if c in frame.columns]
        if not level_cols:
            raise TablesError(f"{path} has no level columns; give at least 's' (and optionally 'rho', 'bits' or 'fmt')")
        reserved = {"unit", "layer", "params", "level", "degradation", *LEVEL_COLUMNS}
        cost_columns = list(cost_columns) if cost_columns else [c for c in frame.columns if c not in reserved]
        if not cost_columns:
            raise TablesError(f"{path} has no cost columns (e.g. flops_decode, bytes_decode)")
        _require_columns(frame, cost_columns, str(path), "name existing columns in cost_columns")
        for c in [c for c in level_cols if c != "fmt"] + [c for c in ("layer", "params") if c in frame.columns]:
            _numeric_column(frame, c, path)
        try:
            levels = normalize_levels(frame[level_cols].drop_duplicates().reset_index(drop=True))
        except LevelError as exc:
            raise TablesError(f"the levels of {path}: {exc}") from exc
        level_pos = frame[level_cols].merge(levels[level_cols].reset_index(), on=level_cols, how="left")["index"]
        unit_names = list(dict.fromkeys(frame["unit"]))
        n, m = len(unit_names), len(levels)
        ui, li = _pair_positions(frame["unit"], level_pos.to_numpy(dtype=int), unit_names, m, str(path), None)
        columns = cost_columns + (["degradation"] if "degradation" in frame.columns else [])
        grids = {c: _fill_grid(frame, c, ui, li, (n, m), str(path)) for c in columns}
        first = frame.drop_duplicates("unit").set_index("unit")
        units = [Unit(name=u, layer=int(first.loc[u, "layer"]) if "layer" in first else i,
                      params=int(first.loc[u, "params"]) if "params" in first else 0)
                 for i, u in enumerate(unit_names)]
        deg = grids.pop("degradation", None)
        return cls(units, levels, grids, deg, {"source": str(path)})


# ---------------------------------------------------------------------------------------------- reading helpers
def _read_saved(directory: Path) -> tuple[dict, pd.DataFrame]:
    try:
        meta = json.loads((directory / "tables.json").read_text(encoding="utf-8"))
        frame = pd.read_parquet(directory / "tables.parquet")
    except FileNotFoundError as exc:
        raise TablesError(f"no saved tables in {directory} ({exc.filename} missing); save them with Tables.save") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise TablesError(f"the saved tables in {directory} are corrupt ({exc}); delete the folder and re-profile") from exc
    if not isinstance(meta, dict) or meta.get("_type") != "allocator.Tables":
        raise TablesError(f"{directory}/tables.json is not an allocator.Tables file (no \"_type\": "
                          "\"allocator.Tables\" object); write it with Tables.save")
    version = meta.get("_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version > TABLES_FORMAT_VERSION:
        raise TablesError(f"{directory}/tables.json has _version {version!r}; this package reads integer versions "
                          f"<= {TABLES_FORMAT_VERSION}: upgrade layer-allocator or re-save the tables")
    return meta, frame


def _meta_field(meta: dict, key: str, kind: type, where: str):
    if not isinstance(meta.get(key), kind):
        raise TablesError(f"{where} has no '{key}' {kind.__name__}; it is written by Tables.save "
                          "(re-save the tables, or add the field)")
    return meta[key]


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"unit": str})
    except FileNotFoundError as exc:
        raise TablesError(f"no CSV file {path}; give the path of a long table (unit, s, <costs>, degradation)") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TablesError(f"{path} is not a readable CSV ({exc})") from exc
    if "unit" not in frame.columns:
        raise TablesError(f"{path} has no 'unit' column; expected columns: unit, s [, rho, bits], <cost columns>, degradation")
    empty = np.flatnonzero(frame["unit"].isna().to_numpy())
    if empty.size:
        raise TablesError(f"{path}: the 'unit' column is empty in data rows {empty[:5].tolist()}; name every row's unit")
    return frame


def _require_columns(frame: pd.DataFrame, columns, source: str, fix: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TablesError(f"{source} lacks the columns {missing} (has {list(frame.columns)}); {fix}")


def _numeric_column(frame: pd.DataFrame, column: str, source) -> np.ndarray:
    values = frame[column]
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        bad = values[pd.to_numeric(values, errors="coerce").isna()].unique()[:3].tolist()
        raise TablesError(f"column '{column}' of {source} is not numeric (values such as {bad}); "
                          "write plain numbers in it")
    return values.to_numpy(dtype=float)


def _integer_column(frame: pd.DataFrame, column: str, source) -> np.ndarray:
    values = _numeric_column(frame, column, source)
    if not np.all(np.isfinite(values) & (values == np.round(values))):
        raise TablesError(f"column '{column}' of {source} must hold whole numbers; re-save the tables")
    return values.astype(int)


def _pair_positions(unit_col: pd.Series, level_pos: np.ndarray, names: list[str], m: int, source: str,
                    names_source: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(unit, level) position of every row; every pair must appear exactly once and the unit names must agree."""
    index = {u: i for i, u in enumerate(names)}
    unknown, missing = sorted(set(unit_col) - set(index)), sorted(set(index) - set(unit_col))
    if names_source and (unknown or missing):
        raise TablesError(f"the unit names of {source} disagree with {names_source}: only in the parquet "
                          f"{unknown[:5]}, only in the JSON {missing[:5]}; the two files come from different runs: "
                          "re-save the tables with Tables.save")
    ui, li = unit_col.map(index).to_numpy(dtype=int), np.asarray(level_pos, dtype=int)
    if ((li < 0) | (li >= m)).any():
        raise TablesError(f"{source} holds level positions outside 0..{m - 1}; re-save the tables")
    counts = np.zeros((len(names), m), dtype=int)
    np.add.at(counts, (ui, li), 1)
    if (counts != 1).any():
        raise TablesError(f"{source} must list every (unit, level) pair exactly once: {len(names)} units x {m} levels "
                          f"= {len(names) * m} rows expected, found {len(unit_col)} rows covering "
                          f"{int((counts > 0).sum())} pairs")
    return ui, li


def _fill_grid(frame: pd.DataFrame, column: str, ui: np.ndarray, li: np.ndarray, shape: tuple[int, int],
               source: str) -> np.ndarray:
    out = np.full(shape, np.nan)
    out[ui, li] = _numeric_column(frame, column, source)
    return out


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
    if isinstance(obj, Level):
        return obj.to_dict()
    return obj
