"""The Hydra CLI end to end: one run and a multirun, outputs in Hydra's directories."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from allocator import Allocation


def run_cli(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "allocator", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_single_run_writes_outputs(tmp_path):
    out = run_cli("experiment=synthetic", "solver=greedy", "budget.value=0.4", f"hydra.run.dir={tmp_path}/run",
                  cwd=tmp_path)
    assert "greedy: feasible" in out
    run = tmp_path / "run"
    alloc = Allocation.from_json(run / "allocation.json")
    assert len(alloc) == 30 and alloc.metadata["problem"]["sparsity"] == 0.4
    frame = pd.read_parquet(run / "result.parquet")
    assert set(frame["solver"]) == {"greedy"} and len(frame) == 30
    assert (run / "report.md").exists() and (run / "tables" / "tables.parquet").exists()
    payload = json.loads((run / "allocation.json").read_text())
    assert payload["_type"] == "allocator.Allocation" and payload["_version"] == 1


def test_multirun_one_directory_per_solver(tmp_path):
    run_cli("--multirun", "experiment=synthetic", "solver=dp,milp,greedy,uniform", f"hydra.sweep.dir={tmp_path}/sweep",
            "hydra.sweep.subdir=${solver.name}", cwd=tmp_path)
    objectives = {}
    for name in ("dp", "milp", "greedy", "uniform"):
        frame = pd.read_parquet(tmp_path / "sweep" / name / "result.parquet")
        assert frame["feasible"].all()
        objectives[name] = frame["total_degradation"].iloc[0]
    assert objectives["dp"] == pytest.approx(objectives["milp"], rel=1e-3)
    assert objectives["milp"] <= objectives["greedy"] + 1e-12 <= objectives["uniform"] + 1e-9


def test_bad_budget_kind_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "allocator", "experiment=synthetic", "budget=delta", "budget.value=-5",
                           f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "smallest predicted degradation achievable" in proc.stderr + proc.stdout
