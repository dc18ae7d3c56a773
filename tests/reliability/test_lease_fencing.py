"""The fenced lease (depthray/job/lease.py), local disk and moto S3: two real processes
taking over one stale lease at the same instant (held side by side at the takeover step
by depthray/crash_points.py) end with exactly one holder; a run whose lease another run
took over commits nothing more and exits non-zero naming that run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.reliability.conftest import REPO
from tests.reliability.crash_harness import Output, inputs, job, spawn

pytestmark = pytest.mark.timeout(300)

CONTENDER = """
import json, sys, time, os
from depthray.config import StorageConfig
from depthray.job.lease import OutputBusy, OutputLease
url, run_id, done = sys.argv[1:]
try:
    lease = OutputLease(url, StorageConfig(), run_id, timeout_s=30).acquire()
    print(json.dumps({"run_id": run_id, "won": True, "generation": lease.generation}), flush=True)
except OutputBusy as e:
    print(json.dumps({"run_id": run_id, "won": False, "message": str(e)}), flush=True)
deadline = time.time() + 60  # stay alive (a live holder) until the test has looked
while not os.path.exists(done) and time.time() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "s3":
        return Output("s3", tmp_path, request.getfixturevalue("s3_bucket"))
    return Output("local", tmp_path)


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _put_lease(output: Output, lease: dict) -> None:
    path = f"{output.root()}/_jobs/lease.json"
    if output.kind == "local":
        os.makedirs(os.path.dirname(path), exist_ok=True)
    output.fs.pipe_file(path, json.dumps(lease).encode())


@pytest.mark.parametrize("release", ["together", "staggered"])
def test_two_processes_taking_over_one_stale_lease_at_once_one_wins(output, tmp_path, release):
    """Both contenders read the stale lease and stand at the takeover before either writes.
    `together`: both are let go at once. `staggered`: the first is let go and its takeover
    lands before the second is let go, which then writes against the lease it read (now
    gone): the case a delete-then-create takeover loses deterministically."""
    _put_lease(output, {"run_id": "dead-run", "host": "elsewhere", "pid": 1,
                        "heartbeat": time.time() - 3600, "generation": 7})
    done = tmp_path / "done"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, output.url(), f"contender-{i}", str(done)],
                              cwd=REPO, env=dict(os.environ, DEPTHRAY_PAUSE_AT=f"lease_takeover={tmp_path / f'go{i}'}",
                                                 PYTHONPATH=path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        _wait_for(lambda: all(list(tmp_path.glob(f"go{i}.*.reached")) for i in range(2)), 60,
                  "both contenders at the takeover")
        (tmp_path / "go0").touch()
        if release == "staggered":
            first = json.loads(procs[0].stdout.readline() or "{}")
            assert first.get("won"), first
        (tmp_path / "go1").touch()
        results = [first if release == "staggered" and i == 0 else json.loads(p.stdout.readline() or "{}")
                   for i, p in enumerate(procs)]
    finally:
        done.touch()
        for p in procs:
            p.wait(60)
    winners = [r for r in results if r.get("won")]
    assert len(winners) == 1, results
    loser = next(r for r in results if not r.get("won"))
    assert winners[0]["run_id"] in loser["message"], loser  # the loser names the run that won
    lease = output.read_json("_jobs/lease.json")
    assert (lease["run_id"], lease["generation"]) == (winners[0]["run_id"], 8) == (
        winners[0]["run_id"], winners[0]["generation"])


def test_a_run_that_lost_its_lease_stops_committing(ray_session, output, tmp_path, make_image):
    """The run is held at its second commit; meanwhile another run takes the lease over
    (the lease now names it, one generation on). Let go, the run commits nothing more,
    exits 3 naming the other run, and leaves the other run's lease alone."""
    inputs(tmp_path, make_image)
    go = tmp_path / "go"
    # The Ray executor: the hardest case, its stream keeps producing while the run is held.
    proc = spawn(job(tmp_path, output.url(), executor="ray"), tmp_path / "run.log",
                 {"DEPTHRAY_PAUSE_AT": f"commit_start:2={go}"})
    try:
        _wait_for(lambda: list(tmp_path.glob("go.*.reached")) or proc.poll() is not None, 150,
                  "the second commit")
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        held = output.read_json("_jobs/lease.json")
        intruder = {**held, "run_id": "intruder-run", "pid": os.getpid(), "heartbeat": time.time(),
                    "generation": held["generation"] + 1}
        _put_lease(output, intruder)
        go.touch()
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert rc == 3, log[-3000:]
    assert "lost the lease" in log and "intruder-run" in log, log[-3000:]
    files = output.files()
    manifests = [f for f in files if f.startswith("_manifest/") and f.endswith(".json")]
    assert len(manifests) == 1, files  # the first commit only: none after the takeover
    assert output.read_json(manifests[0])["lease_generation"] == held["generation"]
    assert not [f for f in files if f.startswith("_pending/")], files  # not even begun
    assert output.read_json("_jobs/lease.json")["run_id"] == "intruder-run"


def test_a_heartbeat_never_overwrites_a_lease_another_run_took(output):
    """The heartbeat is conditional on the lease being as this run last wrote it: once
    another run took it over, the beat fails, the lease stays the other run's, and this run
    knows it lost (the next commit's `verify` raises LeaseLost naming the other run)."""
    from depthray.config import StorageConfig
    from depthray.job.lease import LeaseLost, OutputLease

    lease = OutputLease(output.url(), StorageConfig(), "me", timeout_s=30, heartbeat_s=0.1).acquire()
    try:
        other = {**output.read_json("_jobs/lease.json"), "run_id": "other-run", "generation": 2,
                 "heartbeat": time.time()}
        _put_lease(output, other)
        _wait_for(lambda: lease.lost is not None, 10, "the heartbeat to notice")
        time.sleep(0.3)  # beats that would have overwritten it
        assert output.read_json("_jobs/lease.json") == other
        with pytest.raises(LeaseLost, match="other-run"):
            lease.verify()
    finally:
        lease.release()
    assert output.read_json("_jobs/lease.json") == other  # not released: it is not ours
