"""The throughput benchmark runs end to end at toy sizes, so it cannot rot.

Numbers at these sizes mean nothing; only the structure is checked. The Ray half of the
job benchmark is left to tests/test_pipeline.py (it is `run_job` itself); its plain-loop
contender, which calls the job's stage functions directly, runs here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_benchmark_smoke_prints_table_and_json(tmp_path, tiny_model_dir):
    from depthray.models.tiny import build_tiny_vae_decoder

    taesd = build_tiny_vae_decoder(tmp_path / "taesd")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--device", "cpu",
           "--model", str(tiny_model_dir), "--vae-decoder", str(taesd), "--skip", "job"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert lines[0].startswith("depthray benchmarks (smoke")
    assert result["engine_vs_diffusers"] > 0
    assert result["pipeline_vs_engine"] is None and result["rss_growth"] is None  # skipped
    assert set(result["tiled_cost_per_megapixel"]) == {"96x128", "192x256"}
    assert result["unet"]["flops_per_call"] > 0 and result["unet"]["achieved_tflops"] > 0
    abl = result["ablations"]
    for name in ("batching_across_images", "encode_once", "closed_form_ensembling", "tiny_vae_decoder"):
        assert abl[name]["speedup"] > 0, name
    assert abl["torch_compile"] is None  # not compiled in smoke mode (minutes on CPU)
    assert result["engine_vs_diffusers_compiled"] is None
    assert 0 <= abl["closed_form_ensembling"]["mean_abs_diff"] < 0.2


@pytest.mark.timeout(120)
def test_diffusers_is_called_once_with_the_whole_list_and_both_sides_share_a_layout(tiny_model_dir, monkeypatch):
    """diffusers is called as its users batch equal-size images: one call per round with the
    whole list and batch_size = the engine's views per call, so one UNet call holds every
    image's latent (one call per image would hold one); both sides hold their weights, and
    run their convolutions, in the layout asked for (channels_last here, on the CPU)."""
    import torch
    from diffusers import MarigoldDepthPipeline

    sys.path.insert(0, str(ROOT))
    from benchmarks._common import scene_images
    from benchmarks._engine import EngineSettings, engine_vs_diffusers, load_diffusers, load_engine

    s = EngineSettings("cpu", "float32", resolution=32, ensemble_size=1, steps=1, batch_size=8, rounds=1,
                       channels_last=True)
    images = scene_images(3, 24, 32)
    model, pipe = load_engine(tiny_model_dir, s), load_diffusers(tiny_model_dir, s)
    calls, batches = [], {"depthray": [], "diffusers": []}
    real_call = MarigoldDepthPipeline.__call__

    def spy(self, image, **kwargs):
        calls.append((image, kwargs))
        return real_call(self, image, **kwargs)

    monkeypatch.setattr(MarigoldDepthPipeline, "__call__", spy)
    for side, unet in (("depthray", model.unet), ("diffusers", pipe.unet)):
        unet.conv_in.register_forward_hook(
            lambda mod, args, out, side=side: batches[side].append(
                (out.shape[0], out.is_contiguous(memory_format=torch.channels_last))))
    r = engine_vs_diffusers(model, pipe, images, s, warmup=1)

    assert len(calls) == 2  # one warm-up call and one timed round, each over the whole set
    for image, kwargs in calls:
        assert isinstance(image, list) and [im.size for im in image] == [(32, 24)] * 3
        assert kwargs["batch_size"] == 8 and kwargs["ensemble_size"] == 1 and kwargs["num_inference_steps"] == 1
    assert batches["diffusers"] == batches["depthray"] == [(3, True), (3, True)]
    assert r["unet_batch_sizes"] == {"depthray": {"3": 1.0}, "diffusers": {"3": 1.0}}
    assert r["memory_format"] == {"depthray": "channels_last", "diffusers": "channels_last"}

    pipe.vae.to(memory_format=torch.contiguous_format)  # one side's layout differs: refused
    with pytest.raises(ValueError, match="layouts"):
        engine_vs_diffusers(model, pipe, images, s)
    pipe.vae.to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="equal-size"):
        engine_vs_diffusers(model, pipe, images + scene_images(1, 32, 24), s)


def test_ensemble_device_ablation_runs():
    """CUDA-only in run.py; its timing code runs here with the CPU as 'device'."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from benchmarks._engine import EngineSettings, ensemble_device_effect

    r = ensemble_device_effect([np.zeros((48, 64, 3), np.uint8)], EngineSettings("cpu", "float32", 64, 3, 1, 6, 1))
    assert r["cpu_s"] > 0 and r["speedup"] > 0 and len(r["times_s"]["device"]) == 1


