"""studies/sensitivity.py on a tiny synthetic table: no model, a few seconds."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

STUDY = Path(__file__).resolve().parents[2] / "studies" / "sensitivity.py"


def _study():
    spec = importlib.util.spec_from_file_location("sensitivity", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tables(n_layers=8):
    from allocator import Tables, Unit, make_levels
    levels = make_levels(s=[0.3, 0.5, 0.7])
    sites = [("q+k+v", ("q", "k", "v")), ("gate+up", ("gate", "up"))]
    units = [Unit(f"layers.{i}.{name}", layer=i, kinds=kinds) for i in range(n_layers) for name, kinds in sites]
    s = np.array([0.3, 0.5, 0.7])
    # smooth in depth (neighbours alike), the MLP input 3x the attention input
    trend = 1 + np.arange(n_layers) / n_layers
    deg = np.array([[t * w * s_ ** 2 for s_ in s] for t in trend for w in (1.0, 3.0)])
    cost = np.tile(1 - s, (len(units), 1))
    return Tables(units, levels, {"bytes_decode": cost}, deg, {"metric": "kl", "unit": "input",
                                                                  "dense_costs": {"bytes_decode": [1.0] * len(units)}})


def test_heatmap_neighbours_and_grouping_on_a_synthetic_table(tmp_path):
    study = _study()
    tables = _tables()
    frame = study.unit_frame(tables)
    assert list(frame["site"].unique()) == ["q+k+v", "gate+up"]
    grid = study.heatmap(frame, 0.5)
    assert grid.shape == (8, 2) and np.allclose(grid["gate+up"], 3 * grid["q+k+v"])
    near = study.neighbours(frame, 0.5, permutations=50, seed=0)
    assert near["lag1"]["q+k+v"]["spearman"] == pytest.approx(1.0)       # monotone in depth
    assert near["lag1"]["layer sum"]["p"] < 0.1
    rows = study.grouped_vs_unit(tables, 0.5)
    per_unit = rows[0]["predicted_kl"]
    assert rows[0]["allocation"] == "per unit"
    assert all(r["predicted_kl"] >= per_unit - 1e-12 for r in rows)       # per unit is never worse on the table
    assert rows[1]["distinct_levels"] == 1 and rows[1]["layer_runs"] == 1  # G <= 1: one level everywhere
    study.plot(frame, [0.5, 0.7], tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_quick_run_writes_every_output(tmp_path):
    study = _study()
    tables = _tables()
    tables.save(tmp_path / "tables")
    study.main(["--tables", str(tmp_path / "tables"), "--out", str(tmp_path / "out"), "--quick",
                "--permutations", "20"])
    for name in ("sensitivity.md", "sensitivity.csv", "sensitivity.groups.csv", "sensitivity.png",
                 "sensitivity.json"):
        assert (tmp_path / "out" / name).exists(), name
    assert "Spearman(l, l+1)" in (tmp_path / "out" / "sensitivity.md").read_text()
