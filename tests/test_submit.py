"""`depthray submit` for real: a local Ray head (`ray start --head`), the demo config, the
Ray Job API, and the outputs the job wrote."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from depthray.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(400)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 in its own process group, shared by this module's tests (each
    submits its own job into its own folders), stopped (only it) afterwards.

    `ray start --block` in a new session keeps the head's processes in one process group,
    so stopping it does not touch other Ray instances here (`ray stop` would stop them all).
    """
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0")
    # The test doubles (tests/) importable on the head, as a cluster's image has the model
    # factories its jobs name installed (depthray and pipelines/ travel with each job).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    temp_dir = tempfile.mkdtemp(prefix="drhead")  # short: Ray's socket paths have a length limit
    dash = _free_port()
    cmd = [os.path.join(bindir, "ray"), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
           f"--ray-client-server-port={_free_port()}", "--include-dashboard=true",
           # Every agent on its own free port: another Ray on this machine (a developer's, a
           # test's) must not leave the head without a job agent ("No available agent").
           f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # up, and asking for Ray's auth token
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Ray head did not come up (exit code {proc.poll()})")
                time.sleep(1)
        yield address
    finally:
        # Only this head's process group: GCS, raylet, dashboard and their workers. (A
        # graceful SIGTERM waits ~30 s on a node drain; nothing here needs to survive.)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_demo_config_to_a_ray_head(ray_head, tmp_path, monkeypatch, capsys):
    from depthray.demo import IMAGES_PER_SHARD, NUM_SHARDS, make_inputs

    make_inputs(tmp_path / "demo_output" / "inputs")
    monkeypatch.chdir(tmp_path)  # the demo config's paths are relative to where you run
    rc = cli_main(["submit", str(ROOT / "configs" / "demo.yaml"), "--address", ray_head, "--timeout", "300"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "SUCCEEDED" in out
    depth = tmp_path / "demo_output" / "depth"
    table = pq.read_table(depth)
    assert table.num_rows == NUM_SHARDS * IMAGES_PER_SHARD
    assert len(set(table.column("key").to_pylist())) == table.num_rows
    assert set(table.column("height").to_pylist()) == {96} and set(table.column("width").to_pylist()) == {128}
    manifests = sorted((depth / "_manifest").glob("*.json"))
    assert [m.stem for m in manifests] == [f"{i:05d}" for i in range(NUM_SHARDS)]
    assert all(json.loads(m.read_text())["status"] == "complete" for m in manifests)


def test_ray_job_submit_runs_a_pipeline_file(ray_head, tmp_path):
    """#29: `ray job submit -- python pipelines/depth.py CONFIG`, Ray's own CLI against a
    local head: the pipeline module runs the job on the cluster, and its config hash is a
    plain `depthray run`'s (a later plain run resumes, nothing redone)."""
    import yaml

    from depthray.demo import IMAGES_PER_SHARD, NUM_SHARDS, make_inputs

    make_inputs(tmp_path / "inputs")
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["input"]["url"] = str(tmp_path / "inputs" / "{00000..00001}.tar")
    config["output"]["url"] = str(tmp_path / "depth")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    ray = str(Path(sys.executable).parent / "ray")
    # The head asks for Ray's token (kept in ~/.ray/auth_token by `ray start`); Ray's CLI sends it in token mode.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([ray, "job", "submit", "--address", ray_head, "--",
                           sys.executable, str(ROOT / "pipelines" / "depth.py"), str(tmp_path / "job.yaml")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    table = pq.read_table(tmp_path / "depth")
    assert table.num_rows == NUM_SHARDS * IMAGES_PER_SHARD == len(set(table.column("key").to_pylist()))
    again = subprocess.run([sys.executable, "-m", "depthray", "status", str(tmp_path / "job.yaml")],
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr  # every shard complete for the plain config


def _metric_job(tmp_path, pipeline: str = "metric_depth") -> tuple[Path, dict]:
    """tests/test_metric_pipeline.py's eight samples (LiDAR members, two broken) as a
    metric_depth job, and the labels a run here gives them. (The job runs the local executor
    in its driver on the head: this is about reaching the cluster with the task's code; the
    task on Ray's executor is tests/test_metric_pipeline.py's.)"""
    import yaml

    from tests.test_metric_pipeline import write_input

    write_input(tmp_path / "in")
    config = {"input": {"url": str(tmp_path / "in" / "*.tar")}, "output": {"url": str(tmp_path / "local")},
              "model": {"factory": "tests.reliability.doubles:make_log_depth"},
              "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
              "compute": {"images_per_batch": 4, "executor": "local"},
              "pipeline": pipeline, "metric": {"member": "lidar.png"}}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(tmp_path / "local.yaml")]) == 0
    config["output"]["url"] = str(tmp_path / "cluster")  # run by the job on the head, in its driver (tiny)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "job.yaml", {r["key"]: r for r in pq.read_table(tmp_path / "local").to_pylist()}


def _assert_metric_labels(folder: Path, local: dict) -> None:
    got = {r["key"]: r for r in pq.read_table(folder).to_pylist()}
    assert sorted(got) == sorted(local) and len(got) == 6  # 8 samples, 2 error rows
    for key, row in got.items():
        assert row["metric_depth"] is not None and row["metric_depth"] == local[key]["metric_depth"], key
        assert row["config_hash"] == local[key]["config_hash"], key
    assert sorted(r["key"] for r in pq.read_table(folder / "_errors").to_pylist()) == ["street8", "yard7"]


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def metric_submissions(ray_head, tmp_path_factory):
    """The three metric_depth submissions the tests below check, started together: each
    spends its ~20 s waiting on the head (runtime env, job driver start), not on this CPU, so
    they overlap. name -> (process, its folder, the local run's labels); each test awaits its own."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    runs = {}
    folder = tmp_path_factory.mktemp("ray_job_submit")
    config, local = _metric_job(folder)
    # the test double's module (tests/) on the job's path, wherever the head was started
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray = str(Path(sys.executable).parent / "ray")
    runs["ray_job_submit"] = (_start([ray, "job", "submit", "--address", ray_head, "--runtime-env-json", runtime_env,
                                      "--", sys.executable, str(ROOT / "pipelines" / "metric_depth.py"), str(config)],
                                     ROOT, env, folder / "submit.log"), folder, local)
    folder = tmp_path_factory.mktemp("named")
    config, local = _metric_job(folder)
    runs["named"] = (_start([sys.executable, "-m", "depthray", "submit", str(config), "--address", ray_head,
                             "--timeout", "300"], ROOT, env, folder / "submit.log"), folder, local)
    folder = tmp_path_factory.mktemp("relative")
    (folder / "tasks").mkdir()
    shutil.copyfile(ROOT / "pipelines" / "metric_depth.py", folder / "tasks" / "my_metric.py")
    with contextlib.chdir(folder):  # the task is named by its path from the folder you run in
        config, local = _metric_job(folder, pipeline="tasks/my_metric.py")
    runs["relative"] = (_start([sys.executable, "-m", "depthray", "submit", str(config), "--address", ray_head,
                                "--timeout", "300"], folder, env, folder / "submit.log"), folder, local)
    yield runs
    for proc, _, _ in runs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _finished(run) -> tuple[int, str, Path, dict]:
    proc, folder, local = run
    rc = proc.wait(timeout=330)
    return rc, (folder / "submit.log").read_text(errors="replace"), folder, local


def test_ray_job_submit_runs_the_metric_depth_pipeline(metric_submissions):
    """#29: `ray job submit -- python pipelines/metric_depth.py CONFIG` against a local head:
    the metric labels (and error rows) of a local run, byte for byte, same config hash."""
    rc, out, folder, local = _finished(metric_submissions["ray_job_submit"])
    assert rc == 0 and "succeeded" in out, out[-3000:]
    _assert_metric_labels(folder / "cluster", local)


def test_depthray_submit_ships_the_named_pipeline(metric_submissions):
    """`depthray submit` of a config naming `pipeline: metric_depth`: pipelines/ travels with
    the job (runtime_env py_modules) beside depthray, and the job declares its task from that
    copy, not from this checkout."""
    rc, out, folder, local = _finished(metric_submissions["named"])
    assert rc == 0 and "SUCCEEDED" in out, out[-3000:]
    declared = [ln.split("pipeline metric_depth: ", 1)[1].strip() for ln in out.splitlines()
                if "pipeline metric_depth: " in ln]
    assert declared and all(p.endswith("metric_depth.py") for p in declared), out[-3000:]
    assert not any(Path(p).resolve().is_relative_to(ROOT) for p in declared), declared  # the shipped copy
    _assert_metric_labels(folder / "cluster", local)


def test_depthray_submit_ships_a_pipeline_file_named_by_a_relative_path(metric_submissions):
    """A task of your own (a copy of pipelines/metric_depth.py), named by its path from the
    folder you submit from: it travels in the job's working directory under the same name,
    so the cluster's labels carry a local run's config hash."""
    rc, out, folder, local = _finished(metric_submissions["relative"])
    assert rc == 0 and "SUCCEEDED" in out, out[-3000:]
    declared = [ln.split("pipeline tasks/my_metric.py: ", 1)[1].strip() for ln in out.splitlines()
                if "pipeline tasks/my_metric.py: " in ln]
    assert declared and not any(Path(p).resolve().is_relative_to(folder) for p in declared), out[-3000:]
    _assert_metric_labels(folder / "cluster", local)


def test_depthray_submit_refuses_a_pipeline_file_that_cannot_travel(tmp_path, monkeypatch, capsys):
    import yaml

    (tmp_path / "task.py").write_text("def stages(cfg, run_id='', device_kind=None):\n    return []\n")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    config = {"input": {"url": str(tmp_path / "in.tar")}, "output": {"url": str(tmp_path / "out")},
              "pipeline": "../task.py"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["submit", str(tmp_path / "job.yaml"), "--address", "http://127.0.0.1:9"]) == 2
    assert "outside the current folder does not travel" in capsys.readouterr().err
