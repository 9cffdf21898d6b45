"""Typed, validated solver options: one frozen dataclass per solver, checked once, here.

Every solver declares ``class Options(SolverOptions)`` with one ``option(default, rule)`` field per setting;
the defaults live only there. ``Solver.__init__(**kwargs)`` calls ``Options.build(solver_name, kwargs)``, which
rejects an unknown key (naming the closest valid one) and every value its rule refuses (naming the value and
the valid range), so a misspelt ``tim_limit=5`` or a zero budget fails at once instead of being ignored or
misreported later. A rule is a predicate plus the words that describe what it accepts.
"""
from __future__ import annotations

import difflib
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar


class SolverOptionError(ValueError):
    """An unknown solver option, or a value of the wrong type or out of range; the message says what fits."""

    def __init__(self, message: str, solver: str = "", option: str = "", value: Any = None):
        super().__init__(message)
        self.solver, self.option, self.value = solver, option, value


@dataclass(frozen=True)
class Rule:
    """What one option accepts: ``accepts(value)`` and the phrase ``describe`` used in error messages."""

    describe: str
    accepts: Callable[[Any], bool]

    def __or__(self, other: "Rule") -> "Rule":
        return Rule(f"{self.describe} or {other.describe}", lambda v: self.accepts(v) or other.accepts(v))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)


def integer(low: int | None = None, high: int | None = None) -> Rule:
    bounds = (f" >= {low}" if high is None else f" in [{low}, {high}]") if low is not None else ""
    return Rule(f"an integer{bounds}", lambda v: _is_int(v) and (low is None or v >= low)
                and (high is None or v <= high))


def real(low: float | None = None, high: float | None = None, low_open: bool = False) -> Rule:
    if low is None:
        bounds = ""
    elif high is None:
        bounds = f" {'>' if low_open else '>='} {low:g}"
    else:
        bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    return Rule(f"a finite number{bounds}",
                lambda v: _is_real(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or v <= high))


def one_of(*choices) -> Rule:
    return Rule("one of " + ", ".join(repr(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


NONE = Rule("None", lambda v: v is None)
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str))
CALLABLE = Rule("a callable", callable)
LEVEL_VECTORS = Rule("level-index vectors (a list or array of integers)",
                     lambda v: not isinstance(v, (str, bytes, dict)) and hasattr(v, "__len__"))


def stages() -> Rule:
    """Multi-step selection stages: [(fidelity, survivors), ...], both integers >= 1."""
    def ok(value):
        try:
            return all(len(s) == 2 and all(_is_int(k) and k >= 1 for k in s) for s in value)
        except TypeError:
            return False
    return Rule("a list of (fidelity, survivors) pairs of integers >= 1", ok)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def storage_url() -> Rule:
    """An optuna storage: a database URL (``sqlite:///study.db``, ``postgresql://...``) or a storage object."""
    return Rule("a database URL such as 'sqlite:///study.db' or an optuna storage object",
                lambda v: bool(_URL.match(v)) if isinstance(v, str) else hasattr(v, "create_new_study"))


def option(default, rule: Rule, doc: str = ""):
    """A dataclass field holding a solver option: its default, what it accepts, and a one-line meaning."""
    return field(default=default, metadata={"rule": rule, "doc": doc})


@dataclass(frozen=True)
class SolverOptions:
    """Base of every solver's ``Options``. ``PRESETS`` (optional): named bundles applied under explicit options;
    ``RENAMED``: old option name -> new one, named in the error a stale call gets."""

    PRESETS: ClassVar[dict[str, dict]] = {}
    RENAMED: ClassVar[dict[str, str]] = {}

    @classmethod
    def names(cls) -> list[str]:
        return sorted(f.name for f in fields(cls))

    @classmethod
    def build(cls, solver: str, kwargs: dict) -> "SolverOptions":
        """The options of ``solver`` from keyword arguments: unknown keys and bad values raise SolverOptionError."""
        for key in kwargs:
            if key not in cls.names():
                raise cls._unknown(solver, key, kwargs[key])
        preset = kwargs.get("preset")
        if cls.PRESETS and preset is not None:
            if preset not in cls.PRESETS:
                raise SolverOptionError(f"solver '{solver}' option preset={preset!r} is invalid: expected None or "
                                        f"one of {sorted(cls.PRESETS)}", solver, "preset", preset)
            kwargs = {**cls.PRESETS[preset], **kwargs}   # explicit options win over the preset
        options = cls(**kwargs)
        for f in fields(options):
            value = getattr(options, f.name)
            rule = f.metadata.get("rule")
            if rule is not None and not rule.accepts(value):
                meaning = f" ({f.metadata['doc']})" if f.metadata.get("doc") else ""
                raise SolverOptionError(f"solver '{solver}' option {f.name}={value!r} is invalid: expected "
                                        f"{rule.describe}{meaning}", solver, f.name, value)
        options.check(solver)
        return options

    @classmethod
    def _unknown(cls, solver: str, key: str, value) -> SolverOptionError:
        valid = cls.names()
        close = difflib.get_close_matches(key, valid, n=1)
        if key in cls.RENAMED:
            hint = f" (renamed to '{cls.RENAMED[key]}')."
        else:
            hint = f"; did you mean '{close[0]}'?" if close else "."
        listing = ", ".join(valid) or "(none: this solver takes no options)"
        return SolverOptionError(f"unknown option '{key}' for solver '{solver}'{hint} Valid options: {listing}",
                                 solver, key, value)

    def check(self, solver: str) -> None:
        """Rules linking several options (override; raise ``self.error``)."""

    def error(self, solver: str, name: str, expected: str) -> SolverOptionError:
        value = getattr(self, name)
        return SolverOptionError(f"solver '{solver}' option {name}={value!r} is invalid: expected {expected}",
                                 solver, name, value)

    def as_dict(self) -> dict:
        """Field name -> value, without copying (values may be callables holding a model)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_seed(seed, solver: str) -> None:
    """A solve seed is None or a non-negative integer (what ``numpy.random.default_rng`` takes)."""
    if seed is not None and not (_is_int(seed) and seed >= 0):
        raise SolverOptionError(f"solver '{solver}' seed={seed!r} is invalid: expected None or an integer >= 0",
                                solver, "seed", seed)
