"""Codecs, part writers, manifests and resume planning; outputs read back with plain tools."""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from depthray.config import OutputConfig, QualityConfig, StorageConfig
from depthray.io import records, row_meta
from depthray.io.codecs import (
    decode_depth_png16,
    decode_uncertainty_png16,
    encode_batch,
    encode_depth_png16,
    encode_uncertainty_png16,
)
from depthray.io.fs import write_atomic
from depthray.io.manifest import ManifestStore, resume_shards
from depthray.io.sinks import safe_key, write_batch
from depthray.io.sources import Shard

STORAGE = StorageConfig()


def test_png16_roundtrip_with_plain_pil():
    depth = np.linspace(0, 1, 12 * 7, dtype=np.float32).reshape(12, 7)
    data = encode_depth_png16(depth)
    raw = np.asarray(Image.open(io.BytesIO(data)))
    assert raw.dtype == np.uint16 and raw.shape == (12, 7) and raw.max() == 65535
    np.testing.assert_allclose(decode_depth_png16(data), depth, atol=1 / 65535)


def test_uncertainty_png_carries_its_scale():
    unc = np.linspace(0, 0.03, 20, dtype=np.float32).reshape(4, 5)
    data, scale = encode_uncertainty_png16(unc)
    assert scale == pytest.approx(0.03)
    assert float(Image.open(io.BytesIO(data)).text["depthray_uncertainty_scale"]) == pytest.approx(scale)
    np.testing.assert_allclose(decode_uncertainty_png16(data), unc, atol=scale / 65535)
    zeros, zscale = encode_uncertainty_png16(np.zeros((2, 2), np.float32))
    assert zscale == 1.0 and decode_uncertainty_png16(zeros).max() == 0


def test_safe_key_never_escapes_and_never_collides():
    assert safe_key("img_001") == "img_001"
    for bad in ["../../etc/x", "/abs/path", "a.b", "a b"]:
        s = safe_key(bad)
        assert "/" not in s and "." not in s and s != bad
    assert safe_key("a.b") != safe_key("a_b")


def predicted_rows(source: str, keys: list[str], h=6, w=9):
    rows = []
    for k in keys:
        rows.append({"source": source, "key": k, "height": h, "width": w, "meta": {"mode": "RGB"},
                     "depth_f32": np.full((h, w), 0.5, np.float32).tobytes(),
                     "uncertainty_f32": np.full((h, w), 0.01, np.float32).tobytes(),
                     "num_views": 1, "ensemble_size": 2, "infer_s": 0.1, "data": b"JPEGBYTES", "ext": "jpeg"})
    return rows


def encoded_batch(rows):
    return encode_batch(records.to_table(rows, records.PREDICTED), QualityConfig(max_uncertainty_mean=0.001))


def test_parquet_part_schema_and_errors(tmp_path):
    rows = predicted_rows("s1", ["a", "b"]) + [
        {"source": "s1", "key": "bad", "stage": "decode", "error": "not_an_image", "message": "x"},
        {"source": "s1", "key": None, "shard_total": 3},
    ]
    cfg = OutputConfig(url=str(tmp_path), format="parquet")
    acks = write_batch(encoded_batch(rows), cfg, STORAGE, "m", "h").to_pylist()
    assert len(acks) == 1
    ack = acks[0]
    assert (ack["rows"], ack["outputs"], ack["errors"], ack["shard_total"]) == (4, 2, 1, 3)
    assert json.loads(ack["error_reasons"]) == {"decode:not_an_image": 1}
    # Written parts wait in _staging/ until their shard commits: plain readers see nothing.
    assert not [p for p in tmp_path.rglob("*.parquet") if "_staging" not in p.parts]
    assert ack["part_bytes"] == [(tmp_path / "_staging" / ack["parts"][0]).stat().st_size]
    table = pq.read_table(tmp_path / "_staging")  # plain pyarrow; _errors/ and _manifest/ are ignored
    assert sorted(table.column("key").to_pylist()) == ["a", "b"]
    assert {"key", "source", "width", "height", "depth", "uncertainty", "uncertainty_mean", "model",
            "config_hash", "ensemble_size", "num_views"} <= set(table.column_names)
    row = table.to_pylist()[0]
    assert np.asarray(Image.open(io.BytesIO(row["depth"]))).shape == (6, 9)
    assert row["model"] == "m" and row["config_hash"] == "h"
    meta = json.loads(row["meta"])
    assert meta["low_confidence"] is True
    assert meta["quality"]["max_uncertainty_mean"] == 0.001
    assert meta["quality"]["uncertainty_mean"] == pytest.approx(0.01)
    assert "uncertainty_mean" in meta["quality"]["reasons"][0]
    errs = pq.read_table(tmp_path / "_staging" / "_errors")
    assert errs.column_names == ["key", "source", "stage", "error", "message"]
    assert errs.column("key").to_pylist() == ["bad"]
    # A retried task writes the same part names: no duplicates.
    write_batch(encoded_batch(rows), cfg, STORAGE, "m", "h")
    assert pq.read_table(tmp_path / "_staging").num_rows == 2


