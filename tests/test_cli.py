"""The CLI as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _depthray(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "depthray.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


def test_help_lists_every_verb():
    out = _depthray("--help")
    assert out.returncode == 0
    for verb in ("run", "submit", "demo", "plan", "predict", "eval", "preview", "make-tiny-model"):
        assert verb in out.stdout, verb
    sub = _depthray("predict", "--help")
    assert "16-bit" in sub.stdout and "--tiny" in sub.stdout


def test_predict_writes_png16_and_preview(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray((rng.integers(0, 65535, (30, 20), dtype=np.uint16))).save(tmp_path / "b.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = _depthray("predict", str(tmp_path / "a.jpg"), str(tmp_path / "b.png"), str(tmp_path / "broken.jpg"),
                    "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                    "--set", "model.processing_resolution=64", "--set", "inference.ensemble_size=2")
    assert out.returncode == 1, "one unreadable file must be reported in the exit status"
    assert "skipped" in out.stdout + out.stderr and "broken.jpg" in out.stdout + out.stderr
    depth = np.asarray(Image.open(tmp_path / "out" / "a.depth.png"))
    assert depth.dtype == np.uint16 and depth.shape == (45, 70)
    assert int(depth.max()) - int(depth.min()) > 10000  # a real depth map, not a constant
    assert Image.open(tmp_path / "out" / "a.depth.png").text["depthray_output_space"] == "depth"
    assert "0 = near" in out.stdout
    assert np.asarray(Image.open(tmp_path / "out" / "b.depth.png")).shape == (30, 20)
    preview = np.asarray(Image.open(tmp_path / "out" / "a.preview.png"))
    assert preview.shape[0] == 45 and preview.shape[1] > 2 * 70


def test_config_errors_exit_2_with_one_message(tmp_path):
    out = _depthray("predict", "x.jpg", "--out", str(tmp_path), "--set", "inference.ensemble_sise=2",
                    "--set", "inference.batch_size=zero")
    assert out.returncode == 2
    assert "ensemble_sise: unknown key" in out.stderr and "batch_size: expected int" in out.stderr


def test_make_tiny_model(tmp_path):
    out = _depthray("make-tiny-model", str(tmp_path / "m"), "--scheduler", "lcm")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "model_index.json").exists()
    assert "LCMScheduler" in (tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text()
    again = _depthray("make-tiny-model", str(tmp_path / "m"))
    assert again.returncode != 0 and "already holds a checkpoint" in again.stderr


def test_predict_never_overwrites_files_that_share_a_stem(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(1)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / folder / "x.png")
    out = _depthray("predict", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                    "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                    "--set", "model.processing_resolution=32", "--set", "inference.ensemble_size=1")
    assert out.returncode == 0, out.stderr
    written = sorted(p.name for p in (tmp_path / "out").glob("*.depth.png"))
    assert len(written) == 2 and all(n.startswith("x-") for n in written), written


def test_predict_refuses_an_output_folder_inside_its_input(tiny_model_dir, tmp_path):
    """#26 item 5: `--out` equal to (or inside) an input folder would have the next predict
    over that folder label its own depth maps (`pic0.depth.depth.png`, exit 0): exit 2,
    nothing written. A folder beside the inputs is fine."""
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "photos" / "pic0.png")
    for out_dir in (tmp_path / "photos", tmp_path / "photos" / "depth"):
        out = _depthray("predict", str(tmp_path / "photos"), "--out", str(out_dir), "--model", str(tiny_model_dir))
        assert out.returncode == 2 and "inside the input folder" in out.stderr, out.stderr
        assert sorted(p.name for p in (tmp_path / "photos").rglob("*")) == ["pic0.png"]


def test_predict_takes_folders_warns_on_costly_images_and_shows_views(tiny_model_dir, tmp_path):
    from depthray.config import config_from_dict
    from depthray.tiling import plan_tiles

    rng = np.random.default_rng(2)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "in" / "big.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "in" / "sub" / "small.jpg")
    (tmp_path / "in" / "sub" / "notes.txt").write_text("not an image")
    settings = ["--set", "model.processing_resolution=32", "--set", "inference.ensemble_size=4",
                "--set", "inference.batch_size=16"]
    out = _depthray("predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                    "--preview-size", "100", "--progress-every", "0", *settings)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.depth.png")) == ["big.depth.png", "small.depth.png"]
    assert "skipped 1 file(s)" in out.stderr and "1 .txt" in out.stderr
    # the warning is given exactly for the image whose views x members reach 200
    views = plan_tiles(300, 400, 32, config_from_dict({}).inference.tiling).num_views
    assert views * 4 >= 200 and 1 * 4 < 200
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "big.png" in warnings[0] and f"{views * 4} model evaluations" in warnings[0]
    # views within the big image (a line per view with --progress-every 0), counted to the
    # end; time left never before a view is done
    progress = [line for line in out.stderr.replace("\r", "\n").splitlines() if ": views " in line]
    both = views + 1  # one batch (compute.images_per_batch): big's views and small's one
    assert progress[0].startswith(f"images 1-2/2: views 1/{both}") and f"images 1-2/2: views {both}/{both}" in progress
    assert not [line for line in progress if " 0/" in line and "left" in line]
    # the preview is capped, the depth keeps every pixel
    preview = Image.open(tmp_path / "out" / "big.preview.png")
    assert max(preview.size) <= 100 and preview.size[0] > preview.size[1]
    assert np.asarray(Image.open(tmp_path / "out" / "big.depth.png")).shape == (300, 400)
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "a.txt").write_text("x")
    empty = _depthray("predict", str(tmp_path / "no-images"), "--out", str(tmp_path / "o2"), "--model", str(tiny_model_dir))
    assert empty.returncode == 2 and "no image files" in empty.stderr and "1 .txt" in empty.stderr


def test_predict_with_a_disparity_model_says_so_and_eval_refuses_it_as_depth(tmp_path):
    """A transformers model that predicts disparity (Depth Anything layout): each depth PNG
    records `disparity` in its text chunk, the closing message says 1 = near, and `depthray
    eval` on the folder refuses to score it as depth (exit 1, the reason per image) but scores
    it as disparity; the output reader that `depthray preview` uses reads the same chunk."""
    from depthray.io.outputs import read_outputs

    from depthray.models.hf_depth import build_tiny_depth_anything

    model = build_tiny_depth_anything(tmp_path / "da")
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    (tmp_path / "gt").mkdir()
    for name in ("p", "q"):
        Image.fromarray(rng.integers(0, 256, (42, 56, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{name}.png")
        np.save(tmp_path / "gt" / f"{name}.npy", 1.0 + rng.random((42, 56)).astype(np.float32))
    out = _depthray("predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                    "--set", "model.kind=transformers", "--set", f"model.path={model}")
    assert out.returncode == 0, out.stderr
    assert "disparity*65535, 1 = near" in out.stdout and "0 = near" not in out.stdout
    assert Image.open(tmp_path / "out" / "p.depth.png").text["depthray_output_space"] == "disparity"
    as_depth = _depthray("eval", str(tmp_path / "out"), str(tmp_path / "gt"))
    assert as_depth.returncode == 1 and as_depth.stdout.count("holds disparity") >= 2, as_depth.stdout
    as_disp = _depthray("eval", str(tmp_path / "out"), str(tmp_path / "gt"), "--space", "disparity")
    assert as_disp.returncode == 0 and "holds disparity" not in as_disp.stdout, as_disp.stdout
    assert {r.meta.get("output_space") for r in read_outputs(str(tmp_path / "out"))} == {"disparity"}
