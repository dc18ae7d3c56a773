"""The Ray graph is generic over the stage list: each stage's execution hints (depthray/job/
stages.py) become its `map_batches` arguments, without the graph naming a stage."""

from __future__ import annotations

import dataclasses

import pytest

from depthray.job.ray_graph import Resources, apply_stages
from depthray.job.stages import job_stages, stage
from tests import golden_job

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20


class Recorder:
    """Stands in for a Ray Dataset: records the graph's calls, in order."""

    def __init__(self):
        self.calls: list[tuple] = []

    def repartition(self, **kwargs):
        self.calls.append(("repartition", kwargs))
        return self

    def map_batches(self, fn, **kwargs):
        self.calls.append((fn.__name__, kwargs))
        return self


def _graph(stages, res: Resources) -> list[tuple]:
    return apply_stages(Recorder(), stages, res).calls


def _config(read_parallelism=None):
    cfg = golden_job.job_config("in/{00000..00001}.tar", "out")
    cfg.compute.images_per_batch = 4
    cfg.compute.read_parallelism = read_parallelism
    return cfg


def test_the_job_graph_has_each_stage_arguments_on_cpu_actors():
    """Today's graph, argument by argument: read and decode reserve 256 MiB (and obey
    compute.read_parallelism), blocks of one batch before the pool, the pool's size and
    resources from `Resources`, and on CPU actors one call per block."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    cfg = _config(read_parallelism=3)
    stages = job_stages(cfg, run_id="r1")
    kw = {s.name: s.kwargs for s in stages}
    readers = TaskPoolStrategy(size=3)
    assert _graph(stages, Resources(1, 1, gpus_per_actor=0.0, cpus_per_actor=2.0)) == [
        ("read_shards", dict(batch_size=1, batch_format="pyarrow", fn_kwargs=kw["read"], compute=readers,
                             memory=256 * MiB)),
        ("decode_batch", dict(batch_size=None, batch_format="pyarrow", fn_kwargs=kw["decode"], compute=readers,
                              memory=256 * MiB)),
        ("repartition", dict(target_num_rows_per_block=4)),
        ("DepthPredictor", dict(batch_size=None, batch_format="pyarrow", fn_constructor_kwargs=kw["infer"],
                                compute=ActorPoolStrategy(size=1), num_gpus=0.0, num_cpus=2.0)),
        ("encode_batch", dict(batch_size=None, batch_format="pyarrow", fn_kwargs=kw["encode"])),
        ("write_batch", dict(batch_size=cfg.output.rows_per_part, batch_format="pyarrow", fn_kwargs=kw["write"])),
    ]


def test_the_job_graph_on_gpu_actors_asks_for_gpus_and_a_batch_size():
    from ray.data import ActorPoolStrategy

    cfg = _config()
    stages = job_stages(cfg, run_id="r1", device_kind="cuda")
    calls = dict(_graph(stages, Resources(1, None, gpus_per_actor=1.0, cpus_per_actor=0.5))[2:4])
    assert calls["repartition"] == {"target_num_rows_per_block": 4}
    infer = calls["DepthPredictor"]
    assert infer["batch_size"] == 4  # Ray refuses batch_size=None with GPUs
    assert (infer["compute"], infer["num_gpus"], infer["num_cpus"]) == (
        ActorPoolStrategy(min_size=1, max_size=None), 1.0, 0.5)
    # read_parallelism unset: Ray decides how many readers, and no compute is passed
    assert "compute" not in _graph(stages, Resources(1, 1, 1.0, 1.0))[0][1]


def test_a_new_stage_runs_as_its_hints_say_without_the_graph_knowing_it():
    """What the next capabilities need: a second model stage (normals, say) declared like
    infer gets blocks and the pool; a task stage with a memory hint gets its reservation."""
    cfg = _config()
    stages = job_stages(cfg, run_id="r1")
    normals = dataclasses.replace(stage(stages, "infer"), name="normals", batch_size=2)
    tagged = dataclasses.replace(stage(stages, "encode"), name="tag", memory=64 * MiB)
    calls = _graph([*stages[:3], normals, tagged, *stages[3:]], Resources(2, 2, 0.0, 1.0))
    names = [c[0] for c in calls]
    assert names == ["read_shards", "decode_batch", "repartition", "DepthPredictor", "repartition",
                     "DepthPredictor", "encode_batch", "encode_batch", "write_batch"]
    assert calls[4][1] == {"target_num_rows_per_block": 2} and calls[5][1]["num_cpus"] == 1.0
    assert calls[6][1]["memory"] == 64 * MiB and "memory" not in calls[7][1]


def test_stage_hints_that_cannot_run_are_refused():
    from depthray.job.ray_graph import map_batches_args

    infer = stage(job_stages(_config(), run_id="r1"), "infer")
    with pytest.raises(ValueError, match="actor pool only"):
        map_batches_args(dataclasses.replace(infer, actor_pool=False), Resources(1, 1, 0.0, 1.0))
    with pytest.raises(ValueError, match="max_tasks"):
        dataclasses.replace(infer, max_tasks=2)
    with pytest.raises(ValueError, match="not a function"):
        dataclasses.replace(stage(job_stages(_config()), "encode"), actor_pool=True)
