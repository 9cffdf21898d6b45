"""Scale-out over ``torch.distributed`` ranks launched by ``torchrun``: which profiling rows a rank measures, how
the ranks' rows are merged, and a measured objective whose batches are scored across the ranks.

Only small Python objects travel between ranks (finished rows, level vectors, values), through a gloo process
group, on GPUs too: no tensor collective is used, so each rank's device (or ``device_map`` shard group) is its
own business and a multi-host run needs nothing but torchrun's rendezvous. ``torchrun`` sets ``WORLD_SIZE`` /
``RANK`` / ``LOCAL_RANK``; ``profile.distributed=auto`` (the default) joins them when ``WORLD_SIZE > 1``.

Protocol of a job on ``world`` ranks (``stages.run_main_job``): every rank loads a replica, calibrates (same seed,
same thresholds) and profiles the rows ``k % world == rank`` of the list of rows still to measure, each finished
row appended to the resumable cache as it is measured; the ranks then exchange their rows, so every rank (and
every host's cache) holds the whole table, identical to the single-process one. Rank 0 alone solves, plans,
measures and reports; the others exit, or, when the solver searches a measured objective, serve it: rank 0's
batches (evo's offspring, bayes's ask() batch) are split the same way, ``k % world``.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

logger = logging.getLogger(__name__)
MODES = ("auto", "on", "off")


class DistributedError(RuntimeError):
    """A distributed option cannot be honoured here (no torchrun environment, a bad GPU split)."""


@dataclass
class Ranks:
    """This process's place among the ranks (``world=1``: a single process, every collective a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    group: object = field(default=None, repr=False)     # the gloo group the collectives use

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: list) -> list:
        """Item ``k`` of ``items`` goes to rank ``k % world`` (the same split on every rank)."""
        return [item for k, item in enumerate(items) if k % self.world == self.rank]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj=None):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier(group=self.group)


_CURRENT: Ranks | None = None


def env_ranks() -> Ranks:
    """The ranks torchrun's environment describes (a single process without it)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return Ranks(rank, world, int(env.get("LOCAL_RANK", str(rank))), local_world)


def current() -> Ranks:
    """The ranks set up by ``resolve`` in this process (a single process when none was)."""
    return _CURRENT or Ranks()


def resolve(distributed="auto", timeout_s: float = 86400.0) -> Ranks:
    """``Ranks`` for ``distributed``: "auto" (join torchrun's ranks when ``WORLD_SIZE > 1``), "on" (the same, an
    error without torchrun), "off" / False / None (a single process), or a ``Ranks`` object (used as it is). The
    gloo group is created once per process (``timeout_s``: how long a rank waits for the others at an exchange;
    the fastest rank of a profiling run waits for the slowest)."""
    global _CURRENT
    if isinstance(distributed, Ranks):
        return distributed
    if distributed in (None, False, "off"):
        return Ranks()
    if distributed not in ("auto", "on", True):
        raise DistributedError(f"distributed={distributed!r} is not one of {', '.join(MODES)}")
    if _CURRENT is not None:
        return _CURRENT
    ranks = env_ranks()
    if not ranks.active:
        if distributed in ("on", True):
            raise DistributedError("profile.distributed=on needs torchrun's environment (WORLD_SIZE > 1): launch "
                                   "with `torchrun --nproc-per-node N -m allocator ...`, or use profile.distributed"
                                   "=auto / off")
        return ranks
    import torch.distributed as dist
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:   # torchrun stops the other ranks with SIGTERM: unwind,
        signal.signal(signal.SIGTERM, _exit_on_sigterm)      # so a rank's unfinished row claims are released
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        atexit.register(_shutdown)   # a gloo group left to interpreter teardown can abort the rank at exit
        group = None
    else:   # the caller's own group (NCCL, say): objects go through a gloo group beside it
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                         timeout=timedelta(seconds=timeout_s))
    ranks.group = group
    _CURRENT = ranks
    logger.info("rank %d of %d (local %d of %d)", ranks.rank, ranks.world, ranks.local_rank, ranks.local_world)
    return ranks


def _shutdown() -> None:
    """Destroy the process group this module created, before the interpreter tears its threads down."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def assign_gpus(device: str, gpus_per_rank: int, ranks: Ranks) -> None:
    """Give each local rank its own GPUs before CUDA starts: ``gpus_per_rank`` consecutive devices (1: one
    replica per GPU; k > 1: a shard group, the model spread over them by ``model.device_map=auto``), through
    ``CUDA_VISIBLE_DEVICES``, so ``model.device=cuda`` means the rank's first GPU."""
    if not ranks.active or not str(device).startswith("cuda"):
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    pool = visible.split(",") if visible else [str(i) for i in range(ranks.local_world * gpus_per_rank)]
    first = ranks.local_rank * gpus_per_rank
    if first + gpus_per_rank > len(pool):
        raise DistributedError(f"profile.gpus_per_rank={gpus_per_rank} x {ranks.local_world} local ranks needs "
                               f"{ranks.local_world * gpus_per_rank} GPUs; {len(pool)} are visible: lower "
                               f"--nproc-per-node or profile.gpus_per_rank")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(pool[first:first + gpus_per_rank])