def test_webdataset_part_readable_with_webdataset(tmp_path):
    import webdataset as wds

    cfg = OutputConfig(url=str(tmp_path), format="webdataset", include_image=True)
    ack = write_batch(encoded_batch(predicted_rows("s2", ["k1", "x/../k.2"])), cfg, STORAGE, "m", "h").to_pylist()[0]
    part = tmp_path / "_staging" / ack["parts"][0]
    with tarfile.open(part) as tar:
        names = tar.getnames()
    assert all("/" not in n for n in names)
    samples = list(wds.WebDataset(str(part), shardshuffle=False))
    assert len(samples) == 2
    by_key = {json.loads(s["json"])["key"]: s for s in samples}
    assert set(by_key) == {"k1", "x/../k.2"}
    s = by_key["k1"]
    assert np.asarray(Image.open(io.BytesIO(s["depth.png"]))).shape == (6, 9)
    assert s["jpg"] == b"JPEGBYTES"  # input passed through, .jpeg normalised to .jpg


def test_write_atomic_local_leaves_no_temp(tmp_path):
    fs = fsspec.filesystem("file")
    write_atomic(fs, str(tmp_path / "d" / "f.bin"), b"abc")
    assert (tmp_path / "d" / "f.bin").read_bytes() == b"abc"
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["f.bin"]


