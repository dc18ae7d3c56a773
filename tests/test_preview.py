"""Preview contact sheet + HTML page, checked in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from depthray import cli
from depthray.preview import write_preview
from tests import output_fixtures as fx


@pytest.fixture(scope="module")
def samples():
    # Keys in one order, uncertainty in another, so a sort visibly changes the order.
    return fx.make_samples(6, h=96, w=128, noise=(0.05, 0.0, 0.1, 0.02, 0.08, 0.01))


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium: installed here when we may (root + apt), else the test is skipped."""
    exe = shutil.which("chromium")
    if exe is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") \
            and not os.environ.get("DEPTHRAY_NO_APT"):
        for cmd in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "chromium"]):  # a fresh machine has no package lists yet
            done = subprocess.run(cmd, capture_output=True, timeout=900,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if cmd[1] == "install" and done.returncode == 0:
                break
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not on PATH and could not be installed (as root: apt-get install -y "
                    "chromium); the HTML preview is not checked in a browser")
    return exe


def _chromium(exe, tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_contact_sheet_and_html_are_self_contained(tmp_path, samples):
    out = fx.write_webdataset(tmp_path / "out", samples, include_image=True)
    sheet, page = write_preview(str(out), tmp_path / "preview", n=5, max_uncertainty_mean=0.06)
    img = np.asarray(Image.open(sheet).convert("RGB"))
    # 5 cells in a 4-column grid -> 2 rows; a cell is three 96x128 panels (small images are
    # not upscaled) with 4 px gaps, 34 px of caption below, 8 px padding around cells.
    assert img.shape[:2] == (8 + 2 * (96 + 34 + 8), 8 + 4 * (3 * 128 + 2 * 4 + 8))
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 1000  # real pictures, not a blank
    text = page.read_text()
    assert text.count('class="card') == 5
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 15 and all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere
    # noise 0.1 and 0.08 images exceed the threshold: flagged with the words on the page.
    assert text.count("card flagged") == 2 and "low confidence" in text


def test_preview_in_headless_chromium_renders_and_sorts(tmp_path, samples, chromium):
    out = fx.write_parquet(tmp_path / "out", samples)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for s in samples:  # Parquet outputs carry no image: inputs come from --inputs
        (inputs / f"{s.key}.jpg").write_bytes(fx.jpeg(s.rgb))
    preview_dir = tmp_path / "preview"
    assert cli.main(["preview", str(out), "--n", "32", "--out", str(preview_dir),
                     "--inputs", str(inputs)]) == 0
    page = preview_dir / "preview.html"
    html = page.read_text()

    # 1. Screenshot: the expected size and a real picture (many colours, Spectral reds).
    shot = tmp_path / "shot.png"
    r = _chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    assert shot.exists(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (900, 1200, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 2000
    red = (img[..., 0] > 140) & (img[..., 1] < 90) & (img[..., 2] < 110)  # Spectral's near end
    assert red.sum() > 500
    keep = os.environ.get("DEPTHRAY_PREVIEW_SCREENSHOT")
    if keep:  # for a human to look at
        shutil.copy(shot, keep)

    # 2. Sorting: the page as served lists keys in key order; opened with #sort=..., the
    # script clicks the sort button and the DOM holds the cards by uncertainty.
    by_unc = [s.key for s in sorted(samples, key=lambda s: -float(s.unc.mean()))]
    keys = sorted(s.key for s in samples)
    assert re.findall(r'data-key="([^"]+)"', html) == keys != by_unc
    for frag, expected in (("uncertainty-desc", by_unc), ("uncertainty-asc", by_unc[::-1])):
        r = _chromium(chromium, tmp_path, "--dump-dom", page.as_uri() + f"#sort={frag}")
        dom_keys = re.findall(r'data-key="([^"]+)"', r.stdout)
        assert dom_keys == expected, (frag, r.stderr[-2000:])
        assert f'data-sort="{frag}"' in r.stdout and 'class="active"' in r.stdout


def test_disparity_labels_are_coloured_near_red_like_depth():
    """A transformers model's label can hold disparity (1 = near, meta.output_space): the
    preview flips it, so the near half of a scene is red in both, not violet in one."""
    from depthray.preview import PreviewItem, panels

    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 1))  # depth: near on the left
    as_depth = panels(PreviewItem("d", ramp), 64, 1.0)[1]
    as_disparity = panels(PreviewItem("p", 1.0 - ramp, space="disparity"), 64, 1.0)[1]
    assert np.array_equal(as_depth, as_disparity)
    left, right = as_depth[:, :8].mean((0, 1)), as_depth[:, -8:].mean((0, 1))
    assert left[0] > left[2] and right[2] > right[0]  # red near, violet/blue far
