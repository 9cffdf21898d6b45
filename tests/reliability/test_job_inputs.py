"""Bad job configurations (the Python API's dict configs and the command line): each is an error naming the
input and the fix, raised where the config enters, before any model is loaded."""
import subprocess
import sys

import pytest

from allocator.config import ConfigError, load_config

CASES = [  # (config, words the message must contain: the input and the fix)
    ({"model": {"threads": -1}}, ["model.threads=-1", ">= 1"]),
    ({"model": {"threads": 0}}, ["model.threads=0", ">= 1"]),
    ({"model": {"threads": 2.5}}, ["model.threads=2.5", "integer"]),
    ({"model": {"max_layers": 0}}, ["model.max_layers=0", ">= 1"]),
    ({"model": {"max_layers": -1}}, ["model.max_layers=-1", ">= 1"]),
    ({"model": {"dtype": "float8"}}, ["model.dtype='float8'", "bfloat16"]),
    ({"model": {"max_layer": 2}}, ["model.max_layer", "did you mean 'model.max_layers'"]),
    ({"method": {"sparse_fraction": 0}}, ["method.sparse_fraction=0", "(0, 1]"]),
    ({"method": {"sparse_fraction": 1.5}}, ["method.sparse_fraction=1.5", "(0, 1]"]),
    ({"method": {"calibration": "seq"}}, ["method.calibration='seq'", "sequential"]),
    ({"method": {"levels": {"s": []}}}, ["method.levels.s=[]", "non-empty list"]),
    ({"method": {"levels": {"s": ["a"]}}}, ["method.levels.s=['a']", "list of numbers"]),
    ({"method": {"levels": {"bit": [16]}}}, ["method.levels.bit", "did you mean 'method.levels.bits'"]),
    ({"method": {"operating_rho": 2}}, ["method.operating_rho=2", "[0, 1]"]),
    ({"data": {"profile_length": 1}}, ["data.profile_length=1", ">= 2"]),
    ({"data": {"profile_windows": 0}}, ["data.profile_windows=0", ">= 1"]),
    ({"data": {"eval_windows": 0}}, ["data.eval_windows=0", ">= 1"]),
    ({"data": {"calibration_length": "long"}}, ["data.calibration_length='long'", "integer"]),
    ({"data": {"batch_size": 0}}, ["data.batch_size=0", ">= 1"]),
    ({"profile": {"batch_size": 0}}, ["profile.batch_size=0", ">= 1"]),
    ({"profile": {"window": -0.1}}, ["profile.window=-0.1", "[0, 1]"]),
    ({"profile": {"unit": "blocks"}}, ["profile.unit='blocks'", "input"]),
    ({"profile": {"mode": "iso"}}, ["profile.mode='iso'", "operating_point"]),
    ({"profile": {"metric": "acc"}}, ["profile.metric='acc'", "kl"]),
    ({"evaluator": {"score_last": 0}}, ["evaluator.score_last=0", "(0, 1]"]),
    ({"evaluator": {"zeroshot": {"task": []}}}, ["evaluator.zeroshot.task", "tasks"]),
    ({"budget": {"kind": "ratio"}}, ["budget.kind='ratio'", "sparsity"]),
    ({"budget": {"value": "0.5"}}, ["budget.value='0.5'", "finite number"]),
    ({"budget": {"value": float("nan")}}, ["budget.value=nan", "finite number"]),
    ({"problem": {"max_groups": 0}}, ["problem.max_groups=0", ">= 1"]),
    ({"problem": {"tokens": 0}}, ["problem.tokens=0", ">= 1"]),
    ({"problem": {"cst": "bytes_decode"}}, ["problem.cst", "did you mean 'problem.cost'"]),
    ({"solvr": {"name": "dp"}}, ["config.solvr", "did you mean 'config.solver'"]),
    ({"seed": "abc"}, ["seed='abc'", "integer"]),
    ({"experiment": {"name": "smol"}}, ["unknown experiment 'smol'", "smollm2"]),
    ({"model": "smollm2"}, ["'model' must be a mapping", "smollm2"]),
]


@pytest.mark.parametrize("config, words", CASES, ids=[str(c) for c, _ in CASES])
def test_a_bad_config_is_named_with_its_fix(config, words):
    with pytest.raises(ConfigError) as err:
        load_config(config)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def cli(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "allocator", *args, f"hydra.run.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("args, words", [
    (["method=cats", "method.levels.bits=[16,4]", "model.max_layers=1"], ["cats", "w4a16-g128", "teal, rsparse"]),
    (["method.levels.fmt=[bf16,w4a16g128]", "model.max_layers=1"], ["w4a16g128", "did you mean 'w4a16-g128'"]),
    (["solver=evo", "solver.options.max_evals=-1", "model.max_layers=1"], ["max_evals=-1"]),
    (["+solver.options.timelimit=5", "model.max_layers=1"], ["solver.options.timelimit", "valid options"]),
    (["budget=absolute", "experiment=synthetic"], ["budget.value"]),
    (["problem.cost=flops", "experiment=synthetic"], ["flops", "bytes_decode"]),
], ids=["bits-not-applied", "unknown-format", "negative-search-budget", "misspelt-solver-option", "missing-budget", "unknown-cost"])
def test_a_bad_command_line_fails_before_any_work_with_a_clear_message(args, words, tmp_path):
    proc = cli(*args, tmp_path=tmp_path)
    assert proc.returncode != 0
    for word in words:
        assert word in proc.stderr + proc.stdout, (word, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert "profiling" not in proc.stdout + proc.stderr      # nothing expensive ran
