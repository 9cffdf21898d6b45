"""The plugin conformance suite (allocator.testing) on evo and bayes, with their default operators (shorter runs)."""
import pytest

pytest.importorskip("pymoo")
pytest.importorskip("optuna")

from allocator.testing import SolverConformance  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class TestEvo(SolverConformance):
    solver_name = "evo"
    solver_options = {"progress": False, "n_gen": 20}
    seeds = (0, 1)


class TestEvoWarmStarted(SolverConformance):
    solver_name = "evo"
    solver_options = {"progress": False, "warm_start": "greedy", "n_gen": 10}
    seeds = (0,)


class TestBayes(SolverConformance):
    solver_name = "bayes"
    solver_options = {"progress": False, "n_trials": 40}
    seeds = (0, 1)
