"""What `depthray predict` reports: views done within an image, time left once there is a
rate, a warning for costly images, folders expanded with skipped files counted."""

from __future__ import annotations

import numpy as np

from depthray.config import config_from_dict
from depthray.predict import predict_images
from depthray.predict_progress import ViewProgress, cost_warning, expand_inputs, skipped_line, views_line


class _Double:
    processing_resolution = 32

    def __call__(self, views, seeds):
        return views[:, 0].clone()  # [N,h,w]


def test_predict_images_reports_every_view_after_announcing_the_total():
    cfg = config_from_dict({"inference": {"ensemble_size": 2, "batch_size": 3}})
    images = [np.random.default_rng(i).random((90, 120, 3), dtype=np.float32) for i in range(2)]
    heard = []
    results = predict_images(images, _Double(), cfg.inference, progress=lambda d, t: heard.append((d, t)))
    total = sum(r.num_views for r in results)
    assert total > 2  # 120 px > 1.5 x 32: tiled, so there is progress inside an image
    assert heard[0] == (0, total)
    assert [d for d, _ in heard] == list(range(total + 1)) and {t for _, t in heard} == {total}


def test_predict_reporting_loads_nothing_of_the_job():
    """The views line's duration formatter is shared (depthray/durations.py): predict's
    reporting imports no module of the job's driver side (the ledger) to get it."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, depthray.predict_progress; "
            "print(sorted(m for m in sys.modules if m.startswith('depthray.job')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_time_left_appears_only_once_a_view_was_timed():
    assert views_line(0, 1, 1, 0, 120, 0.0) == "image 1/1: views 0/120"
    assert views_line(0, 1, 1, 0, 120, 30.0) == "image 1/1: views 0/120"  # time passed, no view done: no rate
    assert views_line(0, 1, 1, 30, 120, 60.0) == "image 1/1: views 30/120, ~3m00s left"
    assert views_line(4, 4, 10, 120, 120, 60.0) == "images 5-8/10: views 120/120"


def test_progress_is_throttled_and_restarts_its_clock_per_batch():
    now = [100.0]
    lines = []
    p = ViewProgress(2, lines.append, every_s=5.0, clock=lambda: now[0])
    p(0, 1, 0, 10)
    for done in range(1, 11):
        now[0] += 1.0
        p(0, 1, done, 10)
    # one line after 5 s and the end: not one line per view
    assert lines == ["image 1/2: views 5/10, ~5s left", "image 1/2: views 10/10"]
    now[0] += 100.0  # the next image's clock starts at its own 0, not at the first one's
    p(1, 1, 0, 4)
    now[0] += 2.0
    p(1, 1, 4, 4)
    assert len(lines) == 2  # a batch done within 5 s: no line (#26 item 10: 642 lines for 300 images)
    for b in range(300):  # quick batches say nothing at all
        p(b, 1, 0, 1)
        now[0] += 0.1
        p(b, 1, 1, 1)
    assert len(lines) == 2


def test_cost_warning_names_the_count_and_the_settings_that_reduce_it():
    assert cost_warning("a.jpg", 39, 5) is None  # 195 evaluations
    text = cost_warning("big.jpg", 121, 5)
    assert "605 model evaluations" in text and "121 views x 5" in text
    for setting in ("inference.tiling.max_tiles", "inference.ensemble_size", "model.processing_resolution"):
        assert setting in text


def test_folders_are_searched_recursively_and_other_files_counted(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("b.JPG", "sub/a.png", "sub/deeper/c.webp", "notes.txt", "sub/x.heic", "sub/y.heic", "README",
                 ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    files, skipped = expand_inputs([str(tmp_path), str(tmp_path / "named.heic")])
    assert [f.removeprefix(str(tmp_path) + "/") for f in files] == [
        "b.JPG", "sub/a.png", "sub/deeper/c.webp", "named.heic"]  # a named file is tried as given
    assert skipped == {".heic": 2, ".txt": 1, "(no extension)": 1}
    assert skipped_line(skipped).startswith("skipped 4 file(s)") and "2 .heic" in skipped_line(skipped)
    assert skipped_line(expand_inputs([str(tmp_path / "sub" / "deeper")])[1]) is None


def test_preview_long_side_is_capped_and_small_images_stay_as_they_are():
    from depthray.predict_command import preview_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    depth = rng.random((2000, 3000), dtype=np.float32)
    sheet = preview_image(image, depth, 1024)
    assert sheet.dtype == np.uint8 and max(sheet.shape[:2]) <= 1024 and sheet.shape[1] > 1000  # fills the cap
    assert preview_image(image[:40, :60], depth[:40, :60], 1024).shape == (40, 2 * 60 + 4, 3)
    assert preview_image(image[:40, :60], depth[:40, :60], 0).shape == (40, 124, 3)  # 0 = full size
    tall = preview_image(image[:, :300], depth[:, :300], 500)  # height is the long side
    assert tall.shape[0] == 500 and tall.shape[1] <= 500
