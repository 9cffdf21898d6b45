"""Compression methods on a real (truncated) SmolLM2: exactness at s=0, R-Sparse mechanics, calibration, removal."""
import math

import pytest
import torch

from allocator.evaluators.methods import (Protocol, ThresholdLinear, apply_allocation_, get_method, measured_sparsity,
                                          quantile, remove_compression_, rsparse_rank)
from allocator.evaluators.metrics import logits_of
from allocator.evaluators.models import find_projections



N_LAYERS = 4


def uniform(level):
    return {f"layers.{i}": dict(level) for i in range(N_LAYERS)}


@pytest.mark.parametrize("name,rho", [("teal", 1.0), ("rsparse", 1.0), ("rsparse", 0.8), ("cats", 1.0),
                                      ("griffin", 1.0), ("oracle_topk", 1.0)])
def test_every_method_at_sparsity_zero_reproduces_dense_logits(small_model, calibrated, eval_windows, name, rho):
    model = small_model[0]
    dense = logits_of(model, eval_windows[:2])
    apply_allocation_(model, uniform({"s": 0.0, "rho": rho}), calibrated[name])
    try:
        wrapped = sum(not isinstance(m, torch.nn.Linear) for m in model.modules()
                      if type(m).__name__ in ("ThresholdLinear", "TopKLinear", "ThresholdActivation",
                                              "PromptSelectedLinear"))
        assert wrapped > 0, "the wrappers must be in place (the test would be vacuous otherwise)"
        assert torch.equal(logits_of(model, eval_windows[:2]), dense)
    finally:
        remove_compression_(model)


def test_methods_at_half_sparsity_change_the_logits(small_model, calibrated, eval_windows):
    model = small_model[0]
    dense = logits_of(model, eval_windows[:1])
    for name, method in calibrated.items():
        apply_allocation_(model, uniform({"s": 0.5}), method)
        try:
            assert not torch.allclose(logits_of(model, eval_windows[:1]), dense), name
        finally:
            remove_compression_(model)


def _layer_input(model, windows, layer, attr_path):
    """The real input of one projection on the given windows, and the projection."""
    proj = next(p for p in find_projections(model)[layer] if p.kind == attr_path)
    linear = getattr(proj.parent, proj.attr)
    seen = []
    handle = linear.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        logits_of(model, windows)
    finally:
        handle.remove()
    return proj, linear, torch.cat(seen).reshape(-1, proj.d_in)


def test_rsparse_rho_one_is_score_threshold_sparsity_without_low_rank(small_model, calibrated, eval_windows):
    model = small_model[0]
    method = calibrated["rsparse"]
    proj, linear, x = _layer_input(model, eval_windows[:2], 2, "gate")
    [(_, _, wrapper)] = method.wrap(proj, {"s": 0.5, "rho": 1.0})
    assert isinstance(wrapper, ThresholdLinear) and wrapper.rank == 0 and wrapper.lr_down is None
    threshold = quantile(method.stats[proj.name], 0.5)
    assert wrapper.threshold == pytest.approx(threshold)
    score = x.abs() * linear.weight.norm(dim=0)
    expected = torch.nn.functional.linear(x * (score > threshold), linear.weight, linear.bias)
    torch.testing.assert_close(wrapper(x), expected, rtol=0, atol=1e-5)


def test_rsparse_rank_follows_the_budget_on_real_gqa_shapes():
    # k_proj of SmolLM2 is 576 -> 192 (GQA): k = 576 * 0.5 * 0.8 = 230, r = (576*192*0.5 - 230*192) / (576+192)
    assert rsparse_rank(192, 576, 0.5, 0.8) == (230, int((576 * 192 * 0.5 - 230 * 192) / 768))
    assert rsparse_rank(192, 576, 0.5, 1.0)[1] == 0


def test_svd_correction_lowers_a_real_layer_error_at_equal_budget(small_model, calibrated, eval_windows):
    """Layer 0's q/k projections (the ones R-Sparse's released recipe makes most low-rank heavy): at s=0.5, spending
    10% of the budget on the SVD of the dropped channels beats spending it all on exact channels."""
    model = small_model[0]
    method = calibrated["rsparse"]
    for kind in ("q", "k"):
        proj, linear, x = _layer_input(model, eval_windows, 0, kind)
        dense = linear(x)

        def error(rho):
            [(_, _, wrapper)] = method.wrap(proj, {"s": 0.5, "rho": rho})
            return ((wrapper(x) - dense).norm() / dense.norm()).item(), wrapper.rank

        (pure, r0), (corrected, r1) = error(1.0), error(0.9)
        assert r0 == 0 and r1 > 0
        assert corrected < 0.97 * pure, (kind, corrected, pure)


def test_calibrated_thresholds_hit_the_target_sparsity_on_held_out_tokens(small_model, calibrated, eval_windows):
    """Thresholds from calibration text zero the target share of held-out inputs (dense activations: what the
    calibration promises; with every layer sparse the inputs of later layers shrink and the share rises)."""
    model = small_model[0]
    shapes = {p.name: p.d_in * p.d_out for row in find_projections(model) for p in row}
    for name in ("teal", "rsparse"):
        for target in (0.4, 0.6):
            per_tensor = measured_sparsity(model, eval_windows, calibrated[name], {"s": target}, compounding=False)
            assert len(per_tensor) == len(shapes)
            overall = sum(per_tensor[k] * shapes[k] for k in per_tensor) / sum(shapes.values())
            median = sorted(per_tensor.values())[len(per_tensor) // 2]
            assert abs(overall - target) <= 0.02, (name, target, overall)
            assert abs(median - target) <= 0.02, (name, target, median)


def test_apply_then_remove_restores_identical_outputs(small_model, calibrated, eval_windows):
    model = small_model[0]
    before = logits_of(model, eval_windows[:2])
    modules_before = {n: type(m) for n, m in model.named_modules()}
    allocation = {"layers.0": {"s": 0.3, "rho": 0.9}, "layers.1": {"s": 0.6, "rho": 1.0}, "layers.3.q": {"s": 0.5}}
    apply_allocation_(model, allocation, calibrated["rsparse"])
    assert not torch.equal(logits_of(model, eval_windows[:2]), before)
    apply_allocation_(model, {"layers.1": {"s": 0.2}}, calibrated["rsparse"])   # re-applying moves the unit
    remove_compression_(model)
    assert {n: type(m) for n, m in model.named_modules()} == modules_before
    assert torch.equal(logits_of(model, eval_windows[:2]), before)


def test_protocol_last_fraction_keeps_the_prefix_dense(small_model, calibrated, eval_windows):
    model = small_model[0]
    method = get_method("teal", protocol=Protocol(0.25))
    method.stats = calibrated["teal"].stats
    dense = logits_of(model, eval_windows[:1])
    apply_allocation_(model, uniform({"s": 0.5}), method)
    try:
        sparse = logits_of(model, eval_windows[:1])
    finally:
        remove_compression_(model)
    cut = eval_windows.shape[1] - math.ceil(0.25 * eval_windows.shape[1])
    torch.testing.assert_close(sparse[:, :cut], dense[:, :cut], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sparse[:, cut:], dense[:, cut:])


def test_uncalibrated_method_says_so(small_model):
    model = small_model[0]
    with pytest.raises(RuntimeError, match="calibrate"):
        apply_allocation_(model, {"layers.0": {"s": 0.5}}, get_method("teal"))
    remove_compression_(model)
    with pytest.raises(KeyError, match="registered"):
        get_method("nope")
