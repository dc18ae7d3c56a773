"""`depthray predict`'s own module (#27): its folder is a sink fed by the job's stages, and
each preview is built from the pixels the decode stage decoded and the depth the infer stage
made: no file is read twice, no image decoded twice, no depth PNG decoded back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from depthray.config import config_from_dict
from depthray.io.codecs import decode_depth_png16
from depthray.io.decode import decode_image
from depthray.predict_command import predict_files, preview_image

CFG = {"model": {"factory": "tests.reliability.doubles:make", "options": {"processing_resolution": 32}},
       "inference": {"ensemble_size": 2, "tiling": {"mode": "off"}}, "compute": {"images_per_batch": 2}}


def _inputs(folder: Path) -> list[str]:
    """A JPEG stored sideways (EXIF orientation 6: decoded pixels are not the stored ones), a
    gray PNG, an RGB PNG and a broken file (an error row between good ones)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(folder / "a.jpg", exif=exif.tobytes())
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8)).save(folder / "b.png")
    (folder / "c.jpg").write_bytes(b"not an image")
    Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(folder / "d.png")
    return [str(p) for p in sorted(folder.iterdir())]


def test_each_file_is_read_and_decoded_once_and_no_depth_png_is_decoded(tmp_path, monkeypatch):
    import depthray.io.codecs as codecs
    import depthray.io.decode as decode

    paths = _inputs(tmp_path / "in")
    decoded, reads = [], []
    real_decode, real_read = decode.decode_image, Path.read_bytes
    monkeypatch.setattr(decode, "decode_image", lambda data, *a: decoded.append(len(data)) or real_decode(data, *a))
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real_read(self))

    def refuse(*_):
        raise AssertionError("predict decoded a depth PNG it had just encoded")

    monkeypatch.setattr(codecs, "decode_depth_png16", refuse)
    rows = []
    assert predict_files(paths, config_from_dict(CFG), tmp_path / "out", on_done=lambda p, r: rows.append(r)) == 1
    assert sorted(reads) == ["a.jpg", "b.png", "c.jpg", "d.png"]
    assert len(decoded) == 4  # the decode stage, once per file (c.jpg fails there)
    assert [(r["key"], r["error"]) for r in rows] == [("a", None), ("b", None), ("c", "not_an_image"), ("d", None)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{k}.{kind}.png" for k in "abd" for kind in ("depth", "preview")]


@pytest.mark.parametrize("max_side", [64, 0])
def test_the_preview_is_the_decoded_image_beside_the_depth_its_png_holds(tmp_path, max_side):
    """What the preview showed when predict re-read the file and decoded its own PNG, pixel
    for pixel: the image as displayed (EXIF applied) and the depth at the PNG's 16-bit levels."""
    cfg = config_from_dict(CFG)
    paths = _inputs(tmp_path / "in")
    assert predict_files(paths, cfg, tmp_path / "out", preview_max_side=max_side) == 1
    for path in paths:
        key = Path(path).stem
        if key == "c":
            continue
        image, _ = decode_image(Path(path).read_bytes(), cfg.input.max_pixels, cfg.input.min_side)
        depth = decode_depth_png16((tmp_path / "out" / f"{key}.depth.png").read_bytes())
        expected = preview_image(image, depth, max_side)
        got = np.asarray(Image.open(io.BytesIO((tmp_path / "out" / f"{key}.preview.png").read_bytes())))
        np.testing.assert_array_equal(got, expected, err_msg=key)
    shape = np.asarray(Image.open(tmp_path / "out" / "a.preview.png")).shape
    assert shape == ((52, 64, 3) if max_side else (70, 2 * 40 + 4, 3))  # a.jpg upright: 40 wide, 70 high
