"""Levels with number formats through methods and plans: rotate -> sparsify -> quantize, saved and reloaded."""
import math

import pytest

torch = pytest.importorskip("torch")

from allocator.levels import Level  # noqa: E402
from allocator.evaluators.methods import MethodError, get_method  # noqa: E402
from allocator.evaluators.plan import CompressionPlan, Target, compressed, restore_  # noqa: E402
from allocator.evaluators.quantize import FakeQuantLinear, quantize_activation  # noqa: E402
from allocator.evaluators.wrappers import ThresholdLinear  # noqa: E402

MIXED = [(Target.of(0, ("q", "k", "v")), Level(0.5, fmt="w4a16-g128")), (Target.of(0, ("o",)), Level(0.0, fmt="w8a8-fp8")),
         (Target.of(1, ("gate", "up")), Level(0.4, fmt="w8a16")), (Target.of(2, ("down",)), Level(0.3))]


@torch.no_grad()
def _logits(model, windows):
    return model(input_ids=windows[:2], use_cache=False).logits


def test_a_formatted_level_nests_the_quantized_linear_under_the_mask(small_model, calibrated):
    model = small_model[0]
    plan = CompressionPlan.build(model, calibrated["teal"], MIXED)
    by_path = {e.path: e for e in plan.entries}
    q = next(e for p, e in by_path.items() if p.endswith("layers.0.self_attn.q_proj"))
    assert q.wrapper == "ThresholdLinear" and [s.wrapper for s in q.inner] == ["FakeQuantLinear"]
    down = next(e for p, e in by_path.items() if p.endswith("layers.2.mlp.down_proj"))
    assert down.inner == ()
    module = q.module
    assert isinstance(module.inner, FakeQuantLinear) and isinstance(module, ThresholdLinear)
    x = torch.randn(3, module.linear.in_features)
    keep = x.abs() > module.threshold
    expected = torch.nn.functional.linear(quantize_activation(x * keep, "bf16"), module.inner.weight_hat)
    torch.testing.assert_close(module(x), expected)


def test_plans_with_formats_save_load_and_restore_exactly(small_model, calibrated, eval_windows, tmp_path):
    model = small_model[0]
    dense = _logits(model, eval_windows)
    plan = CompressionPlan.build(model, calibrated["teal"], MIXED)
    with compressed(model, plan):
        ours = _logits(model, eval_windows)
    assert (ours - dense).abs().max() > 1e-3                     # the formats changed the function
    plan.save(tmp_path / "plan")
    again = CompressionPlan.load(tmp_path / "plan")
    with compressed(model, again):
        torch.testing.assert_close(_logits(model, eval_windows), ours)
    restore_(model)
    torch.testing.assert_close(_logits(model, eval_windows), dense, rtol=0, atol=0)


def test_gptq_needs_calibration_and_beats_rtn_on_the_real_layer(small_model, calib_windows):
    model = small_model[0]
    gptq = get_method("teal", quantizer="gptq").calibrate(model, calib_windows)
    rtn = get_method("teal").calibrate(model, calib_windows)
    assert set(gptq.hessians) >= {"model.layers.0.self_attn:q+k+v", "model.layers.3.mlp.down_proj"}
    assert gptq.options()["quantizer"] == "gptq" and "quantizer" not in rtn.options()
    level = Level(0.0, fmt="w3a16-g128")
    errors = {}
    for name, method in (("gptq", gptq), ("rtn", rtn)):
        plan = CompressionPlan.build(model, method, [(Target.of(1), level)])
        with compressed(model, plan):
            errors[name] = (_logits(model, calib_windows) - _logits_dense(model, calib_windows)).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"]


def _logits_dense(model, windows):
    from allocator.evaluators.plan import temporarily_dense
    with temporarily_dense(model):
        return _logits(model, windows)


def test_methods_that_cannot_quantize_say_so(calibrated):
    with pytest.raises(MethodError, match="cannot apply the format w8a8-fp8"):
        calibrated["cats"].check_level(Level(0.5, fmt="w8a8-fp8"))
    with pytest.raises(MethodError, match="unknown quantizer 'gptqq'"):
        get_method("teal", quantizer="gptqq")
    assert math.isfinite(Level(fmt="w4a4").bits)


def test_profiling_measures_a_quantized_format_at_zero_sparsity(small_model, calibrated, eval_windows):
    """s = 0 is the shared dense row only for a dense format: w4 at s = 0 is profiled, not assumed free."""
    from allocator.levels import make_levels
    from allocator.evaluators.profiling import profile
    model = small_model[0]
    levels = make_levels(s=[0.0, 0.5], fmt=["bf16", "w3a16-g128"])
    prof = profile(model, calibrated["teal"], eval_windows[:2, :32], levels, [Target.of(1)], cache=False,
                   progress=False)
    table = prof.table("kl")[0]
    by_level = dict(zip(zip(levels["fmt"], levels["s"]), table))
    assert by_level[("w3a16-g128", 0.0)] > 10 * abs(by_level[("bf16", 0.0)]) + 1e-4
    assert by_level[("w3a16-g128", 0.5)] > by_level[("bf16", 0.5)]
