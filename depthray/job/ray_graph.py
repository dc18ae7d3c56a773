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
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float


def resolve_resources(cfg: Config) -> Resources:
    """Actor pool size and per-actor GPUs from config, defaulting to the cluster's GPUs."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0)
    per = cfg.compute.num_gpus_per_actor
    if per is None:
        per = 1.0 if gpus >= 1 else 0.0
    n = cfg.compute.num_actors
    if n is None:
        n = max(1, int(gpus // per)) if per > 0 else 1
    if per > 0 and n * per > gpus:
        log.warning("%d actors x %g GPUs asked, cluster has %g GPUs now (autoscaler may add more)",
                    n, per, gpus)
    return Resources(num_actors=n, gpus_per_actor=per, cpus_per_actor=cfg.compute.num_cpus_per_actor)


def build_dataset(stages: list[Stage], shards: list[Shard], cfg: Config, res: Resources):
    """The Ray Data graph running `stages` over `shards` (lazy; runs when iterated)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

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
        "infer": {"compute": ActorPoolStrategy(size=res.num_actors), "num_gpus": res.gpus_per_actor,
                  "num_cpus": res.cpus_per_actor},
    }
    items = shard_items(shards)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    for st in stages:
        kw = dict(resources.get(st.name, {}))
        if st.stateful:
            ds = ds.map_batches(st.fn, batch_size=st.batch_size, batch_format="pyarrow",
                                fn_constructor_kwargs=st.kwargs, **kw)
        else:
            ds = ds.map_batches(st.fn, batch_size=st.batch_size, batch_format="pyarrow",
                                fn_kwargs=st.kwargs, **kw)
    return ds
