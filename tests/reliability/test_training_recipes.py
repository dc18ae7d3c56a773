"""The recipes of docs/training.md, run as written on outputs a real job wrote (#18 item 11):
every input extension, an EXIF-rotated photo, and the S3 recipe on the moto server."""

from __future__ import annotations

import glob
import io
import json
import os
import re
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from depthray.job.driver import run_job
from tests.reliability.conftest import double_model, local_job_config

pytestmark = pytest.mark.timeout(300)

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


@pytest.fixture(scope="module")
def doc_code():
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth, asymmetric content: a pairing or orientation mistake shows as low correlation."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    v = 0.6 * x / w + 0.4 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 * h * w))
    return np.repeat((v / v.max() * 255).astype(np.uint8)[..., None], 3, axis=2)


def write_inputs(fs, root: str) -> set[str]:
    files = {}
    for i, (fmt, ext) in enumerate([("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")]):
        buf = io.BytesIO()
        Image.fromarray(scene(48, 64, i)).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        files[f"img_{ext}.{ext}"] = buf.getvalue()
    rotated = Image.fromarray(scene(48, 64, 9))
    exif = rotated.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", quality=95, exif=exif)
    files["rotated.jpg"] = buf.getvalue()
    fs.makedirs(root, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)
    return {n.rsplit(".", 1)[0] for n in files}


def check_pairs(pairs) -> None:
    for image, depth in pairs:
        gray = image.mean(dim=0).numpy().ravel()
        assert float(np.corrcoef(gray, depth[0].numpy().ravel())[0, 1]) > 0.9


def test_recipes_on_job_outputs_every_extension(tmp_path, doc_code):
    fs = fsspec.filesystem("file")
    keys = write_inputs(fs, str(tmp_path / "in"))
    wds_out, pq_out = tmp_path / "wds", tmp_path / "pq"
    run_job(local_job_config(str(tmp_path / "in"), str(wds_out), double_model(),
                             output={"format": "webdataset", "include_image": True}))
    run_job(local_job_config(str(tmp_path / "in"), str(pq_out), double_model()))
    tars = sorted(str(p) for p in wds_out.rglob("*.tar") if "_" not in p.relative_to(wds_out).parts[0][:1])
    loader = doc_code["make_webdataset_loader"](tars, batch_size=1, num_workers=0, size=(24, 32))
    pairs = [(im[0], d[0]) for im, d in loader]
    assert len(pairs) == len(keys)
    check_pairs(pairs)
    ds = doc_code["ParquetDepthDataset"](str(pq_out), size=(24, 32))
    assert sorted(r["key"] for r in ds.rows) == sorted(keys)
    check_pairs(ds[i] for i in range(len(ds)))


def test_parquet_recipe_on_s3_as_documented(s3_bucket, doc_code):
    """The documented S3 call: `ParquetDepthDataset("s3://bucket/depth/", filesystem=s3fs.S3FileSystem())`."""
    import s3fs

    fs = fsspec.filesystem("s3")
    keys = write_inputs(fs, f"{s3_bucket}/images")
    run_job(local_job_config(f"s3://{s3_bucket}/images", f"s3://{s3_bucket}/depth", double_model()))
    ds = doc_code["ParquetDepthDataset"](f"s3://{s3_bucket}/depth/", filesystem=s3fs.S3FileSystem(), size=(24, 32))
    assert sorted(r["key"] for r in ds.rows) == sorted(keys)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, num_workers=0)
    assert sum(b[0].shape[0] for b in loader) == len(keys)
    check_pairs(ds[i] for i in range(len(ds)))


def test_delta_recipe_and_depthray_reader_on_s3(s3_bucket, doc_code):
    """A job with `output.format: delta` on the moto server, read by the documented recipe
    (`DeltaDepthDataset(url, storage_options=...)`) and by depthray's own reader
    (preview / eval's `read_outputs`): every key once, pairs in their orientation."""
    from depthray.io.outputs import read_outputs

    fs = fsspec.filesystem("s3")
    keys = write_inputs(fs, f"{s3_bucket}/images")
    url = f"s3://{s3_bucket}/depth"
    run_job(local_job_config(f"s3://{s3_bucket}/images", url, double_model(), output={"format": "delta"}))
    options = {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true",
               "AWS_REGION": "us-east-1"}
    ds = doc_code["DeltaDepthDataset"](url, storage_options=options, size=(24, 32))
    assert sorted(r["key"] for r in ds.rows) == sorted(keys)
    check_pairs(ds[i] for i in range(len(ds)))
    records = list(read_outputs(url))
    assert sorted(r.key for r in records) == sorted(keys)
    assert all(r.depth.shape in ((48, 64), (64, 48)) and r.uncertainty is not None for r in records)


# ------------------------------------------------ every input format, back to its image (#26 item 7)


