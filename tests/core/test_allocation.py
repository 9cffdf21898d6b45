"""Allocation: validation of the object and of allocation.json, Level objects, summaries."""
import json

import numpy as np
import pytest

from allocator import Allocation, AllocationError, Level, Problem, Tables, Unit, make_levels, minimize


def tables(n=4):
    units = [Unit(f"layers.{i}", i, kinds=("q", "k")) for i in range(n)]
    cost = np.array([[10.0, 6.0, 3.0]] * n)
    deg = np.array([[0.0, 0.1, 0.5]] * n) * np.arange(1, n + 1)[:, None]
    return Tables(units, make_levels(s=[0.0, 0.4, 0.7]), {"flops_decode": cost}, deg, {"model": "toy"})


def test_levels_are_level_objects_and_json_stays_dicts(tmp_path):
    alloc = Allocation.from_levels(tables(), [0, 1, 2, 1])
    assert alloc.levels[2] == Level(0.7) and alloc.level_of("layers.1") == Level(0.4)
    path = alloc.to_json(tmp_path / "allocation.json")
    stored = json.loads(path.read_text())["_data"]["levels"]
    assert stored[2] == {"s": 0.7, "rho": 1.0, "bits": 16, "fmt": "bf16"}
    assert Allocation.from_json(path) == alloc
    assert list(alloc.to_frame()["s"]) == [0.0, 0.4, 0.7, 0.4]


def test_reprs_summarize():
    result = minimize(Problem(tables(), cost="flops_decode", sparsity=0.4), solver="dp")
    text = repr(result)
    assert text.startswith("Result(dp, feasible, cost") and "4 units, levels s=" in text and "array" not in text
    assert repr(result.allocation).startswith("Allocation(4 units, levels s=")


def payload(**data_changes):
    good = Allocation.from_levels(tables(), [0, 1, 2, 1]).to_dict()
    good["_data"].update(data_changes)
    return good


@pytest.mark.parametrize("changes, match", [
    ({"levels": [{"s": 0.4}] * 2}, r"4 units but \{'levels': 2\}"),
    ({"units": ["a", "a", "b", "c"]}, r"duplicated unit names \['a'\]"),
    ({"levels": [{"s": 1.5}] * 4}, r"unit 'layers.0' is invalid: level s=1.5 lies outside"),
    ({"levels": [{"s": -0.3}] * 4}, "s=-0.3 lies outside"),
    ({"level_index": [0, 1, "x", 1]}, r"level_index must hold integers, found \['x'\]"),
    ({"kinds": [["q"]]}, r"\{'kinds': 1\}"),
])
def test_bad_data_is_an_allocation_error(changes, match):
    with pytest.raises(AllocationError, match=match):
        Allocation.from_dict(payload(**changes))


def test_bad_files(tmp_path):
    bad = tmp_path / "allocation.json"
    cases = [('["units"]', "holds a JSON list, not an object"),
             (json.dumps({**payload(), "_version": "abc"}), "_version 'abc' is not an integer"),
             (json.dumps({k: v for k, v in payload().items() if k != "_data"}), "has no _data object"),
             ("{", "is not valid JSON")]
    for text, match in cases:
        bad.write_text(text)
        with pytest.raises(AllocationError, match=match):
            Allocation.from_json(bad)
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(AllocationError, match="is not UTF-8"):
        Allocation.from_json(bad)
    with pytest.raises(AllocationError, match="no allocation file"):
        Allocation.from_json(tmp_path / "missing.json")
