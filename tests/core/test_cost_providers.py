"""Cost providers: analytic kinds, measured latency from a saved table (the CPU path), the no-GPU error."""
import sys

import numpy as np
import pandas as pd
import pytest

from allocator import (CostProviderError, Tables, analytic_tables, available_cost_kinds, cost_provider, make_levels,
                       register_cost_provider, with_costs)
from allocator.cost_providers import LATENCY_COLUMNS, decode_gemv_shapes

TINY = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 32, "_name_or_path": "tiny"}
LEVELS = make_levels(s=[0.0, 0.5], rho=[1.0, 0.9])
# the GEMVs of one decode step of TINY: q|k|v fused (8 + 4 + 4 = 16 outputs), o, gate|up fused, down
GEMVS = {(16, 8): 3.0, (8, 8): 2.0, (32, 8): 5.0, (8, 16): 4.0}


def without(tables, kind):
    return Tables(tables.units, tables.levels, {k: v for k, v in tables.costs.items() if k != kind},
                  tables.degradation, tables.provenance)


def test_analytic_provider_reproduces_analytic_tables():
    t = analytic_tables("smollm2-135m", LEVELS, unit="input", tokens=512)
    assert with_costs(t, "bytes_decode") is t  # already held: unchanged
    for kind in ("flops_prefill", "flops_decode", "bytes_decode"):
        back = with_costs(without(t, kind), kind)
        np.testing.assert_array_equal(back.cost(kind), t.cost(kind))
        assert back.provenance["cost_sources"][kind] == "analytic"


def test_unknown_kind_and_option_are_clear():
    t = analytic_tables(TINY, LEVELS)
    with pytest.raises(CostProviderError, match=r"unknown cost kind 'wallclock'.*'latency_decode'"):
        with_costs(t, "wallclock")
    with pytest.raises(CostProviderError, match=r"takes the options \['tokens'\], not \['latency'\]"):
        with_costs(without(t, "flops_decode"), "flops_decode", latency=1)
    with pytest.raises(CostProviderError, match="no cost provider 'nope'"):
        cost_provider("nope")


def test_registered_provider_is_used(monkeypatch):
    from allocator import cost_providers
    for registry in ("_PROVIDERS", "_KIND_PROVIDER"):  # register into copies: other tests see the shipped registry
        monkeypatch.setattr(cost_providers, registry, dict(getattr(cost_providers, registry)))

    @register_cost_provider("unit_count")
    def unit_count(tables, kind, *, per_unit=1.0):
        return np.full((tables.n_units, tables.n_levels), per_unit)

    assert "unit_count" in available_cost_kinds()
    t = with_costs(analytic_tables(TINY, LEVELS), "unit_count", per_unit=2.0, latency_table=None)
    assert (t.cost("unit_count") == 2.0).all()


def latency_csv(path, gemvs=GEMVS):
    """A table in the format measure_latency_table returns and studies/kernel_bench.py saves (to_csv, no index)."""
    rows = [["CPU test", d_out, d_in, s, rho, "float16", 1, dense * (1 - s * (1.2 - rho)), dense, "standalone"]
            for (d_out, d_in), dense in gemvs.items() for rho in (1.0, 0.9) for s in (0.0, 0.5)]
    pd.DataFrame(rows, columns=LATENCY_COLUMNS[:-1]).to_csv(path, index=False)   # an older table: no fmt column
    return path


def test_latency_decode_by_format(tmp_path):
    """Levels in a low-bit format price with their format's rows (no fallback to the bf16 dense time: the low-bit
    op has no bf16 copy), the bf16 ones with the bf16 rows; a format that was not measured, or that has no
    decode kernel, is named."""
    rows = [["CPU test", d_out, d_in, s, 1.0, "float16", 1, dense * (1 - s / 2) * scale, dense, path, fmt]
            for (d_out, d_in), dense in GEMVS.items() for s in (0.0, 0.5)
            for fmt, scale, path in (("bf16", 1.0, "standalone"), ("bf16", 0.8, "fused"), ("w4a16-g128", 1.5,
                                                                                          "standalone"))]
    table = pd.DataFrame(rows, columns=LATENCY_COLUMNS)
    t = analytic_tables(TINY, make_levels(s=[0.0, 0.5], fmt=["bf16", "w4a16-g128"]), unit="input")
    lat = with_costs(t, "latency_decode", latency_table=table, path="fused").cost("latency_decode")
    levels = t.level_objects()
    dense = GEMVS[(16, 8)]
    for j, lv in enumerate(levels):     # a low-bit level in the grid: every level is timed standalone
        want = dense * (1 - lv.s / 2) * (1.5 if lv.fmt == "w4a16-g128" else 1.0)
        assert lat[0, j] == pytest.approx(want if lv.fmt != "bf16" else min(want, dense))
    only_bf16 = with_costs(analytic_tables(TINY, make_levels(s=[0.5]), unit="input"), "latency_decode",
                           latency_table=table, path="fused").cost("latency_decode")
    assert only_bf16[0, 0] == pytest.approx(dense * 0.75 * 0.8)                      # bf16 alone: the fused rows
    with pytest.raises(CostProviderError, match="in format w8a16"):
        with_costs(analytic_tables(TINY, make_levels(s=[0.5], fmt=["w8a16"]), unit="input"), "latency_decode",
                   latency_table=table)
    with pytest.raises(CostProviderError, match=r"formats \['w3a16-g128'\] have no decode kernel"):
        with_costs(analytic_tables(TINY, make_levels(s=[0.5], fmt=["w3a16-g128"]), unit="input"), "latency_decode",
                   latency_table=table)


