"""Typed configs: one home per default, misspelt keys named with the valid ones, for every group and from the
command line; the latency cost without a GPU is a clear error before any model loads."""
import subprocess
import sys
from dataclasses import fields

import pytest

from allocator.config import (EXPERIMENT_SCHEMAS, GROUPS, ConfigError, JobConfig, check_overrides, load_config)


def misspell(name: str) -> str:
    return name[:-1] + ("x" if name[-1] != "x" else "y")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_a_misspelt_key_of_every_group_is_an_error_naming_the_valid_ones(group):
    key = fields(GROUPS[group])[0].name
    with pytest.raises(ConfigError) as err:
        load_config({group: {misspell(key): 1}})
    message = str(err.value)
    assert f"{group}.{misspell(key)}" in message and f"{group}.{key}" in message      # the bad key and the fix
    assert all(f.name in message for f in fields(GROUPS[group]))
    with pytest.raises(ConfigError, match=f"did you mean '{group}.{key}'"):
        check_overrides([f"{group}.{misspell(key)}=1"])


@pytest.mark.parametrize("experiment", sorted(EXPERIMENT_SCHEMAS))
def test_experiment_keys_depend_on_the_chosen_experiment(experiment):
    key = fields(EXPERIMENT_SCHEMAS[experiment])[-1].name
    check_overrides([f"experiment={experiment}", f"experiment.{key}=1"])
    with pytest.raises(ConfigError, match="valid options of 'experiment'"):
        check_overrides([f"experiment={experiment}", f"experiment.{misspell(key)}=1"])


def test_nested_keys_and_top_level_keys_are_checked():
    with pytest.raises(ConfigError, match="method.levels.bits"):
        load_config({"method": {"levels": {"bit": [16]}}})
    with pytest.raises(ConfigError, match="evaluator.zeroshot.tasks"):
        check_overrides(["evaluator.zeroshot.task=[piqa]"])
    with pytest.raises(ConfigError, match="seed"):
        load_config({"sed": 1})
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config({"seed": "abc"})
    with pytest.raises(ConfigError, match="profile.unit='blocks' is not one of"):
        load_config({"profile": {"unit": "blocks"}})
    with pytest.raises(ConfigError, match="unknown experiment"):
        load_config({"experiment": {"name": "nope"}})


def test_defaults_live_in_the_dataclasses_and_a_partial_dict_fills_them():
    config = load_config({"model": {"max_layers": 2}})
    assert isinstance(config, JobConfig) and config.model.max_layers == 2 and config.model.name == "smollm2-135m"
    assert config.profile.unit == "layer" and config.method.levels.s[0] == 0.0 and config.solver.name == "dp"
    assert config.profile.split == "auto" and config.profile.refine == 0.05     # the hybrid (issue 17)


def test_the_yaml_presets_only_add_to_the_schema():
    """Every preset composes to a config load_config accepts (no YAML key outside the dataclasses)."""
    from hydra import compose, initialize_config_module
    from allocator.config import register_schemas
    register_schemas()
    with initialize_config_module(config_module="allocator.conf", version_base="1.3"):
        for override in ["method=rsparse", "method=griffin", "model=hf", "data=wikitext2", "profile=operating_point",
                         "budget=delta", "experiment=synthetic", "solver=evo", "solver=bayes", "solver=milp"]:
            cfg = compose(config_name="config", overrides=[override, "model.name=x"] if override == "model=hf"
                          else [override])
            load_config(cfg)
        rsparse = load_config(compose(config_name="config", overrides=["method=rsparse"]))
        assert rsparse.method.levels.rho == [1.0, 0.9]


def run_cli(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "allocator", *args, f"hydra.run.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_cli_names_a_misspelt_option_before_hydra_runs(tmp_path):
    proc = run_cli("model.max_layer=2", tmp_path=tmp_path)
    assert proc.returncode != 0 and "did you mean 'model.max_layers'" in proc.stderr


def test_latency_cost_without_a_gpu_is_a_clear_error_before_loading(tmp_path):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: latency_decode would be measured")
    proc = run_cli("problem.cost=latency_decode", "budget=delta", "model.max_layers=2", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "needs a CUDA GPU with triton, or problem.latency_table=" in proc.stderr
    proc = run_cli("problem.cost=latency_decode", "model.max_layers=2", tmp_path=tmp_path)
    assert proc.returncode != 0 and "use budget=delta" in proc.stderr
    assert "loading" not in proc.stderr.lower()


def test_paired_differences_and_their_verdict():
    from allocator.gains import paired_difference, share_removed, verdict
    mean, se, n = paired_difference([1.0, 2.0, 3.0, 4.0], [1.5, 2.4, 3.6, 4.5])
    assert n == 4 and mean == pytest.approx(-0.5) and se == pytest.approx(0.0408248, rel=1e-5)
    assert verdict(mean, se) == "better" and verdict(-mean, se) == "worse" and verdict(0.05, 0.03) == "tie"
    assert share_removed(44.4, 75.3, 58.2) == pytest.approx((75.3 - 58.2) / (75.3 - 44.4))
