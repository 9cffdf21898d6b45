"""``bayes``: model-based search with optuna (TPE, or a Gaussian process), on the tables or a measured objective.

Algorithm. One integer parameter ``x{i}`` per search dimension (unit, layer or fixed group: grouping is how to
give TPE few dimensions). optuna's ask / tell loop: the sampler proposes a level vector; its cost comes from
the tables, so an over-budget proposal costs no model evaluation: it is told with its violation as an optuna
constraint (``Trial.set_constraint`` / ``constraints_func``; > 0 = violated; optuna's constrained TPE / GP) and
the worst value measured so far (no outlier penalty that would wreck a GP's scaling); with ``repair=True``
(default) the budget repair of ``_repair`` projects it onto the budget and the repaired vector is
measured and added to the study as its own trial, so the sampler learns from feasible points. Warm starts (``dp`` / ``greedy`` answers, or vectors) are queued with ``enqueue_trial``.
``storage`` takes any optuna storage URL (``sqlite:///study.db``, ``postgresql://...``, ``mysql+pymysql://...``,
or ``journal:///path/study.log`` for optuna's JournalStorage where no database runs): several processes or
machines running the same ``study_name`` share one study (optuna's distributed mode), each with its own budget;
each trial records the ``worker`` (host:pid) that told it. ``batch=k`` asks k trials before telling any and
scores them in one call (a batched objective, e.g. ``evaluators.distributed.RankObjective``, spreads them over
torchrun's ranks); TPE then uses optuna's constant liar.

Validation (``validation=callable`` on windows disjoint from the fitness windows and from any test text): after
the search the ``validation_top`` best measured trials (plus the study's shared best) and the warm start are
scored on it, and the warm start is returned unless a trial beats it there, so a search that overfits its
fitness windows does not replace a good start (as in ``evo``; ``info["validation"]`` has the record).

Samplers: TPE (Bergstra et al., NeurIPS 2011; optuna's multivariate TPE, Akiba et al., KDD 2019) and optuna's
``GPSampler`` (log expected improvement times the probability of feasibility; needs torch). ``sampler="auto"``
uses the GP on a measured objective when torch is importable (few, expensive evaluations) and TPE otherwise.

Complexity: ``n_trials`` proposals; TPE costs O(n_trials * n_vars) per proposal, the GP O(n_trials^3); each
feasible proposal costs one objective evaluation (memoised).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from ..registry import register_solver
from ._repair import BudgetRepair
from ._scoring import Scorer, resolve_fitness
from ._search_options import SearchOptions
from ._validation import choose_by_validation
from ._warm_start import warm_start_vectors
from .base import Solver, SolveOutput
from .options import BOOL, NONE, TEXT, SolverOptionError, integer, one_of, option, storage_url

logger = logging.getLogger(__name__)

PENALTY = 1e12  # objective told for an over-budget proposal (plus its violation): never measured
STORAGE_RETRIES = 5   # opening a new database that another worker is creating (its schema) is retried
WORKER = f"{socket.gethostname()}:{os.getpid()}"   # user attribute of every trial this process tells


@dataclass(frozen=True)
class BayesOptions(SearchOptions):
    """Options of ``bayes`` (and the shared search options)."""

    n_trials: int = option(250, integer(1), "proposals (a repaired proposal adds one more trial to the study)")
    sampler: str = option("auto", one_of("auto", "tpe", "gp"),
                          "'auto': GP on a measured objective when torch is importable, else TPE")
    n_startup_trials: int = option(20, integer(0), "random proposals before the model is fitted")
    storage: object = option(None, NONE | storage_url(), "shared optuna storage, e.g. 'sqlite:///search.db'")
    study_name: str | None = option(None, NONE | TEXT, "None: derived from the tables hash and the limit")
    load_if_exists: bool = option(True, BOOL, "join an existing study of that name in the storage")
    batch: int = option(1, integer(1), "trials asked before any is told, scored in one call (a RankObjective "
                                       "spreads them across torchrun's ranks); TPE then lies constantly")


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
    side_limits = True
    Options = BayesOptions

    def _sampler(self, optuna, cfg, measured, seed):
        cons = {} if _native_constraints(optuna) else {"constraints_func": _constraints}
        kind = cfg.sampler
        if kind == "auto":
            kind = "gp" if measured is not None and importlib.util.find_spec("torch") is not None else "tpe"
        if kind == "gp":
            if importlib.util.find_spec("torch") is None:
                logger.warning("optuna's GPSampler needs torch; falling back to TPE")
            else:
                return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials,
                                                 deterministic_objective=True, **cons), "gp"
        liar = {"constant_liar": True} if cfg.batch > 1 else {}   # pending trials repel the next proposals
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials, multivariate=True,
                                          **cons, **liar), "tpe"

    def _solve(self, problem, rng) -> SolveOutput:
        optuna = _optuna()
        cfg = self.options
        measured = resolve_fitness(problem, cfg.fitness, self.name)
        fid = cfg.fidelity if measured is not None else None
        m, n = problem.n_levels, problem.n_vars
        repair = BudgetRepair(problem) if cfg.repair and problem.cost_matrix is not None else None
        sampler, kind = self._sampler(optuna, cfg, measured, int(rng.integers(2**31 - 1)))
        name = cfg.study_name or (f"allocator-{problem.tables.content_hash()}-{problem.direction}-"
                                  f"{problem.limit:.6g}-{'measured' if measured else 'table'}")
        if cfg.storage is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=sampler, storage=self._storage(optuna),
                                    study_name=name, load_if_exists=cfg.load_if_exists)
        dists = {f"x{i}": optuna.distributions.IntDistribution(0, m - 1) for i in range(n)}
        warm = warm_start_vectors(problem, cfg.warm_start, rng, repair, self.name)
        for x in warm:
            study.enqueue_trial({f"x{i}": int(v) for i, v in enumerate(x)}, skip_if_exists=True)

        scorer = Scorer(problem, measured, max_evals=cfg.max_evals, max_time=cfg.max_time,
                        progress=cfg.progress, desc=f"bayes-{kind}", fidelity=fid)
        n_asked = n_penalised = 0
        native = _native_constraints(optuna)
        worst = None  # worst measured value: what an over-budget proposal is told (GP-friendly, no outliers)
        try:
            while n_asked < cfg.n_trials and not scorer.exhausted:
                asked = []  # (trial or None when repaired, raw proposal, its violation, the vector to score)
                while len(asked) < cfg.batch and n_asked < cfg.n_trials and not scorer.exhausted:
                    trial = study.ask(dists)
                    n_asked += 1
                    trial.set_user_attr("worker", WORKER)
                    x = np.array([trial.params[f"x{i}"] for i in range(n)], dtype=int)
                    viol = float(scorer.violation(x[None])[0])
                    if viol <= 0:
                        asked.append((trial, None, 0.0, x))
                        continue
                    n_penalised += 1  # known over budget from the tables: never measured
                    if repair is None:
                        _set_constraint(trial, viol, native)
                        study.tell(trial, worst if worst is not None else PENALTY)
                        continue
                    asked.append((None, trial, viol, repair.repair_one(x, rng)))
                if not asked:
                    continue
                values, viols = scorer.score(np.stack([a[3] for a in asked]), fidelity=fid)
                worst, stopped = self._tell(optuna, study, asked, values, viols, dists, native, problem, worst)
                if stopped:  # the budget ran out before some were measured
                    break
        finally:
            scorer.close()

        best_units, best_value = scorer.best_units, scorer.best_value
        shared = self._best_in_study(study, optuna)  # trials of other processes sharing the storage
        if shared is not None and shared[1] < best_value:
            best_units, best_value = np.asarray(shared[0], dtype=int), shared[1]
        if best_units is None and scorer.exhausted:
            raise scorer.budget_spent(self.name)
        if best_units is None:
            raise problem.infeasible(float("inf"), scope="the Bayesian search (no feasible proposal measured)")
        validation = None
        if cfg.validation is not None:
            starts = list(problem.expand(warm[problem.evaluate(warm).feasible])) if len(warm) else []
            candidates = [u for _, u in scorer.top(cfg.validation_top)]
            if shared is not None and shared[1] < scorer.best_value:
                candidates.insert(0, np.asarray(shared[0], dtype=int))
            best_units, validation = choose_by_validation(candidates, starts, cfg.validation, float(cfg.validation_z))
        info = {**scorer.info(), "sampler": kind, "study_name": name, "storage": _storage_label(cfg.storage),
                "n_asked": n_asked, "n_penalised": n_penalised, "n_trials_in_study": len(study.trials),
                "best_value": float(best_value), "fidelity": fid, "validation": validation}
        return SolveOutput(best_units, n_evals=scorer.n_evals, history=scorer.history, info=info)

    @staticmethod
    def _tell(optuna, study, asked, values, viols, dists, native, problem, worst):
        """Tell the study each scored trial of a batch; returns the worst measured value and whether the budget
        ran out (NaN: not measured; those trials are told as failed)."""
        stopped = False
        for (trial, raw, raw_viol, x), value, viol in zip(asked, values, viols):
            value, viol = float(value), float(viol)
            if np.isnan(value):
                study.tell(trial if trial is not None else raw, state=optuna.trial.TrialState.FAIL)
                stopped = True
                continue
            told = value if np.isfinite(value) else (worst if worst is not None else PENALTY)
            if np.isfinite(value):
                worst = value if worst is None else max(worst, value)
            units = problem.expand(x[None])[0].tolist()
            if trial is None:  # the raw proposal: its violation, and a value no better than its repair
                _set_constraint(raw, raw_viol, native)
                study.tell(raw, max(told, worst if worst is not None else told))
                study.add_trial(_created_trial(optuna, native, {f"x{i}": int(v) for i, v in enumerate(x)}, dists,
                                               told, viol, {"x_units": units, "repaired": True, "worker": WORKER}))
            else:
                trial.set_user_attr("x_units", units)
                _set_constraint(trial, viol, native)
                study.tell(trial, told)
        return worst, stopped

    def _storage(self, optuna):
        """The optuna storage to open: None (in memory), a storage object, or a URL opened here so that a bad one
        is reported as this option (not as a database driver's error)."""
        url = self.options.storage
        if not isinstance(url, str):
            return url
        try:
            if url.startswith("journal://"):    # an append-only log file, for where no database server runs
                from optuna.storages.journal import JournalFileBackend
                return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal://"):]))
            for attempt in range(STORAGE_RETRIES):
                try:
                    return optuna.storages.RDBStorage(url)
                except Exception as exc:  # workers starting at once race to create a new database's schema
                    racing = type(exc).__name__ in ("IntegrityError", "OperationalError")
                    if not racing or attempt == STORAGE_RETRIES - 1:
                        raise
                    time.sleep(0.1 * (attempt + 1))
        except Exception as exc:  # sqlalchemy parse errors, missing drivers, unreachable servers
            raise SolverOptionError(f"solver '{self.name}' option storage={url!r} could not be opened "
                                    f"({type(exc).__name__}: {exc}); expected a database URL such as "
                                    "'sqlite:///search.db' or 'postgresql://user:password@host/db'",
                                    self.name, "storage", url) from exc

    @staticmethod
    def _best_in_study(study, optuna):
        best = None
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if "x_units" in t.user_attrs and max(t.user_attrs.get("constraint", [0.0])) <= 0 and t.value < PENALTY:
                if best is None or t.value < best[1]:
                    best = (t.user_attrs["x_units"], float(t.value))
        return best


def _storage_label(storage):
    return storage if storage is None or isinstance(storage, str) else type(storage).__name__
