"""``bayes``: model-based search with optuna (TPE, or a Gaussian process), on the tables or the true objective.

Algorithm. One integer parameter ``x{i}`` per search dimension (unit, layer or fixed group: grouping is how to
give TPE few dimensions). optuna's ask / tell loop: the sampler proposes a level vector; its cost comes from
the tables, so an over-budget proposal costs no model evaluation: it is told with its violation as an optuna
constraint (``Trial.set_constraint`` / ``constraints_func``; > 0 = violated; optuna's constrained TPE / GP) and
the worst value measured so far (no outlier penalty that would wreck a GP's scaling); with ``repair=True``
(default) the budget repair of ``_search_common`` projects it onto the budget and the repaired vector is
measured and added to the study as its own trial, so the sampler learns from feasible points. Warm starts (``dp`` / ``greedy`` answers, or vectors) are queued with ``enqueue_trial``.
``storage`` takes any optuna storage URL (``sqlite:///study.db``, ``postgresql://...``): several processes or
machines running the same ``study_name`` share one study (optuna's distributed mode), each with its own budget.

Validation (``validation=callable`` on windows disjoint from the fitness windows and from any test text): after
the search the ``validation_top`` best measured trials (plus the study's shared best) and the warm start are
scored on it, and the warm start is returned unless a trial beats it there, so a search that overfits its
fitness windows does not replace a good start (as in ``evo``; ``info["validation"]`` has the record).

Samplers: TPE (Bergstra et al., NeurIPS 2011; optuna's multivariate TPE, Akiba et al., KDD 2019) and optuna's
``GPSampler`` (log expected improvement times the probability of feasibility; needs torch). ``sampler="auto"``
uses the GP on the true objective when torch is importable (few, expensive evaluations) and TPE otherwise.

Complexity: ``n_trials`` proposals; TPE costs O(n_trials * n_vars) per proposal, the GP O(n_trials^3); each
feasible proposal costs one objective evaluation (memoised).
"""
from __future__ import annotations

import importlib.util
import logging

import numpy as np

from ..registry import register_solver
from ._search_common import BudgetRepair, Scorer, choose_by_validation, resolve_true_objective, warm_start_vectors
from .base import Solver, SolveOutput

logger = logging.getLogger(__name__)

DEFAULTS = {
    "n_trials": 250,         # proposals (a repaired proposal adds one more trial to the study)
    "max_evals": None,       # budget: objective evaluations (memo hits are free)
    "max_time": None,        # budget: wall-clock seconds
    "objective": "auto",     # "auto" | "tables" | "true" | callable(unit_levels, fidelity=None) -> float
    "fidelity": None,        # calibration windows per true-objective evaluation (None: all)
    "sampler": "auto",       # "auto" | "tpe" | "gp"
    "n_startup_trials": 20,  # random proposals before the model is fitted
    "warm_start": None,      # None | "dp" | "greedy" | "uniform" | vectors
    "repair": True,
    "storage": None,         # optuna storage URL, e.g. "sqlite:///search.db"
    "study_name": None,      # default: derived from the problem's tables hash and limit
    "load_if_exists": True,
    "validation": None,      # callable(unit_levels) -> float on held-aside windows: picks the answer
    "validation_z": 2.0,     # per-window validation values: a candidate must win by this many standard errors
    "validation_top": 5,     # best trials scored on validation, beside the warm start
    "progress": True,
}
PENALTY = 1e12  # objective told for an over-budget proposal (plus its violation): never measured


def _optuna():
    try:
        import optuna
    except ImportError as exc:  # optional dependency: fail late, naming the extra
        raise ImportError("solver 'bayes' needs optuna: pip install 'layer-allocator[search]'") from exc
    return optuna


def _constraints(trial) -> list[float]:
    return list(trial.user_attrs.get("constraint", [0.0]))


def _native_constraints(optuna) -> bool:
    """optuna >= 5 stores constraints on the trial (``Trial.set_constraint``); older ones need constraints_func."""
    return hasattr(optuna.trial.Trial, "set_constraint")


def _set_constraint(trial, viol: float, native: bool):
    trial.set_user_attr("constraint", [viol])
    if native:
        trial.set_constraint("cost", viol)


def _created_trial(optuna, native, params, dists, value, viol, attrs):
    extra = {"constraints": {"cost": viol}} if native else {"system_attrs": {"constraints": [viol]}}
    return optuna.trial.create_trial(params=params, distributions=dists, value=value,
                                     user_attrs={**attrs, "constraint": [viol]}, **extra)


