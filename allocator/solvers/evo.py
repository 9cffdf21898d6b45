"""``evo``: a genetic algorithm (pymoo ``GA``) over integer level vectors, on the tables or a measured objective.

Algorithm. One integer variable per search dimension (unit, layer or fixed group; ``problem.n_vars``) holding a
level index. pymoo's GA (binary tournament on constraint violation then fitness, elitist survival of the best
``pop_size`` of parents + offspring) with ``IntegerRandomSampling``, SBX crossover and polynomial mutation made
integer by ``RoundingRepair`` (pymoo's integer recipe), plus two operators from EvoPress (arXiv 2410.14649,
Algorithm 1): the **level-switch mutation** (one variable down a level, another up; it keeps the cost on
equal-sized units) applied to a share ``p_switch`` of the offspring, and **multi-step selection** (offspring
scored on few calibration windows, only the best survivors re-scored on more; meaningful on a measured
objective only). A budget **repair** projects every infeasible child onto the cost constraint (cheapest
table-predicted moves first) and spends leftover slack, so the search runs in the feasible region. Warm start:
the ``dp`` / ``greedy`` answer (or given vectors) joins the first population with level-switch mutants of it;
elitism makes the result never worse than the warm start on the objective being searched.

Validation (``validation=callable``, same protocol as the measured objective, on windows disjoint from the fitness
windows and from any test text): elitism guards only the fitness windows, and a search of a few hundred
evaluations on a few hundred tokens overfits them. With a validation callable, the ``validation_top`` best
measured candidates and the warm start are scored on it after the search, and the warm start is returned unless
a candidate beats it there (without a warm start: the best candidate on validation). Cost: at most
``validation_top + 1`` validation calls. ``info["validation"]`` records the values and the decision.

Presets: ``preset="rsparse"`` is R-Sparse's search (arXiv 2504.19449, section 4: population 32, 5
generations, fitness on 16 calibration samples); ``preset="evopress"`` a small-population, many-generation
search with multi-step selection, as EvoPress's scripts.

Complexity: ``pop_size + n_gen * n_offsprings`` objective evaluations (memoised; each one a model forward on a
measured objective), plus O(n_offsprings * moves * n_vars * n_levels) numpy work per generation for the repair.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

try:  # optional dependency (the [search] extra); the registry imports this module only when 'evo' is asked for
    from pymoo.algorithms.soo.nonconvex.ga import GA, comp_by_cv_and_fitness
    from pymoo.core.duplicate import DefaultDuplicateElimination
    from pymoo.core.mating import Mating
    from pymoo.core.problem import Problem as PymooProblem
    from pymoo.core.repair import Repair
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.operators.selection.tournament import TournamentSelection
except ImportError as exc:
    raise ImportError("solver 'evo' needs pymoo: pip install 'layer-allocator[search]'") from exc

from ..registry import register_solver
from ._repair import BudgetRepair, level_switch
from ._scoring import Scorer, resolve_fitness
from ._search_options import SearchOptions
from ._validation import choose_by_validation
from ._warm_start import warm_start_vectors
from .base import Solver, SolveOutput
from .options import NONE, integer, one_of, option, real, stages

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvoOptions(SearchOptions):
    """Options of ``evo`` (and the shared search options). A ``preset`` fills the options not given explicitly."""

    PRESETS = {
        "rsparse": {"pop_size": 32, "n_gen": 5, "fidelity": 16, "multi_step": None},
        "evopress": {"pop_size": 8, "n_offsprings": 16, "n_gen": 50, "multi_step": ((1, 4),)},
    }

    preset: str | None = option(None, NONE | one_of(*PRESETS), "a named bundle of the options below")
    pop_size: int = option(32, integer(1), "population size (R-Sparse: 32)")
    n_offsprings: int | None = option(None, NONE | integer(1), "children per generation; None: pop_size")
    n_gen: int = option(100, integer(1), "generations, the first one being the initial population")
    multi_step: object = option(None, NONE | stages(), "stages before the full-fidelity one")
    p_switch: float = option(0.5, real(0, 1), "share of children mutated by level switch (the rest: polynomial)")
    crossover_prob: float = option(0.9, real(0, 1), "SBX crossover probability")
    eta: float = option(3.0, real(0), "SBX / PM distribution index: small = far-reaching moves")


class TableProblem(PymooProblem):
    """pymoo's view of the problem: fitness from the ``Scorer`` (after multi-step screening), constraint from tables."""

    def __init__(self, problem, scorer: Scorer, stages: list, fidelity: int | None):
        super().__init__(n_var=problem.n_vars, n_obj=1, n_ieq_constr=1, xl=0, xu=problem.n_levels - 1, vtype=int)
        self.scorer, self.stages, self.fidelity, self.top = scorer, stages, fidelity, problem.n_levels - 1

    def _evaluate(self, X, out, *args, **kwargs):
        X = np.clip(np.rint(X), 0, self.top).astype(int)
        F = np.full(len(X), np.inf)
        alive = np.arange(len(X))
        for fid, keep in self.stages:  # multi-step selection: cheap screening, survivors go on
            if len(alive) <= keep:
                break
            vals, _ = self.scorer.score(X[alive], fidelity=fid)
            alive = alive[np.argsort(np.nan_to_num(vals, nan=np.inf), kind="stable")[:keep]]
        vals, _ = self.scorer.score(X[alive], fidelity=self.fidelity)
        F[alive] = np.nan_to_num(vals, nan=np.inf)  # NaN: not measured, the budget ran out
        out["F"] = F[:, None]
        out["G"] = self.scorer.violation(X)[:, None]


