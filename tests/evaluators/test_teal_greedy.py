"""TEAL's block-wise greedy (evaluators.teal_greedy) on the cut real SmolLM2 (4 layers, 2 x 64 tokens)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from allocator.evaluators.methods import get_method  # noqa: E402
from allocator.evaluators.plan import CompressionPlan, compressed  # noqa: E402
from allocator.evaluators.teal_greedy import (block_output_error, teal_greedy_allocation,  # noqa: E402
                                              teal_greedy_table)

TARGETS = (0.1, 0.2, 0.3, 0.4)
BASE_STEP = 0.05


@pytest.fixture(scope="module")
def greedy(small_model, calib_windows):
    model = small_model[0]
    windows = calib_windows[:2]
    method = get_method("teal", shared_inputs=False).calibrate(model, windows)
    table = teal_greedy_table(model, method, windows, targets=TARGETS, base_step=BASE_STEP)
    return model, method, windows, table


def test_table_hits_every_target_within_one_step(greedy):
    _, _, _, table = greedy
    assert table.kinds == ("q", "k", "v", "o", "gate", "up", "down")
    one_step = BASE_STEP / len(table.kinds)          # every step removes base_step x the mean projection size
    over = table.achieved - np.array(TARGETS)
    assert np.all(over >= -1e-9) and np.all(over <= one_step + 1e-9), over
    # the recorded split is byte-weighted to the achieved sparsity
    shares = table.sizes / table.sizes.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.einsum("ltk,lk->lt", table.sparsity, shares), table.achieved, atol=1e-12)
    assert table.provenance["block_forwards"] > 0


def test_errors_increase_with_the_target(greedy):
    _, _, _, table = greedy
    assert np.all(table.error > 0)
    assert np.all(np.diff(table.error, axis=1) > 0), table.error
    assert all(np.all(np.diff(s, axis=0) >= 0) for s in table.path_s)      # one projection raised at a time


def test_greedy_split_beats_uniform_on_block_output_error(greedy):
    model, method, windows, table = greedy
    j = TARGETS.index(0.4)
    for layer in range(table.n_layers):
        mine = block_output_error(model, method, windows, layer, dict(zip(table.kinds, table.sparsity[layer, j])))
        assert mine == pytest.approx(table.error[layer, j], rel=1e-9)
        uniform = block_output_error(model, method, windows, layer, {k: 0.4 for k in table.kinds})
        assert mine < uniform, (layer, mine, uniform)         # at (up to one step) more bytes removed


def test_allocation_at_equal_bytes_applies_per_projection(greedy):
    model, method, windows, table = greedy
    alloc = teal_greedy_allocation(model, table, 0.35)
    assert len(alloc) == 7 * table.n_layers and alloc.kinds[0] == ["q"] and alloc.units[1] == "layers.0.k"
    s = np.array([lv.s for lv in alloc.levels]).reshape(table.n_layers, -1)
    shares = table.sizes / table.sizes.sum(axis=1, keepdims=True)
    np.testing.assert_allclose((s * shares).sum(axis=1), 0.35, atol=1e-6)    # every block at the budget
    assert alloc.metadata["byte_weighted_sparsity"] == pytest.approx(0.35, abs=1e-6)
    lookup = teal_greedy_allocation(model, table, 0.3, interpolate=False)     # TEAL's own table entry
    np.testing.assert_allclose([lv.s for lv in lookup.levels], table.sparsity[:, 2].ravel(), atol=1e-8)
    plan = CompressionPlan.build(model, method, alloc)
    assert len(plan) == len(alloc)
    with torch.no_grad(), compressed(model, plan):
        assert torch.isfinite(model(input_ids=windows[:1]).logits).all()
    with pytest.raises(ValueError, match="greedy path reaches"):
        teal_greedy_allocation(model, table, 0.8)


def test_bad_options_are_errors(small_model, calib_windows):
    with pytest.raises(ValueError, match="base_step"):
        teal_greedy_table(small_model[0], None, calib_windows[:1], base_step=0)
    with pytest.raises(ValueError, match="targets"):
        teal_greedy_table(small_model[0], None, calib_windows[:1], targets=(0.5, 1.0))
