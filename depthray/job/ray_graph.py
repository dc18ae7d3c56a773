"""The stage chain (depthray/job/stages.py) as a Ray Data graph.

Resources are declared here, where `map_batches` is called: CPU tasks for read, decode,
encode and write; an actor pool for infer (GPUs when the cluster has them). Every stage
turns a bad row into an error row and never raises for one, so Ray Data's
`max_errored_blocks` (kept at 0) can never drop rows silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


def build_dataset(stages: list[Stage], shards: list[Shard], cfg: Config, res: Resources):
    """The Ray Data graph running `stages` over `shards` (lazy; runs when iterated)."""
    import ray
    from ray.data import DataContext, TaskPoolStrategy

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = 0  # a failing block fails the job loudly, never drops rows
    ctx.enable_progress_bars = False  # the driver logs its own progress lines

    read_compute = TaskPoolStrategy(size=cfg.compute.read_parallelism) if cfg.compute.read_parallelism else None
    # Decoded pixels take memory; saying so keeps Ray from packing too many decode tasks
    # on one node. It also keeps Ray from fusing read+decode into the inference actor (it
    # fuses operators with equal resource requests), which would put CPU decoding on the
    # GPU actor's critical path.
    resources = {
        "read": {"compute": read_compute, "memory": 256 << 20},
        "decode": {"compute": read_compute, "memory": 256 << 20},
        "infer": {"compute": res.strategy(), "num_gpus": res.gpus_per_actor,
                  "num_cpus": res.cpus_per_actor},
    }
    items = shard_items(shards)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    for st in stages:
        if st.name == "infer":
            # Work travels in blocks of one actor batch, not whole shards: a shard's rows
            # spread over every actor (the ledger still commits the shard as one unit), and
            # at the tail no actor sits on a shard's worth of queued rows while others idle.
            # On CPU actors each block is one call (batch_size=None): Ray would otherwise
            # bundle a shard's short last block with the next shard's rows, which moves
            # depth values by ~1e-5 (which images share a model batch). Ray insists on a
            # batch_size for GPU actors; there a batch may span two shards, which the
            # crash bookkeeping allows (rows are named by shard and key).
            ds = ds.repartition(target_num_rows_per_block=max(1, st.batch_size or 1))
        kw = dict(resources.get(st.name, {}))
        if st.stateful:
            per_block = st.name == "infer" and res.gpus_per_actor == 0
            ds = ds.map_batches(st.fn, batch_size=None if per_block else st.batch_size,
                                batch_format="pyarrow",
                                fn_constructor_kwargs=st.kwargs, **kw)
        else:
            ds = ds.map_batches(st.fn, batch_size=st.batch_size, batch_format="pyarrow",
                                fn_kwargs=st.kwargs, **kw)
    return ds