def setup(config) -> Ranks:
    """The main job's hook (before the model loads): the ranks of ``config.profile.distributed`` and their GPUs."""
    p = config.profile
    ranks = resolve(p.distributed, p.distributed_timeout)
    assign_gpus(config.model.device, p.gpus_per_rank, ranks)
    return ranks


# ---------------------------------------------------------------------------------------------- search
class RankObjective:
    """A measured objective scored across the ranks. Rank 0 calls it with a batch of level vectors (P, n_units)
    (``batched = True``: the search solvers' ``Scorer`` hands it evo's offspring / bayes's ask() batch whole);
    candidate ``k`` is measured on rank ``k % world``'s replica and the values come back in order. The other
    ranks run ``serve()`` until rank 0's ``close()``."""

    batched = True

    def __init__(self, objective, ranks: Ranks):
        self.objective, self.ranks = objective, ranks

    def __call__(self, population, fidelity: int | None = None) -> np.ndarray:
        X = np.atleast_2d(np.asarray(population, dtype=int))
        self.ranks.broadcast(("score", X, fidelity))
        return self._score_share(X, fidelity)

    def _score_share(self, X: np.ndarray, fidelity) -> np.ndarray:
        kwargs = {} if fidelity is None else {"fidelity": fidelity}
        mine = {k: float(self.objective(X[k], **kwargs)) for k in range(len(X)) if k % self.ranks.world ==
                self.ranks.rank}
        values = np.full(len(X), np.nan)
        for part in self.ranks.gather(mine):
            for k, value in part.items():
                values[k] = value
        return values

    def serve(self) -> int:
        """A worker rank's loop: score its share of each batch rank 0 sends; returns the batches served."""
        served = 0
        while True:
            message = self.ranks.broadcast(None)
            if message[0] == "stop":
                return served
            self._score_share(message[1], message[2])
            served += 1

    def close(self) -> None:
        """Rank 0: release the serving ranks (call once, after the search)."""
        if self.ranks.main and self.ranks.active:
            self.ranks.broadcast(("stop",))


def share_objective(objective, ranks: Ranks | None = None):
    """On several ranks, ``objective`` wrapped as a ``RankObjective``; on one, ``objective`` itself."""
    ranks = ranks or current()
    return RankObjective(objective, ranks) if ranks.active and objective is not None else objective


def worker(config, build_objective) -> dict:
    """What a rank other than 0 does after profiling: serve the measured search when the solver runs one
    (``build_objective()`` gives this rank's replica of it), else nothing. Returns the rank's summary."""
    ranks = current()
    served = None
    if dict(config.solver.options).get("fitness") == "measured":
        served = RankObjective(build_objective(), ranks).serve()
    logger.info("rank %d done (profiling%s); rank 0 reports", ranks.rank,
                "" if served is None else f", {served} search batches")
    return {"rank": ranks.rank, "world": ranks.world, "search_batches": served}