@pytest.mark.timeout(120)
def test_job_benchmark_loop_contender(tmp_path, tiny_model_dir):
    """The loop contender (same stage functions as the Ray job, no Ray) runs and counts."""
    sys.path.insert(0, str(ROOT))
    from benchmarks._job import JobSettings, job_config, run_child, write_inputs

    s = JobSettings(shards=1, images_per_shard=2, image_size=(24, 32), resolution=16, ensemble_size=1,
                    images_per_batch=2, device="cpu")
    small = write_inputs(tmp_path / "in-1x", 1, s)
    big = write_inputs(tmp_path / "in-10x", 2, s)
    cfg = tmp_path / "loop.json"
    cfg.write_text(json.dumps(job_config(tiny_model_dir, small, str(tmp_path / "out"), s)))
    out, peak = run_child(["loop", str(cfg), big], {**os.environ, "PYTHONPATH": str(ROOT)})
    assert out["small"]["images"] == 2 and out["big"]["images"] == 4
    assert out["big"]["seconds"] > 0 and peak > 0
    assert list((tmp_path / "out-10x").rglob("*.parquet"))


def test_flop_arithmetic_counts_the_real_modules(tiny_model_dir):
    """benchmarks/flops.py counts on the meta device; the count must equal FlopCounterMode
    on the real tiny checkpoint at the same size, and per-image totals must scale with
    members x steps."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.flops import build_meta_modules, count_flops, per_image, per_view_flops

    import torch

    from depthray.models.marigold import MarigoldDepthModel

    meta = per_view_flops(build_meta_modules(checkpoint=str(tiny_model_dir)), 48, 64)
    model = MarigoldDepthModel.from_pretrained(tiny_model_dir, device="cpu", processing_resolution=64)
    unet_in = torch.randn(1, 8, 6, 8)
    text = model.empty_text_embedding
    real_unet = count_flops(lambda: model.unet(unet_in, 10, encoder_hidden_states=text))
    real_decode = count_flops(lambda: model.vae.decode(torch.randn(1, 4, 6, 8)))
    assert meta["unet"] == real_unet > 0
    assert meta["vae_decode"] == real_decode > 0
    one, many = per_image(meta, 1, 1), per_image(meta, 4, 5)
    expected = (meta["vae_encode"] + 20 * meta["unet"] + 5 * meta["vae_decode"]) / 1e12
    assert abs(many["tflop"] - expected) < 1e-12 and many["tflop"] > one["tflop"]
    assert abs(sum(v for k, v in many.items() if k.endswith("_share")) - 1) < 1e-9

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flops.py"), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sd2 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sd2["per_view_tflop"]["unet"] > 1.0  # SD2 widths at 768x576: ~1.5 TFLOP per UNet call


def test_scale_benchmark_smoke_ends_with_its_json_keys():
    """benchmarks/scale.py at toy sizes: planning counts the shards it made, the encoder
    table checks each contender losslessly, and the last line carries the four keys, each a
    finite measurement above zero (planning 50 shards takes a few ms on a fast CPU: the
    benchmark reports significant digits, so a real time is never written as 0)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--shards", "50", "--images", "2"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("planning_s_100k", "driver_rss_mb_100k", "host_ms_per_image", "bytes_per_image"):
        value = last[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert last["planning"]["50"]["shards"] == 50 and last["planning"]["50"]["skipped"] == 25


@pytest.mark.timeout(300)
def test_table_formats_benchmark_smoke_measures_delta_on_disk_and_moto():
    """benchmarks/table_formats.py at toy sizes, the Delta half (pylance is no test
    dependency): each measure is a finite number above zero, local and on moto."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.table_formats", "--shards", "2", "--rows", "4",
                          "--part-rows", "2", "--commits", "21", "--maps", "1", "--formats", "delta"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    for kind in ("delta_local", "delta_s3"):
        for key in ("data_s_per_shard", "commit_s_per_shard", "overwrite_commit_s", "scan_rows_per_s", "lookup_ms"):
            assert math.isfinite(last[kind][key]) and last[kind][key] > 0, (kind, key)
    assert last["delta_growth"]["commits"] == 21


@pytest.mark.timeout(300)
def test_gpu_check_runs_every_section_and_keeps_results_line_by_line(tmp_path, tiny_model_dir):
    """benchmarks/gpu.py (the issue-17 GPU check) at toy sizes on the CPU: every engine section
    measures, and each result is on disk as its own line as soon as it exists."""
    out = tmp_path / "gpu.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--model", str(tiny_model_dir),
           "--rehearsal", "--compile-backend", "eager", "--skip", "job", "--skip", "tiling",
           "--budget-s", "600", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["section"] for x in lines] == ["env", "matrix", "breakdown", "matrix_ensembling", "job", "compiled",
                                             "tiling"]
    got = {x["section"]: x["result"] for x in lines}
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(got))
    # The headline is the cells without ensembling on either side; members > 1 apart, with why.
    assert got["matrix"]["headline_cells"] == ["1x1", "4x1"] and "depends_on" not in got["matrix"]
    assert got["matrix_ensembling"]["headline_cells"] == [] and "scipy" in got["matrix_ensembling"]["depends_on"]
    for section, cell in (("matrix", "1x1"), ("matrix", "4x1"), ("matrix_ensembling", "1x2")):
        m = got[section][cell]
        assert m["ratio"] > 0 and m["gpu_hours_per_million"] > 0
        assert m["headline"] is (m["members"] == 1)
        # 4 images of one size, 8 views per call: each side puts the whole set in one UNet call
        assert m["unet_batch_sizes"] == {side: {str(4 * m["members"]): m["steps"]} for side in ("depthray", "diffusers")}
        assert m["memory_format"] == {"depthray": "contiguous", "diffusers": "contiguous"}
    share = got["breakdown"]["predict"]["1x1"]["share"]
    assert all(share[k] > 0 for k in ("vae_encode", "unet", "vae_decode"))
    assert abs(sum(share.values()) - 1.0) < 1e-9 and share["other"] > -0.05
    assert got["compiled"]["ratio_compiled"] > 0 and got["compiled"]["backend"] == "eager"
    assert got["compiled"]["unet"]["latent"] == [6, 8]  # the shape it was compiled for: 48x64 at 64 px
    assert got["compiled"]["unet"]["achieved_tflops"] > 0 and got["compiled"]["unet_eager"]["flops_per_call"] > 0
    assert got["job"] == {"skipped": "--skip"} and got["tiling"] == {"skipped": "--skip"}


def test_gpu_check_skips_a_section_that_no_longer_fits_its_budget(tmp_path):
    """A section whose estimate exceeds the time left is recorded as skipped, never started."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu import Budget, Recorder, parse_args, run_section

    ran = []
    record = Recorder(tmp_path / "r.jsonl")
    args = parse_args(["--device", "cpu"])
    run_section("job", lambda: ran.append(1) or {}, Budget(10), 60, record, args)
    run_section("tiling", lambda: ran.append(2) or {"x": 1}, Budget(100), 60, record, args)
    assert ran == [2]
    assert record.results["job"]["skipped"].endswith("estimate 60 s")
    assert record.results["tiling"]["x"] == 1
    assert [json.loads(x)["section"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == ["job", "tiling"]


def test_actor_active_span_is_read_from_ray_datas_stats_line():
    sys.path.insert(0, str(ROOT))
    from benchmarks._job import infer_span_s

    stages = ["Operator 1 MapBatches(read_shards)->MapBatches(decode_batch): 20 tasks executed, 20 blocks produced in 2.71s",
              "Operator 3 MapBatches(DepthPredictor): 21 tasks executed, 21 blocks produced in 70.14s",
              "Operator 4 MapBatches(encode_batch)->MapBatches(write_batch): 2 tasks executed, 2 blocks produced in 32.23s"]
    assert infer_span_s(stages) == 70.14
    assert infer_span_s(stages[:1]) is None
