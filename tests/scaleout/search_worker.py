"""Measured search across ranks: ``torchrun --nproc-per-node 2 search_worker.py OUT`` (or plain python: one rank).

The objective is the table degradation of a synthetic problem, standing in for a model replica per rank; rank 0
runs evo and bayes (``batch=4``) on a ``RankObjective``, the other rank serves it. Rank 0 writes the answers and
every rank the number of candidates it scored to ``OUT/search-rank<R>.json``.
"""
import json
import sys
from pathlib import Path

import numpy as np

from allocator import Problem, analytic_tables, make_levels, minimize
from allocator.evaluators.distributed import RankObjective, resolve
from allocator.synthetic import synthetic_tables


def main(out: str) -> None:
    ranks = resolve("auto")
    tables = synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=[0.0, 0.2, 0.4, 0.5, 0.6, 0.8])))
    problem = Problem(tables, sparsity=0.5)
    scored = []

    def objective(unit_levels, fidelity=None):
        scored.append(1)
        return float(problem.evaluate(np.asarray(unit_levels)[None]).degradation[0])

    shared = RankObjective(objective, ranks)
    answers = {}
    if ranks.main:
        runs = {"evo": dict(pop_size=8, n_gen=4, warm_start="dp"),
                "bayes": dict(n_trials=12, sampler="tpe", n_startup_trials=4, batch=4, warm_start="dp")}
        for name, options in runs.items():
            result = minimize(problem, name, seed=0, fitness=shared, progress=False, **options)
            answers[name] = {"x": [int(v) for v in result.allocation.level_index],
                             "value": float(result.degradation), "n_evals": result.n_evals}
        shared.close()
    else:
        shared.serve()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"search-rank{ranks.rank}.json").write_text(json.dumps({"answers": answers,
                                                                         "scored": len(scored)}))


if __name__ == "__main__":
    main(sys.argv[1])
