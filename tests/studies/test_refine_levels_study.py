"""studies/refine_levels.py: the common flags, help without a GPU, and its fidelity helpers on known numbers."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

STUDY = Path(__file__).resolve().parents[2] / "studies" / "refine_levels.py"


def _load():
    spec = importlib.util.spec_from_file_location("refine_levels", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_has_the_common_flags():
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, str(STUDY), "--help"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    for flag in ("--out", "--quick", "--seed", "--step", "--coarse", "--replicate"):
        assert flag in done.stdout


def test_fidelity_and_linear_interpolation():
    study = _load()
    direct = np.array([[0.0, 0.1, 0.2, 0.4], [0.0, 0.2, 0.5, 0.9], [0.0, 0.05, 0.1, 0.3]])
    approx = direct + np.array([[0, 0.01, 0, 0], [0, -0.02, 0, 0], [0, 0.0, 0, 0]])
    fid = study.fidelity(direct, approx, np.array([False, True, False, False]))
    assert fid["mae"] == pytest.approx(0.01) and fid["max_abs"] == pytest.approx(0.02)
    assert fid["median_rel"] == pytest.approx(0.1) and fid["spearman_per_level_min"] == pytest.approx(1.0)
    levels = study.per_level(direct, {"a": approx}, np.array([False, True, False, True]), np.array([0, .1, .2, .3]))
    assert list(levels["s"]) == [0.1, 0.3] and levels["mae_a"].tolist() == pytest.approx([0.01, 0.0])

    class Coarse:
        levels = pd.DataFrame({"s": [0.0, 0.4]})
        degradation = np.array([[0.0, 0.4]])
    np.testing.assert_allclose(study.linear(Coarse, pd.DataFrame({"s": [0.0, 0.1, 0.4]})), [[0.0, 0.1, 0.4]])
