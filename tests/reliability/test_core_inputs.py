"""Bad-input catalogue of the torch-free core: every bad input is the project's own error (or a standard one)
whose message names the input and says how to fix it."""
import json
import sys
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from allocator import (Allocation, AllocationError, CostProviderError, LevelError, Tables, TablesError, Unit,
                       analytic_tables, load_model_config, make_levels, model_shape, normalize_levels, with_costs)

UNITS = [Unit("u0", 0), Unit("u1", 1)]
SMOL = load_model_config("smollm2-135m")


def good_tables():
    return Tables(UNITS, make_levels(s=[0.0, 0.5]), {"flops": np.ones((2, 2))}, np.zeros((2, 2)))


def saved(tmp_path, edit_json=None, edit_frame=None):
    """Save good tables, then edit tables.json (a dict -> dict) or the parquet frame, and load them."""
    folder = good_tables().save(tmp_path / "t")
    if edit_json:
        meta = json.loads((folder / "tables.json").read_text())
        (folder / "tables.json").write_text(json.dumps(edit_json(meta)))
    if edit_frame:
        edit_frame(pd.read_parquet(folder / "tables.parquet")).to_parquet(folder / "tables.parquet", index=False)
    return Tables.load(folder)


def csv(tmp_path, text):
    (tmp_path / "user.csv").write_text(text)
    return Tables.from_csv(tmp_path / "user.csv")


def allocation_file(tmp_path, content):
    path = tmp_path / "allocation.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return Allocation.from_json(path)


def allocation_doc(**data):
    doc = Allocation.from_levels(good_tables(), [0, 1]).to_dict()
    doc["_data"].update(data)
    return json.dumps(doc)


