"""`depthray plan` and plan_image: the counts a job will run, from the planner inference uses."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from depthray.cli import main
from depthray.config import config_from_dict
from depthray.plan import model_settings, plan_image
from depthray.predict import predict_image


class _CountingDouble:
    """Model test double: the view's first channel, min-max normalised; counts views seen."""

    def __init__(self, processing_resolution: int):
        self.processing_resolution = processing_resolution
        self.seen = 0

    def __call__(self, views: torch.Tensor, seeds: list[int], num_inference_steps: int | None = None) -> torch.Tensor:
        # accepts inference.num_inference_steps (and ignores it)
        self.seen += views.shape[0]
        d = views[:, 0]  # [N,h,w]
        lo, hi = d.flatten(1).amin(1)[:, None, None], d.flatten(1).amax(1)[:, None, None]
        return (d - lo) / (hi - lo).clamp_min(1e-6)


@pytest.mark.parametrize("h,w,fusion", [(300, 500, "pyramid"), (300, 500, "align"), (90, 120, "pyramid"),
                                        (700, 260, "pyramid-lowfreq")])
def test_plan_matches_what_inference_runs(h, w, fusion):
    cfg = config_from_dict({"model": {"processing_resolution": 64},
                            "inference": {"ensemble_size": 2, "num_inference_steps": 3,
                                          "tiling": {"mode": "auto", "fusion": fusion, "max_tiles": 30}}})
    plan = plan_image(h, w, cfg, seconds_per_evaluation=0.5)
    model = _CountingDouble(64)
    image = np.random.default_rng(0).random((h, w, 3), dtype=np.float32)
    res = predict_image(image, model, cfg.inference)
    assert plan.views == res.num_views
    assert plan.member_predictions == res.model_evaluations == model.seen == plan.views * 2
    assert plan.model_evaluations == plan.views * 2 * 3
    assert plan.gpu_seconds == pytest.approx(plan.model_evaluations * 0.5)
    assert (plan.views > 1) == (max(h, w) > 1.5 * 64)
    assert plan.views == 1 + sum(n for _, _, n in plan.levels)


def test_checkpoint_defaults_from_config_then_model_index_then_marigold(tmp_path):
    cfg = config_from_dict({"model": {"path": str(tmp_path), "processing_resolution": 512},
                            "inference": {"num_inference_steps": 2}})
    assert model_settings(cfg)[:2] == (512, 2)
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"default_processing_resolution": 640, "default_denoising_steps": 4}))
    assert model_settings(config_from_dict({"model": {"path": str(tmp_path)}}))[:2] == (640, 4)
    hub = config_from_dict({"model": {"path": "prs-eth/marigold-depth-v1-1"}})
    assert model_settings(hub)[:2] == (768, 1)


def test_plan_cli(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("model: {processing_resolution: 768}\ninference: {ensemble_size: 4}\n")
    rc = main(["plan", str(config), "--size", "4000x3000", "--size", "640x480", "--count", "10",
               "--set", "inference.tiling.fusion=align", "--steps", "2", "--seconds-per-evaluation", "0.1"])
    out = capsys.readouterr().out
    assert rc == 0
    cfg = config_from_dict({"model": {"processing_resolution": 768},
                            "inference": {"ensemble_size": 4, "tiling": {"fusion": "align"}}})
    big = plan_image(3000, 4000, cfg, steps=2, seconds_per_evaluation=0.1)
    assert big.views == 36  # 1 global + 7 x 5 tiles of 768 px at 25 % overlap
    row = next(line for line in out.splitlines() if line.strip().startswith("4000x3000"))
    numbers = row.split()
    assert numbers[1] == "10" and int(numbers[-4]) == big.views
    assert int(numbers[-2]) == big.views * 4 * 2
    assert float(numbers[-1]) == pytest.approx(big.gpu_seconds, abs=0.01)
    small_row = next(line for line in out.splitlines() if line.strip().startswith("640x480"))
    assert "global only" in small_row and small_row.split()[-4] == "1"
    total = int(re.search(r"(\d+) model evaluations", out).group(1))
    assert total == 10 * big.model_evaluations + 10 * 1 * 4 * 2
    assert "GPU-hours" in out


def test_plan_cli_reads_image_sizes(tmp_path, capsys):
    from depthray.samples import write_sample_images

    write_sample_images(tmp_path / "images", n=2, size=(60, 90))
    rc = main(["plan", "--images", str(tmp_path / "images" / "*.jpg"),
               "--set", "model.processing_resolution=32"])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if line.strip().startswith("90x60"))
    assert row.split()[1] == "2" and int(row.split()[-4]) > 1  # 90 px > 1.5 x 32: tiled
    assert "--seconds-per-evaluation" in out  # no estimate without a measured speed


def test_plan_cli_rejects_bad_input(capsys):
    assert main(["plan", "--size", "4000by3000"]) == 2
    assert main(["plan"]) == 2
    assert main(["plan", "--size", "100x100", "--set", "inference.tiling.fusion=magic"]) == 2
    assert "fusion" in capsys.readouterr().err


def test_plan_measures_seconds_per_evaluation_with_the_real_model(tiny_model_dir):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "depthray.cli", "plan", "--size", "200x150", "--measure",
         "--set", f"model.path={tiny_model_dir}", "--set", "model.processing_resolution=64",
         "--set", "inference.batch_size=2", "--set", "inference.ensemble_size=2", "--steps", "2"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    measured = float(out.stdout.split("measured ")[1].split(" s per evaluation")[0])
    assert 0 < measured < 5
    row = next(line for line in out.stdout.splitlines() if line.strip().startswith("200x150"))
    views, members, evals, gpu = row.split()[-4:]
    assert int(evals) == int(views) * 2 * 2
    assert float(gpu) == pytest.approx(int(evals) * measured, rel=0.05)


