"""A real multi-node Ray on one machine: an autoscaling cluster that starts with no GPU
node (like cluster.yaml), and a GPU node lost mid-job (spot preemption).

Nodes are real raylets with fake `GPU` resources; the model is a CPU test double that
logs (pid, views, node id, time) per call. Each cluster runs in its own temp dir on free
ports; nothing here runs `ray stop` (other Ray sessions may share the machine), and the
processes a test started are ended by their pids.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import defaultdict

import fsspec
import psutil
import pytest

from depthray.job.driver import run_job
from tests.reliability.conftest import REPO, assert_exactly_once, double_model, job_config, read_outputs
from tests.reliability.test_crashes import write_shards

# no_ray: each test connects to a cluster of its own
pytestmark = [pytest.mark.timeout(170), pytest.mark.usefixtures("no_ray")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _fake_provider_config(gcs_address: str, worker_types: dict) -> dict:
    """What AutoscalingCluster builds from the example YAML the wheel lacks, with the GCS
    address ours (not 6379)."""
    return {
        "cluster_name": "depthray-fake",
        "max_workers": 8,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class LocalCluster:
    """ray.cluster_utils.Cluster in its own temp dir on a free GCS port, optionally with the
    fake multi-node autoscaler; `close()` ends every process under that temp dir by pid."""

    def __init__(self, head_cpus: int, autoscale_workers: dict | None = None):
        from ray.cluster_utils import Cluster

        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.temp_dir = tempfile.mkdtemp(prefix="drc-", dir="/tmp")
        port = _free_port()
        args = {"num_cpus": head_cpus, "gcs_server_port": port, "temp_dir": self.temp_dir, "include_dashboard": False,
                "object_store_memory": 100 << 20}
        if autoscale_workers:
            os.environ["RAY_FAKE_CLUSTER"] = "1"
            os.environ["AUTOSCALER_UPDATE_INTERVAL_S"] = "1"
            path = os.path.join(self.temp_dir, "autoscaler.json")
            import ray

            ip = ray._private.services.get_node_ip_address()
            with open(path, "w") as f:
                json.dump(_fake_provider_config(f"{ip}:{port}", autoscale_workers), f)
            args["autoscaling_config"] = path
        self.cluster = Cluster(initialize_head=True, head_node_args=args)

    def add_gpu_node(self, cpus: int = 1):
        return self.cluster.add_node(num_cpus=cpus, num_gpus=1,
                                     object_store_memory=100 << 20)

    def connect(self):
        import ray

        ray.init(address=self.cluster.address, logging_level="WARNING", log_to_driver=False)

    def close(self) -> None:
        import ray

        ray.shutdown()
        try:
            self.cluster.shutdown()
        except Exception:
            pass
        os.environ.pop("RAY_FAKE_CLUSTER", None)
        os.environ.pop("AUTOSCALER_UPDATE_INTERVAL_S", None)
        # Nodes the fake autoscaler started outlive the head: end them by pid.
        mine = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.temp_dir in a for a in (p.info["cmdline"] or [])):
                    mine.append(p)
            except (psutil.Error, TypeError):
                continue
        for p in mine:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(mine, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _calls(path) -> list[tuple[int, int, str, float]]:
    out = []
    for ln in path.read_text().splitlines():
        pid, n, node, t = ln.split()
        out.append((int(pid), int(n), node, float(t)))
    return out


def pool_sizes(calls) -> list[tuple[float, int]]:
    """(seconds since the first call, distinct actor processes that made a call in the
    2 s window ending then), once per second: the busy pool size over time."""
    if not calls:
        return []
    t0 = calls[0][3]
    end = calls[-1][3]
    sizes = []
    t = t0
    while t <= end + 1:
        sizes.append((round(t - t0, 1), len({pid for pid, _, _, tc in calls if t - 2 <= tc <= t})))
        t += 1
    return sizes


def test_autoscaling_pool_grows_onto_new_gpu_nodes(tmp_path, make_image):
    """A head without GPUs, a GPU worker type from 0 nodes: with num_actors unset the pool
    starts at one actor (whose GPU request makes the autoscaler start a node), grows while
    work is queued (more nodes), and every key ends exactly once."""
    # 80 calls of 0.8 s: ~64 s of work for one actor, longer than a loaded machine takes to
    # start the next fake node after asking (~40 s seen), so the pool can grow before the end.
    expected = write_shards(tmp_path / "in", make_image, shards=4, per=40)
    calls = tmp_path / "calls.log"
    cfg = job_config(str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"),
                     double_model(sleep_s=0.8, calls_log=str(calls)),
                     compute={"num_gpus_per_actor": 1, "num_cpus_per_actor": 0.5, "max_actors": 3,
                              "images_per_batch": 2})
    cluster = LocalCluster(head_cpus=2, autoscale_workers={
        "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3}})
    try:
        cluster.connect()
        t0 = time.time()
        summary = run_job(cfg, log_every_s=5.0)
        wall = time.time() - t0
    finally:
        cluster.close()
    log = _calls(calls)
    nodes = {node for _, _, node, _ in log}
    sizes = pool_sizes(log)
    print(f"autoscaling job: {wall:.1f} s, nodes used {len(nodes)}, actors {len({c[0] for c in log})}, "
          f"busy pool size over time {sizes}")
    print(f"summary: pool_sizes {summary['pool_sizes']}, node_rampup_s {summary['node_rampup_s']}")
    assert summary["shards_complete"] == 4 and not summary["job_error"]
    assert len(nodes) >= 2, f"the job ran on one node only: {nodes}"
    assert summary["pool_max"] >= 2 and len(summary["node_rampup_s"]) >= 2, summary
    assert summary["pool_sizes"][0][1] <= 1  # the pool starts small and grows
    assert max(n for _, n in sizes) >= 2
    outs, errors = read_outputs(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert not errors
    assert_exactly_once(expected, outs, errors)


def test_gpu_node_lost_mid_job_work_is_redone_not_crashed(tmp_path, make_image):
    """Two GPU nodes, a fixed pool of two actors; one node is killed mid-job (spot
    preemption, no graceful shutdown) and a replacement joins a few seconds later, as the
    autoscaler would start one. The lost node's batches are redone elsewhere: the job
    finishes, every key exactly once, no `crashed` (or any) error."""
    expected = write_shards(tmp_path / "in", make_image, shards=3, per=16)
    calls = tmp_path / "calls.log"
    cfg = job_config(str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"),
                     double_model(sleep_s=0.4, calls_log=str(calls)),
                     compute={"num_gpus_per_actor": 1, "num_cpus_per_actor": 0.5, "num_actors": 2,
                              "images_per_batch": 2})
    cluster = LocalCluster(head_cpus=2)
    result: dict = {}
    try:
        nodes = [cluster.add_gpu_node(), cluster.add_gpu_node()]
        cluster.connect()
        job = threading.Thread(target=lambda: result.update(summary=run_job(cfg, log_every_s=5.0)), daemon=True)
        t0 = time.time()
        job.start()
        victim = None
        while victim is None and job.is_alive() and time.time() - t0 < 90:
            time.sleep(0.5)
            log = _calls(calls) if calls.exists() else []
            per_node = defaultdict(int)
            for _, _, node, _ in log:
                per_node[node] += 1
            busy = [n for n in nodes if per_node.get(n.node_id, 0) >= 2]
            if len(busy) == 2:
                victim = busy[1]
        assert victim is not None, "both GPU nodes never got work"
        lost_at = len(_calls(calls))
        cluster.cluster.remove_node(victim, allow_graceful=False)
        time.sleep(3)
        replacement = cluster.add_gpu_node()
        job.join(timeout=150 - (time.time() - t0))
        assert not job.is_alive(), "the job did not finish after the node loss"
        wall = time.time() - t0
    finally:
        cluster.close()
    log = _calls(calls)
    after = {node for _, _, node, _ in log[lost_at:]}
    print(f"node-loss job: {wall:.1f} s, {lost_at} calls before the loss, {len(log)} in all; "
          f"nodes after the loss {sorted(n[:8] for n in after)}; replacement used: {replacement.node_id in after}")
    summary = result["summary"]
    assert summary["shards_complete"] == 3 and not summary["job_error"], summary
    outs, errors = read_outputs(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert not errors, errors
    assert_exactly_once(expected, outs, errors)
    assert victim.node_id not in after or all(t <= log[lost_at - 1][3] + 1 for _, _, n, t in log[lost_at:]
                                              if n == victim.node_id)
