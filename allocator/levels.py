"""One compression level: the frozen value object every stage reads (solvers, methods, kernels, reports).

A level is a point of the grid ``(s, rho, bits)``: activation sparsity ``s`` (share of input channels not
read), R-Sparse's ratio ``rho`` (share of the kept budget spent on exact channels; 1 = pure sparsity) and the
weight bit width. Levels serialize as plain dicts (``allocation.json``, tables) and come back through
``Level.from_mapping``, which is the one place a missing field gets its default and a bad value an error.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

LEVEL_FIELDS = ("s", "rho", "bits")
DENSE_BITS = 16


class LevelError(ValueError):
    """A level value is out of range or of the wrong type; the message names the field and the valid range."""


@dataclass(frozen=True, order=True)
class Level:
    s: float = 0.0
    rho: float = 1.0
    bits: int = DENSE_BITS

    def __post_init__(self):
        for name in ("s", "rho"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LevelError(f"level {name}={value!r} is not a finite number; give {name} in [0, 1]")
            if not 0.0 <= float(value) <= 1.0:
                raise LevelError(f"level {name}={value} lies outside [0, 1]; give {name} in [0, 1]")
            object.__setattr__(self, name, float(value))
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits != int(bits) or bits <= 0:
            raise LevelError(f"level bits={bits!r} must be a positive integer (16 = uncompressed weights)")
        object.__setattr__(self, "bits", int(bits))

    @classmethod
    def from_mapping(cls, value: "Level | Mapping[str, Any]") -> "Level":
        """A Level from a Level or a ``{"s", "rho", "bits"}`` mapping (missing fields: 0, 1, 16)."""
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
        return self.s <= 0.0 and self.bits >= DENSE_BITS

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> tuple:
        """A hashable, rounding-stable key (memo tables, cache rows)."""
        return (round(self.s, 6), round(self.rho, 6), self.bits)