def write_input_formats(root: Path) -> dict[str, str]:
    """The same five images as a folder, an uncompressed tar (members in a sub-folder, so the
    member name is no key), a gzipped tar, a Parquet file of bytes, and as `datasets` writes
    them (paths in a Parquet file, bytes in a save_to_disk folder): format -> input URL."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from depthray.io.tar_samples import tar_bytes

    fs = fsspec.filesystem("file")
    folder = root / "folder"
    write_inputs(fs, str(folder))
    files = sorted(folder.iterdir())
    (root / "tar").mkdir()
    (root / "tar" / "s0.tar").write_bytes(tar_bytes((f"photos/{p.name}", p.read_bytes()) for p in files))
    (root / "tgz").mkdir()
    (root / "tgz" / "s0.tar.gz").write_bytes(gzip.compress((root / "tar" / "s0.tar").read_bytes()))
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"key": [p.stem for p in files], "image": [p.read_bytes() for p in files]}),
                   root / "parquet" / "p0.parquet", row_group_size=2)  # rows in several groups
    import datasets

    as_struct = datasets.Dataset.from_dict({"image": [str(p) for p in files]}).cast_column("image", datasets.Image())
    as_struct.to_parquet(str(root / "hf_paths.parquet"))  # {bytes: null, path} structs: images read by path
    embedded = datasets.Dataset.from_dict({"key": [p.stem for p in files], "image": [p.read_bytes() for p in files]})
    embedded.save_to_disk(str(root / "hf_disk"))  # Arrow IPC stream files, bytes inside
    return {"folder": str(folder), "tar": str(root / "tar"), "tgz": str(root / "tgz"),
            "parquet": str(root / "parquet"), "hf_paths": str(root / "hf_paths.parquet"),
            "hf_disk": str(root / "hf_disk")}


@pytest.mark.parametrize("input_format", ["folder", "tar", "tgz", "parquet", "hf_paths", "hf_disk"])
def test_recipes_lead_back_to_the_input_image_of_every_input_format(tmp_path, doc_code, input_format):
    """The documented recipes, as written, on Parquet and WebDataset outputs (the latter
    without the image passed through) of folder, tar, gzipped-tar and Parquet inputs: each
    label finds its own image through `read_input_image` (a wrong member, offset or row shows
    as low correlation), and a tar member's offset is a range read of exactly its bytes.
    Also Hugging Face exports: a Parquet file of {bytes: null, path} structs and a
    `save_to_disk` folder."""
    url = write_input_formats(tmp_path / "in")[input_format]
    keys = {p.stem for p in (tmp_path / "in" / "folder").iterdir()}
    pq_out, wds_out = tmp_path / "pq", tmp_path / "wds"
    run_job(local_job_config(url, str(pq_out), double_model()))
    run_job(local_job_config(url, str(wds_out), double_model(), output={"format": "webdataset"}))

    ds = doc_code["ParquetDepthDataset"](str(pq_out), size=(24, 32))
    assert sorted(r["key"].rsplit("/", 1)[-1] for r in ds.rows) == sorted(keys)
    check_pairs(ds[i] for i in range(len(ds)))
    originals = {p.stem: p.read_bytes() for p in (tmp_path / "in" / "folder").iterdir()}
    for row in ds.rows:
        assert doc_code["read_input_image"](row["meta"]) == originals[row["key"].rsplit("/", 1)[-1]]
        if input_format == "tar":
            assert row["meta"]["source_member"].startswith("photos/") and "source_offset" in row["meta"]
        if input_format == "tgz":
            assert "source_offset" not in row["meta"]  # offsets of a gzipped stream mean nothing

    tars = sorted(glob.glob(f"{wds_out}/[!_]*/**/*.tar", recursive=True))
    loader = doc_code["make_webdataset_loader"](tars, batch_size=1, num_workers=0, size=(24, 32))
    pairs = [(im[0], d[0]) for im, d in loader]
    assert len(pairs) == len(keys)
    check_pairs(pairs)


def test_stock_readers_open_outputs_as_they_are(tmp_path, make_image, doc_code):
    """docs/training.md's one line per reader (pyarrow, datasets, DuckDB, polars; webdataset
    and datasets on a WebDataset output), on
    an output a killed run left: each sees exactly the committed shards' labels, never the
    staged parts of the shard whose commit the kill cut off, never an error row; the errors
    read apart."""
    from tests.reliability import crash_harness as ch

    expected = ch.inputs(tmp_path, make_image)
    for fmt in ("parquet", "webdataset"):
        out = tmp_path / f"out-{fmt}"
        config = ch.job(tmp_path, str(out), fmt=fmt, name=fmt)
        rc = ch.run_killed(config, tmp_path / f"{fmt}.log", {"DEPTHRAY_CRASH_AT": "commit_start:3"})
        assert rc == -9, (tmp_path / f"{fmt}.log").read_text()[-2000:]
        committed = sorted(p.stem for p in (out / "_manifest").glob("*.json"))
        staged = [p for p in (out / "_staging").rglob("*.part-*") if p.is_file()]
        assert len(committed) == 2 and staged, (committed, staged)  # a shard in flight: the hard case
        bad = {k for s in committed for k in expected[s] if k.endswith("bad")}
        assert bad, "the committed shards hold an error row"
        want = sorted(k for s in committed for k in expected[s] if k not in bad)

        seen = doc_code["open_with_stock_readers"](str(out), fmt)
        errors = seen.pop("errors")
        assert sorted(errors.column("key").to_pylist()) == sorted(bad)
        for reader, rows in seen.items():
            if reader == "errors_duckdb":
                assert sorted(rows.column("key").to_pylist()) == sorted(bad)
            elif reader == "webdataset":
                assert sorted(json.loads(s["json"])["key"] for s in rows) == want, reader
            elif fmt == "webdataset":  # datasets' webdataset builder: the JSON member per sample
                assert sorted(r["key"] for r in rows["json"]) == want, reader
            else:
                got = rows["key"].to_list() if hasattr(rows["key"], "to_list") else rows["key"]
                got = got.to_pylist() if hasattr(got, "to_pylist") else got
                assert sorted(got) == want, reader