@register_solver("bayes")
class BayesSolver(Solver):
    """optuna TPE / GP with table-known constraints, repair, warm start and shared storage."""

    needs_additive = False

    def _config(self) -> dict:
        unknown = set(self.options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown bayes options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        return {**DEFAULTS, **self.options}

    def _sampler(self, optuna, cfg, true_fn, seed):
        cons = {} if _native_constraints(optuna) else {"constraints_func": _constraints}
        kind = cfg["sampler"]
        if kind == "auto":
            kind = "gp" if true_fn is not None and importlib.util.find_spec("torch") is not None else "tpe"
        if kind == "gp":
            if importlib.util.find_spec("torch") is None:
                logger.warning("optuna's GPSampler needs torch; falling back to TPE")
            else:
                return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg["n_startup_trials"],
                                                 deterministic_objective=True, **cons), "gp"
        elif kind != "tpe":
            raise ValueError(f"unknown bayes sampler {kind!r}; use 'auto', 'tpe' or 'gp'")
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg["n_startup_trials"], multivariate=True,
                                          **cons), "tpe"

    def _solve(self, problem, rng) -> SolveOutput:
        optuna = _optuna()
        cfg = self._config()
        true_fn = resolve_true_objective(problem, cfg["objective"])
        fid = cfg["fidelity"] if true_fn is not None else None
        m, n = problem.n_levels, problem.n_vars
        repair = BudgetRepair(problem) if cfg["repair"] and problem.cost_matrix is not None else None
        sampler, kind = self._sampler(optuna, cfg, true_fn, int(rng.integers(2**31 - 1)))
        name = cfg["study_name"] or (f"allocator-{problem.tables.content_hash()}-{problem.direction}-"
                                     f"{problem.limit:.6g}-{'true' if true_fn else 'tables'}")
        if cfg["storage"] is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=sampler, storage=cfg["storage"], study_name=name,
                                    load_if_exists=cfg["load_if_exists"])
        dists = {f"x{i}": optuna.distributions.IntDistribution(0, m - 1) for i in range(n)}
        warm = warm_start_vectors(problem, cfg["warm_start"], rng, repair)
        for x in warm:
            study.enqueue_trial({f"x{i}": int(v) for i, v in enumerate(x)}, skip_if_exists=True)

        scorer = Scorer(problem, true_fn, max_evals=cfg["max_evals"], max_time=cfg["max_time"],
                        progress=cfg["progress"], desc=f"bayes-{kind}", fidelity=fid)
        n_asked = n_penalised = 0
        native = _native_constraints(optuna)
        worst = None  # worst measured value: what an over-budget proposal is told (GP-friendly, no outliers)
        try:
            while n_asked < cfg["n_trials"] and not scorer.exhausted:
                trial = study.ask(dists)
                n_asked += 1
                x = np.array([trial.params[f"x{i}"] for i in range(n)], dtype=int)
                viol = float(scorer.violation(x[None])[0])
                if viol > 0:  # known over budget from the tables: never measured
                    n_penalised += 1
                    if repair is None:
                        _set_constraint(trial, viol, native)
                        study.tell(trial, worst if worst is not None else PENALTY)
                        continue
                    raw, raw_viol = trial, viol
                    x, trial = repair.repair_one(x, rng), None
                value, viol = scorer.score(x[None], fidelity=fid)
                value, viol = float(value[0]), float(viol[0])
                if np.isnan(value):  # the budget ran out before this one was measured
                    study.tell(trial if trial is not None else raw, state=optuna.trial.TrialState.FAIL)
                    break
                told = value if np.isfinite(value) else (worst if worst is not None else PENALTY)
                if np.isfinite(value):
                    worst = value if worst is None else max(worst, value)
                units = problem.expand(x[None])[0].tolist()
                if trial is None:  # the raw proposal: its violation, and a value no better than its repair
                    _set_constraint(raw, raw_viol, native)
                    study.tell(raw, max(told, worst if worst is not None else told))
                    study.add_trial(_created_trial(optuna, native, {f"x{i}": int(v) for i, v in enumerate(x)}, dists,
                                                   told, viol, {"x_units": units, "repaired": True}))
                else:
                    trial.set_user_attr("x_units", units)
                    _set_constraint(trial, viol, native)
                    study.tell(trial, told)
        finally:
            scorer.close()

        best_units, best_value = scorer.best_units, scorer.best_value
        shared = self._best_in_study(study, optuna)  # trials of other processes sharing the storage
        if shared is not None and shared[1] < best_value:
            best_units, best_value = np.asarray(shared[0], dtype=int), shared[1]
        if best_units is None:
            raise problem.infeasible(float("inf"), scope="the Bayesian search (no feasible proposal measured)")
        validation = None
        if cfg["validation"] is not None:
            starts = list(problem.expand(warm[problem.evaluate(warm).feasible])) if len(warm) else []
            candidates = [u for _, u in scorer.top(int(cfg["validation_top"]))]
            if shared is not None and shared[1] < scorer.best_value:
                candidates.insert(0, np.asarray(shared[0], dtype=int))
            best_units, validation = choose_by_validation(candidates, starts, cfg["validation"],
                                                                 float(cfg["validation_z"]))
        info = {**scorer.info(), "sampler": kind, "study_name": name, "storage": cfg["storage"],
                "n_asked": n_asked, "n_penalised": n_penalised, "n_trials_in_study": len(study.trials),
                "best_value": float(best_value), "fidelity": fid, "validation": validation}
        return SolveOutput(best_units, n_evals=scorer.n_evals, history=scorer.history, info=info)

    @staticmethod
    def _best_in_study(study, optuna):
        best = None
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if "x_units" in t.user_attrs and max(t.user_attrs.get("constraint", [0.0])) <= 0 and t.value < PENALTY:
                if best is None or t.value < best[1]:
                    best = (t.user_attrs["x_units"], float(t.value))
        return best
