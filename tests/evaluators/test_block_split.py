"""The hybrid's within-block stage (evaluators.block_split): exact splits against brute force, the block-local table
on the cut real SmolLM2, the profiling and pricing joins, and the main job with profile.split=milp."""
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from allocator.evaluators.block_split import BlockErrors, BlockSplit, block_errors  # noqa: E402
from allocator.evaluators.methods import get_method  # noqa: E402
from allocator.evaluators.plan import Target, apply_levels, restore_  # noqa: E402
from allocator.evaluators.profiling import profile  # noqa: E402
from allocator.evaluators.teal_greedy import block_output_error  # noqa: E402
from allocator.levels import Level, make_levels  # noqa: E402

KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def synthetic(seed: int, n_kinds: int = 3, n_s: int = 6) -> BlockErrors:
    rng = np.random.default_rng(seed)
    s = np.round(np.arange(n_s) * 0.15, 9)
    error = np.cumsum(rng.random((1, n_kinds, n_s)) ** 2, axis=2)
    error -= error[:, :, :1]
    sizes = rng.integers(1, 9, size=(1, n_kinds)).astype(float) * 100
    return BlockErrors(KINDS[:n_kinds], s, sizes, [{}], error, provenance={"key": f"synthetic{seed}"})


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("t", [0.1, 0.3, 0.45, 0.6])
def test_split_is_the_least_error_split_at_the_budget(seed, t):
    e = synthetic(seed)
    split = BlockSplit(e).split(0, (), t)
    sizes, grid = e.sizes[0], list(e.s_grid)
    best = min(sum(e.error[0, k, j] for k, j in enumerate(c)) for c in itertools.product(range(len(grid)), repeat=3)
               if sum(sizes[k] * grid[j] for k, j in enumerate(c)) >= t * sizes.sum() - 1e-9)
    mine = [grid.index(split[k]) for k in e.kinds]
    assert sum(e.error[0, k, j] for k, j in enumerate(mine)) == pytest.approx(best, abs=1e-9)
    assert sum(sizes[k] * split[kind] for k, kind in enumerate(e.kinds)) >= t * sizes.sum() - 1e-9


def test_split_errors_name_the_fix():
    e = synthetic(0)
    with pytest.raises(ValueError, match="split_max"):
        BlockSplit(e).split(0, (), 0.9)
    with pytest.raises(ValueError, match="unknown projection kinds"):
        BlockSplit(e).split(0, ("gate",), 0.2)
    with pytest.raises(ValueError, match="unknown within-block split solver"):
        BlockSplit(e, "annealing")


@pytest.fixture(scope="module")
def hybrid(small_model, calib_windows, tmp_path_factory):
    model = small_model[0]
    windows = calib_windows[:2]
    method = get_method("teal").calibrate(model, windows)
    cache = tmp_path_factory.mktemp("block_errors")
    errors = block_errors(model, method, windows, step=0.1, max_s=0.8, cache=cache, progress=False)
    return model, method, windows, errors, cache


def test_block_errors_are_the_block_output_errors_and_cached(hybrid):
    model, method, windows, errors, cache = hybrid
    assert errors.kinds == KINDS and errors.error.shape == (4, 7, 9)
    assert np.all(errors.error[:, :, 0] == 0) and np.all(errors.error[:, :, 1:] > 0)
    steps = np.diff(errors.error[:, :, 1:], axis=2)                      # more sparsity, more error (but for
    assert np.mean(steps > 0) > 0.95 and np.all(errors.error[:, :, -1] > 10 * errors.error[:, :, 1])  # noise)
    for layer, kind, j in [(0, "q", 3), (2, "down", 8)]:
        direct = block_output_error(model, method, windows, layer, {kind: float(errors.s_grid[j])})
        assert errors.error[layer, KINDS.index(kind), j] == pytest.approx(direct, rel=1e-6)
    again = block_errors(model, method, windows, step=0.1, max_s=0.8, cache=cache, progress=False)
    assert again.provenance["block_forwards"] == 0 and again.provenance["cached_layers"] == 4
    np.testing.assert_array_equal(again.error, errors.error)
    (next(cache.glob("*.npz"))).write_bytes(b"not an npz")                 # a corrupt cache is recomputed
    third = block_errors(model, method, windows, step=0.1, max_s=0.8, cache=cache, progress=False)
    np.testing.assert_allclose(third.error, errors.error, rtol=1e-6)


def test_split_beats_uniform_inside_the_block(hybrid):
    model, method, windows, errors, _ = hybrid
    split = BlockSplit(errors)
    for layer in range(4):
        mine = split.split(layer, (), 0.5)
        achieved = sum(mine[k] * errors.sizes[layer, i] for i, k in enumerate(KINDS)) / errors.sizes[layer].sum()
        assert 0.5 - 1e-9 <= achieved <= 0.55
        assert block_output_error(model, method, windows, layer, mine) < \
            block_output_error(model, method, windows, layer, {k: 0.5 for k in KINDS})


