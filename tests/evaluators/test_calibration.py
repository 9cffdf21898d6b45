"""Sequential calibration (thresholds taken on the model whose earlier layers are already compressed) and the
realized-sparsity meter."""
import pytest

torch = pytest.importorskip("torch")

from allocator.evaluators.calibration import (_layer_inputs, _stages, calibrate_sequential,  # noqa: E402
                                              for_allocations, realized_sparsity)
from allocator.evaluators.measure import compare  # noqa: E402
from allocator.evaluators.models import decoder_layers, find_projections  # noqa: E402
from allocator.evaluators.plan import Target, is_compressed, plans_for, uniform_targets  # noqa: E402
from allocator.levels import Level  # noqa: E402

MIXED_S = (0.3, 0.7, 0.5, 0.7)


def mixed(rho: float = 1.0):
    return [(Target.of(i), Level(s, rho)) for i, s in enumerate(MIXED_S)]


def test_stages_follow_what_each_projection_reads(small_model, calibrated, calib_windows):
    model = small_model[0]
    method = calibrated["teal"]
    targets = [(key, module, on_output, value, proj) for proj in find_projections(model)[1]
               for key, module, on_output, value in method.stat_targets(proj)]
    hidden, kwargs = _layer_inputs(model, calib_windows, 4)[0]
    batch = (hidden, kwargs[0])
    stages = _stages(decoder_layers(model)[1], targets, batch)
    assert [[t[4].kind for t in stage] for stage in stages] == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


@pytest.mark.parametrize("name, rho", [("teal", 1.0), ("rsparse", 1.0), ("rsparse", 0.9)])
@pytest.mark.parametrize("allocation", ["uniform", "mixed"])
def test_sequential_thresholds_realize_the_target_on_held_out_tokens(small_model, calibrated, eval_windows, name,
                                                                     rho, allocation):
    """With every layer compressed, dense-calibrated thresholds overshoot (later inputs shrink); thresholds
    calibrated layer by layer on the compressed model realize the allocation's sparsity within 2 points."""
    model = small_model[0]
    alloc = uniform_targets(4, {"s": 0.6, "rho": rho}) if allocation == "uniform" else mixed(rho)
    target = sum(lv.s for _, lv in alloc) / len(alloc)      # all layers have the same shapes
    dense_cal = realized_sparsity(model, eval_windows, calibrated[name], alloc)["model"]
    tuned = calibrate_sequential(model, calibrated[name], alloc)
    assert not is_compressed(model)
    sequential = realized_sparsity(model, eval_windows, tuned, alloc)["model"]
    assert abs(sequential - target) <= 0.02, (sequential, target)
    assert abs(sequential - target) < abs(dense_cal - target), (sequential, dense_cal, target)
    assert calibrated[name].stats is not tuned.stats                 # the calibrated method is untouched


def test_sequential_calibration_keeps_a_dense_prefix_exact(small_model, calibrated, calib_windows):
    """Layer 0 reads the embeddings whatever the allocation: its q/k/v statistics are those of dense calibration
    up to sampling, so their thresholds agree closely."""
    model = small_model[0]
    method = calibrated["teal"]
    tuned = calibrate_sequential(model, method, mixed())
    for kind in ("q", "k", "v"):
        proj = next(p for p in find_projections(model)[0] if p.kind == kind)
        a = method.wrap(proj, Level(0.5))[0][2].threshold
        b = tuned.wrap(proj, Level(0.5))[0][2].threshold
        assert abs(a - b) <= 0.05 * abs(a), (kind, a, b)


def test_compare_takes_one_method_per_allocation_and_reports_realized_sparsity(small_model, calibrated,
                                                                               eval_windows):
    model = small_model[0]
    allocations = {"uniform": uniform_targets(4, {"s": 0.5}), "mixed": mixed()}
    dense = compare(model, eval_windows[:2], plans_for(model, dict.fromkeys(allocations, calibrated["teal"]),
                                                       allocations))
    methods = for_allocations(model, calibrated["teal"], allocations, "sequential")
    sequential = compare(model, eval_windows[:2], plans_for(model, methods, allocations))
    assert dense["dense"]["perplexity"] == sequential["dense"]["perplexity"]
    for name in allocations:
        assert sequential[name]["realized_sparsity"] < dense[name]["realized_sparsity"]
    with pytest.raises(ValueError, match="calibration"):
        for_allocations(model, calibrated["teal"], allocations, "bogus")
