"""The job's stage chain is one value that Ray and the local runner both execute: the same
rows either way, the same bytes as `depthray predict`, and the same outputs as before the
job package existed (tests/data/job_golden.json, made by tests/golden_job.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from depthray.config import InferenceConfig, ModelConfig, QualityConfig
from depthray.job.stages import STAGE_NAMES, job_stages, stage
from tests import golden_job

pytestmark = pytest.mark.timeout(300)
GOLDEN = Path(__file__).parent / "data" / "job_golden.json"


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    from depthray.demo import make_inputs

    root = tmp_path_factory.mktemp("demo-inputs")
    make_inputs(root)
    return root


@pytest.fixture(scope="module")
def ray_output(ray_session, demo_inputs, tmp_path_factory):
    from depthray.job.driver import run_job

    out = tmp_path_factory.mktemp("ray") / "out"
    summary = run_job(golden_job.job_config(str(demo_inputs / "{00000..00001}.tar"), str(out)))
    assert summary["images"] == 12 and summary["errors"] == 0, summary
    return out


def test_stage_chain_is_one_plain_value():
    cfg = golden_job.job_config("in/{00000..00001}.tar", "out")
    cfg.quality = QualityConfig(max_uncertainty_mean=0.2)
    stages = job_stages(cfg, run_id="r1")
    assert tuple(s.name for s in stages) == STAGE_NAMES
    # Every stage gets its settings from the config as typed sections, never re-parsed dicts
    # (a hand-wired copy of this chain once passed a float where the quality config belonged).
    assert stage(stages, "encode").kwargs["quality"] is cfg.quality
    infer = stage(stages, "infer")
    assert infer.stateful and isinstance(infer.kwargs["model"], ModelConfig)
    assert isinstance(infer.kwargs["inference"], InferenceConfig) and infer.kwargs["run_id"] == "r1"
    assert infer.batch_size == cfg.compute.images_per_batch
    assert stage(stages, "write").batch_size == cfg.output.rows_per_part
    assert stage(stages, "write").kwargs["config_hash"] == cfg.hash()


def _assert_same_record(got, want, where: str) -> None:
    """Structured values equal field by field, exactly, except floats: those are computed
    (meta.quality.uncertainty_mean is the uncertainty column's mean again) and differ in their
    last bits between CPUs, so they get the tolerance the uncertainty columns get."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and not isinstance(got, bool), (where, got)
        assert got == pytest.approx(want, rel=1e-3, abs=1e-6), (where, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (where, got, want)
        for k in want:
            _assert_same_record(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_record(g, w, f"{where}[{i}]")
    else:
        assert got == want and type(got) is type(want), (where, got, want)


def test_job_outputs_match_the_golden_run(ray_output):
    """The outputs of a fixed job (the default tiling fusion) equal those recorded in
    tests/data/job_golden.json: every column exactly, floats inside `meta` with the
    uncertainty columns' tolerance, the maps as 8x8 block means (depth to 1e-4: only
    model-batch composition and the CPU's float path move a value, by ~1e-5)."""
    want = json.loads(GOLDEN.read_text())
    got = golden_job.summarize(ray_output)
    assert sorted(got) == sorted(want)
    for key in want:
        for field, value in want[key].items():
            if field == "depth_blocks":
                np.testing.assert_allclose(got[key][field], value, atol=1e-4, err_msg=f"{key}.{field}")
            elif field == "uncertainty_blocks":
                # The uncertainty is a median absolute deviation, an order statistic: where two
                # members' deviations are nearly equal, a last-bit difference between CPUs'
                # float paths (AVX-512, AVX2, default) swaps which one is the middle one, and
                # the joint tile solve's robust reweighting passes that on. 1e-3 is 1 % of the
                # largest block (~0.1), far below what a plumbing bug moves (a block's whole
                # value); depth, a mean of aligned members, keeps 1e-4.
                np.testing.assert_allclose(got[key][field], value, atol=1e-3, err_msg=f"{key}.{field}")
            elif field in ("uncertainty_mean", "uncertainty_scale"):
                assert got[key][field] == pytest.approx(value, rel=1e-3, abs=1e-6), (key, field)
            elif field == "meta":
                _assert_same_record(got[key][field], value, f"{key}.meta")
            else:
                assert got[key][field] == value, (key, field)


def _assert_same_rows(local_parts, ray_output) -> None:
    """The rows under `local_parts` are the Ray job's: same keys and columns, meta numbers
    close, depth within 2 PNG levels (one batch composition differs in float rounding)."""
    from depthray.io.codecs import decode_depth_png16

    local = {r["key"]: r for r in pq.read_table(str(local_parts)).to_pylist()}
    job = {r["key"]: r for r in pq.read_table(str(ray_output)).to_pylist()}
    assert sorted(local) == sorted(job)
    for key, row in job.items():
        other = local[key]
        for col in ("source", "width", "height", "model", "config_hash", "ensemble_size", "num_views"):
            assert other[col] == row[col], (key, col)
        assert _numbers_close(json.loads(other["meta"]), json.loads(row["meta"])), key
        diff = np.abs(decode_depth_png16(other["depth"]) - decode_depth_png16(row["depth"])).max()
        assert diff <= 2 / 65535, (key, diff)


def test_local_runner_writes_the_rows_the_ray_job_writes(ray_output, demo_inputs, tmp_path):
    from depthray.job.checks import list_input_shards
    from depthray.job.local import LocalRunner, shard_tables

    cfg = golden_job.job_config(str(demo_inputs / "{00000..00001}.tar"), str(tmp_path / "local"))
    acks = [a for t in LocalRunner(job_stages(cfg)).run(shard_tables(list_input_shards(cfg))) for a in t.to_pylist()]
    assert sum(a["outputs"] for a in acks) == 12 and not sum(a["errors"] for a in acks)
    # The local runner writes the parts (staged: committing them is the driver's ledger's job).
    _assert_same_rows(tmp_path / "local" / "_staging", ray_output)


def test_local_executor_commits_what_the_ray_job_commits(ray_output, demo_inputs, tmp_path):
    """`compute.executor: local`: the same stage chain in the driver's process, committed by
    the same ledger (manifests, resume): the same rows as the Ray job, and a re-run skips."""
    from depthray.job.driver import run_job

    cfg = golden_job.job_config(str(demo_inputs / "{00000..00001}.tar"), str(tmp_path / "local"))
    cfg.compute.executor = "local"
    summary = run_job(cfg)
    assert (summary["images"], summary["errors"], summary["stages"]) == (12, 0, [])
    assert len(list((tmp_path / "local" / "_manifest").glob("[!.]*.json"))) == 2
    _assert_same_rows(tmp_path / "local", ray_output)
    again = run_job(cfg)
    assert again["shards_skipped"] == 2 and again["images"] == 0


def _numbers_close(a, b, rel: float = 1e-3) -> bool:
    """Equal structure and values; floats within `rel` (batch composition moves them a little)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_numbers_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_numbers_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-6)
    return a == b


def test_predict_writes_the_bytes_the_job_writes(ray_session, tmp_path, make_image):
    """`depthray predict` runs the job's own decode -> infer -> encode stages: for the same
    image and config its depth PNG is byte for byte the job's (one image per model batch and
    one thread on both sides, so even float rounding is the same)."""
    from depthray.job.driver import run_job
    from depthray.predict_command import predict_files

    folder = tmp_path / "in" / "photos"
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate([(70, 90), (96, 64)]):
        (folder / f"img{i}.png").write_bytes(make_image(h, w, seed=i, fmt="PNG"))
    cfg = golden_job.job_config(str(folder), str(tmp_path / "out"))
    cfg.input.format = "images"
    cfg.compute.images_per_batch = 1
    assert run_job(cfg)["images"] == 2
    job = {r["key"]: r["depth"] for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray runs a 1-CPU actor: float sums then round the same way
    try:
        failed = predict_files([str(p) for p in sorted(folder.iterdir())], cfg, tmp_path / "predict")
    finally:
        torch.set_num_threads(threads)
    assert failed == 0
    for key, png in job.items():
        assert (tmp_path / "predict" / f"{key}.depth.png").read_bytes() == png, key
        assert (tmp_path / "predict" / f"{key}.preview.png").stat().st_size > 0


def test_one_shard_spreads_over_the_pool_and_the_tail_is_short(ray_session, tmp_path, make_image):
    """Issue 13, item 3: work travels in actor batches, not whole shards. One shard of 32
    images, batches of 4, a fixed pool of two actors whose model takes 0.4 s a call: both
    actors work on that one shard, and the last call of one starts within a few batches of
    the other's (with whole-shard units one actor did all 8 calls: a tail of the shard)."""
    from depthray.config import config_from_dict
    from depthray.io.tar_samples import tar_bytes
    from depthray.job.driver import run_job
    from tests.reliability.conftest import double_model

    (tmp_path / "in").mkdir()
    keys = [f"k{i:02d}" for i in range(32)]
    (tmp_path / "in" / "only.tar").write_bytes(
        tar_bytes((f"{k}.jpg", make_image(12, 16, seed=i)) for i, k in enumerate(keys)))
    calls = tmp_path / "calls.log"
    cfg = config_from_dict({
        "input": {"url": str(tmp_path / "in" / "only.tar")}, "output": {"url": str(tmp_path / "out")},
        "model": double_model(sleep_s=0.4, calls_log=str(calls)),
        "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": 4, "num_actors": 2, "num_cpus_per_actor": 0.5}}, require_io=True)
    summary = run_job(cfg)
    assert summary["images"] == 32 and summary["errors"] == 0, summary
    assert sorted(pq.read_table(str(tmp_path / "out")).column("key").to_pylist()) == keys
    by_pid: dict[str, list[float]] = {}
    for line in calls.read_text().split("\n"):
        if line:
            pid, _, _, t = line.split()
            by_pid.setdefault(pid, []).append(float(t))
    assert len(by_pid) == 2, by_pid  # the one shard's rows went to both actors
    assert sum(map(len, by_pid.values())) == 8
    last = sorted(max(ts) for ts in by_pid.values())
    assert last[1] - last[0] <= 3 * 0.4 + 1.0, by_pid  # a tail of a few batches, not half the shard
