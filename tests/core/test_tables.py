"""Tables: validation errors, parquet + JSON round trip, CSV import."""
import numpy as np
import pandas as pd
import pytest

from allocator import Tables, TablesError, Unit, analytic_tables, make_levels
from allocator.synthetic import synthetic_tables


def small_tables(n=4, m=3, seed=0):
    rng = np.random.default_rng(seed)
    units = [Unit(f"u{i}", i) for i in range(n)]
    return Tables(units, make_levels(s=np.linspace(0, 0.6, m)), {"flops_decode": rng.random((n, m)) + 1},
                  rng.random((n, m)), {"model": "toy"})


def test_roundtrip_parquet_json(tmp_path):
    t = synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=[0, 0.3, 0.6], rho=[1, 0.8]), unit="projection"))
    t.save(tmp_path / "t")
    back = Tables.load(tmp_path / "t")
    assert back.unit_names == t.unit_names and back.units == t.units
    pd.testing.assert_frame_equal(back.levels, t.levels)
    for k in t.costs:
        np.testing.assert_array_equal(back.costs[k], t.costs[k])
    np.testing.assert_array_equal(back.degradation, t.degradation)
    assert back.provenance["model"] == t.provenance["model"]
    assert back.content_hash() == t.content_hash()


@pytest.mark.parametrize("bad, match", [
    (np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (-1.0, "negative cost"),
])
def test_bad_cost_values(bad, match):
    t = small_tables()
    costs = t.costs["flops_decode"].copy()
    costs[1, 2] = bad
    with pytest.raises(TablesError, match=match):
        Tables(t.units, t.levels, {"flops_decode": costs})


def test_nan_degradation_and_shape_mismatch():
    t = small_tables()
    deg = t.degradation.copy()
    deg[0, 0] = np.nan
    with pytest.raises(TablesError, match="degradation holds NaN"):
        t.with_degradation(deg)
    with pytest.raises(TablesError, match=r"shape \(4, 2\), expected"):
        Tables(t.units, t.levels, {"flops_decode": t.costs["flops_decode"][:, :2]})


def test_duplicate_units_and_empty_grid():
    t = small_tables()
    with pytest.raises(TablesError, match="duplicate unit names"):
        Tables([Unit("a", 0), Unit("a", 1)], t.levels, {})
    with pytest.raises(TablesError, match="level grid is empty"):
        Tables(t.units, pd.DataFrame({"s": []}), {})
    with pytest.raises(TablesError, match="unknown level columns"):
        Tables(t.units, pd.DataFrame({"sparsity": [0.1]}), {})


def test_csv_import(tmp_path):
    t = small_tables()
    frame = t.to_frame().drop(columns=["level"])
    frame.to_csv(tmp_path / "mine.csv", index=False)
    back = Tables.from_csv(tmp_path / "mine.csv")
    np.testing.assert_allclose(back.costs["flops_decode"], t.costs["flops_decode"])
    np.testing.assert_allclose(back.degradation, t.degradation)
    assert back.unit_names == t.unit_names


def test_malformed_csv(tmp_path):
    (tmp_path / "a.csv").write_text("unit,s,flops\nu0,0.0,1\nu0,0.5,2\nu1,0.0,1\n")  # u1 lacks s=0.5
    with pytest.raises(TablesError, match="exactly once"):
        Tables.from_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("name,s,flops\nu0,0.0,1\n")
    with pytest.raises(TablesError, match="no 'unit' column"):
        Tables.from_csv(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("unit,s,flops\nu0,0.0,abc\nu0,0.5,2\n")
    with pytest.raises(TablesError, match="not numeric"):
        Tables.from_csv(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("unit,s,flops\nu0,0.0,1\nu0,0.5,nan\n")
    with pytest.raises(TablesError, match="NaN"):
        Tables.from_csv(tmp_path / "d.csv")


def test_corrupt_saved_tables(tmp_path):
    small_tables().save(tmp_path / "t")
    (tmp_path / "t" / "tables.parquet").write_bytes(b"not parquet")
    with pytest.raises(TablesError, match="corrupt"):
        Tables.load(tmp_path / "t")
    with pytest.raises(TablesError, match="missing"):
        Tables.load(tmp_path / "nothing")


def test_repr_summarizes():
    t = analytic_tables("smollm2-135m", make_levels(s=[0, 0.5]))
    assert repr(t) == ("Tables(30 units x 2 levels, costs ['bytes_decode', 'flops_decode', 'flops_prefill', 'time_prefill'], "
                       "no degradation, model HuggingFaceTB/SmolLM2-135M-Instruct)")
    assert "degradation (ppl)" in repr(t.with_degradation(np.zeros((30, 2)), metric="ppl"))


def test_load_aligns_rows_by_unit_name(tmp_path):
    t = small_tables()
    t.save(tmp_path / "t")
    frame = pd.read_parquet(tmp_path / "t" / "tables.parquet")
    frame.iloc[::-1].to_parquet(tmp_path / "t" / "tables.parquet", index=False)  # rows in another order
    back = Tables.load(tmp_path / "t")
    np.testing.assert_array_equal(back.costs["flops_decode"], t.costs["flops_decode"])
    np.testing.assert_array_equal(back.degradation, t.degradation)


def test_load_rejects_unit_names_that_disagree(tmp_path):
    small_tables().save(tmp_path / "t")
    frame = pd.read_parquet(tmp_path / "t" / "tables.parquet")
    frame.assign(unit=frame["unit"].replace({"u0": "layers.0"})).to_parquet(tmp_path / "t" / "tables.parquet")
    with pytest.raises(TablesError, match=r"disagree with .*tables.json: only in the parquet \['layers.0'\], "
                                          r"only in the JSON \['u0'\]"):
        Tables.load(tmp_path / "t")


def test_load_rejects_incomplete_json(tmp_path):
    import json
    small_tables().save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "tables.json").read_text())
    (tmp_path / "t" / "tables.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "units"}))
    with pytest.raises(TablesError, match="tables.json has no 'units' list"):
        Tables.load(tmp_path / "t")
    meta["units"][1] = {"layer": 1}
    (tmp_path / "t" / "tables.json").write_text(json.dumps(meta))
    with pytest.raises(TablesError, match="at least 'name' and 'layer'"):
        Tables.load(tmp_path / "t")


def test_string_costs_are_a_tables_error():
    t = small_tables()
    with pytest.raises(TablesError, match="cost 'flops_decode' is not numeric"):
        Tables(t.units, t.levels, {"flops_decode": [["a", "b", "c"]] * 4})


@pytest.mark.parametrize("text, match", [
    ("unit,s,flops\nu0,low,1\nu0,0.5,2\n", r"column 's' of .* is not numeric \(values such as \['low'\]\)"),
    ("unit,s,layer,flops\nu0,0.0,first,1\nu0,0.5,first,2\n", "column 'layer' .* not numeric"),
])
def test_csv_non_numeric_level_and_layer_columns(tmp_path, text, match):
    (tmp_path / "a.csv").write_text(text)
    with pytest.raises(TablesError, match=match):
        Tables.from_csv(tmp_path / "a.csv")


def test_csv_unit_names_are_text(tmp_path):
    (tmp_path / "a.csv").write_text("unit,s,flops\n1,0.0,1\n1,0.5,2\n01,0.0,3\n01,0.5,4\n")
    t = Tables.from_csv(tmp_path / "a.csv")
    assert t.unit_names == ["1", "01"]
    np.testing.assert_array_equal(t.costs["flops"], [[1, 2], [3, 4]])
