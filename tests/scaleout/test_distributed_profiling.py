"""torchrun --nproc-per-node 2 (gloo) profiling the cut real SmolLM2: the table of the single process, and a rank
killed mid-way costs only its unfinished rows on restart (``profile_worker.py`` is one run)."""
import json
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("torch.distributed")
pytest.importorskip("transformers")

from ._launch import launch  # noqa: E402

WORKER = Path(__file__).with_name("profile_worker.py")
N_ROWS = 8 * 3          # 2 layers x 4 input units, 3 levels above s = 0


def _run(args, torchrun: bool, check: bool = True):
    return launch(WORKER, args, torchrun, check)


def _rows(cache: Path) -> dict:
    (rows_file,) = cache.glob("*/rows.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    return {(r["unit"], r["level"]): r for r in rows}


def _logged(out: Path) -> list[str]:
    return [line for f in sorted(out.glob("rows-rank*.log")) for line in f.read_text().split()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run, then a 2-rank run whose rank 1 is SIGKILLed after 2 rows, then its restart."""
    root = tmp_path_factory.mktemp("scaleout")
    _run([root / "cache1", root / "single"], torchrun=False)
    killed = _run([root / "cache2", root / "killed", 2], torchrun=True, check=False)
    assert killed.returncode != 0, "rank 1 should have been killed"
    after_kill = _rows(root / "cache2")
    _run([root / "cache2", root / "restart"], torchrun=True)
    return root, after_kill


def test_two_ranks_give_the_single_process_table(runs):
    root, _ = runs
    single = np.load(root / "single" / "table-rank0.npy")
    for rank in (0, 1):     # each rank returns the whole table, byte for byte the single process's
        table = np.load(root / "restart" / f"table-rank{rank}.npy")
        assert table.tobytes() == single.tobytes()
    assert _rows(root / "cache2") == _rows(root / "cache1")     # the merged cache: the single process's rows
    assert not list((root / "cache2").glob("*/claims/*"))      # nothing left claimed


def test_a_killed_rank_costs_only_its_unfinished_rows(runs):
    root, after_kill = runs
    killed = _logged(root / "killed")
    assert (root / "killed" / "rows-rank1.log").read_text().split().__len__() == 2   # rank 1 died after 2 rows
    finished = {f"{u}@{j}" for (u, j) in after_kill if u != "__base__"}
    assert finished == set(killed)                  # every row measured before the kill is in the cache
    recomputed = _logged(root / "restart")
    assert not finished & set(recomputed)           # the restart measures no finished row ...
    assert len(recomputed) == len(set(recomputed)) == N_ROWS - len(finished)   # ... each missing one once
    assert len(_logged(root / "single")) == N_ROWS
