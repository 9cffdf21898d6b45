"""Cost providers: where the matrix of one cost kind comes from (the analytic model, measured kernel latency).

Callers ask for a cost kind and get tables that hold it: ``with_costs(tables, "latency_decode",
latency_table="lat.csv")``. A provider is a function ``(tables, kind, **context) -> (n_units, n_levels)``
registered for the kinds it computes. Torch-free at import: the latency provider imports the kernels only when
it has to measure.

Latency tables (``LATENCY_COLUMNS``, one row per measured GEMV shape x level, written by
``allocator.kernels.latency.measure_latency_table`` and ``studies/kernel_bench.py``) are read here, without
torch, so that a saved table prices a problem on any machine.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import cache_dir
from .costs import COST_KINDS, projection_costs
from .formats import DENSE_FORMAT, decode_kernel, prefill_kernel
from .tables import Tables, Unit

ANALYTIC_KINDS = COST_KINDS
LATENCY_COLUMNS = ["gpu", "d_out", "d_in", "s", "rho", "dtype", "batch", "latency_us", "dense_us", "path", "fmt"]
OPTIONAL_LATENCY_COLUMNS = {"path": "standalone", "fmt": "bf16"}   # older tables: standalone bf16 rows
PREFILL_COLUMNS = ["gpu", "d_out", "d_in", "tokens", "kernel", "dtype", "latency_us"]
# projections that read one input run as one fused GEMV in a decode step (q|k|v, gate|up): time them as one
FUSED_INPUTS = (("q", "k", "v"), ("gate", "up"))
NEEDS_GPU = ("problem.cost=latency_decode needs a CUDA GPU with triton, or problem.latency_table=<csv written by "
             "studies/kernel_bench.py or the latency evaluator>")

_PROVIDERS: dict[str, Callable[..., np.ndarray]] = {}
_KIND_PROVIDER: dict[str, str] = {}


class CostProviderError(ValueError):
    """A cost kind cannot be provided here; the message says what is missing and how to supply it."""


def register_cost_provider(name: str, kinds: Sequence[str] | None = None):
    """Decorator: register ``fn(tables, kind, **context) -> matrix`` under ``name`` for ``kinds`` (default: name)."""
    def decorator(fn):
        _PROVIDERS[name] = fn
        for kind in kinds or (name,):
            _KIND_PROVIDER[kind] = name
        return fn
    return decorator


def cost_provider(name: str) -> Callable[..., np.ndarray]:
    """The provider registered as ``name``, or the one that computes cost kind ``name``."""
    name = _KIND_PROVIDER.get(name, name)
    if name not in _PROVIDERS:
        raise CostProviderError(f"no cost provider '{name}'; registered providers {sorted(_PROVIDERS)} "
                                f"provide the cost kinds {available_cost_kinds()}")
    return _PROVIDERS[name]


def available_cost_kinds() -> list[str]:
    return sorted(_KIND_PROVIDER)


def check_available(kind: str, **context) -> None:
    """Fail early, before any model loads, when cost kind ``kind`` cannot be provided here with ``context``."""
    if kind not in _KIND_PROVIDER:
        raise CostProviderError(f"unknown cost kind '{kind}'; the registered providers compute {available_cost_kinds()}")
    if kind in ("latency_decode", "latency_prefill") and context.get("latency_table") is None:
        _gpu_name()                          # measuring needs a CUDA GPU: its error says so and names the fix


def with_costs(tables: Tables, kind: str, **context) -> Tables:
    """``tables`` holding cost kind ``kind``: unchanged when they already do, else priced by its provider.

    ``context`` holds the provider's options (None values are ignored), e.g. ``latency_table=`` for
    ``latency_decode`` or ``tokens=`` for the analytic kinds.
    """
    if kind in tables.costs:
        return tables
    if kind not in _KIND_PROVIDER:
        raise CostProviderError(f"unknown cost kind '{kind}'; the tables hold {sorted(tables.costs)} and the "
                                f"registered providers compute {available_cost_kinds()}")
    provider = cost_provider(kind)
    options = {k: v for k, v in context.items() if v is not None}
    accepted = [p for p in inspect.signature(provider).parameters if p not in ("tables", "kind")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CostProviderError(f"cost kind '{kind}' takes the options {accepted}, not {unknown}")
    matrix = provider(tables, kind, **options)
    sources = {**tables.provenance.get("cost_sources", {}), kind: _KIND_PROVIDER[kind]}
    return Tables(tables.units, tables.levels, {**tables.costs, kind: matrix}, tables.degradation,
                  {**tables.provenance, "cost_sources": sources})


# ---------------------------------------------------------------------------------------------- analytic
@register_cost_provider("analytic", kinds=ANALYTIC_KINDS)
def analytic_costs(tables: Tables, kind: str, *, tokens: int | None = None) -> np.ndarray:
    """The analytic cost model (``costs.projection_costs``) summed over each unit's projection shapes."""
    tokens = int(tokens or tables.provenance.get("tokens", 2048))
    _require_shapes(tables, kind, "build the tables with analytic_tables(config, levels) or give the cost column")
    levels = tables.level_objects()
    return np.array([[sum(projection_costs(d_out, d_in, lv, tokens)[kind]
                          for d_out, d_in in unit.shapes) for lv in levels] for unit in tables.units])