class BudgetRepairOperator(Repair):
    """pymoo's repair hook: round to levels, then project over-budget children onto the budget (``BudgetRepair``)."""

    def __init__(self, problem, repair: BudgetRepair | None, rng: np.random.Generator):
        super().__init__()  # pymoo's own ``self.repair`` slot stays empty: this operator is the repair
        self.allocation_problem, self.budget_repair, self.rng = problem, repair, rng

    def _do(self, problem, X, **kwargs):
        X = np.clip(np.rint(X), 0, self.allocation_problem.n_levels - 1).astype(int)
        if self.budget_repair is None:
            return X
        feasible = self.allocation_problem.evaluate(X).feasible
        return np.stack([x if f else self.budget_repair.repair_one(x, self.rng) for x, f in zip(X, feasible)])


class LevelSwitchMutation(PM):
    """EvoPress's level switch on a share ``p_switch`` of the children, polynomial mutation (rounded) on the others."""

    def __init__(self, n_levels: int, p_switch: float, eta: float):
        super().__init__(prob=1.0, eta=eta)
        self.n_levels, self.p_switch = n_levels, p_switch

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        X = np.asarray(X, dtype=float)
        Xp = np.rint(super()._do(problem, X, random_state=random_state)).astype(int)
        for i in np.flatnonzero(random_state.random(len(X)) < self.p_switch):
            Xp[i] = level_switch(np.rint(X[i]).astype(int), self.n_levels, random_state)
        return Xp


class WarmStartSampling(IntegerRandomSampling):
    """The first population: warm vectors, level-switch mutants of them (half the rest), then random integers."""

    def __init__(self, warm: np.ndarray, n_levels: int):
        super().__init__()
        self.warm, self.n_levels = warm, n_levels

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        warm = self.warm
        rows = [*warm]
        if len(warm):
            while len(rows) < len(warm) + (n_samples - len(warm)) // 2:
                rows.append(level_switch(warm[random_state.integers(len(warm))], self.n_levels, random_state))
        if n_samples > len(rows):
            rows.extend(np.asarray(super()._do(problem, n_samples - len(rows), random_state=random_state), dtype=int))
        return np.stack(rows).astype(int)


def genetic_algorithm(cfg: EvoOptions, problem, repair: BudgetRepair | None, initial: np.ndarray,
                      rng: np.random.Generator) -> GA:
    """pymoo's GA with our operators. Mating retries 5 times (not 100) for unique children: in a small or
    converged space more is wasted work; a short generation follows, and an empty one ends the search."""
    repair_op, dedup = BudgetRepairOperator(problem, repair, rng), DefaultDuplicateElimination()
    crossover = SBX(prob=cfg.crossover_prob, eta=cfg.eta, vtype=float, repair=RoundingRepair())
    mating = Mating(TournamentSelection(func_comp=comp_by_cv_and_fitness), crossover,
                    LevelSwitchMutation(problem.n_levels, cfg.p_switch, cfg.eta),
                    repair=repair_op, eliminate_duplicates=dedup, n_max_iterations=5)
    return GA(pop_size=cfg.pop_size, n_offsprings=cfg.n_offsprings or cfg.pop_size, sampling=initial,
              repair=repair_op, eliminate_duplicates=dedup, mating=mating)


@register_solver("evo")
class EvoSolver(Solver):
    """pymoo GA with budget repair, level-switch mutation, multi-step selection and warm start."""

    needs_additive = False
    side_limits = True
    Options = EvoOptions

    def _solve(self, problem, rng) -> SolveOutput:
        cfg = self.options
        measured = resolve_fitness(problem, cfg.fitness, self.name)
        final_fid = cfg.fidelity if measured is not None else None
        scorer = Scorer(problem, measured, max_evals=cfg.max_evals, max_time=cfg.max_time,
                        progress=cfg.progress, desc="evo", fidelity=final_fid)
        repair = BudgetRepair(problem) if cfg.repair and problem.cost_matrix is not None else None
        stages = [tuple(s) for s in cfg.multi_step or []] if measured is not None else []
        pproblem = TableProblem(problem, scorer, stages, final_fid)
        warm = warm_start_vectors(problem, cfg.warm_start, rng, repair, self.name)[:cfg.pop_size]
        initial = WarmStartSampling(warm, problem.n_levels).do(pproblem, cfg.pop_size, random_state=rng).get("X")
        algorithm = genetic_algorithm(cfg, problem, repair, initial.astype(int), rng)
        algorithm.setup(pproblem, termination=("n_gen", cfg.n_gen), seed=int(rng.integers(2**31 - 1)), verbose=False)
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
        if scorer.best_units is None and scorer.exhausted:
            raise scorer.budget_spent(self.name)
        if scorer.best_units is None:
            ev = problem.evaluate(initial.astype(int))
            constrained = ev.cost if problem.direction == "min_degradation" else ev.degradation
            raise problem.infeasible(float(np.min(constrained)), scope="the evolutionary search")
        answer, validation = scorer.best_units, None
        if cfg.validation is not None:
            starts = problem.expand(warm[problem.evaluate(warm).feasible]) if len(warm) else []
            candidates = [u for _, u in scorer.top(cfg.validation_top)]
            answer, validation = choose_by_validation(candidates, list(starts), cfg.validation, float(cfg.validation_z))
        info = {**scorer.info(), "generations": int(algorithm.n_gen - 1), "pop_size": cfg.pop_size,
                "preset": cfg.preset, "fidelity": final_fid, "multi_step": stages,
                "warm_start": _warm_start_label(cfg.warm_start), "warm_start_values": warm_value,
                "validation": validation}
        return SolveOutput(answer, n_evals=scorer.n_evals, history=scorer.history, info=info)


def _warm_start_label(spec) -> str | None:
    return None if spec is None else (spec if isinstance(spec, str) else "vectors")
