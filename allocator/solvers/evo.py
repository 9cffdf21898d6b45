"""``evo``: a genetic algorithm (pymoo ``GA``) over integer level vectors, on the tables or the true objective.

Algorithm. One integer variable per search dimension (unit, layer or fixed group; ``problem.n_vars``) holding a
level index. pymoo's GA (binary tournament on constraint violation then fitness, elitist survival of the best
``pop_size`` of parents + offspring) with ``IntegerRandomSampling``, SBX crossover and polynomial mutation made
integer by ``RoundingRepair`` (pymoo's integer recipe), plus two operators from EvoPress (arXiv 2410.14649,
Algorithm 1): the **level-switch mutation** (one variable down a level, another up; it keeps the cost on
equal-sized units) applied to a share ``p_switch`` of the offspring, and **multi-step selection** (offspring
scored on few calibration windows, only the best survivors re-scored on more; meaningful on the true
objective only). A budget **repair** projects every infeasible child onto the cost constraint (cheapest
table-predicted moves first) and spends leftover slack, so the search runs in the feasible region. Warm start:
the ``dp`` / ``greedy`` answer (or given vectors) joins the first population with level-switch mutants of it;
elitism makes the result never worse than the warm start on the objective being searched.

Validation (``validation=callable``, same protocol as the true objective, on windows disjoint from the fitness
windows and from any test text): elitism guards only the fitness windows, and a search of a few hundred
evaluations on a few hundred tokens overfits them. With a validation callable, the ``validation_top`` best
measured candidates and the warm start are scored on it after the search, and the warm start is returned unless
a candidate beats it there (without a warm start: the best candidate on validation). Cost: at most
``validation_top + 1`` validation calls. ``info["validation"]`` records the values and the decision.

Presets: ``preset="rsparse"`` is R-Sparse's search (arXiv 2504.19449, section 4: population 32, 5
generations, fitness on 16 calibration samples); ``preset="evopress"`` a small-population, many-generation
search with multi-step selection, as EvoPress's scripts.

Complexity: ``pop_size + n_gen * n_offsprings`` objective evaluations (memoised; each one a model forward on the
true objective), plus O(n_offsprings * moves * n_vars * n_levels) numpy work per generation for the repair.
"""
from __future__ import annotations

import logging

import numpy as np

from ..registry import register_solver
from ._search_common import (BudgetRepair, Scorer, choose_by_validation, level_switch, resolve_true_objective,
                             warm_start_vectors)
from .base import Solver, SolveOutput

logger = logging.getLogger(__name__)

PRESETS = {
    "rsparse": {"pop_size": 32, "n_gen": 5, "fidelity": 16, "multi_step": None},
    "evopress": {"pop_size": 8, "n_offsprings": 16, "n_gen": 50, "multi_step": [(1, 4)]},
}
DEFAULTS = {
    "preset": None,
    "pop_size": 32,          # population size (R-Sparse: 32)
    "n_offsprings": None,    # children per generation (default: pop_size)
    "n_gen": 100,            # generations, the first one being the initial population
    "max_evals": None,       # budget: objective evaluations (memo hits are free)
    "max_time": None,        # budget: wall-clock seconds
    "objective": "auto",     # "auto" | "tables" | "true" | callable(unit_levels, fidelity=None) -> float
    "fidelity": None,        # calibration windows of a full true-objective evaluation (None: all of them)
    "multi_step": None,      # [(fidelity, survivors), ...] stages before the full-fidelity one
    "warm_start": None,      # None | "dp" | "greedy" | "uniform" | vectors
    "p_switch": 0.5,         # share of offspring mutated by level switch (the rest by polynomial mutation)
    "crossover_prob": 0.9,
    "eta": 3.0,              # SBX / PM distribution index: small = far-reaching moves
    "repair": True,
    "validation": None,      # callable(unit_levels) -> float on held-aside windows: picks the answer (see above)
    "validation_z": 2.0,     # per-window validation values: a candidate must win by this many standard errors
    "validation_top": 5,     # best search candidates scored on validation, beside the warm start
    "progress": True,
}


def _pymoo():
    try:
        from pymoo.algorithms.soo.nonconvex.ga import GA
        from pymoo.core.mutation import Mutation
        from pymoo.core.problem import Problem as PymooProblem
        from pymoo.core.repair import Repair
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling
    except ImportError as exc:  # optional dependency: fail late, naming the extra
        raise ImportError("solver 'evo' needs pymoo: pip install 'layer-allocator[search]'") from exc
    return GA, Mutation, PymooProblem, Repair, SBX, PM, RoundingRepair, IntegerRandomSampling


