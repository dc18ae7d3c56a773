"""Storage faults, injected for real by an HTTP proxy in front of the moto S3 server:
transient 5xx / throttling / dropped connections are retried and the job ends with every
key exactly once; permanent errors (403, missing bucket) stop the job before any work with
a message naming the URL; a write that keeps failing ends in a summary, not a traceback;
the secret key never shows up in logs, errors, summaries or outputs."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from depthray.config import ConfigError
from depthray.job.driver import run_job
from tests.reliability.conftest import (
    assert_exactly_once,
    assert_no_partial_files,
    double_model,
    job_config,
    read_outputs,
)

pytestmark = pytest.mark.timeout(300)

SECRET = f"depthray-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def secret_ray(s3_endpoint, no_ray):
    """A Ray of this module's own whose workers see a unique AWS secret, so a leak is greppable."""
    import os

    import ray

    from tests.reliability.conftest import REPO

    saved = os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray._private.worker._global_node.get_session_dir_path()
    finally:
        ray.shutdown()
        os.environ["AWS_SECRET_ACCESS_KEY"] = saved


def make_input(fs, bucket: str, make_image, make_tar, shards: int = 4, per: int = 4) -> dict[str, set[str]]:
    expected = {}
    for s in range(shards):
        members = [(f"s{s}k{i}.jpg", make_image(16, 20, seed=s * 10 + i)) for i in range(per)]
        fs.pipe_file(f"{bucket}/in/{s:05d}.tar", make_tar(members))
        expected[f"{s:05d}"] = {f"s{s}k{i}" for i in range(per)}
    return expected


def test_transient_faults_are_retried_exactly_once(secret_ray, s3_bucket, fault_proxy, make_image, make_tar,
                                                   caplog):
    fs = fsspec.filesystem("s3")
    expected = make_input(fs, s3_bucket, make_image, make_tar)
    # 30% of requests fail (503 SlowDown, 500, dropped connection, an answer 4 s late with a
    # 2 s client timeout) until 24 faults were served.
    fault_proxy.flaky(fraction=0.3, budget=24, actions=(503, 500, "drop", "slow"), seed=1)
    out = f"s3://{s3_bucket}/out"
    cfg = job_config(f"s3://{s3_bucket}/in/{{00000..00003}}.tar", out, double_model(),
                     storage={"endpoint_url": fault_proxy.url, "retries": 8, "timeout_s": 2.0},
                     output={"rows_per_part": 3})
    with caplog.at_level(logging.INFO):
        summary = run_job(cfg)
    assert sum(fault_proxy.injected.values()) >= 12, fault_proxy.injected  # faults really happened
    assert fault_proxy.injected["slow"] >= 1, fault_proxy.injected
    assert (summary["shards_complete"], summary["shards_unfinished"]) == (4, {}), summary
    assert (summary["images"], summary["errors"]) == (16, 0)
    fault_proxy.clear()
    outs, errors = read_outputs(fs, f"{s3_bucket}/out")
    assert_exactly_once(expected, outs, errors)
    assert_no_partial_files(fs, f"{s3_bucket}/out")
    assert_no_secret(fs, s3_bucket, summary, caplog.text, secret_ray)


def test_write_that_keeps_failing_ends_in_a_summary_then_resumes(secret_ray, s3_bucket, fault_proxy, make_image,
                                                                  make_tar, caplog):
    fs = fsspec.filesystem("s3")
    expected = make_input(fs, s3_bucket, make_image, make_tar, shards=3)
    # Every PUT of a depth part is refused: the write stage fails after all retries.
    fault_proxy.always(500, lambda m, p: m == "PUT" and ".part-" in p and "/_errors/" not in p)
    out = f"s3://{s3_bucket}/out"
    # The write stage's failure and the driver's summary are the subject: the local executor
    cfg = job_config(f"s3://{s3_bucket}/in/*.tar", out, double_model(), executor="local",
                     storage={"endpoint_url": fault_proxy.url, "retries": 2})
    with caplog.at_level(logging.INFO):
        summary = run_job(cfg)
    assert summary["job_error"] and summary["summary_path"]
    assert len(summary["shards_unfinished"]) == 3
    assert all("incomplete:" in why for why in summary["shards_unfinished"].values()), summary
    assert "500" in summary["job_error"] or "InternalError" in summary["job_error"], summary["job_error"]
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/out/_manifest")  # nothing committed
    # Storage recovers; the same command finishes every shard, exactly once.
    fault_proxy.clear()
    again = run_job(cfg)
    assert (again["shards_complete"], again["shards_unfinished"], again["job_error"]) == (3, {}, None)
    outs, errors = read_outputs(fs, f"{s3_bucket}/out")
    assert_exactly_once(expected, outs, errors)
    assert_no_secret(fs, s3_bucket, summary, caplog.text, secret_ray)


@pytest.mark.parametrize("case", ["missing_input_bucket", "missing_output_bucket", "input_403", "output_403"])
def test_permanent_errors_fail_fast_naming_the_url(secret_ray, s3_bucket, fault_proxy, make_image, make_tar, case):
    fs = fsspec.filesystem("s3")
    make_input(fs, s3_bucket, make_image, make_tar, shards=1, per=1)
    inp, out = f"s3://{s3_bucket}/in/{{00000..00001}}.tar", f"s3://{s3_bucket}/out"
    if case == "missing_input_bucket":
        inp = "s3://no-such-bucket-depthray/in/{00000..00001}.tar"
    elif case == "missing_output_bucket":
        out = "s3://no-such-bucket-depthray/out"
    elif case == "input_403":
        fault_proxy.always(403, lambda m, p: m in ("GET", "HEAD") and "/in" in p)
    else:
        fault_proxy.always(403, lambda m, p: m == "PUT" and "/out/" in p)
    cfg = job_config(inp, out, double_model(), storage={"endpoint_url": fault_proxy.url})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        run_job(cfg)
    assert time.perf_counter() - t0 < 20  # no retry storm, no graph started
    msg = str(err.value)
    assert (inp if "input" in case else out) in msg, msg
    assert SECRET not in msg
    if "403" in case:
        assert "Forbidden" in msg or "AccessDenied" in msg or "Permission" in msg, msg


def assert_no_secret(fs, bucket: str, summary: dict, log_text: str, session_dir: str) -> None:
    assert SECRET not in json.dumps(summary) and SECRET not in log_text
    fs.invalidate_cache()
    for p in fs.find(bucket):
        assert SECRET.encode() not in fs.cat_file(p), p
    for f in Path(session_dir, "logs").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
