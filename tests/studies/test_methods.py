"""studies/methods.py: every method at equal sparsity and equal bytes, a real quick run on the 2-layer SmolLM2."""
import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def _study():
    spec = importlib.util.spec_from_file_location("methods", STUDIES / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_and_grids_follow_the_budgets():
    study = _study()
    assert [r["match"] for r in study.specs("teal", [0.4, 0.5], 1.0)] == ["bytes", "bytes"]
    cats = study.specs("cats", [0.4, 0.5], 0.5)
    assert [(r["match"], r["s"]) for r in cats] == [("sparsity", 0.4), ("bytes", 0.8), ("sparsity", 0.5),
                                                     ("bytes", None)]            # 50% of the bytes: every neuron
    base = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    over = study.method_overrides("teal", study.specs("teal", [0.4, 0.5], 1.0), base)
    assert over == ["method=teal", "method.levels.s=[0,0.2,0.3,0.4,0.5,0.6,0.7]"]
    over = study.method_overrides("griffin", study.specs("griffin", [0.4], 0.75), base)
    assert "profile.unit=layer" in over and "0.5333" in over[-1]


def test_quick_run_prices_bytes_per_method_and_pairs_the_rows(tmp_path):
    pytest.importorskip("torch")
    study = _study()
    study.main(["--quick", "--out", str(tmp_path), "--methods", "teal", "cats", "--budgets", "0.4", "0.5",
                "--set", "model.threads=1"])
    frame = pd.read_csv(tmp_path / "methods_smollm2.csv")
    teal = frame[frame.method == "teal"].set_index(["budget", "allocation"])
    for budget in (0.4, 0.5):
        assert teal.loc[(budget, "uniform"), "byte_sparsity"] == pytest.approx(budget)
        assert teal.loc[(budget, "dp"), "byte_sparsity"] >= budget - 1e-3          # dp within the byte budget
        assert math.isfinite(teal.loc[(budget, "dp"), "u_se_nll_austen"])        # paired against its uniform
    cats = frame[frame.method == "cats"]
    # SmolLM2: up + down are half of a layer's projection bytes, so neuron sparsity s skips s / 2 of them
    uniform = cats[(cats.allocation == "uniform") & (cats.match == "sparsity")].set_index("budget")
    assert uniform.loc[0.5, "byte_sparsity"] == pytest.approx(0.25)
    equal = cats[(cats.match == "bytes") & (cats.budget == 0.4)].set_index("allocation")
    assert equal.loc["uniform", "s"] == pytest.approx(0.8)
    assert equal.loc["uniform", "byte_sparsity"] == pytest.approx(0.4)
    assert "t_dnll_wiki" in equal and math.isfinite(equal.loc["uniform", "t_dnll_wiki"])   # paired against teal
    assert (cats[(cats.match == "bytes") & (cats.budget == 0.5)].allocation == "infeasible").all()
    assert (frame.dropna(subset=["ppl_austen"]).ppl_austen > 1).all()
    text = (tmp_path / "methods_smollm2.md").read_text()
    assert text.startswith("# Sparsity methods") and "infeasible" in text and "Machine:" in text
