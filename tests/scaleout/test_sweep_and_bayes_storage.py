"""A joblib-launched multirun equals the sequential one (merged by ``allocator.sweep``); two bayes workers on one
SQLite study share it without evaluating a trial twice; JournalStorage works the same way."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from allocator import Problem, analytic_tables, make_levels, minimize
from allocator.sweep import main as sweep_main, merge, without_timings
from allocator.synthetic import synthetic_tables

optuna = pytest.importorskip("optuna")
SOLVERS = "dp,greedy,milp,evo"


def _multirun(out: Path, *launcher: str) -> None:
    subprocess.run([sys.executable, "-m", "allocator", "--multirun", "experiment=synthetic", f"solver={SOLVERS}",
                    "print_allocation=false", f"hydra.sweep.dir={out}", *launcher],
                   check=True, capture_output=True, text=True, timeout=300)


def test_joblib_multirun_equals_the_sequential_one(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    _multirun(tmp_path / "sequential")
    _multirun(tmp_path / "joblib", "hydra/launcher=local")      # conf/hydra/launcher/local.yaml: joblib, 2 jobs
    sequential, parallel = merge([tmp_path / "sequential"]), merge([tmp_path / "joblib"], out=tmp_path / "cmp")
    assert len(parallel) == 4 and sorted(parallel["solver"]) == sorted(SOLVERS.split(","))
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(without_timings(sequential), without_timings(parallel))
    assert {"comparison.csv", "comparison.md", "comparison.png"} <= {p.name for p in (tmp_path / "cmp").iterdir()}
    assert sweep_main(["merge", str(tmp_path / "joblib"), "--sort", "total_degradation"]) == 0
    assert sweep_main(["merge", str(tmp_path / "nothing-here")]) == 2


def test_two_bayes_workers_share_one_sqlite_study(tmp_path):
    worker = Path(__file__).with_name("bayes_worker.py")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    procs = [subprocess.Popen([sys.executable, str(worker), storage, "shared", str(seed),
                               str(tmp_path / f"{seed}.log")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    workers = Counter(t.user_attrs.get("worker") for t in trials)
    assert len(workers) == 2 and None not in workers                 # every trial told by exactly one worker
    assert len({t.number for t in trials}) == len(trials)
    for seed, out in zip((1, 2), outs):                               # a worker measured only its own trials ...
        evaluated = [tuple(json.loads(line)) for line in (tmp_path / f"{seed}.log").read_text().splitlines()]
        assert len(evaluated) == len(set(evaluated)) and out["info"]["n_asked"] == 20
        (name,) = [w for w in workers if int(w.rsplit(":", 1)[1]) == procs[seed - 1].pid]
        own = {tuple(t.user_attrs["x_units"]) for t in trials if t.user_attrs.get("worker") == name
               and "x_units" in t.user_attrs}
        assert set(evaluated) <= own
    assert max(out["info"]["n_trials_in_study"] for out in outs) == len(trials) == sum(workers.values())  # union
    best = min(t.value for t in trials if "x_units" in t.user_attrs and t.user_attrs["constraint"][0] <= 0)
    last = max(outs, key=lambda out: out["info"]["n_trials_in_study"])
    assert last["value"] == pytest.approx(best)                      # ... and the last one answers the union's best


def test_journal_storage_is_shared_between_runs(tmp_path):
    tables = synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=[0.0, 0.3, 0.5, 0.7])))
    problem = Problem(tables, sparsity=0.5)
    storage = f"journal://{tmp_path / 'study.log'}"
    options = dict(n_trials=8, sampler="tpe", n_startup_trials=4, storage=storage, study_name="j", progress=False)
    first = minimize(problem, "bayes", seed=1, **options)
    second = minimize(problem, "bayes", seed=2, **options)
    assert first.info["n_trials_in_study"] < second.info["n_trials_in_study"]
    assert second.degradation <= first.degradation + 1e-12
