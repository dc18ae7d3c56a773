"""Outputs written before a change keep reading, and a job today writes what they hold.

tests/data/output-2026-12/ is a real job output (Parquet and WebDataset, one shard of three
PNGs and a file that is no image; the CPU test double, `quality.max_uncertainty_mean: 0.5`)
written by the code of 2026-12-05, before the rows' metadata became a typed struct between
stages (#27). Stock pyarrow/webdataset and depthray's readers open it; the same job run now
writes the same metadata, field by field, and the same depth."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from depthray.io.codecs import decode_depth_png16
from depthray.io.outputs import read_outputs
from depthray.io.tar_samples import tar_bytes
from depthray.job.driver import run_job
from tests.reliability.conftest import double_model, local_job_config

OLD = Path(__file__).parent / "data" / "output-2026-12"
KEYS = ["img0", "img1", "img2"]


def write_input(folder: Path) -> None:
    """The input the stored outputs were made from, byte for byte (/tmp/oldout/in then)."""
    files = []
    for i in range(3):
        y, x = np.mgrid[0:24, 0:32]
        arr = np.repeat(((x * 7 + y * (3 + i)) % 256).astype(np.uint8)[..., None], 3, axis=2)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        files.append((f"img{i}.png", buf.getvalue()))
    files.append(("broken.jpg", b"not an image"))
    folder.mkdir(parents=True)
    (folder / "s0.tar").write_bytes(tar_bytes(files))


def parquet_rows(out: Path) -> dict[str, dict]:
    return {r["key"]: {**r, "meta": json.loads(r["meta"])} for r in pq.read_table(out).to_pylist()}


def tar_samples(out: Path) -> dict[str, dict]:
    samples = {}
    for part in sorted(out.glob("[!_]*/**/*.tar")):
        with tarfile.open(part) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def comparable(meta: dict) -> dict:
    """The metadata without the input's folder (a temporary one each time)."""
    return {**meta, "source_url": meta["source_url"].rsplit("/", 1)[-1]}


def test_old_outputs_read_with_stock_and_depthray_readers(tmp_path):
    shutil.copytree(OLD, tmp_path / "old")
    rows = parquet_rows(tmp_path / "old" / "parquet")
    assert sorted(rows) == KEYS
    assert all(r["meta"]["output_space"] == "depth" and r["meta"]["quality"]["passed"] for r in rows.values())
    errors = pq.read_table(tmp_path / "old" / "parquet" / "_errors").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("broken", "decode")]
    for fmt in ("parquet", "webdataset"):
        records = {r.key: r for r in read_outputs(str(tmp_path / "old" / fmt))}
        assert sorted(records) == KEYS, fmt
        assert all(r.depth.shape == (24, 32) and r.meta["output_space"] == "depth" for r in records.values())
    assert sorted(json.loads(s["json"])["key"] for s in tar_samples(tmp_path / "old" / "webdataset").values()) == KEYS


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_a_job_today_writes_what_the_old_output_holds(tmp_path, fmt):
    write_input(tmp_path / "in")
    out = tmp_path / fmt
    run_job(local_job_config(str(tmp_path / "in"), str(out), double_model(), output={"format": fmt},
                             quality={"max_uncertainty_mean": 0.5}))
    if fmt == "parquet":
        old, new = parquet_rows(OLD / fmt), parquet_rows(out)
        assert sorted(new) == sorted(old) == KEYS
        for key in KEYS:
            assert comparable(new[key]["meta"]) == comparable(old[key]["meta"]), key
            diff = np.abs(decode_depth_png16(new[key]["depth"]) - decode_depth_png16(old[key]["depth"])).max()
            assert diff <= 1 / 65535, key
    else:
        old, new = tar_samples(OLD / fmt), tar_samples(out)
        assert sorted(new) == sorted(old)
        for key in old:
            assert sorted(new[key]) == sorted(old[key]), key  # the same members
            assert comparable(json.loads(new[key]["json"])) == comparable(json.loads(old[key]["json"])), key
