"""The Ray graph is generic over the stage list: each stage's execution hints (depthray/job/
stages.py) become its `map_batches` arguments, and the pool reports itself to the job
summary's watcher (depthray/job/pool_watch.py) without anyone naming a stage."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest

from depthray.job.pool_watch import ALIVE_WITHIN_S, Heartbeat, PoolWatch, report_pool_member
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


# ---------------------------------------------------------------- the pool reports itself


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def test_heartbeat_stops_when_its_registry_is_gone_and_never_holds_a_process():
    class Gone(Exception):
        pass

    calls = []

    def beat():
        calls.append(time.monotonic())
        if len(calls) > 2:
            raise Gone()

    hb = Heartbeat(beat, every_s=0.01, gone=lambda e: isinstance(e, Gone)).start()
    assert hb.thread.daemon
    hb.thread.join(timeout=5)
    assert not hb.thread.is_alive() and hb.beats == 2 and len(calls) == 3


def test_heartbeat_rides_out_a_slow_registry_then_gives_up():
    state = {"fail": 3, "calls": 0}

    def beat():
        state["calls"] += 1
        if state["fail"]:
            state["fail"] -= 1
            raise TimeoutError()

    hb = Heartbeat(beat, every_s=0.01, give_up_after_s=1.0).start()
    _wait(lambda: hb.beats >= 2, 5, "beats after the registry came back")
    state["fail"] = 10**9  # from now on the registry never answers
    hb.thread.join(timeout=5)
    assert not hb.thread.is_alive(), "a heartbeat to a registry that never answers must end"


def test_a_pool_member_outside_a_ray_actor_reports_nothing():
    assert report_pool_member("") is None
    assert report_pool_member("r1") is None  # this process is no Ray actor (Ray may even run)


class _Member:
    """A stand-in pool stage class, built inside a Ray actor."""

    def __init__(self, run_id: str):
        self.heartbeat = report_pool_member(run_id)

    def beating(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.thread.is_alive()


def test_pool_watch_counts_the_actors_that_beat_and_drops_lost_ones(ray_session):
    """A pool actor counts while it beats, stops counting within ALIVE_WITHIN_S once killed
    (a lost node), and once the run's watch ends, a surviving member stops beating."""
    import ray

    run_id = "t-" + uuid.uuid4().hex[:8]
    member = ray.remote(num_cpus=0)(_Member)
    with PoolWatch(run_id, every_s=0.2) as watch:
        a = member.remote(run_id)
        _wait(lambda: watch.sizes and watch.sizes[-1][1] == 1, 60, "the first member counted")
        b = member.remote(run_id)
        _wait(lambda: watch.sizes[-1][1] == 2, 60, "the second member counted")
        ray.kill(a)
        t0 = time.monotonic()
        _wait(lambda: watch.sizes[-1][1] == 1, 2 * ALIVE_WITHIN_S + 10, "the killed member dropped")
        assert time.monotonic() - t0 >= ALIVE_WITHIN_S - 1.5  # gone only once its beats are stale
    summary = watch.summary()
    assert summary["pool_max"] == 2 and summary["pool_sizes"][-1][1] == 1, summary
    here = ray.get_runtime_context().get_node_id()
    assert list(summary["node_rampup_s"]) == [here[-8:]], summary
    _wait(lambda: not ray.get(b.beating.remote()), 30, "the surviving member stopped beating")
    ray.kill(b)


def test_pool_watch_without_ray_state_never_fails(monkeypatch):
    """Best effort: no registry (it could not start) and a failing sample leave the job
    alone and the summary empty."""
    watch = PoolWatch("none", every_s=0.01)
    monkeypatch.setattr("depthray.job.pool_watch.start_registry", lambda name: 1 / 0)
    with watch:
        time.sleep(0.05)
    assert watch.summary() == {"pool_sizes": [], "pool_max": 0, "node_rampup_s": {}}
    assert not any(t.name == "depthray-pool-watch" for t in threading.enumerate())


# ---------------------------------------------------------------- the local Ray's CPUs


@pytest.mark.parametrize("files, want", [
    ({}, None),
    ({"cpu.max": "max 100000"}, None),
    ({"cpu.max": "150000 100000"}, 1),
    ({"cpu.max": "300000 100000"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000", "cpuset/cpuset.cpus": "0-3,6"}, 5),
    ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000", "cpuset/cpuset.cpus": "0-3"}, 2),
    ({"cpu.max": "1000 100000"}, 1),
])
def test_local_ray_cpus_counts_a_containers_cgroup_limits(tmp_path, monkeypatch, files, want):
    import os

    from depthray.job.checks import local_ray_cpus

    monkeypatch.delenv("RAY_USE_MULTIPROCESSING_CPU_COUNT", raising=False)
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text + "\n")
    assert local_ray_cpus(str(tmp_path)) == (want if want is not None else os.cpu_count())
