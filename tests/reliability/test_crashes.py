"""Crashes: the driver SIGKILLed mid-job and re-run, an inference actor process dying
mid-batch, GPU out-of-memory. Each ends with every key exactly once and no partial file
under a final name."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml
from PIL import Image

from depthray.job.driver import run_job
from tests.reliability.conftest import (
    COMMITTED,
    REPO,
    assert_exactly_once,
    assert_no_partial_files,
    double_model,
    job_config,
    read_outputs,
)

pytestmark = pytest.mark.timeout(300)


def write_shards(folder: Path, make_image, shards: int, per: int) -> dict[str, set[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per):
                data = make_image(12, 16, seed=s * 100 + i)
                info = tarfile.TarInfo(f"s{s}k{i}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (folder / f"{s:05d}.tar").write_bytes(buf.getvalue())
        expected[f"{s:05d}"] = {f"s{s}k{i}" for i in range(per)}
    return expected


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(config: Path, log: Path) -> subprocess.Popen:
    """`depthray run` in its own process group on the suite's shared Ray (`--address` its GCS,
    as a job submitted to a running cluster: no Ray start per process), so the test can kill
    exactly the driver it started; Ray ends a dead driver's workers itself."""
    import ray

    cmd = [sys.executable, "-m", "depthray.cli", "run", str(config), "--address", ray.get_runtime_context().gcs_address]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _status(config: Path, capsys) -> tuple[int, dict]:
    """`depthray status CONFIG --json`, in this process (it reads storage, starts no Ray)."""
    from depthray.cli import main as cli_main

    capsys.readouterr()
    rc = cli_main(["status", str(config), "--json"])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_kill_driver_mid_job_then_resume(ray_session, tmp_path, make_image, capsys):
    expected = write_shards(tmp_path / "in", make_image, shards=12, per=4)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"url": str(tmp_path / "in" / "*.tar")},
        "output": {"url": str(out), "rows_per_part": 2},
        "model": double_model(sleep_s=0.25),
        "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": 2, "num_cpus_per_actor": 0.5},
    }))
    first = run_cli(config, tmp_path / "first.log")
    try:
        deadline = time.time() + 150
        while time.time() < deadline and first.poll() is None:
            manifests = list((out / "_manifest").glob(COMMITTED)) if (out / "_manifest").exists() else []
            if len(manifests) >= 3:
                break
            time.sleep(0.2)
        assert first.poll() is None, "job finished before it could be killed:\n" + (tmp_path / "first.log").read_text()
        os.kill(first.pid, signal.SIGKILL)  # the driver only, mid-job
        first.wait(30)
        time.sleep(1.0)
    finally:
        try:  # then anything else in its process group (started by us)
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    committed = {p.stem for p in (out / "_manifest").glob(COMMITTED)}
    assert 3 <= len(committed) < 12, committed
    # After the crash, every file under a final name is complete (temporaries are hidden
    # '.tmp-*' names), and committed shards already hold exactly their keys.
    fs = fsspec.filesystem("file")
    outs, errors = read_outputs(fs, str(out))  # parses every visible part: none is truncated
    assert_exactly_once({k: v for k, v in expected.items() if k in committed},
                        [r for r in outs if r["source"] in committed], [e for e in errors if e["source"] in committed])
    # Unfiltered, as a plain reader sees it: no key twice, and a shard's results all or none
    # (on local disk they appear with one folder rename, even if the kill cut a commit).
    seen = Counter((r["source"], r["key"]) for r in outs + errors)
    assert max(seen.values()) == 1, seen
    for shard in {r["source"] for r in outs}:
        assert {r["key"] for r in outs if r["source"] == shard} == expected[shard], shard
    # `depthray status` reads the same state: committed shards done, the rest to do, and no
    # run summary (the killed driver never wrote one).
    rc, st = _status(config, capsys)
    assert rc == 1 and st["shards_complete"] == len(committed) and len(st["shards_todo"]) == 12 - len(committed)
    assert st["images"] == 4 * len(committed) and st["errors"] == 0 and st["last_run"] is None
    from depthray.cli import main as cli_main

    assert cli_main(["status", str(config)]) == 1
    text = capsys.readouterr().out
    assert f"{len(committed)} complete, {12 - len(committed)} to do" in text and "none finished yet" in text
    # The re-run: the same `depthray run` command line, in this process on the suite's Ray (a
    # second process would spend its time starting another local Ray; the crash was real).
    capsys.readouterr()
    rc = cli_main(["run", str(config), "--address", "local"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert rc == 0, text
    assert f"{len(committed)} already complete" in text, text
    summaries = [json.loads(p.read_text()) for p in sorted((out / "_jobs").glob("2*.json"))]  # run summaries
    resumed = summaries[-1]
    assert resumed["shards_skipped"] == len(committed) and resumed["shards_complete"] == 12 - len(committed)
    rc, st = _status(config, capsys)
    assert rc == 0 and (st["shards_complete"], st["shards_todo"], st["images"]) == (12, [], 48)
    assert st["last_run"]["run_id"] == resumed["run_id"] and st["shards_other_config"] == {}
    outs, errors = read_outputs(fs, str(out))
    assert_exactly_once(expected, outs, errors)
    assert_no_partial_files(fs, str(out))
    # Committed shards were not redone: their manifests still name the first run.
    for name in committed:
        m = json.loads((out / "_manifest" / f"{name}.json").read_text())
        assert m["run_id"] != resumed["run_id"]


def test_actor_process_dies_mid_batch_and_is_restarted(ray_session, tmp_path, make_image):
    expected = write_shards(tmp_path / "in", make_image, shards=3, per=4)
    marker = tmp_path / "actor-died"
    calls = tmp_path / "calls.log"
    cfg = job_config(str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"),
                     double_model(die_once_marker=str(marker), die_on_call=3, calls_log=str(calls)),
                     compute={"images_per_batch": 2}, output={"rows_per_part": 2})
    summary = run_job(cfg)
    assert marker.exists(), "the actor never died: the scenario did not happen"
    pids = {ln.split()[0] for ln in calls.read_text().splitlines()}
    assert len(pids) >= 2, "no restarted actor process ran the retried batch"
    assert (summary["shards_complete"], summary["shards_unfinished"], summary["errors"]) == (3, {}, 0)
    outs, errors = read_outputs(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert_exactly_once(expected, outs, errors)
    assert_no_partial_files(fsspec.filesystem("file"), str(tmp_path / "out"))


def _shards_with_white_image(tmp_path: Path, make_image) -> dict[str, set[str]]:
    """Two ordinary shards and a third whose middle image is all white (the poison)."""
    expected = write_shards(tmp_path / "in", make_image, shards=2, per=3)
    white = io.BytesIO()
    Image.new("RGB", (16, 12), (255, 255, 255)).save(white, format="PNG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("ok0.jpg", make_image(12, 16, seed=7)), ("poison.png", white.getvalue()),
                           ("ok1.jpg", make_image(12, 16, seed=8))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "in" / "00002.tar").write_bytes(buf.getvalue())
    expected["00002"] = {"ok0", "poison", "ok1"}
    return expected


@pytest.mark.parametrize("fault,compute,reason,says", [
    ("die_if_white", {}, "crashed", "died"),
    ("hang_if_white", {"batch_timeout_s": 3}, "timeout", "batch_timeout_s=3 s"),
], ids=["kills-its-process", "hangs"])
def test_image_that_always_kills_or_hangs_its_worker_becomes_an_error(ray_session, tmp_path, make_image,
                                                                      fault, compute, reason, says):
    """Ray restarts the actor and retries the batch forever by default; the actor notices a
    batch whose last attempt died, runs it image by image, and reports the culprit. A model
    call that never returns (a wedged GPU) would stall the job forever instead: past
    compute.batch_timeout_s the actor ends itself and the same path reports a timeout."""
    expected = _shards_with_white_image(tmp_path, make_image)
    cfg = job_config(str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"), double_model(**{fault: True}),
                     compute={"images_per_batch": 3, **compute})
    t0 = time.monotonic()
    summary = run_job(cfg)
    assert time.monotonic() - t0 < 200
    assert (summary["shards_complete"], summary["shards_unfinished"]) == (3, {}), summary
    outs, errors = read_outputs(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert [(e["source"], e["key"], e["stage"], e["error"]) for e in errors] == [("00002", "poison", "infer", reason)]
    assert says in errors[0]["message"]
    assert_exactly_once(expected, outs, errors)


def test_gpu_out_of_memory_falls_back_to_smaller_batches(tmp_path, make_image):
    expected = write_shards(tmp_path / "in", make_image, shards=2, per=3)
    calls = tmp_path / "calls.log"
    # 4 members per view, 8 views per call asked; the "GPU" holds only 1 view at a time.
    cfg = job_config(str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"),
                     double_model(oom_above=1, calls_log=str(calls)), executor="local",
                     inference={"ensemble_size": 4, "batch_size": 8})
    summary = run_job(cfg)
    assert (summary["shards_complete"], summary["images"], summary["errors"]) == (2, 6, 0), summary
    sizes = [int(ln.split()[1]) for ln in calls.read_text().splitlines()]
    assert max(sizes) > 1 and sizes.count(1) >= 6 * 4  # tried big, finished with 1 view per call
    outs, errors = read_outputs(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert_exactly_once(expected, outs, errors)
    assert all(r["meta"] is not None for r in outs)
    assert np.isfinite([r["width"] for r in outs]).all()

    # Out of memory even at 1 view per call: each image becomes an error that says so.
    cfg = job_config(str(tmp_path / "in" / "00000.tar"), str(tmp_path / "out0"), double_model(oom_above=0),
                     executor="local")
    summary = run_job(cfg)
    outs, errors = read_outputs(fsspec.filesystem("file"), str(tmp_path / "out0"))
    assert summary["shards_complete"] == 1 and not outs
    assert {(e["stage"], e["error"]) for e in errors} == {("infer", "infer")}
    assert all("OutOfMemoryError" in e["message"] for e in errors)
    assert_exactly_once({"00000": expected["00000"]}, outs, errors)


@pytest.mark.parametrize("device,configured,expected", [("cuda", None, 1800.0), ("cpu", None, 0.0),
                                                        ("cuda", 0, 0.0), ("cpu", 5, 5.0)])
def test_batch_timeout_default_is_on_for_gpu_actors_only(device, configured, expected):
    """null = auto: a GPU actor watches its model calls (1800 s), a CPU actor does not (a slow
    CPU batch is not a hang); an explicit value wins, 0 = off. The double only reports the
    device (`device` attribute, as a loaded Marigold model does); nothing runs on it."""
    from depthray.config import InferenceConfig, StorageConfig, model_config
    from depthray.job.predictor import DepthPredictor

    spec = model_config({**double_model(device=device), "kind": "marigold", "path": ""})
    actor = DepthPredictor(spec, InferenceConfig(), StorageConfig(), timeout_s=configured)
    assert actor.model.device.type == device
    assert actor.timeout_s == expected


def test_out_of_memory_keeps_the_smaller_batch_for_later_calls(tmp_path):
    """After one out-of-memory fallback the predictor does not start from the full batch size
    again: the image-by-image retry and later batches use the size that fitted."""
    from depthray.config import StorageConfig, inference_config, model_config
    from depthray.io import records
    from depthray.job.predictor import DepthPredictor

    calls = tmp_path / "calls.log"
    spec = model_config({**double_model(oom_above=2, calls_log=str(calls)), "kind": "marigold", "path": ""})
    actor = DepthPredictor(spec, inference_config({"ensemble_size": 4, "batch_size": 8, "tiling": {"mode": "off"}}),
                           StorageConfig())
    rng = np.random.default_rng(0)

    def batch(n):
        rows = [{"source": "s", "key": f"k{i}", "height": 16, "width": 16,
                 "pixels": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8).tobytes()} for i in range(n)]
        return records.to_table(rows, records.DECODED)

    first = actor(batch(2)).to_pylist()
    assert all(r["error"] is None for r in first) and actor.inference.batch_size == 2
    calls.write_text("")
    second = actor(batch(2)).to_pylist()
    assert all(r["error"] is None for r in second)
    sizes = [int(ln.split()[1]) for ln in calls.read_text().splitlines()]
    assert sizes and max(sizes) <= 2, sizes  # no attempt at 8 views again


def test_non_finite_model_output_is_an_error_row_never_a_label(tmp_path, make_tar):
    """A model that returns NaN for one image (a float16 VAE overflowing): that image becomes
    an `infer` / `non_finite` error; its neighbours in the same batch are written."""
    def png(value):
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    noisy = np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(make_tar([("a.png", buf.getvalue()), ("black.png", png(0)),
                                                          ("c.png", png(90))]))
    cfg = job_config(str(tmp_path / "in" / "00000.tar"), str(tmp_path / "out"),
                     double_model(nan_if_black=True), executor="local", inference={"ensemble_size": 2})
    summary = run_job(cfg)
    assert (summary["images"], summary["errors"]) == (2, 1), summary
    outs, errors = read_outputs(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert [(e["key"], e["stage"], e["error"]) for e in errors] == [("black", "infer", "non_finite")]
    assert "NaN" in errors[0]["message"]
    assert_exactly_once({"00000": {"a", "black", "c"}}, outs, errors)


def test_predict_image_refuses_non_finite_output():
    from depthray.predict import NonFiniteDepth, predict_image
    from tests.reliability.doubles import make

    model = make(nan_if_black=True)
    assert predict_image(np.full((20, 20, 3), 80, np.uint8), model, {"ensemble_size": 2}).depth.shape == (20, 20)
    with pytest.raises(NonFiniteDepth, match="non-finite"):
        predict_image(np.zeros((20, 20, 3), np.uint8), model, {"ensemble_size": 2})


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_marigold_decoder_overflow_is_refused_not_clamped(tiny_model_dir, bad):
    """The real engine with its VAE decoder returning +-inf or NaN at one pixel of one image
    (what a float16 decoder does when it overflows): that image raises NonFiniteDepth, which
    the job writes as a `non_finite` error row; +-inf must not be clamped into a near or far
    pixel first. The other image of the same batch is labelled."""
    from depthray.models.loading import load_model
    from depthray.predict import NonFiniteDepth, predict_images

    model = load_model({"path": str(tiny_model_dir), "device": "cpu", "processing_resolution": 32})
    images = [np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8) for i in range(2)]

    def overflow_first_image(module, args, output):
        output = output.clone()
        output[0, :, 3, 5] = bad
        return output

    cfg = {"ensemble_size": 1, "batch_size": 2, "tiling": {"mode": "off"}}
    handle = model.vae.decoder.register_forward_hook(overflow_first_image)
    try:
        with pytest.raises(NonFiniteDepth, match="1 of 1536"):  # the one pixel, not a clamped value
            predict_images(images, model, cfg)
    finally:
        handle.remove()
    clean = predict_images(images, model, cfg)
    assert all(r.depth.shape == (24, 32) and np.isfinite(r.depth).all() for r in clean)