@register_solver("evo")
class EvoSolver(Solver):
    """pymoo GA with budget repair, level-switch mutation, multi-step selection and warm start."""

    needs_additive = False

    def _config(self) -> dict:
        unknown = set(self.options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown evo options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        preset = self.options.get("preset")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown evo preset {preset!r}; presets: {sorted(PRESETS)}")
        return {**DEFAULTS, **PRESETS.get(preset, {}), **self.options}

    def _solve(self, problem, rng) -> SolveOutput:
        GA, Mutation, PymooProblem, Repair, SBX, PM, RoundingRepair, IntegerRandomSampling = _pymoo()
        cfg = self._config()
        true_fn = resolve_true_objective(problem, cfg["objective"])
        scorer = Scorer(problem, true_fn, max_evals=cfg["max_evals"], max_time=cfg["max_time"],
                        progress=cfg["progress"], desc="evo",
                        fidelity=cfg["fidelity"] if true_fn is not None else None)
        m, n = problem.n_levels, problem.n_vars
        repair = BudgetRepair(problem) if cfg["repair"] and problem.cost_matrix is not None else None
        stages = list(cfg["multi_step"] or []) if true_fn is not None else []
        final_fid = cfg["fidelity"] if true_fn is not None else None

        class _Problem(PymooProblem):
            def __init__(self):
                super().__init__(n_var=n, n_obj=1, n_ieq_constr=1, xl=0, xu=m - 1, vtype=int)

            def _evaluate(self, X, out, *args, **kwargs):
                X = np.clip(np.rint(X), 0, m - 1).astype(int)
                F = np.full(len(X), np.inf)
                alive = np.arange(len(X))
                for fid, keep in stages:  # multi-step selection: cheap screening, survivors go on
                    if len(alive) <= keep:
                        break
                    vals, _ = scorer.score(X[alive], fidelity=fid)
                    alive = alive[np.argsort(np.nan_to_num(vals, nan=np.inf), kind="stable")[:keep]]
                vals, _ = scorer.score(X[alive], fidelity=final_fid)
                F[alive] = np.nan_to_num(vals, nan=np.inf)  # NaN: not measured, the budget ran out
                out["F"] = F[:, None]
                out["G"] = scorer.violation(X)[:, None]

        class _Repair(Repair):
            def _do(self, problem_, X, **kwargs):
                X = np.clip(np.rint(X), 0, m - 1).astype(int)
                if repair is None:
                    return X
                feasible = problem.evaluate(X).feasible
                return np.stack([x if f else repair.repair_one(x, rng) for x, f in zip(X, feasible)])

        p_switch, pm = cfg["p_switch"], PM(prob=1.0, eta=cfg["eta"], vtype=float, repair=RoundingRepair())

        class _Mutation(Mutation):
            """Level switch on a share ``p_switch`` of the children, polynomial mutation on the others."""

            def _do(self, problem_, X, *args, random_state=None, **kwargs):
                X = np.asarray(X, dtype=float)
                Xp = np.rint(pm._do(problem_, X, random_state=random_state)).astype(int)
                switch = random_state.random(len(X)) < p_switch
                for i in np.flatnonzero(switch):
                    Xp[i] = level_switch(np.rint(X[i]).astype(int), m, random_state)
                return Xp

        pop_size = int(cfg["pop_size"])
        warm = warm_start_vectors(problem, cfg["warm_start"], rng, repair)[:pop_size]
        initial = self._initial_population(warm, pop_size, m, n, rng, IntegerRandomSampling, _Problem())
        algorithm = GA(pop_size=pop_size, n_offsprings=cfg["n_offsprings"] or pop_size, sampling=initial,
                       crossover=SBX(prob=cfg["crossover_prob"], eta=cfg["eta"], vtype=float,
                                     repair=RoundingRepair()),
                       mutation=_Mutation(prob=1.0), repair=_Repair(), eliminate_duplicates=True)
        # pymoo retries mating up to 100 times for unique children; in a small or converged space that is wasted
        # work: a few tries, then the generation is short (and an empty one ends the search)
        algorithm.mating.n_max_iterations = 5
        pproblem = _Problem()
        algorithm.setup(pproblem, termination=("n_gen", int(cfg["n_gen"])), seed=int(rng.integers(2**31 - 1)),
                        verbose=False)
        warm_value = None
        try:
            while algorithm.has_next() and not scorer.exhausted:
                pop = algorithm.ask()
                if pop is None or len(pop) == 0:
                    break
                algorithm.evaluator.eval(pproblem, pop)
                algorithm.tell(infills=pop)
                if warm_value is None and len(warm):
                    warm_value = scorer.score(warm, fidelity=final_fid, stop_on_budget=False)[0].tolist()
        finally:
            scorer.close()
        if scorer.best_units is None:
            constrained = problem.evaluate(initial).cost if problem.direction == "min_degradation" else \
                problem.evaluate(initial).degradation
            raise problem.infeasible(float(np.min(constrained)), scope="the evolutionary search")
        answer, validation = scorer.best_units, None
        if cfg["validation"] is not None:
            starts = problem.expand(warm[problem.evaluate(warm).feasible]) if len(warm) else []
            candidates = [u for _, u in scorer.top(int(cfg["validation_top"]))]
            answer, validation = choose_by_validation(candidates, list(starts), cfg["validation"],
                                                      float(cfg["validation_z"]))
        info = {**scorer.info(), "generations": int(algorithm.n_gen - 1), "pop_size": pop_size,
                "preset": cfg["preset"], "fidelity": final_fid, "multi_step": stages,
                "warm_start": None if cfg["warm_start"] is None else (cfg["warm_start"] if isinstance(
                    cfg["warm_start"], str) else "vectors"), "warm_start_values": warm_value, "validation": validation}
        return SolveOutput(answer, n_evals=scorer.n_evals, history=scorer.history, info=info)

    @staticmethod
    def _initial_population(warm, pop_size, m, n, rng, IntegerRandomSampling, pproblem) -> np.ndarray:
        """Warm vectors, level-switch mutants of them (half the rest), then uniform random integers."""
        rows = [*warm]
        if len(warm):
            while len(rows) < len(warm) + (pop_size - len(warm)) // 2:
                rows.append(level_switch(warm[rng.integers(len(warm))], m, rng))
        n_random = pop_size - len(rows)
        if n_random > 0:
            sampled = IntegerRandomSampling()._do(pproblem, n_random, random_state=rng)
            rows.extend(np.asarray(sampled, dtype=int))
        return np.stack(rows).astype(int)