def _require_shapes(tables: Tables, kind: str, fix: str) -> None:
    shapeless = [u.name for u in tables.units if not u.shapes]
    if shapeless:
        raise CostProviderError(f"cost kind '{kind}' needs the projection shapes of every unit; units "
                                f"{shapeless[:5]} have none: {fix}")


# ---------------------------------------------------------------------------------------------- latency
@register_cost_provider("latency_decode")
def latency_decode_costs(tables: Tables, kind: str, *, latency_table=None, dtype: str | None = None, batch: int = 1,
                         gpu: str | None = None, path: str = "standalone", with_fallback: bool = True,
                         device: str = "cuda", rep_ms: int = 40, seed: int = 0, cache: bool = True) -> np.ndarray:
    """Measured decode latency (us) per unit and level: from a saved latency table, else measured on this GPU.
    Levels in low-bit formats take the rows of their format (``formats.decode_kernel``); a plan with any of them
    decodes in the runtime's per-site mode, so then every row is the standalone kernel's (``path`` ignored)."""
    formats = sorted({lv.fmt for lv in tables.level_objects()})
    no_kernel = [f for f in formats if decode_kernel(f) is None]
    if no_kernel:
        raise CostProviderError(f"latency_decode: formats {no_kernel} have no decode kernel (low-bit decode runs "
                                "w4a16 (per channel or g >= 16), w8a16 and w8a8-fp8): drop them from the levels or "
                                "use problem.cost=bytes_decode")
    if any(decode_kernel(f) != "bf16" for f in formats):
        path = "standalone"
    _require_shapes(tables, kind, "build the tables with analytic_tables(config, levels)")
    shapes = [decode_gemv_shapes(u) for u in tables.units]
    if latency_table is None:
        dtype = dtype or "float16"
        frame, source = _measured_or_cached(shapes, tables, dtype, batch, path, cache, device=device, rep_ms=rep_ms,
                                            seed=seed)
    else:
        frame, source = read_latency_table(latency_table), str(latency_table)
        dtypes = sorted(frame["dtype"].astype(str).unique())
        dtype = dtype or (dtypes[0] if len(dtypes) == 1 else "float16")   # a table of one dtype: that one
    try:
        return latency_cost_matrix(frame, shapes, tables.levels, dtype=dtype, batch=batch, gpu=gpu,
                                   with_fallback=with_fallback, path=path)
    except KeyError as exc:
        raise CostProviderError(f"latency table {source}: {exc.args[0]}; measure these shapes with "
                                "allocator.kernels.latency.measure_latency_table (studies/kernel_bench.py)") from exc


