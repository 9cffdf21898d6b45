"""evo's offspring and bayes's ask() batch scored across 2 torchrun ranks (gloo): the answers of one process, the
evaluations split between the ranks (``search_worker.py``)."""
import json
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed")
pytest.importorskip("pymoo")
pytest.importorskip("optuna")

from ._launch import launch  # noqa: E402

WORKER = Path(__file__).with_name("search_worker.py")


def test_search_batches_are_scored_across_ranks(tmp_path):
    launch(WORKER, [tmp_path / "one"], torchrun=False)
    launch(WORKER, [tmp_path / "two"], torchrun=True)
    one = json.loads((tmp_path / "one" / "search-rank0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"search-rank{r}.json").read_text()) for r in (0, 1)]
    assert two[0]["answers"] == one["answers"]                     # same answers, same evaluation counts
    assert two[0]["scored"] > 0 and two[1]["scored"] > 0           # both ranks measured candidates ...
    assert two[0]["scored"] + two[1]["scored"] == one["scored"]    # ... each candidate once
