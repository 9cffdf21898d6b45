"""The studies are thin callers of the library: one CLI style, one gains convention, no copies of library logic."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

STUDIES = Path(__file__).resolve().parents[2] / "studies"
NAMES = ["compare_solvers", "unit_granularity", "smollm2_allocation", "solver_scaling", "kernel_bench", "e2e_decode",
         "profile_step", "runtime_bench", "scaleout", "teal_greedy", "joint_bits", "lowbit_bench", "prefill_bench",
         "quality", "proxy_fidelity", "sensitivity", "methods", "lowbit_decode", "latency_formats",
         "evo_hyperparameters"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_every_study_has_the_common_flags_and_help_needs_no_gpu(name):
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, str(STUDIES / f"{name}.py"), "--help"], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    for flag in ("--out", "--quick", "--seed"):
        assert flag in done.stdout, f"{name} --help lacks {flag}"


def test_no_study_copies_library_logic():
    """Level grids, the dense-reference / KL loop, graph timing and the removed pipeline helpers live in the library."""
    banned = [r"make_levels\(s=\[0\.0, 0\.2", r"log_softmax", r"TrueObjective", r"apply_allocation_",
              r"remove_compression_", r"evaluators\.pipeline", r"budget_level", r"trust_region", r"do_bench\(",
              r"rsparse_rank", r"\(ppl - dense\) / \(u", r"\(u - d\)"]
    for name in NAMES:
        text = (STUDIES / f"{name}.py").read_text()
        for pattern in banned:
            assert not re.search(pattern, text), f"studies/{name}.py: {pattern}"


def test_unit_granularity_reports_the_share_removed_and_converts_old_rows():
    study = _load("unit_granularity")
    ppl = {"dense": 40.0, "uniform": 80.0, "dp": 70.0}
    summary = {"timings": {"measured_evaluations": 3}, "measurements": [
        {"allocation": k, "model_sparsity": 0.5, **{f"{m}_{src}": v for src in study.SOURCES for m in ("ppl", "kl")},
         **{f"realized_{src}": 0.5 for src in study.SOURCES}} for k, v in ppl.items()]}
    rows = study.rows_of(summary, {"unit": "layer"}, 1.0)
    assert [r["removed_austen_eval"] for r in rows] == [0.0, 0.25]        # (80 - 70) / (80 - 40)
    old = pd.DataFrame({"share_austen_eval": [1.0, 0.75], "share_wiki_eval": [1.0, 0.5]})   # the share remaining
    new = study.removed_convention(old)
    assert "share_austen_eval" not in new and list(new["removed_austen_eval"]) == [0.0, 0.25]
    assert list(new["removed_wiki_eval"]) == [0.0, 0.5]


def test_joint_bits_quick_run_keeps_every_allocation_within_its_bytes_and_prefill_limits(tmp_path):
    """The joint-bits study end to end on the 2-layer model: every allocation within its byte budget, the milp
    one within the prefill-time side limit, formats alone and the joint part both present."""
    pytest.importorskip("torch")
    study = _load("joint_bits")
    study.main(["--out", str(tmp_path), "--quick", "--rotations", "none", "--rotation", "none",
                "--quantizer", "rtn", "--alone", "w8a8-fp8:rtn", "--evo-evals", "8", "--budgets", "0.5", "0.25"])
    frame = pd.read_csv(tmp_path / "joint_bits.csv")
    assert {"dense", "alone", "joint"} <= set(frame["part"])
    joint = frame[frame["part"] == "joint"]
    for _, row in joint.iterrows():
        budget = 1 / int(row["allocation"].rsplit("1/", 1)[1])
        assert row["bytes_share"] <= budget + 1e-6, row["allocation"]
        if "prefill<=" in row["allocation"]:
            assert row["prefill_share"] <= 0.8 + 1e-6
    assert (tmp_path / "joint_bits.md").read_text().startswith("# Bits and sparsity")


def test_quality_quick_run_pairs_every_variant_against_the_reference(tmp_path):
    """The quality study end to end on the 2-layer model: every variant at the budget's bytes, paired against the
    reference (uniform without a TEAL greedy folder), the report written."""
    pytest.importorskip("torch")
    study = _load("quality")
    study.main(["--out", str(tmp_path), "--quick", "--budgets", "0.5", "--eval-windows", "2",
                "--variants", "hybrid_block"])
    frame = pd.read_csv(tmp_path / "quality.csv")
    assert list(frame["allocation"]) == ["uniform", "hybrid_block"]
    assert frame["byte_sparsity"].min() >= 0.5 - 1e-9 and frame["byte_sparsity"].max() < 0.56
    row = frame.iloc[1]
    assert row["against"] == "uniform" and row["kl_austen_verdict"] in ("better", "tie", "worse")
    assert row["dkl_austen"] == pytest.approx(row["kl_austen"] - frame.iloc[0]["kl_austen"], abs=1e-9)
    assert "hybrid_block" in (tmp_path / "quality.md").read_text()