@register_cost_provider("latency_prefill")
def latency_prefill_costs(tables: Tables, kind: str, *, latency_table=None, tokens: int | None = None,
                          dtype: str = "bfloat16", gpu: str | None = None, device: str = "cuda", rep_ms: int = 40,
                          seed: int = 0, cache: bool = True) -> np.ndarray:
    """Measured prefill time (us) of each unit's GEMMs at ``tokens`` (default: the tables' prefill length) per
    level: the prefill kernel of the level's format (``formats.prefill_kernel``: W8A8 FP8 or a bf16 GEMM; prefill
    is dense, so s and rho do not change it), from a saved table (``PREFILL_COLUMNS``) or measured on this GPU."""
    tokens = int(tokens or tables.provenance.get("tokens", 2048))
    formats = sorted({lv.fmt for lv in tables.level_objects()})
    no_kernel = [f for f in formats if prefill_kernel(f) is None]
    if no_kernel:
        raise CostProviderError(f"latency_prefill: formats {no_kernel} have no prefill kernel in the runtime "
                                "(INT activations): drop them from the levels or use problem.cost=time_prefill")
    _require_shapes(tables, kind, "build the tables with analytic_tables(config, levels)")
    shapes = [decode_gemv_shapes(u) for u in tables.units]
    kernels = sorted({prefill_kernel(f) for f in formats})
    if latency_table is None:
        frame, source = _prefill_measured_or_cached(shapes, tokens, kernels, dtype, cache, device=device,
                                                    rep_ms=rep_ms, seed=seed)
    else:
        frame, source = _read_table(latency_table, PREFILL_COLUMNS, "measure_prefill_table"), str(latency_table)
    table = frame[(frame["dtype"] == dtype) & (frame["tokens"] == tokens)]
    table = table[table["gpu"] == (gpu or (table["gpu"].iloc[0] if len(table) else None))]
    kernel_of = [prefill_kernel(lv.fmt) for lv in tables.level_objects()]
    out = np.zeros((tables.n_units, tables.n_levels))
    for u, unit_shapes in enumerate(shapes):
        for d_out, d_in in unit_shapes:
            for j, kernel in enumerate(kernel_of):
                row = table[(table["d_out"] == d_out) & (table["d_in"] == d_in) & (table["kernel"] == kernel)]
                if row.empty:
                    raise CostProviderError(f"prefill table {source}: no {kernel} GEMM of {d_out}x{d_in} at {tokens} "
                                            f"tokens ({dtype}); measure it with allocator.kernels.latency."
                                            "measure_prefill_table")
                out[u, j] += float(row["latency_us"].iloc[0])
    return out


def _prefill_measured_or_cached(shapes, tokens: int, kernels, dtype: str, cache: bool, **options):
    gpu = _gpu_name()
    gemms = sorted({tuple(s) for unit in shapes for s in unit})
    key = {"gpu": gpu, "dtype": dtype, "tokens": tokens, "kernels": kernels, "shapes": gemms}

    def measure() -> pd.DataFrame:
        try:
            import torch
            from allocator.kernels.latency import measure_prefill_table
        except ImportError as exc:
            raise CostProviderError(f"{NEEDS_GPU} ({exc})") from exc
        return measure_prefill_table(gemms, tokens=(tokens,), kernels=kernels, dtype=getattr(torch, dtype), **options)
    return _cached(f"prefill-{_slug(gpu)}-{dtype}-t{tokens}", key, cache, measure,
                   lambda f: _read_table(f, PREFILL_COLUMNS, "measure_prefill_table"))


