"""Decode stage on real encoded files: orientation, colour modes, limits, broken bytes."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from depthray.config import InputConfig
from depthray.io import records
from depthray.io.decode import DecodeError, decode_batch, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(h=40, w=60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) % 256], -1).astype(np.uint8)


def decode(data: bytes, max_pixels=10_000_000, min_side=4):
    return decode_image(data, max_pixels, min_side)


def test_rgb_png_is_lossless():
    arr = gradient()
    out, meta = decode(encode(Image.fromarray(arr), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, arr)
    assert meta["format"] == "PNG"


def test_exif_orientation_is_applied_and_reported():
    arr = gradient(40, 60)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: display = rotate 90 degrees clockwise
    out, meta = decode(encode(img, "PNG", exif=exif))
    assert out.shape == (60, 40, 3)  # displayed orientation
    np.testing.assert_array_equal(out, np.rot90(arr, k=-1))
    assert meta["exif_orientation"] == 6


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "1"])
def test_modes_become_rgb(mode):
    img = Image.fromarray(gradient()).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out, meta = decode(encode(img, fmt))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert meta["mode"] == mode


def test_cmyk_jpeg_colours_survive():
    red = Image.new("RGB", (32, 32), (220, 20, 20)).convert("CMYK")
    out, _ = decode(encode(red, "JPEG", quality=95))
    r, g, b = out.reshape(-1, 3).mean(0)
    assert r > 150 and g < 80 and b < 80


def test_palette_with_transparency():
    img = Image.fromarray(gradient()).convert("P")
    img.info["transparency"] = 0
    out, _ = decode(encode(img, "PNG", transparency=0))
    assert out.shape == (40, 60, 3)


def test_16bit_grayscale_png_keeps_its_range():
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (16, 1))
    out, meta = decode(encode(Image.fromarray(ramp), "PNG"))
    assert meta["mode"].startswith("I")
    assert out.shape == (16, 64, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255  # scaled, not clipped or wrapped
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out, meta = decode(data)
    assert meta["frames"] == 2
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not_an_image"),
        (encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)),
                "PNG")[:2000], "decode"),  # truncated
    ],
)
def test_broken_bytes(data, reason):
    with pytest.raises(DecodeError) as e:
        decode(data)
    assert e.value.reason == reason


def test_truncated_jpeg_is_an_error():
    data = encode(Image.fromarray(gradient(200, 200)), "JPEG", quality=90)
    with pytest.raises(DecodeError) as e:
        decode(data[: len(data) // 2])
    assert e.value.reason == "decode"


def test_pixel_limit_checked_before_decoding():
    big = encode(Image.new("RGB", (3000, 2000)), "PNG")
    with pytest.raises(DecodeError) as e:
        decode(big, max_pixels=5_000_000)
    assert e.value.reason == "too_large" and "6000000" in str(e.value)


def test_min_side():
    with pytest.raises(DecodeError) as e:
        decode(encode(Image.new("RGB", (1, 1)), "PNG"), min_side=2)
    assert e.value.reason == "too_small"
    out, _ = decode(encode(Image.new("RGB", (1, 300)), "PNG"), min_side=1)  # extreme aspect is fine
    assert out.shape == (300, 1, 3)


def test_decode_batch_turns_failures_into_error_rows():
    good = encode(Image.fromarray(gradient()), "PNG")
    rows = [
        {"source": "s", "key": "a", "data": good, "ext": "png"},
        {"source": "s", "key": "b", "data": b"junk", "ext": "jpg"},
        {"source": "s", "key": "c", "error": "no_image", "stage": "read", "message": "m"},
        {"source": "s", "key": None, "shard_total": 3},
    ]
    out = decode_batch(records.to_table(rows, records.SAMPLE), InputConfig(), keep_input=False).to_pylist()
    assert [r["key"] for r in out] == ["a", "b", "c", None]
    assert out[0]["error"] is None and (out[0]["height"], out[0]["width"]) == (40, 60)
    assert len(out[0]["pixels"]) == 40 * 60 * 3 and out[0]["data"] is None
    assert (out[1]["stage"], out[1]["error"]) == ("decode", "not_an_image")
    assert (out[2]["stage"], out[2]["error"]) == ("read", "no_image")
    assert out[3]["shard_total"] == 3
    assert isinstance(decode_batch(records.to_table(rows[:1], records.SAMPLE), InputConfig(), True), pa.Table)


def test_importing_depthray_leaves_pils_decompression_bomb_guard_alone():
    """#27: only the decoder, which enforces input.max_pixels itself, turns PIL's guard off,
    and only while it decodes; importing the readers (listing, status, preview, outputs, the
    job's stages, the CLI) leaves PIL's process-wide limit at its default."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from PIL import Image; default = Image.MAX_IMAGE_PIXELS; "
            "import depthray.io.listing, depthray.io.decode, depthray.io.outputs, depthray.status, "
            "depthray.preview, depthray.job.stages, depthray.cli, depthray.predict_progress; "
            "print(default, Image.MAX_IMAGE_PIXELS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    default, after = out.stdout.split()
    assert default != "None" and after == default


def test_an_image_past_pils_limit_decodes_within_max_pixels(monkeypatch):
    """PIL's limit made small (as a 100 MP photo meets PIL's real one): within input.max_pixels
    the image decodes, without PIL's warning or error, the job's own limit still refuses a
    larger one, and PIL's limit is back afterwards, also after a failure."""
    import warnings

    from depthray.io.decode import displayed_bytes, own_pixel_limit

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.fromarray(gradient(100, 120)), "PNG")  # 12000 px: > 2x PIL's limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))  # the guard is on outside the decoder
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail here
        out, _ = decode(data, max_pixels=20_000)
        np.testing.assert_array_equal(out, gradient(100, 120))
        exif = Image.Exif()
        exif[0x0112] = 6
        rotated = encode(Image.fromarray(gradient(100, 120)), "JPEG", exif=exif.tobytes())
        upright = displayed_bytes(rotated)  # a passthrough image of that size re-encodes too
        with own_pixel_limit():
            assert Image.open(io.BytesIO(upright)).size == (100, 120)
        assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(DecodeError) as e:
        decode(encode(Image.fromarray(gradient(200, 150)), "PNG"), max_pixels=20_000)
    assert e.value.reason == "too_large" and "30000" in str(e.value)
    assert Image.MAX_IMAGE_PIXELS == 1000
    rows = [{"source": "s", "key": "a", "data": data, "ext": "png"}]
    decoded = decode_batch(records.to_table(rows, records.SAMPLE), InputConfig(max_pixels=20_000),
                           keep_input=True).to_pylist()
    assert decoded[0]["error"] is None and (decoded[0]["height"], decoded[0]["width"]) == (100, 120)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_overlapping_decodes_restore_pils_limit_when_the_last_one_leaves(monkeypatch):
    from depthray.io.decode import own_pixel_limit

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1234)
    with own_pixel_limit():
        with own_pixel_limit():  # a second thread's decode, entered while the first runs
            assert Image.MAX_IMAGE_PIXELS is None
        assert Image.MAX_IMAGE_PIXELS is None  # the first is still decoding
    assert Image.MAX_IMAGE_PIXELS == 1234
