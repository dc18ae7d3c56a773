"""The stage chain (depthray/job/stages.py) as a Ray Data graph.

Generic over the stages: each one's execution hints (`memory`, `max_tasks`, `actor_pool`,
`blocks_of_one_batch`, `one_call_per_block_on_cpu`) become its `map_batches` arguments,
and no stage is known here by name. What is decided here is the cluster's side: the actor
pool's size and per-actor GPUs and CPUs (`Resources`). Every stage turns a bad row into an
error row and never raises for one, so Ray Data's `max_errored_blocks` (kept at 0) can never
drop rows silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from depthray.config import Config
from depthray.io.sources import Shard
from depthray.job.stages import Stage, shard_items

log = logging.getLogger(__name__)


@dataclass
class Resources:
    min_actors: int
    max_actors: int | None  # None: no limit of ours; the cluster's autoscaler caps it
    gpus_per_actor: float
    cpus_per_actor: float

    @property
    def num_actors(self) -> int:
        """The pool's size at the start (its minimum)."""
        return self.min_actors

    @property
    def fixed(self) -> bool:
        return self.max_actors == self.min_actors

    def strategy(self):
        """Ray Data's actor pool: fixed, or autoscaling between min_actors and max_actors."""
        from ray.data import ActorPoolStrategy

        if self.fixed:
            return ActorPoolStrategy(size=self.min_actors)
        return ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors)


def resolve_resources(cfg: Config) -> Resources:
    """Actor pool size and per-actor GPUs from config.

    `compute.num_actors` set: a fixed pool of that size. Unset: an autoscaling pool from
    `compute.min_actors` (default 1) up to `compute.max_actors` (default: no limit, so a
    cluster that starts with no GPU node, like cluster.yaml's, grows to its max_workers:
    Ray Data adds an actor while the pool is busy and work is queued, the cluster
    autoscaler starts a node for it, and idle actors go at the tail). Without any GPU in
    the cluster and no `num_gpus_per_actor`, actors are CPU actors and the pool is fixed at
    `min_actors` unless `max_actors` is set. A cluster whose GPU nodes start at 0 workers
    must say `num_gpus_per_actor` (no GPU is there to see when the job starts).
    """
    import ray

    res = ray.cluster_resources()
    gpus = res.get("GPU", 0.0)
    per = cfg.compute.num_gpus_per_actor
    if per is None:
        per = 1.0 if gpus >= 1 else 0.0
    cpus = cfg.compute.num_cpus_per_actor
    n = cfg.compute.num_actors
    if n is not None:
        if per > 0 and n * per > gpus:
            log.warning("%d actors x %g GPUs asked, cluster has %g GPUs now (autoscaler may add more)",
                        n, per, gpus)
        return Resources(min_actors=n, max_actors=n, gpus_per_actor=per, cpus_per_actor=cpus)
    lo, hi = cfg.compute.min_actors, cfg.compute.max_actors
    if per == 0 and hi is None:  # CPU actors (a local run): one, as before, unless max_actors says more
        hi = lo
    return Resources(min_actors=lo, max_actors=hi, gpus_per_actor=per, cpus_per_actor=cpus)


def build_dataset(stages: list[Stage], shards: list[Shard], res: Resources):
    """The Ray Data graph running `stages` over `shards` (lazy; runs when iterated)."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = 0  # a failing block fails the job loudly, never drops rows
    ctx.enable_progress_bars = False  # the driver logs its own progress lines
    items = shard_items(shards)
    return apply_stages(ray.data.from_items(items, override_num_blocks=len(items)), stages, res)


def apply_stages(ds, stages: list[Stage], res: Resources):
    """`ds` run through every stage in order, each as its hints say."""
    for st in stages:
        if st.blocks_of_one_batch:
            ds = ds.repartition(target_num_rows_per_block=max(1, st.batch_size or 1))
        ds = ds.map_batches(st.fn, **map_batches_args(st, res))
    return ds


def map_batches_args(st: Stage, res: Resources) -> dict[str, Any]:
    """A stage's `map_batches` keyword arguments (a hint left unset is left to Ray)."""
    from ray.data import TaskPoolStrategy

    on_gpu = st.actor_pool and res.gpus_per_actor > 0
    args: dict[str, Any] = {
        "batch_size": None if st.one_call_per_block_on_cpu and not on_gpu else st.batch_size,
        "batch_format": "pyarrow",
        "fn_constructor_kwargs" if st.stateful else "fn_kwargs": st.kwargs,
    }
    if st.actor_pool:
        args.update(compute=res.strategy(), num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor)
    elif st.stateful:  # Ray Data builds a class on actors only, and ours are the one pool's
        raise ValueError(f"stage {st.name!r}: a class runs on the actor pool only (actor_pool=True)")
    elif st.max_tasks:
        args["compute"] = TaskPoolStrategy(size=st.max_tasks)
    if st.memory:
        args["memory"] = st.memory
    return args
