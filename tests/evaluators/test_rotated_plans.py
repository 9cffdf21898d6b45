"""Rotation + sparsity + formats: plans wrap inside the online rotations, carry the rotation, refuse a model
that does not have it."""
import pytest

torch = pytest.importorskip("torch")

from allocator.levels import Level  # noqa: E402
from allocator.evaluators.methods import get_method  # noqa: E402
from allocator.evaluators.models import ModelError, find_projections, load_model, model_id  # noqa: E402
from allocator.evaluators.plan import CompressionPlan, Target, compress_, compressed, restore_, temporarily_dense  # noqa: E402
from allocator.evaluators.rotation import RotatedLinear, RotationConfig, rotate_  # noqa: E402

LEVELS = [(Target.of(0), Level(0.5, fmt="w4a16-g128")), (Target.of(1, ("down",)), Level(0.4, fmt="w8a8-fp8")),
          (Target.of(2, ("o",)), Level(0.3))]


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.fixture()
def rotated(calib_windows):
    model, _ = load_model("smollm2-135m", dtype="float32", max_layers=3)
    dense = _logits(model, calib_windows[:2])
    applied = rotate_(model, RotationConfig("hadamard", seed=0))
    return model, applied, dense


def test_plans_wrap_inside_the_online_rotation_and_keep_it(rotated, calib_windows):
    model, applied, dense = rotated
    ids = calib_windows[:2]
    assert model_id(model).endswith("+rot:hadamard:0[:3]")
    downs = [row[6] for row in find_projections(model)]
    assert all(isinstance(p.parent, RotatedLinear) and p.attr == "inner" for p in downs)
    assert downs[1].name.endswith("layers.1.mlp.down_proj")            # the projection keeps its name
    method = get_method("teal").calibrate(model, calib_windows)
    plan = CompressionPlan.build(model, method, LEVELS)
    assert plan.rotation == {"tag": "hadamard:0"}
    assert any(e.path.endswith("layers.1.mlp.down_proj.inner") for e in plan.entries)
    with compressed(model, plan):
        assert isinstance(model.model.layers[1].mlp.down_proj, RotatedLinear)
        ours = _logits(model, ids)
        with temporarily_dense(model):
            torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    assert (ours - dense).abs().max() > 1e-3
    compress_(model, plan)
    restore_(model)
    assert isinstance(model.model.layers[1].mlp.down_proj, RotatedLinear)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)


def test_a_saved_plan_rotates_a_fresh_model_and_refuses_an_unrotated_one(rotated, calib_windows, tmp_path):
    model, applied, _ = rotated
    ids = calib_windows[:2]
    plan = CompressionPlan.build(model, get_method("teal").calibrate(model, calib_windows), LEVELS)
    plan.attach_rotation(applied).save(tmp_path / "plan")
    with compressed(model, plan):
        ours = _logits(model, ids)
    fresh, _ = load_model("smollm2-135m", dtype="float32", max_layers=3)
    loaded = CompressionPlan.load(tmp_path / "plan")
    with pytest.raises(ModelError, match=r"rotated by hadamard:0, this model is not rotated: rotate it first"):
        compress_(fresh, loaded)
    again = loaded.rotate_(fresh)
    with compressed(fresh, loaded):
        torch.testing.assert_close(_logits(fresh, ids), ours, rtol=1e-5, atol=1e-5)
    again.restore_(fresh)
    assert model_id(fresh) == "smollm2-135m[:3]"


def test_the_runtime_refuses_rotations_and_formats_it_cannot_run(rotated, calib_windows):
    from allocator.evaluators.runtime import RuntimeUnsupported, decoder_from_hf, site_thresholds
    model, applied, _ = rotated
    with pytest.raises(RuntimeUnsupported, match="rotated"):
        decoder_from_hf(model)
    applied.restore_(model)
    plan = CompressionPlan.build(model, get_method("teal").calibrate(model, calib_windows),
                                 [(Target.of(0), Level(0.5, fmt="w3a16-g128"))])   # 3-bit: no decode kernel
    with pytest.raises(RuntimeUnsupported, match="format w3a16-g128 has no decode kernel"):
        site_thresholds(model, plan)
