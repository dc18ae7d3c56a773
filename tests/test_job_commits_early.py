"""Shards commit while the job runs, not all at its end: on a Ray of this module's own.

Ray Data's resource coordinator shares a cluster's CPUs equally among the datasets that hold
a request on it (`request_remaining`, floored to whole CPUs). On the suite's shared Ray a
dataset an earlier test left behind could hold one, and this job's write stage (1 CPU, beside
the 0.5-CPU model actor) then got a budget of 0 CPU until the model's last call: every shard
committed at the end (seen in 2 of 5 suite runs). A job alone on its cluster, as here and as
`depthray run` / `submit` run, has the whole of it; docs/operations.md says so.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("no_ray")


@pytest.fixture(scope="module")
def own_ray(_ray_env):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def test_shards_commit_while_the_model_still_runs(own_ray, tmp_path, make_image):
    """A reader (or `depthray status`) sees shards complete during a job, not all at its end:
    with parts of 8 rows, the first shard's manifest exists before the model's last call.
    The double's last call (the 8th) waits, up to 60 s, for a manifest to appear: a job
    that commits shards as they finish gets one within seconds; one that commits only at
    its end gets none, the call runs late and the manifests all come after it. (A fixed
    sleep per call made this a race on a 2-core machine shared with a second test process.)"""
    from depthray.config import config_from_dict
    from depthray.io.tar_samples import tar_bytes
    from depthray.job.driver import run_job
    from tests.reliability.conftest import double_model

    (tmp_path / "in").mkdir()
    for s in range(4):
        (tmp_path / "in" / f"{s:03d}.tar").write_bytes(
            tar_bytes((f"s{s}k{i}.jpg", make_image(12, 16, seed=10 * s + i)) for i in range(8)))
    calls = tmp_path / "calls.log"
    cfg = config_from_dict({
        "input": {"url": str(tmp_path / "in" / "{000..003}.tar")},
        "output": {"url": str(tmp_path / "out"), "rows_per_part": 8},
        "model": double_model(sleep_s=0.4, calls_log=str(calls), wait_on_call=8,
                              wait_for_glob=str(tmp_path / "out" / "_manifest" / "*.json")),
        "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": 4, "num_actors": 1, "num_cpus_per_actor": 0.5}}, require_io=True)
    summary = run_job(cfg)
    assert summary["images"] == 32 and summary["errors"] == 0, summary
    assert summary["pool_max"] == 1, summary  # the one actor reported itself (pool_watch.py)
    manifests = sorted((tmp_path / "out" / "_manifest").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert len(manifests) == 4
    last_call = max(float(line.split()[3]) for line in calls.read_text().split("\n") if line)
    calls_at = sorted(float(line.split()[3]) for line in calls.read_text().split("\n") if line)
    assert manifests[0].stat().st_mtime < last_call, (
        "every shard committed only after the last model call: calls at "
        f"{[round(t - calls_at[0], 2) for t in calls_at]}, manifests at "
        f"{[round(m.stat().st_mtime - calls_at[0], 2) for m in manifests]}")
