"""studies/compare_solvers.py --merge: jobs of a sweep combine into one report with the share of uniform's
perplexity increase over dense that each allocation removes (``allocator.gains.share_removed``)."""
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
STUDY = Path(__file__).resolve().parents[2] / "studies" / "compare_solvers.py"


def _study():
    spec = importlib.util.spec_from_file_location("compare_solvers", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(folder: Path, method: str, ppl: dict, sparsity=0.5):
    folder.mkdir(parents=True)
    rows = [{"method": method, "unit": "block", "sparsity": sparsity, "solver": solver, "ppl_austen": p,
             "ppl_wiki": p / 2, "kl_austen": 0.1, "kl_wiki": 0.1, "fit_kl": 0.1, "val_kl": 0.1, "table_kl": 0.1,
             "true_evals": 10 if "true" in solver else 0, "profile_evals": 0, "n_evals": 0, "search_s": 5.0,
             "profile_s": 0.0, "cost_ratio": 0.5, "allocation": "1 2", "s_per_eval": 0.5 if "true" in solver else None,
             "chosen": "start" if "true" in solver else None} for solver, p in ppl.items()]
    pd.DataFrame(rows).to_csv(folder / "compare_solvers.csv", index=False)
    curve = {"method": method, "unit": "block", "sparsity": sparsity, "solver": "evo (true, warm dp)",
             "points": [[1, ppl["dp (isolated)"]]], "answer": [10, ppl["evo (true, warm dp)"]], "fit": [[1, 0.1]]}
    (folder / "compare_solvers.curves.json").write_text(json.dumps([curve]))
    args = {"eval_windows": 8, "eval_len": 256, "profile_windows": 4, "profile_len": 128, "budget": 10,
            "pop_size": 12, "bayes_sampler": "tpe", "validation_windows": 16, "validation_top": 5}
    run = {"command": "c", "started": "s", "hours": 0.1, "dense_tok_s": 500.0, "dense": {"austen": 40.0, "wiki": 20.0},
           "args": args}
    (folder / "compare_solvers.runs.json").write_text(json.dumps([run]))


def test_merge_finds_the_jobs_of_a_sweep_and_reports_shares(tmp_path):
    study = _study()
    sweep = tmp_path / "sweep"
    _job(sweep / "teal_block_0.5", "teal", {"uniform": 80.0, "dp (isolated)": 60.0, "evo (true, warm dp)": 60.0})
    _job(sweep / "rsparse_block_0.5", "rsparse", {"uniform": 90.0, "dp (isolated)": 65.0,
                                                    "evo (true, warm dp)": 70.0})
    notes = tmp_path / "notes.md"
    notes.write_text("## Findings\nby hand\n")
    study.merge([sweep], tmp_path / "out", notes)
    text = (tmp_path / "out" / "compare_solvers.md").read_text()
    assert "## teal, block units, model-level sparsity 0.5" in text and "## rsparse, block units" in text
    assert "| dp (isolated) | 60.00 | 30.00 |" in text and "| 0.50 | 0.50 |" in text   # (80-60)/(80-40), (40-30)/(40-20)
    # removed, not remaining: rsparse evo at 70 against uniform 90 and dense 40 removes (90-70)/(90-40) = 0.40
    assert "| evo (true, warm dp) | 70.00 | 35.00 |" in text and "| 0.40 | 0.40 |" in text
    assert "| uniform | 90.00 | 45.00 |" in text and "| 0.00 | 0.00 |" in text
    assert "against its dp start: Austen +5.00" in text and "WORSE" in text           # rsparse: 70 vs 65
    assert text.rstrip().endswith("by hand") and (tmp_path / "out" / "compare_solvers.png").exists()
    # a run writes its merged report beside its job folders; merging that folder again takes the jobs only
    study.merge([sweep], sweep)
    study.merge([sweep], tmp_path / "out3")
    assert len(pd.read_csv(tmp_path / "out3" / "compare_solvers.csv")) == 6
    with pytest.raises(FileNotFoundError):
        study.merge([tmp_path / "empty"], tmp_path / "out2")


def test_the_study_builds_the_main_jobs_config():
    """The level grid and data sizes come from the main job's config (presets included), not from the study."""
    study = _study()
    from allocator.config import MethodConfig

    args = study.parse_args(["--out", "unused", "--methods", "rsparse"])
    config = study.job_config([*study.base_overrides(args, study.STUDY), "method=rsparse"])
    assert config.method.levels.s == MethodConfig().levels.s and config.method.levels.rho == [1.0, 0.9]
    assert config.profile.window is None and config.data.profile_windows == 4
    quick = study.parse_args(["--out", "unused", "--quick", "--budget", "9"])
    assert quick.unit == "layer" and quick.budget == 9     # --quick's sizes, an explicit flag wins
