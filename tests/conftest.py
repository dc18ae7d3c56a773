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


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray (2 CPUs) of the module's own, never a cluster another process started here.
    (tests/reliability/ has its own, started after the S3 server so workers inherit its env.)"""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