def test_measure_encodes_each_view_once_as_a_job_does(tiny_model_dir):
    """plan --measure times a batch shaped like a job's: members of a view share one encode."""
    from depthray.models.marigold import MarigoldDepthModel
    from depthray.plan import measure_seconds_per_evaluation

    encoded = []
    real = MarigoldDepthModel.encode
    MarigoldDepthModel.encode = lambda self, images: encoded.append(images.shape[0]) or real(self, images)
    try:
        cfg = config_from_dict({"model": {"path": str(tiny_model_dir), "processing_resolution": 32},
                                "inference": {"ensemble_size": 4, "batch_size": 8, "num_inference_steps": 1}})
        assert measure_seconds_per_evaluation(cfg, repeats=1) > 0
    finally:
        MarigoldDepthModel.encode = real
    assert encoded and max(encoded) == 2, encoded  # 8 requests = 2 views x 4 members: 2 encodes per call


def test_plan_measure_agrees_with_predict_on_the_same_image(tmp_path, capsys):
    """`plan --measure` estimates the seconds `depthray predict` then spends on the image
    (it was 3.5x low: it timed one model batch and nothing around it).

    The model is a double that sleeps 0.25 s per call, so the model's share of the time is
    fixed by the calls predict makes (a sleep costs the same on a loaded machine) and the
    estimate must count them all: the global view's batch, every tile level's batches and
    the part-filled ones. The path around the model is real CPU work and small next to the
    sleeps, so one round agrees within 25% however busy the machine (a timing retried until
    it passed, as before, could not fail). Here 27 views x 3 members in batches of 4 are ~21
    calls (~5.4 s): the estimate the old plan made (one batch times the evaluations, 81/4 x
    0.25 s) would pass, but a tile level left out (15 of the 21 calls) fails by far."""
    from PIL import Image

    (tmp_path / "in").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    for name in ("a", "b"):  # predict's per-image time averages two copies
        Image.fromarray(pixels).save(tmp_path / "in" / f"{name}.jpg", quality=90)
    settings = ["--set", "model.factory=tests.reliability.doubles:make", "--set", "model.options.sleep_s=0.25",
                "--set", "model.options.processing_resolution=64", "--set", "model.processing_resolution=64",
                "--set", "inference.ensemble_size=3",
                "--set", "inference.batch_size=4", "--set", "compute.images_per_batch=1"]
    assert main(["plan", "--images", str(tmp_path / "in" / "a.jpg"), "--measure", *settings]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("240x180"))
    assert int(row.split()[-4]) > 1  # tiling on: 240 px > 1.5 x 64
    estimate = float(row.split()[-1])
    assert main(["predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *settings]) == 0
    measured = float(re.search(r"\(([\d.]+) s per image", capsys.readouterr().out).group(1))
    assert 0.75 <= estimate / measured <= 1.25, f"estimate {estimate} s, predict {measured} s per image"
    # Exactly, without a clock: the calls measure counts are the calls predict makes.
    from depthray.config import load_config
    from depthray.predict_command import predict_files
    from depthray.measure import measure_image
    from tests.reliability.doubles import make

    sets = [settings[i + 1] for i in range(0, len(settings), 2) if "sleep_s" not in settings[i + 1]]
    cfg = load_config(None, sets, require_io=False)
    timing = measure_image(cfg, make(processing_resolution=64), tmp_path / "in" / "a.jpg", repeats=1)
    log = tmp_path / "calls.log"
    assert predict_files([str(tmp_path / "in" / "a.jpg")], cfg, tmp_path / "out2",
                         model=make(processing_resolution=64, calls_log=str(log))) == 0
    assert timing.model_calls == len(log.read_text().splitlines()) > 10


class _StepsDouble(_CountingDouble):
    """A plug-in with denoising steps of its own: counts the steps it runs."""

    default_num_inference_steps = 3

    def __call__(self, views, seeds, num_inference_steps=None):
        self.evaluations = getattr(self, "evaluations", 0) + views.shape[0] * (num_inference_steps or 3)
        return super().__call__(views, seeds)


def steps_double(processing_resolution: int = 48):
    return _StepsDouble(processing_resolution)


@pytest.mark.parametrize("factory,res,steps", [("tests.test_plan:steps_double", 48, 3),
                                               ("tests.reliability.doubles:make", 40, 1)])
def test_plan_reads_a_factory_models_resolution_and_steps(tmp_path, capsys, factory, res, steps):
    """#26 item 10: `depthray plan` for a `model.factory` plug-in counts the views, members and
    steps the plug-in itself runs (its processing_resolution, its default steps or one
    evaluation per member when it has no steps), not Marigold's defaults (768 px, 4 steps)."""
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {{factory: '{factory}', options: {{processing_resolution: {res}}}}}\n"
                      "inference: {ensemble_size: 2}\n")
    assert main(["plan", str(config), "--size", "300x200"]) == 0
    out = capsys.readouterr().out
    assert f"processing resolution {res}, ensemble 2, {steps} denoising step(s)" in out
    cfg = config_from_dict({"model": {"factory": factory, "options": {"processing_resolution": res}},
                            "inference": {"ensemble_size": 2}})
    model = steps_double(res) if factory.endswith("steps_double") else _CountingDouble(res)
    result = predict_image(np.random.default_rng(0).random((200, 300, 3), dtype=np.float32), model, cfg.inference)
    row = next(line for line in out.splitlines() if line.strip().startswith("300x200"))
    assert int(row.split()[-3]) == result.model_evaluations  # members: views x ensemble
    assert int(row.split()[-2]) == getattr(model, "evaluations", model.seen)  # x steps, as run
