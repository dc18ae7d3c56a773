"""`depthray submit` for real: a local Ray head (`ray start --head`), the demo config, the
Ray Job API, and the outputs the job wrote."""

from __future__ import annotations

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
