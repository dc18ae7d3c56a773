"""Bad and odd inputs, and keys that look like paths, through ONE real job (local Ray, tiny
random-weight Marigold): every key is either written with the right size or recorded in
`_errors/` with key, shard, stage and reason; nothing lands outside the output prefix."""

from __future__ import annotations

import functools

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from depthray.job.driver import run_job
from tests.reliability.conftest import (
    assert_exactly_once,
    assert_no_partial_files,
    enc,
    job_config,
    noise_rgb,
    read_outputs,
)

pytestmark = pytest.mark.timeout(300)

RNG = np.random.default_rng(0)

rgb = functools.partial(noise_rgb, RNG)  # rgb(h, w): noise images, this module's stream


def odd_images() -> dict[str, tuple[bytes, str, tuple]]:
    """key -> (bytes, extension, expected): ("ok", (h, w), meta subset) | ("error", stage, reason)."""
    jpg = enc(rgb(24, 32), "JPEG")
    png = enc(rgb(24, 32), "PNG")
    exif_img = rgb(24, 32)
    exif = exif_img.getexif()
    exif[0x0112] = 6  # displayed rotated 90°: 32 high, 24 wide
    gif_frames = [Image.fromarray(np.full((24, 32), v, np.uint8), "L").convert("P") for v in (0, 120, 240)]
    tif_pages = [rgb(24, 32), rgb(24, 32)]
    palette = Image.fromarray(RNG.integers(0, 4, (24, 32), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    bomb = Image.new("1", (2000, 1000))  # 2 MP > max_pixels=1 MP, a few KB compressed
    return {
        "zero": (b"", "jpg", ("error", "decode", "empty")),
        "trunc_jpg": (jpg[: len(jpg) // 2], "jpg", "processed-or-decode-error"),
        "trunc_png": (png[: len(png) // 2], "png", ("error", "decode", "decode")),
        "not_image": (b"this is a caption, not a JPEG", "jpg", ("error", "decode", "not_an_image")),
        "cmyk": (enc(rgb(24, 32).convert("CMYK"), "JPEG"), "jpg", ("ok", (24, 32), {"mode": "CMYK"})),
        "png16": (enc(Image.fromarray((RNG.integers(0, 65535, (24, 32))).astype(np.uint16)), "PNG"), "png",
                  ("ok", (24, 32), {})),
        "gray": (enc(rgb(24, 32).convert("L"), "PNG"), "png", ("ok", (24, 32), {"mode": "L"})),
        "rgba": (enc(rgb(24, 32).convert("RGBA"), "PNG"), "png", ("ok", (24, 32), {"mode": "RGBA"})),
        "palette_transparent": (enc(palette, "PNG", transparency=0), "png", ("ok", (24, 32), {"mode": "P"})),
        "exif_rotated": (enc(exif_img, "JPEG", exif=exif), "jpg", ("ok", (32, 24), {"exif_orientation": 6})),
        "animated": (enc(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:]), "gif",
                     ("ok", (24, 32), {"frames": 3})),
        "multipage": (enc(tif_pages[0], "TIFF", save_all=True, append_images=tif_pages[1:]), "tif",
                      ("ok", (24, 32), {"frames": 2})),
        "one_pixel": (enc(rgb(1, 1), "PNG"), "png", ("ok", (1, 1), {})),
        "wide": (enc(rgb(3, 2000), "PNG"), "png", ("ok", (3, 2000), {})),
        "tall": (enc(rgb(2000, 3), "PNG"), "png", ("ok", (2000, 3), {})),
        "bomb": (enc(bomb, "PNG"), "png", ("error", "decode", "too_large")),
    }


def parquet_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


PATH_KEYS = ["../../etc/x", "/abs/path", "a/b", "a_b", "ünïcødé/ключ 图", "x.y.z", "..", "~dup1"]


@pytest.fixture(scope="module")
def odd_job(ray_session, tmp_path_factory, tiny_model_dir, make_tar):
    root = tmp_path_factory.mktemp("odd")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    images = odd_images()
    members = [(f"{k}.{ext}", data) for k, (data, ext, _) in images.items()]
    # WebDataset oddities: a sample without an image, a duplicate key, members not grouped.
    members += [("caption_only.txt", b"no image here"),
                ("dup.jpg", enc(rgb(16, 16), "JPEG")), ("sep.jpg", enc(rgb(16, 16), "JPEG")),
                ("dup.jpg", enc(rgb(16, 16), "JPEG")),
                ("split.jpg", enc(rgb(16, 20), "JPEG")), ("other.jpg", enc(rgb(16, 16), "JPEG")),
                ("split.json", b"{}")]
    (inp / "odd.tar").write_bytes(make_tar(members))
    first = enc(rgb(16, 16), "JPEG")
    good = make_tar([("t0.jpg", first)] + [(f"t{i}.jpg", enc(rgb(16, 16), "JPEG")) for i in (1, 2)])
    cut = 512 + -(-len(first) // 512) * 512 + 512 + 100  # t0 whole, t1's header, part of t1
    (inp / "truncated.tar").write_bytes(good[:cut])
    (inp / "unreadable.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    keys_table = pa.table({"key": PATH_KEYS, "image": [enc(rgb(16, 16 + i), "PNG") for i in range(len(PATH_KEYS))]})
    (inp / "keys.parquet").write_bytes(parquet_bytes(keys_table))
    listing = inp / "shards.txt"
    listing.write_text("\n".join(str(inp / n) for n in
                                 ["odd.tar", "truncated.tar", "unreadable.parquet", "missing.tar", "keys.parquet"]))
    cfg = job_config(str(listing), str(out), {"path": str(tiny_model_dir), "processing_resolution": 64},
                     input={"max_pixels": 1_000_000, "min_side": 1},
                     output={"format": "webdataset", "rows_per_part": 8})
    summary = run_job(cfg)
    fs = fsspec.filesystem("file")
    outs, errors = read_outputs(fs, str(out), "webdataset")
    return {"root": root, "out": out, "summary": summary, "outs": outs, "errors": errors, "images": images,
            "cfg": cfg, "fs": fs}


def test_every_odd_image_is_processed_or_explained(odd_job):
    outs = {r["key"]: r for r in odd_job["outs"] if r["source"] == "odd"}
    errors = {e["key"]: e for e in odd_job["errors"] if e["source"] == "odd"}
    for key, (_, _, want) in odd_job["images"].items():
        if want == "processed-or-decode-error":  # PIL may pad a truncated JPEG: either is honest
            assert (key in outs) != (key in errors), key
            if key in errors:
                assert errors[key]["stage"] == "decode"
            continue
        if want[0] == "ok":
            assert key in outs, f"{key}: {errors.get(key)}"
            r = outs[key]
            assert (r["height"], r["width"]) == want[1], key
            for k, v in want[2].items():
                assert r["meta"][k] == v, (key, r["meta"])
        else:
            assert key in errors, f"{key} was not recorded as an error"
            e = errors[key]
            assert (e["stage"], e["error"]) == want[1:], (key, e)
            assert e["message"], key
    assert (errors["caption_only"]["stage"], errors["caption_only"]["error"]) == ("read", "no_image")
    assert "dup" in outs and errors["dup~dup1"]["error"] == "duplicate_key"
    assert "split" in outs and errors["split~dup1"]["error"] == "duplicate_key"  # not grouped by key


def test_damaged_and_missing_shards(odd_job):
    s = odd_job["summary"]
    errors = odd_job["errors"]
    # Truncated tar: what could be read is kept, the damage is one shard-level record.
    trunc = [e for e in errors if e["source"] == "truncated"]
    assert [(e["key"], e["stage"], e["error"]) for e in trunc] == [("<shard>", "read", "corrupt_shard")]
    assert {r["key"] for r in odd_job["outs"] if r["source"] == "truncated"} == {"t0"}
    bad = [e for e in errors if e["source"] == "unreadable"]
    assert [(e["key"], e["error"]) for e in bad] == [("<shard>", "corrupt_shard")]
    # A missing shard is not committed: named in the summary with the reason, retried next run.
    assert list(s["shards_unfinished"]) == ["missing"]
    assert "missing.tar" in s["shards_unfinished"]["missing"] and "FileNotFound" in s["shards_unfinished"]["missing"]
    assert s["shards_complete"] == 4
    manifests = {p.stem for p in (odd_job["out"] / "_manifest").iterdir()}
    assert manifests == {"odd", "truncated", "unreadable", "keys"}


def test_keys_are_data_not_paths(odd_job):
    out, root = odd_job["out"], odd_job["root"]
    outs = [r for r in odd_job["outs"] if r["source"] == "keys"]
    assert sorted(r["key"] for r in outs) == sorted(PATH_KEYS)  # original keys kept in metadata
    names = [r["name"] for r in outs]
    assert len(set(names)) == len(names)  # a/b and a_b do not collide
    for r in outs:
        assert all(c.isalnum() or c in "_-" for c in r["name"]), r["name"]
    # Nothing written outside the output prefix (no root/etc/x, no /abs/path...).
    outside = [p for p in root.rglob("*") if not (p.is_relative_to(out) or p.is_relative_to(root / "in"))]
    assert outside == []
    assert not (root / "etc").exists()


def test_exactly_once_and_no_partial_files(odd_job):
    expected = {
        "odd": set(odd_job["images"]) | {"caption_only", "dup", "dup~dup1", "sep", "split", "other",
                                          "split~dup1"},
        "truncated": {"t0", "<shard>"},
        "unreadable": {"<shard>"},
        "keys": set(PATH_KEYS),
    }
    assert_exactly_once(expected, odd_job["outs"], odd_job["errors"])
    assert_no_partial_files(odd_job["fs"], str(odd_job["out"]))
    s = odd_job["summary"]
    assert s["images"] + s["errors"] == sum(len(v) for v in expected.values())


def test_rerun_retries_only_the_missing_shard(odd_job, make_image, make_tar):
    """The missing shard appears; the same command finishes it and touches nothing else."""
    inp = odd_job["root"] / "in"
    (inp / "missing.tar").write_bytes(make_tar([("m0.jpg", make_image(16, 16)), ("m1.jpg", make_image(16, 24))]))
    again = run_job(odd_job["cfg"])
    assert (again["shards_skipped"], again["shards_complete"], again["shards_unfinished"]) == (4, 1, {})
    outs, errors = read_outputs(odd_job["fs"], str(odd_job["out"]), "webdataset")
    assert sorted(r["key"] for r in outs if r["source"] == "missing") == ["m0", "m1"]
    before = Counter_pairs(odd_job["outs"], odd_job["errors"])
    after = Counter_pairs(outs, errors)
    assert after - before == {("missing", "m0"), ("missing", "m1")} and before <= after


def Counter_pairs(outs, errors):
    pairs = [(r["source"], r["key"]) for r in outs] + [(e["source"], e["key"]) for e in errors]
    assert len(pairs) == len(set(pairs))
    return set(pairs)
