"""One compression level: the frozen value object every stage reads (solvers, methods, kernels, reports).

A level is a point of the grid ``(s, rho, fmt)``: activation sparsity ``s`` (share of input channels not
read), R-Sparse's ratio ``rho`` (share of the kept budget spent on exact channels; 1 = pure sparsity) and the
number format ``fmt`` of the unit's weights and inputs (``allocator.formats``: bf16, w8a8-fp8, w4a16-g128, ...).
``bits`` is the format's weight width, kept as a field so a bare width still reads (``Level(bits=4)`` is
``w4a16-g128``: ``allocator.formats.FORMAT_OF_BITS``); giving both that disagree is an error. Levels serialize
as plain dicts (``allocation.json``, tables) and come back through ``Level.from_mapping``, which is the one
place a missing field gets its default and a bad value an error.

A *level grid* (the options of a table) is a small DataFrame with columns ``s, rho, bits, fmt``, one row per level:
``make_levels`` builds the product grid, ``normalize_levels`` checks any accepted form and returns that frame.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .formats import DENSE_FORMAT, FormatError, format_for_bits, get_format

LEVEL_FIELDS = ("s", "rho", "bits", "fmt")
LEVEL_COLUMNS = LEVEL_FIELDS
DENSE_BITS = 16
LEVEL_DEFAULTS = {"s": 0.0, "rho": 1.0, "bits": DENSE_BITS, "fmt": DENSE_FORMAT}
ACCEPTED_GRIDS = ("a DataFrame with columns s [, rho, bits, fmt]",
                  "a list of Level objects or {'s', 'rho', 'bits' | 'fmt'} dicts", "a 1-D sequence of sparsities",
                  "make_levels(s=[...], rho=[...], fmt=[...] or bits=[...])")


class LevelError(ValueError):
    """A level value is out of range or of the wrong type; the message names the field and the valid range."""


@dataclass(frozen=True, order=True)
class Level:
    s: float = 0.0
    rho: float = 1.0
    bits: int | None = None     # the format's weight width (None: from fmt, else 16)
    fmt: str | None = None      # None: the default format of ``bits``

    def __post_init__(self):
        for name in ("s", "rho"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LevelError(f"level {name}={value!r} is not a finite number; give {name} in [0, 1]")
            if not 0.0 <= float(value) <= 1.0:
                raise LevelError(f"level {name}={value} lies outside [0, 1]; give {name} in [0, 1]")
            object.__setattr__(self, name, float(value))
        bits = self.bits
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits != int(bits)
                                 or bits <= 0):
            raise LevelError(f"level bits={bits!r} must be a positive integer (16 = uncompressed weights)")
        try:
            fmt = get_format(self.fmt if self.fmt is not None else format_for_bits(int(bits or DENSE_BITS)))
        except FormatError as exc:
            raise LevelError(f"level {self.fmt or bits}: {exc}") from exc
        if bits is not None and int(bits) != fmt.weight_bits:
            raise LevelError(f"level bits={bits} contradicts fmt='{fmt.name}' ({fmt.weight_bits}-bit weights); "
                             "give only the format (or only the bits)")
        object.__setattr__(self, "bits", fmt.weight_bits)
        object.__setattr__(self, "fmt", fmt.name)

    @classmethod
    def from_mapping(cls, value: "Level | Mapping[str, Any]") -> "Level":
        """A Level from a Level or a ``{"s", "rho", "bits", "fmt"}`` mapping (missing fields: 0, 1, bf16)."""
        if isinstance(value, Level):
            return value
        if not isinstance(value, Mapping):
            raise LevelError(f"a level must be a mapping with keys {list(LEVEL_FIELDS)}, got {type(value).__name__}")
        unknown = sorted(set(value) - set(LEVEL_FIELDS))
        if unknown:
            raise LevelError(f"unknown level fields {unknown}; a level has {list(LEVEL_FIELDS)}")
        return cls(**{k: value[k] for k in LEVEL_FIELDS if k in value})

    @property
    def is_dense(self) -> bool:
        return self.s <= 0.0 and self.format.is_dense

    @property
    def format(self):
        """The ``allocator.formats.NumberFormat`` of this level."""
        return get_format(self.fmt)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> tuple:
        """A hashable, rounding-stable key (memo tables, cache rows)."""
        return (round(self.s, 6), round(self.rho, 6), self.bits, self.fmt)


def make_levels(s=(0.0,), rho=(1.0,), bits=None, fmt=None) -> pd.DataFrame:
    """The product grid of level options, least compressed first (format by weight width descending, then s
    ascending, rho descending). Give ``fmt`` (format names) or ``bits`` (widths, each its default format)."""
    if fmt is not None and bits is not None and list(bits) not in ([], [DENSE_BITS]):
        raise LevelError("give the level grid's formats either as fmt (names) or as bits (widths), not both")
    names = list(fmt) if fmt is not None else [None] * len(bits or [DENSE_BITS])
    widths = [None] * len(names) if fmt is not None else list(bits or [DENSE_BITS])
    formats = [Level(bits=b, fmt=f) for b, f in zip(widths, names)]
    formats = sorted(dict.fromkeys((lv.bits, lv.fmt) for lv in formats), key=lambda bf: (-bf[0], bf[1]))
    rows = [{"s": float(a), "rho": float(r), "bits": b, "fmt": f}
            for b, f in formats for a in sorted(s) for r in sorted(rho, reverse=True)]
    return normalize_levels(pd.DataFrame(rows))


def normalize_levels(levels) -> pd.DataFrame:
    """The clean level frame (columns s, rho, bits, fmt) of any accepted grid form; every row a valid, distinct Level."""
    frame = _level_frame(levels)
    if len(frame) == 0:
        raise LevelError("the level grid is empty: give at least one level, e.g. levels=make_levels(s=[0, 0.25, 0.5])")
    unknown = [c for c in frame.columns if c not in LEVEL_COLUMNS]
    if unknown:
        raise LevelError(f"unknown level columns {unknown}; levels may only have columns {list(LEVEL_COLUMNS)}")
    if "fmt" not in frame.columns and "bits" not in frame.columns:
        frame = frame.assign(bits=DENSE_BITS)
    frame = frame.assign(**{c: None for c in ("bits", "fmt") if c not in frame.columns})   # one from the other
    frame = frame.assign(**{c: d for c, d in LEVEL_DEFAULTS.items() if c not in frame.columns})
    frame = frame[list(LEVEL_COLUMNS)].reset_index(drop=True)
    if frame[["s", "rho"]].isna().any().any() or (frame["bits"].isna() & frame["fmt"].isna()).any():
        raise LevelError("the level grid has missing values; every level needs s, rho and a format (fmt or bits)")
    objects = [_row_level(j, row) for j, row in enumerate(frame.to_dict(orient="records"))]
    _check_distinct(objects)
    return pd.DataFrame({"s": [lv.s for lv in objects], "rho": [lv.rho for lv in objects],
                         "bits": np.array([lv.bits for lv in objects], dtype=int),
                         "fmt": [lv.fmt for lv in objects]})


def _level_frame(levels) -> pd.DataFrame:
    if isinstance(levels, pd.DataFrame):
        return levels.copy()
    if isinstance(levels, (list, tuple)) and levels and all(isinstance(v, (Level, Mapping)) for v in levels):
        return pd.DataFrame([Level.from_mapping(v).to_dict() for v in levels])
    try:
        arr = np.asarray(levels, dtype=float)
    except (TypeError, ValueError) as exc:
        raise LevelError(f"cannot read the level grid {levels!r} ({exc}); give {'; or '.join(ACCEPTED_GRIDS)}") from exc
    if arr.ndim > 1:
        raise LevelError(f"the level grid is a {arr.ndim}-D array of shape {arr.shape}; a bare array may only list "
                         f"sparsities (1-D). For (s, rho) pairs give {ACCEPTED_GRIDS[0]} or {ACCEPTED_GRIDS[3]}")
    return pd.DataFrame({"s": arr.reshape(-1)})


def _row_level(j: int, row: Mapping) -> Level:
    row = {k: (None if k in ("bits", "fmt") and _missing(v) else v) for k, v in row.items()}
    try:
        return Level(**row)
    except LevelError as exc:
        raise LevelError(f"level {j} of the grid: {exc}") from exc


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_distinct(objects: list[Level]) -> None:
    """Two rows with one key would make a solver pick between conflicting cost / degradation columns."""
    first: dict[tuple, int] = {}
    for j, lv in enumerate(objects):
        i = first.setdefault(lv.key(), j)
        if i != j:
            same = "duplicates" if objects[i] == lv else "is within 1e-6 of (a near-duplicate of)"
            raise LevelError(f"level {j} {lv.to_dict()} {same} level {i} {objects[i].to_dict()}; "
                             "every level of a grid must be distinct: drop one of them")