def config_file(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    return model_shape(tmp_path / "config.json")


def priced(kind, **context):
    return with_costs(analytic_tables(SMOL, make_levels(s=[0.0, 0.5]), unit="input"), kind, **context)


# (id, make(tmp_path) raising, expected error type, substrings of the message: the input, then the fix)
CASES = [
    # levels
    ("levels-2d-array", lambda p: normalize_levels([[0.0, 1.0], [0.5, 0.9]]), LevelError,
     ["shape (2, 2)", "DataFrame with columns s"]),
    ("levels-duplicate", lambda p: make_levels(s=[0.0, 0.5, 0.5]), LevelError, ["duplicates level 1", "drop one"]),
    ("levels-near-duplicate", lambda p: normalize_levels([0.5, 0.5000000001]), LevelError,
     ["0.5000000001", "drop one"]),
    ("levels-s-above-1", lambda p: make_levels(s=[0.0, 1.5]), LevelError, ["s=1.5", "give s in [0, 1]"]),
    ("levels-rho-negative", lambda p: make_levels(rho=[-0.2]), LevelError, ["rho=-0.2", "give rho in [0, 1]"]),
    ("levels-bits-zero", lambda p: make_levels(bits=[0]), LevelError, ["bits=0", "positive integer"]),
    ("levels-empty", lambda p: normalize_levels([]), LevelError, ["empty", "make_levels"]),
    ("levels-strings", lambda p: normalize_levels("abc"), LevelError, ["'abc'", "1-D sequence of sparsities"]),
    ("levels-unknown-column", lambda p: normalize_levels(pd.DataFrame({"sparsity": [0.1]})), LevelError,
     ["['sparsity']", "may only have columns"]),
    # tables
    ("tables-string-costs", lambda p: Tables(UNITS, [0.0, 0.5], {"flops": [["a", "b"]] * 2}), TablesError,
     ["cost 'flops'", "float matrix"]),
    ("tables-nan-cost", lambda p: Tables(UNITS, [0.0, 0.5], {"flops": [[1, np.nan], [1, 1]]}), TablesError,
     ["cost 'flops'", "re-run the profiling"]),
    ("tables-duplicate-level", lambda p: Tables(UNITS, [0.5, 0.5], {"flops": np.ones((2, 2))}), TablesError,
     ["the tables' levels", "drop one"]),
    ("unit-without-name", lambda p: Unit.from_dict({"layer": 0}), TablesError, ["{'layer': 0}", "'name'"]),
    # saved tables
    ("tables-json-without-units", lambda p: saved(p, edit_json=lambda m: {k: v for k, v in m.items() if k != "units"}),
     TablesError, ["tables.json has no 'units'", "re-save"]),
    ("tables-json-unit-without-name", lambda p: saved(p, edit_json=lambda m: {**m, "units": [{"layer": 0}] * 2}),
     TablesError, ["tables.json: a unit must be", "'name'"]),
    ("tables-json-bad-version", lambda p: saved(p, edit_json=lambda m: {**m, "_version": "abc"}), TablesError,
     ["_version 'abc'", "upgrade layer-allocator"]),
    ("tables-parquet-renamed-units",
     lambda p: saved(p, edit_frame=lambda f: f.assign(unit=f["unit"].replace({"u1": "layers.1"}))), TablesError,
     ["['layers.1']", "re-save the tables"]),
    ("tables-missing-folder", lambda p: Tables.load(p / "nothing"), TablesError, ["nothing", "Tables.save"]),
    # CSV
    ("csv-text-in-s", lambda p: csv(p, "unit,s,flops\nu0,low,1\nu0,0.5,2\n"), TablesError,
     ["column 's'", "plain numbers"]),
    ("csv-text-in-layer", lambda p: csv(p, "unit,s,layer,flops\nu0,0,one,1\nu0,0.5,one,2\n"), TablesError,
     ["column 'layer'", "plain numbers"]),
    ("csv-text-in-cost", lambda p: csv(p, "unit,s,flops\nu0,0,abc\nu0,0.5,2\n"), TablesError,
     ["column 'flops'", "plain numbers"]),
    ("csv-missing-pair", lambda p: csv(p, "unit,s,flops\nu0,0,1\nu0,0.5,2\nu1,0,1\n"), TablesError,
     ["user.csv", "exactly once"]),
    ("csv-near-duplicate-levels", lambda p: csv(p, "unit,s,flops\nu0,0.5,1\nu0,0.5000000001,2\n"), TablesError,
     ["user.csv", "drop one"]),
    ("csv-empty-unit", lambda p: csv(p, "unit,s,flops\n,0,1\nu0,0.5,2\n"), TablesError,
     ["'unit' column is empty", "name every row's unit"]),
    ("csv-no-unit-column", lambda p: csv(p, "name,s,flops\nu0,0,1\n"), TablesError, ["no 'unit' column", "expected columns"]),
    # allocation.json
    ("allocation-8-units-2-levels", lambda p: allocation_file(p, allocation_doc(units=[f"u{i}" for i in range(8)])),
     AllocationError, ["allocation.json", "8 units", "one entry per unit"]),
    ("allocation-duplicate-units", lambda p: allocation_file(p, allocation_doc(units=["u0", "u0"])), AllocationError,
     ["['u0']", "each unit once"]),
    ("allocation-s-1.5", lambda p: allocation_file(p, allocation_doc(levels=[{"s": 1.5}, {"s": 0.0}])),
     AllocationError, ["unit 'u0'", "s=1.5", "give s in [0, 1]"]),
    ("allocation-s-negative", lambda p: allocation_file(p, allocation_doc(levels=[{"s": 0.0}, {"s": -0.3}])),
     AllocationError, ["unit 'u1'", "s=-0.3"]),
    ("allocation-version-abc",
     lambda p: allocation_file(p, json.dumps({**json.loads(allocation_doc()), "_version": "abc"})), AllocationError,
     ["_version 'abc'", "write it as 1"]),
    ("allocation-no-data", lambda p: allocation_file(p, '{"_type": "allocator.Allocation", "_version": 1}'),
     AllocationError, ["allocation.json has no _data", "under _data"]),
    ("allocation-json-list", lambda p: allocation_file(p, "[1, 2]"), AllocationError,
     ["allocation.json holds a JSON list", "Allocation.to_json"]),
    ("allocation-not-utf8", lambda p: allocation_file(p, b"\xff\xfe\x00{"), AllocationError,
     ["allocation.json is not UTF-8", "solver wrote"]),
    ("allocation-missing-file", lambda p: Allocation.from_json(p / "none.json"), AllocationError,
     ["none.json", "solver run wrote"]),
    ("allocation-broken-json", lambda p: allocation_file(p, "{"), AllocationError,
     ["allocation.json is not valid JSON", "re-run the solver"]),
    # model configs
    ("config-hidden-0", lambda p: model_shape({**SMOL, "hidden_size": 0}), TablesError,
     ["hidden_size=0", "fix the config"]),
    ("config-heads-0", lambda p: model_shape({**SMOL, "num_attention_heads": 0}), TablesError,
     ["num_attention_heads=0", "fix the config"]),
    ("config-fractional-size", lambda p: model_shape({**SMOL, "intermediate_size": 1536.5}), TablesError,
     ["intermediate_size=1536.5", "integer"]),
    ("config-indivisible-heads", lambda p: model_shape({**SMOL, "hidden_size": 577, "head_dim": None}), TablesError,
     ["hidden_size=577", "give head_dim"]),
    ("config-malformed-json", lambda p: config_file(p, '{"hidden_size": 5'), TablesError,
     ["config.json", "config.save_pretrained"]),
    ("config-missing-keys", lambda p: model_shape({"hidden_size": 8}), TablesError,
     ["['intermediate_size'", "LlamaConfig-like"]),
    ("config-unknown-name", lambda p: model_shape("no-such-model"), FileNotFoundError, ["no-such-model", "llama-2-7b"]),
    # cost kinds
    ("cost-kind-unknown", lambda p: priced("wallclock"), CostProviderError, ["'wallclock'", "latency_decode"]),
    ("cost-latency-without-gpu-or-table", lambda p: _without_torch(priced, "latency_decode"), CostProviderError, ["latency_decode needs a CUDA GPU", "problem.latency_table=<csv"]),
    ("cost-latency-missing-table", lambda p: priced("latency_decode", latency_table=p / "lat.csv"), CostProviderError,
     ["lat.csv", "problem.latency_table=<csv"]),
    ("cost-latency-table-without-columns",
     lambda p: priced("latency_decode", latency_table=pd.DataFrame({"gpu": ["x"]})), CostProviderError,
     ["lacks the latency columns", "measure_latency_table"]),
]


def _without_torch(fn, *args):
    with mock.patch.dict(sys.modules, {"torch": None}):  # as on a machine without torch
        return fn(*args)


@pytest.mark.parametrize("make, error, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(tmp_path, make, error, needles):
    with pytest.raises(error) as info:
        make(tmp_path)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_the_catalogue_is_large_and_distinct():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