def test_resume_skips_complete_shards_and_clears_leftovers(tmp_path):
    from depthray.config import config_from_dict

    out = tmp_path / "out"
    cfg = config_from_dict({"output": {"url": str(out)}, "input": {"url": "x"}})
    shards = [Shard("a", "file:///a.tar", "webdataset"), Shard("b", "file:///b.tar", "webdataset")]
    for name in ["a.part-0123456789abcdef.parquet", "b.part-0123456789abcdef.parquet",
                 "_errors/b.part-fedcba9876543210.parquet", ".tmp-x-b.part-1.parquet",
                 "_staging/b.part-aaaaaaaaaaaaaaaa.parquet"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    manifest = {"status": "complete", "url": "file:///a.tar", "config_hash": cfg.hash(),
                "parts": {"a.part-0123456789abcdef.parquet": 1}}
    ManifestStore(str(out), STORAGE).write("a", manifest)
    plan = resume_shards(shards, cfg)
    assert [s.name for s in plan.todo] == ["b"] and plan.skipped == ["a"]
    assert plan.deleted_parts == 4  # b's promoted, error and staged parts, and the temp file
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.json", "a.part-0123456789abcdef.parquet"]
    # A part of a committed shard that went missing (or changed size) makes it redo.
    (out / "a.part-0123456789abcdef.parquet").write_bytes(b"xx")
    plan = resume_shards(shards, cfg)
    assert [s.name for s in plan.todo] == ["a", "b"] and "2 bytes, manifest says 1" in plan.redo["a"]
    # overwrite: everything is redone, but old parts stay until their shard commits anew
    ManifestStore(str(out), STORAGE).write("a", manifest)
    (out / "a.part-0123456789abcdef.parquet").write_bytes(b"x")
    over = config_from_dict({"output": {"url": str(out), "overwrite": True}, "input": {"url": "x"}})
    plan = resume_shards(shards, over, run_id="r1")
    assert [s.name for s in plan.todo] == ["a", "b"] and plan.replaced == {"a": ["a.part-0123456789abcdef.parquet"]}
    assert (out / "a.part-0123456789abcdef.parquet").exists() and (out / "_manifest" / "a.json").exists()


def test_manifest_store_on_s3(s3_bucket):
    store = ManifestStore(f"s3://{s3_bucket}/out", STORAGE)
    assert store.completed() == set()
    store.write("x/000", {"status": "complete", "inputs": 3})
    assert store.completed() == {"x/000"}
    assert store.read_many(["x/000"])["x/000"]["inputs"] == 3


def test_depth_png_writer_is_lossless_standard_and_not_larger_than_pil():
    """The numpy Up-filter + fast deflate writer (io/codecs.py): stock PIL reads it back exactly,
    as 16-bit grayscale, and it is no larger than PIL's own writer at level 3 on a
    realistic map (smooth surfaces, edges, thin structures, mild noise)."""
    import io as _io

    import numpy as np
    from PIL import Image

    from benchmarks.scale import realistic_maps
    from depthray.io.codecs import encode_depth_png16

    _, depth, _ = realistic_maps(1, 480, 640)[0]  # the size the table was measured at
    ours = encode_depth_png16(depth)
    img = Image.open(_io.BytesIO(ours))
    img.load()
    assert img.mode.startswith("I;16") or img.mode == "I"
    q = np.rint(np.clip(depth, 0, 1) * 65535).astype(np.uint16)
    assert np.array_equal(np.asarray(img).astype(np.uint16), q)
    buf = _io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG", compress_level=3)
    assert len(ours) <= len(buf.getvalue())


def test_png_writer_without_isal_writes_the_same_pixels(monkeypatch):
    """ISA-L is an accelerator, not a format: with stock zlib (the fallback when the isal
    wheel is missing) the PNG holds the same values, and both are ordinary zlib streams."""
    from depthray.io import codecs

    depth = np.random.default_rng(3).random((37, 53), dtype=np.float32)
    fast = codecs.encode_depth_png16(depth)
    monkeypatch.setattr(codecs, "_isal", None)
    stock = codecs.encode_depth_png16(depth)
    a, b = (np.asarray(Image.open(io.BytesIO(x))) for x in (fast, stock))
    assert np.array_equal(a, b)
    assert np.array_equal(a, np.rint(depth * 65535).astype(np.uint16))


def test_parquet_parts_store_png_columns_uncompressed_and_the_rest_zstd(tmp_path):
    """PNG bytes are compressed already: the writer stores them as they are (docs/scale.md:
    zstd over them cost CPU for no size), and compresses the other columns."""
    cfg = OutputConfig(url=str(tmp_path), format="parquet")
    ack = write_batch(encoded_batch(predicted_rows("s1", ["a", "b"])), cfg, STORAGE, "m", "h").to_pylist()[0]
    meta = pq.ParquetFile(tmp_path / "_staging" / ack["parts"][0]).metadata
    codecs = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).compression
              for i in range(meta.num_columns)}
    assert codecs["depth"] == codecs["uncertainty"] == "UNCOMPRESSED"
    assert codecs["key"] == codecs["meta"] == "ZSTD"


def test_encode_turns_a_missing_map_into_an_error_row():
    rows = predicted_rows("s1", ["a", "b"])
    rows[1]["uncertainty_f32"] = None
    out = encode_batch(records.to_table(rows, records.PREDICTED)).to_pylist()
    assert out[0]["error"] is None and out[0]["depth"]
    assert (out[1]["key"], out[1]["stage"]) == ("b", "encode")


