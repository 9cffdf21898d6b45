"""Compression methods on a real (truncated) SmolLM2: exactness at s=0, R-Sparse mechanics, calibration, removal."""
import math

import pytest
import torch

from allocator.costs import rsparse_split
from allocator.evaluators.methods import MethodError, get_method, measured_sparsity, quantile
from allocator.evaluators.metrics import logits_of
from allocator.evaluators.models import find_projections
from allocator.evaluators.plan import CompressionPlan, Target, compress_, compressed, restore_, uniform_targets
from allocator.evaluators.wrappers import ThresholdLinear
from allocator.levels import Level



N_LAYERS = 4


def uniform(level):
    return uniform_targets(N_LAYERS, level)


@pytest.mark.parametrize("name,rho", [("teal", 1.0), ("rsparse", 1.0), ("rsparse", 0.8), ("cats", 1.0),
                                      ("griffin", 1.0), ("oracle_topk", 1.0)])
def test_every_method_at_sparsity_zero_reproduces_dense_logits(small_model, calibrated, eval_windows, name, rho):
    model = small_model[0]
    dense = logits_of(model, eval_windows[:2])
    with compressed(model, CompressionPlan.build(model, calibrated[name], uniform({"s": 0.0, "rho": rho}))):
        wrapped = sum(not isinstance(m, torch.nn.Linear) for m in model.modules()
                      if type(m).__name__ in ("ThresholdLinear", "TopKLinear", "ThresholdActivation",
                                              "PromptSelectedLinear"))
        assert wrapped > 0, "the wrappers must be in place (the test would be vacuous otherwise)"
        assert torch.equal(logits_of(model, eval_windows[:2]), dense)


def test_methods_at_half_sparsity_change_the_logits(small_model, calibrated, eval_windows):
    model = small_model[0]
    dense = logits_of(model, eval_windows[:1])
    for name, method in calibrated.items():
        with compressed(model, CompressionPlan.build(model, method, uniform({"s": 0.5}))):
            assert not torch.allclose(logits_of(model, eval_windows[:1]), dense), name


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
    [(_, _, wrapper)] = method.wrap(proj, Level(0.5, 1.0))
    assert isinstance(wrapper, ThresholdLinear) and wrapper.rank == 0 and wrapper.lr_down is None
    threshold = quantile(method.stats[proj.name], 0.5)
    assert wrapper.threshold == pytest.approx(threshold)
    score = x.abs() * linear.weight.norm(dim=0)
    expected = torch.nn.functional.linear(x * (score > threshold), linear.weight, linear.bias)
    torch.testing.assert_close(wrapper(x), expected, rtol=0, atol=1e-5)


def test_rsparse_rank_follows_the_budget_on_real_gqa_shapes():
    # k_proj of SmolLM2 is 576 -> 192 (GQA): k = 576 * 0.5 * 0.8 = 230, r = (576*192*0.5 - 230*192) / (576+192)
    assert rsparse_split(d_out=192, d_in=576, s=0.5, rho=0.8) == (230, int((576 * 192 * 0.5 - 230 * 192) / 768))
    assert rsparse_split(d_out=192, d_in=576, s=0.5, rho=1.0)[1] == 0


def test_svd_correction_lowers_a_real_layer_error_at_equal_budget(small_model, calibrated, eval_windows):
    """Layer 0's q/k projections (the ones R-Sparse's released recipe makes most low-rank heavy): at s=0.5, spending
    10% of the budget on the SVD of the dropped channels beats spending it all on exact channels."""
    model = small_model[0]
    method = calibrated["rsparse"]
    for kind in ("q", "k"):
        proj, linear, x = _layer_input(model, eval_windows, 0, kind)
        dense = linear(x)

        def error(rho):
            [(_, _, wrapper)] = method.wrap(proj, Level(0.5, rho))
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
    allocation = [(Target.of(0), Level(0.3, 0.9)), (Target.of(1), Level(0.6)), (Target.of(3, ["q"]), Level(0.5))]
    compress_(model, CompressionPlan.build(model, calibrated["rsparse"], allocation))
    assert not torch.equal(logits_of(model, eval_windows[:2]), before)
    compress_(model, CompressionPlan.build(model, calibrated["rsparse"], [(Target.of(1), Level(0.2))]))  # moves it
    restore_(model)
    assert {n: type(m) for n, m in model.named_modules()} == modules_before
    assert torch.equal(logits_of(model, eval_windows[:2]), before)


def test_protocol_last_fraction_keeps_the_prefix_dense(small_model, calibrated, eval_windows):
    model = small_model[0]
    method = get_method("teal", sparse_fraction=0.25)
    method.stats = calibrated["teal"].stats
    dense = logits_of(model, eval_windows[:1])
    with compressed(model, CompressionPlan.build(model, method, uniform({"s": 0.5}))):
        sparse = logits_of(model, eval_windows[:1])
    cut = eval_windows.shape[1] - math.ceil(0.25 * eval_windows.shape[1])
    torch.testing.assert_close(sparse[:, :cut], dense[:, :cut], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sparse[:, cut:], dense[:, cut:])


def test_uncalibrated_method_says_so(small_model):
    model = small_model[0]
    with pytest.raises(RuntimeError, match="calibrate"):
        CompressionPlan.build(model, get_method("teal"), [(Target.of(0), Level(0.5))])
    with pytest.raises(MethodError, match="registered"):
        get_method("nope")
    with pytest.raises(MethodError, match="prompt_fraction"):
        get_method("griffin", prompt_fractoin=0.3)
    with pytest.raises(MethodError, match="cannot apply the format w4a16-g128"):
        CompressionPlan.build(model, get_method("griffin"), [(Target.of(0), Level(0.5, bits=4))])


def test_a_saved_plan_reapplies_bit_identically_without_calibration(small_model, calibrated, eval_windows, tmp_path):
    """The plan carries thresholds and low-rank factors: loaded in a fresh object it gives the same logits."""
    model = small_model[0]
    pairs = [(Target.of(0, ["q", "k", "v"]), Level(0.5, 0.9)), (Target.of(1, ["down"]), Level(0.6)),
             (Target.of(2), Level(0.4, 0.9))]
    plan = CompressionPlan.build(model, calibrated["rsparse"], pairs)
    with compressed(model, plan):
        expected = logits_of(model, eval_windows[:2])
    loaded = CompressionPlan.load(plan.save(tmp_path / "plan"))
    assert [e.path for e in loaded.entries] == [e.path for e in plan.entries] and len(loaded) == 3 + 1 + 7
    with compressed(model, loaded):
        assert torch.equal(logits_of(model, eval_windows[:2]), expected)
    assert not any(isinstance(m, ThresholdLinear) for m in model.modules())


def test_apply_is_all_or_nothing(small_model, calibrated):
    """An allocation naming a layer the model lacks is an error before anything is wrapped."""
    model = small_model[0]
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="layer 30"):
        CompressionPlan.build(model, calibrated["teal"], [(Target.of(0), Level(0.5)), (Target.of(30), Level(0.5))])
    plan = CompressionPlan.build(model, calibrated["teal"], [(Target.of(0), Level(0.5))])
    plan.entries.append(plan.entries[0].__class__("model.layers.9.mlp.up_proj", "x", Level(0.5), "ThresholdLinear",
                                                  {"threshold": 0.1, "sparse_fraction": 1.0}))
    with pytest.raises(ValueError, match="model.layers.9"):
        compress_(model, plan)
    assert {n: type(m) for n, m in model.named_modules()} == before
