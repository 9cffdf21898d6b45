"""studies/evo_hyperparameters.py: a real --quick run (2 layers, tiny windows, a few seconds on 2 CPU cores)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

STUDY = Path(__file__).resolve().parents[2] / "studies" / "evo_hyperparameters.py"


def _study():
    spec = importlib.util.spec_from_file_location("evo_hyperparameters", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_must_spend_the_same_evaluations():
    study = _study()
    assert study.parse_args(["--out", "x"]).settings == [(12, 12), (24, 6), (48, 3)]
    with pytest.raises(SystemExit):
        study.parse_args(["--out", "x", "--evals", "6", "--settings", "2x3", "2x2"])


def test_quick_run_rows_equal_evaluations_and_pairing(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("pymoo")
    study = _study()
    out = study.main(["--quick", "--out", str(tmp_path), "--evals", "6", "--settings", "2x3", "3x2", "6x1",
                      "--fitness-windows", "1", "2", "--eval-windows", "3", "--set", "model.threads=1"])
    frame = pd.read_csv(tmp_path / "evo_hyperparameters.csv")
    names = ["uniform", "dp"] + [f"evo_{s}_w{w}" for w in (1, 2) for s in ("2x3", "3x2", "6x1")]
    assert list(frame["allocation"]) == names
    evo = frame[frame["allocation"].str.startswith("evo_")]
    # equal evaluations: every search spent the budget (repeats answered from the memo count, not run), running
    # past its nominal generations where pymoo dropped duplicate children
    assert (evo["n_evals"] == 6).all() and (evo["population"] * evo["generations"] == 6).all()
    assert (evo["generations_run"] >= evo["generations"]).all()
    assert ((evo["true_evals"] >= 1) & (evo["true_evals"] <= 6)).all()
    assert list(evo["fitness_windows"]) == [1, 1, 1, 2, 2, 2]
    # elitism from dp's warm start: never worse than dp on the fitness windows searched
    assert (evo["fit_kl"] <= evo["fit_kl_dp"] + 1e-12).all()
    assert (evo.groupby("fitness_windows")["fit_kl_dp"].nunique() == 1).all()
    # the pairing: against dp, per token, over the held-out windows of each source
    assert (frame["against"] == "dp").all() and frame.loc[frame.allocation == "dp", "dnll_austen"].isna().all()
    saved = json.loads((tmp_path / "evo_hyperparameters.json").read_text())
    for src in ("austen", "wiki"):
        per = {n: np.asarray(v) for n, v in saved["per_window"][f"{src}_eval"].items()}
        assert len(per["dp"]) == 2                        # --quick's held-out windows win over --eval-windows
        for name in ("uniform", *evo["allocation"]):
            for col, what in ((0, "nll"), (1, "kl")):
                diff = per[name][:, col] / per[name][:, 2] - per["dp"][:, col] / per["dp"][:, 2]
                row = frame.set_index("allocation").loc[name]
                assert row[f"d{what}_{src}"] == pytest.approx(diff.mean(), abs=1e-9)
                assert row[f"se_{what}_{src}"] == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)), abs=1e-9)
    uniform = frame.set_index("allocation").loc["uniform"]
    assert uniform["kl_austen"] > frame.set_index("allocation").loc["dp", "kl_austen"]   # dp beats uniform in KL
    report = (tmp_path / "evo_hyperparameters.md").read_text()
    assert "Command: `python studies/evo_hyperparameters.py --quick" in report
    assert len(out["rows"]) == len(names)