def test_tar_parts_are_the_bytes_tarfile_writes():
    """Samples are built one by one (io/tar_samples.py: tar_member), joined into the tar
    `tarfile` writes: same headers (ustar, pax for long or non-ASCII names), padding, end."""
    import random

    from depthray.io.tar_samples import tar_bytes

    def tarfile_bytes(files):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    rng = random.Random(0)
    for _ in range(50):
        files = [(rng.choice(["a", "k" * 300, "ünï/ключ 图", "x" * 99, "y" * 100, "z" * 101]) + str(i),
                  rng.randbytes(rng.choice([0, 1, 511, 512, 513, 3000, 10240]))) for i in range(rng.randrange(6))]
        assert tar_bytes(files) == tarfile_bytes(files)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_a_row_the_writer_cannot_build_is_an_error_row_but_a_storage_failure_raises(tmp_path, monkeypatch, fmt):
    """One unwritable row costs itself (`write` / `unwritable`, naming the key), the others
    are written and the ACK still counts every row; a failed write to storage raises, so
    Ray retries the task and the shard is never committed short."""
    import depthray.io.sinks as sinks

    rows = predicted_rows("s1", ["a", "bad", "c"]) + [{"source": "s1", "key": None, "shard_total": 3}]
    if fmt == "parquet":  # a kept map column's entry, as JSON: [int, str] is no Arrow list
        row_meta.put(rows[1], columns={"tags": [[1, "x"]]})
    else:  # a name the writer cannot make (no input reaches this since keys are UTF-8)
        real = sinks.safe_key

        def refuse(key):
            if key == "bad":
                raise ValueError("no tar name for this key")
            return real(key)

        monkeypatch.setattr(sinks, "safe_key", refuse)
    cfg = OutputConfig(url=str(tmp_path), format=fmt)
    [ack] = write_batch(encoded_batch(rows), cfg, STORAGE, "m", "h").to_pylist()
    assert (ack["rows"], ack["outputs"], ack["errors"]) == (4, 2, 1)
    assert json.loads(ack["error_reasons"]) == {"write:unwritable": 1}
    [err] = pq.read_table(tmp_path / "_staging" / "_errors").to_pylist()
    assert (err["key"], err["stage"], err["error"]) == ("bad", "write", "unwritable")
    assert err["message"].startswith("key 'bad' cannot be written as"), err
    if fmt == "parquet":
        assert sorted(pq.read_table(tmp_path / "_staging").column("key").to_pylist()) == ["a", "c"]
    else:
        with tarfile.open(tmp_path / "_staging" / ack["parts"][0]) as tar:
            assert sorted(n for n in tar.getnames() if n.endswith(".json")) == ["a.json", "c.json"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks, "write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_batch(encoded_batch(rows), cfg, STORAGE, "m", "h")


def test_folder_sink_writes_predicts_files_atomically_and_is_no_job_output_format(tmp_path):
    """#27: `depthray predict`'s folder is a sink of this family: `{key}.depth.png` is the
    encode stage's bytes, `{key}.preview.png` the row's preview, each written atomically (no
    temporary file left); a row the folder cannot hold is a `write` error row naming its key.
    A job cannot select it: no output.format makes `make_sink` return it."""
    from depthray.config import ConfigError, config_from_dict
    from depthray.io.sinks import FolderSink, make_sink, writable

    depth = encode_depth_png16(np.random.default_rng(0).random((6, 9), dtype=np.float32), "depth")
    rows = [{"source": "s", "key": "a", "depth": depth, "preview": b"PREVIEW-A"},
            {"source": "s", "key": "b", "depth": depth, "preview": None},
            {"source": "s", "key": "../c", "depth": depth, "preview": b"PREVIEW-C"}]
    sink = FolderSink(str(tmp_path / "out"), STORAGE)
    samples, failed = writable(sink, rows)
    assert [(r["key"], r["stage"], r["error"]) for r in failed] == [("b", "write", "unwritable"),
                                                                   ("../c", "write", "unwritable")]
    assert "no preview PNG" in failed[0]["message"] and "outside the output folder" in failed[1]["message"]
    assert sink.write_files(samples) == len(depth) + len(b"PREVIEW-A")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.depth.png", "a.preview.png"]
    assert (tmp_path / "out" / "a.depth.png").read_bytes() == depth
    assert not (tmp_path / "c.depth.png").exists()
    for fmt in ("parquet", "webdataset", "delta"):
        out = config_from_dict({"output": {"url": str(tmp_path / fmt), "format": fmt}}).output
        assert not isinstance(make_sink(out, STORAGE, "m", "h", run_id="r"), FolderSink), fmt
    for fmt in ("folder", "files", "images", "png"):
        with pytest.raises(ConfigError, match="output.format"):
            config_from_dict({"output": {"url": str(tmp_path), "format": fmt}})
