"""Registered evaluators, the measured objective, zero-shot through lm-eval, and the main job end to end."""
import json

import numpy as np
import pytest
import torch

from allocator import Allocation, make_levels
from allocator.evaluators.metrics import EVALUATORS, evaluate
from allocator.evaluators.objective import MeasuredObjective
from allocator.evaluators.plan import CompressionPlan, compressed, uniform_targets


def test_registered_evaluators_measure_cost_memory_and_kl(small_model, calibrated, eval_windows):
    model = small_model[0]
    assert {"perplexity", "kl", "flops", "bytes", "memory", "zeroshot"} <= set(EVALUATORS)
    half = uniform_targets(4, {"s": 0.5, "rho": 0.9})
    assert evaluate("bytes", model, allocation=half)["model_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert evaluate("flops", model, allocation=None)["decode"]["ratio"] == 1.0
    dense_mem = evaluate("memory", model)
    with compressed(model, CompressionPlan.build(model, calibrated["rsparse"], half)):
        mem = evaluate("memory", model)
        kl = evaluate("kl", model, windows=eval_windows[:2])
    assert dense_mem["low_rank_bytes"] == 0 and mem["low_rank_bytes"] > 0
    assert kl["kl"] > 0 and kl["perplexity"] > kl["dense_perplexity"]
    assert evaluate("kl", model, windows=eval_windows[:2])["kl"] == 0


def test_measured_objective_memoises_and_accepts_level_vectors(small_model, calibrated, calib_windows):
    from allocator import analytic_tables
    model = small_model[0]
    tables = analytic_tables(model.config.to_dict(), make_levels(s=[0.0, 0.5]))
    objective = MeasuredObjective(model, calib_windows[:2, :48], calibrated["teal"], tables=tables)
    dense = objective(np.zeros(4, dtype=int))
    half = objective(np.array([1, 1, 0, 0]))
    again = objective(Allocation.from_levels(tables, [1, 1, 0, 0]))
    assert dense == pytest.approx(0, abs=1e-9) and half > 0 and again == half
    assert objective.evaluations == 2 and objective.hits == 1
    assert list(objective.batch([[1, 1, 1, 1], [1, 1, 0, 0]])) [1] == half


def test_zeroshot_runs_an_offline_cloze_task_through_lm_eval(small_model, tmp_path):
    pytest.importorskip("lm_eval")
    from allocator.evaluators.zeroshot import CLOZE_TASK, cloze_task
    model, tok = small_model
    path = cloze_task(tmp_path, n=6)
    res = evaluate("zeroshot", model, tokenizer=tok, tasks=[CLOZE_TASK], include_path=path)
    assert 0.0 <= res[CLOZE_TASK]["acc"] <= 1.0 and res[CLOZE_TASK]["sample_len"] == 6


def test_main_job_end_to_end_on_a_small_model(tmp_path):
    from allocator.evaluators.plan import CompressionPlan
    from allocator.evaluators.stages import run_main_job
    cfg = {
        "seed": 0,
        "model": {"name": "smollm2-135m", "dtype": "float32", "max_layers": 3, "threads": 2},
        "data": {"calibration": "calibration", "calibration_windows": 2, "calibration_length": 64,
                 "profile": "calibration", "profile_windows": 2, "profile_length": 32,
                 "evaluation": ["austen_eval", "wiki_eval"], "eval_windows": 2, "eval_length": 64, "batch_size": 2},
        "method": {"name": "teal", "levels": {"s": [0.0, 0.3, 0.5, 0.7], "rho": [1.0], "bits": [16]}},
        "profile": {"mode": "operating_point", "metric": "kl", "unit": "layer", "cache": str(tmp_path / "cache"),
                    "split": "none", "refine": None, "progress": False},     # whole layers, profiled levels:
                                                                            # uniform's prediction is a table row
        "budget": {"kind": "sparsity", "value": 0.5},
        "solver": {"name": "dp", "options": {}},
    }
    summary = run_main_job(cfg, tmp_path / "out")
    out = tmp_path / "out"
    for name in ("allocation.json", "plan/plan.json", "report.md", "allocation.png", "summary.json", "tables/tables.parquet"):
        assert (out / name).exists(), name
    rows = {r["allocation"]: r for r in summary["measurements"]}
    assert set(rows) == {"dense", "uniform", "dp"}
    assert rows["uniform"]["model_sparsity"] == pytest.approx(0.5) and rows["dp"]["model_sparsity"] >= 0.5 - 1e-9
    assert rows["uniform"]["predicted"] == pytest.approx(rows["uniform"]["measured_kl_calib"], rel=1e-4)
    assert rows["dense"]["ppl_austen_eval"] < rows["uniform"]["ppl_austen_eval"]
    assert Allocation.from_json(out / "allocation.json").units == ["layers.0", "layers.1", "layers.2"]
    assert "additivity audit" in (out / "report.md").read_text()
    assert len(CompressionPlan.load(out / "plan")) == 3 * 7
    again = run_main_job(cfg, tmp_path / "again")                    # cached profile: same tables, same answer
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["objective"] == summary["objective"]