def _slug(gpu: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", gpu)


def _cached(stem: str, key: dict, cache: bool, measure, read) -> tuple[pd.DataFrame, str]:
    """A measured table read from ``cache_dir()/latency/<stem>-<hash of key>.csv``, or measured once and saved there
    (written to a temporary file first, so an interrupted run leaves no partial table)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    file = cache_dir() / "latency" / f"{stem}-{digest}.csv"
    if cache and file.exists():
        return read(file), str(file)
    frame = measure()
    if cache:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        frame.to_csv(tmp, index=False)
        tmp.replace(file)
    return frame, f"this GPU ({key['gpu']}, saved as {file})" if cache else f"this GPU ({key['gpu']})"


def _read_table(table, columns, writer: str, what: str = "") -> pd.DataFrame:
    """A measured table from a DataFrame or a CSV path, with ``columns`` checked (errors name ``writer``)."""
    if isinstance(table, pd.DataFrame):
        frame, where = table, f"the {what}table"
    else:
        where = str(table)
        try:
            frame = pd.read_csv(Path(table))
        except FileNotFoundError as exc:
            raise CostProviderError(f"no latency table {where}; {NEEDS_GPU}") from exc
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise CostProviderError(f"{where} is not a readable CSV ({exc}); give the CSV {writer} wrote") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CostProviderError(f"{where} lacks the {what}columns {missing}; a table written by {writer} has "
                                f"{columns}")
    return frame


def decode_gemv_shapes(unit: Unit) -> list[tuple[int, int]]:
    """(d_out, d_in) of the GEMVs a decode step runs for ``unit``: q|k|v and gate|up fused, as the kernels run them."""
    fused = {kind: group for group in FUSED_INPUTS for kind in group}
    out: dict[object, list[int]] = {}
    for i, (kind, (d_out, d_in)) in enumerate(zip(unit.kinds or [None] * len(unit.shapes), unit.shapes)):
        key = (fused.get(kind, i), d_in)
        out.setdefault(key, [0, d_in])[0] += d_out
    return [tuple(v) for v in out.values()]


def read_latency_table(table) -> pd.DataFrame:
    """A latency table from a DataFrame or the CSV path ``measure_latency_table`` output was saved to."""
    return _read_table(table, [c for c in LATENCY_COLUMNS if c not in OPTIONAL_LATENCY_COLUMNS],
                       "measure_latency_table (studies/kernel_bench.py latency --out DIR)", "latency ")


def _gpu_name() -> str:
    try:
        import torch
    except ImportError as exc:
        raise CostProviderError(f"{NEEDS_GPU} ({exc})") from exc
    if not torch.cuda.is_available():
        raise CostProviderError(f"{NEEDS_GPU} (no CUDA device is visible)")
    return torch.cuda.get_device_name()


def _measured_or_cached(shapes, tables: Tables, dtype: str, batch: int, path: str, cache: bool,
                        **options) -> tuple[pd.DataFrame, str]:
    """A latency table for these GEMV shapes and levels on this GPU: read from the cache, keyed by GPU name,
    dtype, batch, kernel path, shapes and levels, or measured once and saved there."""
    gpu = _gpu_name()
    levels = sorted({(lv.s, lv.rho, lv.fmt) for lv in tables.level_objects()})
    key = {"gpu": gpu, "dtype": dtype, "batch": batch, "path": path, "levels": levels,
           "shapes": sorted({tuple(s) for unit in shapes for s in unit})}
    return _cached(f"{_slug(gpu)}-{dtype}-b{batch}", key, cache,
                   lambda: _measure(shapes, tables, dtype, batch, path, **options), read_latency_table)


def _measure(shapes, tables: Tables, dtype: str, batch: int, path: str, **options) -> pd.DataFrame:
    try:
        import torch
        import triton  # noqa: F401  (the kernels need it)
        from allocator.kernels.latency import measure_latency_table
    except ImportError as exc:
        raise CostProviderError(f"{NEEDS_GPU} ({exc})") from exc
    if not torch.cuda.is_available():
        raise CostProviderError(f"{NEEDS_GPU} (no CUDA device is visible)")
    levels = tables.level_objects()
    return measure_latency_table(sorted({s for unit in shapes for s in unit}),
                                 sparsities=sorted({lv.s for lv in levels}), dtypes=(getattr(torch, dtype),),
                                 batches=(batch,), rhos=sorted({lv.rho for lv in levels}, reverse=True),
                                 paths=tuple(dict.fromkeys(("standalone", path))),
                                 formats=tuple(dict.fromkeys(["bf16", *sorted({lv.fmt for lv in levels})])), **options)


def _levels_frame(levels) -> pd.DataFrame:
    if isinstance(levels, pd.DataFrame):
        df = levels.copy()
    else:
        items = [lv if isinstance(lv, (tuple, list)) else (lv, 1.0) for lv in levels]
        df = pd.DataFrame(items, columns=["s", "rho", "fmt"][:max(2, max((len(i) for i in items), default=2))])
    for column, default in (("rho", 1.0), ("fmt", DENSE_FORMAT)):
        if column not in df:
            df[column] = default
    return df.fillna({"rho": 1.0, "fmt": DENSE_FORMAT})


def latency_cost_matrix(
    df: pd.DataFrame,
    units_shapes: Sequence[Sequence[tuple[int, int]]],
    levels,
    dtype: str = "float16",
    batch: int = 1,
    gpu: str | None = None,
    with_fallback: bool = True,
    path: str = "standalone",
) -> np.ndarray:
    """Decode latency in microseconds, shape (n_units, n_levels).

    units_shapes[u] lists the (d_out, d_in) GEMVs of unit u; levels is a sequence of s values, of (s, rho)
    pairs, or a DataFrame with columns s (and rho). Each GEMV takes the row of its shape with the nearest
    measured rho, then the nearest s; `with_fallback` takes min(kernel, dense) as the op does. `path` picks the
    kernel path ("fused": the decode step of pipelined.py; tables without a path column are standalone).
    A shape (or dtype / batch / path / gpu) that was not measured raises KeyError.
    """
    table = df[(df["dtype"] == dtype) & (df["batch"] == batch)]
    table = table.assign(**{c: table[c].fillna(v) if c in table else v for c, v in OPTIONAL_LATENCY_COLUMNS.items()})
    table = table[table["path"] == path]
    if table.empty:
        raise KeyError(f"no latency rows for dtype {dtype}, batch {batch}, path {path}")
    gpu = table["gpu"].iloc[0] if gpu is None else gpu
    table = table[table["gpu"] == gpu]
    if table.empty:
        raise KeyError(f"no latency rows for gpu {gpu!r} (dtype {dtype}, batch {batch}, path {path})")
    lv = _levels_frame(levels)
    out = np.zeros((len(units_shapes), len(lv)))
    for u, shapes in enumerate(units_shapes):
        for d_out, d_in in shapes:
            shape_rows = table[(table["d_out"] == d_out) & (table["d_in"] == d_in)]
            if shape_rows.empty:
                raise KeyError(f"no latency measured for shape {d_out}x{d_in} ({dtype}, batch {batch}, {gpu})")
            for j, (s, rho, fmt) in enumerate(zip(lv["s"], lv["rho"], lv["fmt"])):
                rows = shape_rows[shape_rows["fmt"] == fmt]
                if rows.empty:
                    raise KeyError(f"no latency measured for shape {d_out}x{d_in} in format {fmt} ({dtype}, batch "
                                   f"{batch}, {gpu})")
                near_rho = rows[(rows["rho"] - rho).abs() == (rows["rho"] - rho).abs().min()]
                row = near_rho.iloc[int(np.argmin((near_rho["s"] - s).abs().to_numpy()))]
                us = row["latency_us"]
                if with_fallback and fmt == DENSE_FORMAT:   # the 16-bit op falls back to cuBLAS; low-bit ones cannot
                    us = min(us, row["dense_us"])
                out[u, j] += us
    return out
