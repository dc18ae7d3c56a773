"""Shared fixtures: a real S3 protocol server (moto) on 127.0.0.1 and tiny Marigold checkpoints.

Add fixtures here only when several test modules need them; keep module-specific ones local.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; AWS_* variables point every client (and Ray worker) at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight Marigold checkpoint (tiny widths, DDIM), built once per test session."""
    from depthray.models.tiny import build_tiny_marigold

    return build_tiny_marigold(tmp_path_factory.mktemp("models") / "tiny-marigold")


# ---- shared by the io and pipeline tests (depthray.io, depthray.job) ----------------


def _encode_image(arr, fmt: str = "JPEG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after. The CI box is small and shared:
    torch's thread pool fighting other processes makes many small ops 10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_image():
    """make_image(h, w, seed=0, fmt="JPEG") -> encoded bytes of a random RGB image."""
    import numpy as np

    def make(h: int, w: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
        arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
        return _encode_image(arr, fmt)

    return make


@pytest.fixture(scope="session")
def make_tar():
    """make_tar([(member_name, bytes), ...]) -> bytes of an uncompressed tar (WebDataset shard)."""
    from depthray.io.tar_samples import tar_bytes

    return tar_bytes


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_shared_ray: dict = {}  # {"gcs": address} of the one local Ray the suite shares, while it runs


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _shared_ray.clear()


@pytest.fixture(scope="session")
def _ray_env(s3_endpoint):
    """The environment every shared-Ray worker inherits (set before the first ray.init):
    the S3 server's AWS_* variables, this repository on PYTHONPATH (workers import
    tests.reliability.doubles) and one OpenMP thread per worker. Ends the shared Ray."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        _shutdown_ray()


@pytest.fixture(scope="module")
def ray_session(_ray_env):
    """A local Ray (2 CPUs) of this test session's own, never a cluster another process
    started here. One Ray serves every module that asks for it (starting one costs ~10 s
    and a cold worker pool); it is started on first use, after the S3 server so workers
    inherit its env, and ended at the session's end or by a module that needs `no_ray`."""
    import ray

    if ray.is_initialized() and _shared_ray.get("gcs") != ray.get_runtime_context().gcs_address:
        ray.shutdown()  # connected to something else (a test's own cluster): not ours to keep
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        _shared_ray["gcs"] = ray.get_runtime_context().gcs_address
    wait_until_ray_idle()
    yield


def wait_until_ray_idle(timeout_s: float = 60.0) -> None:
    """Wait until the shared Ray has every CPU free again: a driver an earlier test SIGKILLed
    (or a job's actor pool just shut down) holds its CPUs for a moment, seconds on a loaded
    machine, and a job started meanwhile plans around the CPUs it sees (a job whose write
    tasks found none free committed every shard only at its end)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.2)


@pytest.fixture
def idle_ray(ray_session):
    """The shared Ray, with every CPU free when the test starts (for tests that time a job)."""
    wait_until_ray_idle()
    yield


@pytest.fixture(scope="module")
def no_ray():
    """For a module that starts its own Ray (a cluster, one with its own env) or checks that
    none runs: the shared Ray is ended first (the next `ray_session` starts it again)."""
    _shutdown_ray()
    yield
    _shutdown_ray()


def pytest_collection_modifyitems(items):
    """Modules that need no shared Ray (`no_ray`) run first, so the shared Ray starts once
    and is never ended in the middle of the suite and started again. Stable: the order
    within each group is the usual one."""
    items.sort(key=lambda item: 0 if "no_ray" in getattr(item, "fixturenames", ()) else 1)