def test_latency_decode_from_a_saved_table(tmp_path):
    t = analytic_tables(TINY, LEVELS, unit="input")
    assert [decode_gemv_shapes(u) for u in t.units[:4]] == [[(16, 8)], [(8, 8)], [(32, 8)], [(8, 16)]]
    priced = with_costs(t, "latency_decode", latency_table=str(latency_csv(tmp_path / "lat.csv")))
    lat = priced.cost("latency_decode")
    assert lat.shape == (8, 4) and priced.provenance["cost_sources"]["latency_decode"] == "latency_decode"
    np.testing.assert_allclose(lat[0], [3.0, 3.0, 3.0 * 0.9, 3.0 * 0.85])  # levels (0,1), (0,.9), (.5,1), (.5,.9)
    per_layer = with_costs(analytic_tables(TINY, LEVELS), "latency_decode", latency_table=tmp_path / "lat.csv")
    np.testing.assert_allclose(per_layer.cost("latency_decode"), lat.reshape(2, 4, 4).sum(axis=1))


def test_latency_decode_errors(tmp_path, monkeypatch):
    t = analytic_tables(TINY, LEVELS, unit="input")
    small = latency_csv(tmp_path / "small.csv", {(16, 8): 3.0})
    with pytest.raises(CostProviderError, match=r"small.csv: no latency measured for shape 8x8.*measure_latency_table"):
        with_costs(t, "latency_decode", latency_table=small)
    with pytest.raises(CostProviderError, match="no latency table .*missing.csv"):
        with_costs(t, "latency_decode", latency_table=tmp_path / "missing.csv")
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch at all
    with pytest.raises(CostProviderError, match=r"needs a CUDA GPU with triton, or problem.latency_table=<csv"):
        with_costs(t, "latency_decode")


def test_a_measured_latency_table_is_cached_by_gpu_dtype_batch_shapes_and_levels(tmp_path, monkeypatch):
    """Measured once per (GPU name, dtype, batch, path, shapes, levels), then read back from the cache."""
    import allocator.cost_providers as cp
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cp, "_gpu_name", lambda: "NVIDIA H200")
    measured = []

    def fake_measure(shapes, tables, dtype, batch, path, **options):
        measured.append((dtype, batch))
        return pd.read_csv(latency_csv(tmp_path / f"m{len(measured)}.csv"))
    monkeypatch.setattr(cp, "_measure", fake_measure)
    t = analytic_tables(TINY, LEVELS, unit="input")
    first = with_costs(t, "latency_decode").cost("latency_decode")
    again = with_costs(t, "latency_decode").cost("latency_decode")
    assert measured == [("float16", 1)] and np.array_equal(first, again)
    [saved] = list((tmp_path / "allocator" / "latency").glob("NVIDIA-H200-float16-b1-*.csv"))
    with_costs(analytic_tables(TINY, make_levels(s=[0.0, 0.6])), "latency_decode")    # other levels: measured
    with_costs(t, "latency_decode", cache=False)                                       # asked not to cache
    assert len(measured) == 3 and saved.exists()


def test_latency_prefill_by_format(tmp_path):
    """Prefill prices each level by its format's prefill kernel (w8a8-fp8: the FP8 GEMM; bf16 and weight-only
    formats: the bf16 GEMM), whatever its sparsity; a format without a prefill kernel is named."""
    from allocator.cost_providers import PREFILL_COLUMNS
    rows = [["CPU test", d_out, d_in, 2048, kernel, "bfloat16", dense * (0.6 if kernel == "fp8" else 1.0)]
            for (d_out, d_in), dense in GEMVS.items() for kernel in ("bf16", "fp8")]
    path = tmp_path / "prefill.csv"
    pd.DataFrame(rows, columns=PREFILL_COLUMNS).to_csv(path, index=False)
    t = analytic_tables(TINY, make_levels(s=[0.0, 0.5], fmt=["bf16", "w4a16-g128", "w8a8-fp8"]), unit="input")
    lat = with_costs(t, "latency_prefill", latency_table=path).cost("latency_prefill")
    for j, lv in enumerate(t.level_objects()):
        assert lat[0, j] == pytest.approx(GEMVS[(16, 8)] * (0.6 if lv.fmt == "w8a8-fp8" else 1.0))
    with pytest.raises(CostProviderError, match="no fp8 GEMM of 16x8 at 512 tokens"):
        with_costs(analytic_tables(TINY, make_levels(s=[0.0], fmt=["w8a8-fp8"]), unit="input", tokens=512),
                   "latency_prefill", latency_table=path)
    with pytest.raises(CostProviderError, match=r"\['w8a8-int8'\] have no prefill kernel"):
        with_costs(analytic_tables(TINY, make_levels(s=[0.0], fmt=["w8a8-int8"]), unit="input"), "latency_prefill",
                   latency_table=path)