def test_profile_rows_apply_the_split_and_prices_follow_it(hybrid, small_model):
    from allocator.costs import analytic_tables
    model, method, windows, errors, _ = hybrid
    split = BlockSplit(errors)
    levels = make_levels(s=[0.0, 0.4, 0.6])
    tables = analytic_tables(model.config.to_dict(), levels, unit="block")
    prof = profile(model, method, windows, levels, tables.units, cache=False, progress=False, expand=split)
    unit = tables.units[3]                                           # layers.1.mlp
    assert unit.name == "layers.1.mlp"
    pairs = split.expand([(Target.from_unit(unit), Level(0.6))])
    assert [t.name for t, _ in pairs] == ["layers.1.gate", "layers.1.up", "layers.1.down"]
    from allocator.evaluators.metrics import logits_of
    with torch.no_grad():
        dense = logits_of(model, windows).log_softmax(-1)
        apply_levels(model, method, pairs)
        sparse = logits_of(model, windows).log_softmax(-1)
        restore_(model)
    kl = float((dense.exp() * (dense - sparse)).sum(-1)[:, :-1].mean())
    assert prof.kl[3, 2] == pytest.approx(kl, rel=1e-3)
    priced = split.price(tables.with_degradation(prof.kl), tokens=2048)
    size = sum(o * i for o, i in unit.shapes)
    removed = sum(lv.s * np.prod(errors.shapes[1][t.members[0][1][0]]) for t, lv in pairs) / size
    dense_bytes = tables.cost("bytes_decode")[3, 0]
    assert priced.cost("bytes_decode")[3, 2] == pytest.approx(dense_bytes * (1 - removed), rel=1e-3)   # whole columns
    assert removed >= 0.6 - 1e-9


def test_auto_split_applies_where_the_hybrid_can(small_model, calibrated):
    from allocator.config import load_config
    from allocator.evaluators.stages import Grid, split_mode
    model = small_model[0]

    def mode(method="teal", unit="layer", split="auto", **levels):
        config = load_config({"method": {"name": method}, "profile": {"unit": unit, "split": split}})
        return split_mode(config, model, calibrated[method], Grid(make_levels(**{"s": [0.0, 0.5], **levels})))

    assert mode() == "milp" and mode(unit="block") == "milp" and mode("oracle_topk") == "milp"
    assert mode(unit="input") == "none" and mode(unit="projection") == "none"
    assert mode("rsparse", rho=[1.0, 0.9]) == "none" and mode("rsparse") == "milp"
    assert mode("cats") == "none" and mode("griffin") == "none"              # MLP-only: not every projection
    assert mode(fmt=["w8a8-fp8"]) == "none"
    assert mode(split="none") == "none" and mode(unit="input", split="milp") == "milp"   # explicit: as given


def test_main_job_with_the_hybrid(tmp_path):
    import json

    from allocator.evaluators.plan import CompressionPlan
    from allocator.evaluators.stages import run_main_job
    from allocator.result import Allocation
    cfg = {"seed": 0, "model": {"name": "smollm2-135m", "dtype": "float32", "max_layers": 2, "threads": 2},
           "data": {"calibration_windows": 2, "calibration_length": 64, "profile_windows": 2, "profile_length": 32,
                    "eval_windows": 2, "eval_length": 64, "batch_size": 2},
           "method": {"name": "teal", "levels": {"s": [0.0, 0.3, 0.5, 0.7]}},
           "profile": {"unit": "block", "split": "milp", "split_step": 0.1, "split_max": 0.8, "window": None,
                       "cache": str(tmp_path / "cache"), "progress": False},
           "budget": {"kind": "sparsity", "value": 0.5}}
    summary = run_main_job(cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert Allocation.from_json(out / "allocation.json").units == ["layers.0.attn", "layers.0.mlp",
                                                                    "layers.1.attn", "layers.1.mlp"]
    per = Allocation.from_json(out / "allocation_projections.json")
    assert len(per) == 14 and per.units[0] == "layers.0.q" and "split" in per.metadata
    plan = CompressionPlan.load(out / "plan")
    assert len(plan) == 14
    rows = {r["allocation"]: r for r in summary["measurements"]}
    assert rows["uniform"]["model_sparsity"] == pytest.approx(0.5)
    assert rows["dp"]["model_sparsity"] >= 0.5 - 1e-9                   # priced per projection
    assert rows["dp"]["realized_austen_eval"] > 0.4
    assert (out / "split.csv").exists() and "split" in json.loads((out / "summary.json").read_text())["timings"]
    assert "on 64 calibration tokens" in (out / "report.md").read_text()     # the profile's 2 x 32, not pricing's
    cfg["profile"]["unit"] = "input"
    with pytest.raises(ValueError, match="profile.unit=layer or profile.unit=block"):
        run_main_job(cfg, tmp_path / "bad")
