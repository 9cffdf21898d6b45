"""One bayes worker on a shared optuna study: ``python bayes_worker.py STORAGE STUDY SEED LOG``.

The problem: SmolLM2's analytic tables (30 layers x 6 levels) with a seeded synthetic degradation, 50% sparsity;
the fitness a callable (the table objective) that appends every vector it scores to LOG, so the test can tell
which worker evaluated what. Prints the solver's answer and info as JSON.
"""
import json
import sys

import numpy as np

from allocator import Problem, analytic_tables, make_levels, minimize
from allocator.synthetic import synthetic_tables


def main(storage: str, study: str, seed: int, log: str) -> None:
    tables = synthetic_tables(analytic_tables("smollm2-135m", make_levels(s=[0.0, 0.2, 0.4, 0.5, 0.6, 0.8])))
    problem = Problem(tables, sparsity=0.5)

    def fitness(unit_levels):
        with open(log, "a") as f:
            f.write(json.dumps([int(v) for v in unit_levels]) + "\n")
        return float(problem.evaluate(np.asarray(unit_levels)[None]).degradation[0])

    result = minimize(problem, "bayes", seed=seed, n_trials=20, sampler="tpe", n_startup_trials=5,
                      fitness=fitness, storage=storage, study_name=study, warm_start="dp", progress=False)
    print(json.dumps({"x": list(result.allocation.level_index), "value": float(result.degradation),
                      "info": {k: result.info[k] for k in ("n_asked", "n_trials_in_study", "best_value")}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
