"""The code blocks of docs/training.md, run as written on outputs in the documented format."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests import output_fixtures as fx

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


@pytest.fixture(scope="module")
def doc_code():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 5, ("docs/training.md should hold the stock readers, the way back to the input "
                              "image, and the WebDataset, the Parquet and the Delta recipe")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


@pytest.fixture(scope="module")
def samples():
    return fx.make_samples(5, h=48, w=64)


def _check_pairs(batches, samples, keep):
    images = torch.cat([b[0] for b in batches])
    depths = torch.cat([b[1] for b in batches])
    assert images.shape == (len(keep), 3, 24, 32) and depths.shape == (len(keep), 1, 24, 32)
    assert images.dtype == depths.dtype == torch.float32
    # uint8 / 255 (the recipe's scaling, nothing clamps it): a wrong divisor leaves [0, 1]
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and float(images.max()) > 0.5
    # The depth of pair i is sample keep[i]'s stored depth (resized): pairs stay paired.
    for i, k in enumerate(keep):
        small = samples[k].pred.reshape(24, 2, 32, 2).mean(axis=(1, 3))
        assert float(np.corrcoef(depths[i, 0].numpy().ravel(), small.ravel())[0, 1]) > 0.9


def test_webdataset_recipe(tmp_path, samples, doc_code):
    out = fx.write_webdataset(tmp_path / "out", samples, include_image=True)
    # Mark one sample low confidence: the recipe must drop it.
    tar_path = next(out.glob("*.tar"))
    with tarfile.open(tar_path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tar_path, "w") as t:
        for m, data in members:
            if m.name == "img_002.json":
                data = json.dumps({**json.loads(data), "low_confidence": True}).encode()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    loader = doc_code["make_webdataset_loader"]([str(tar_path)], batch_size=2, num_workers=0, size=(24, 32))
    _check_pairs(list(loader), samples, keep=[0, 1, 3, 4])


def test_parquet_recipe(tmp_path, samples, doc_code):
    images = tmp_path / "images"
    images.mkdir()
    for s in samples:
        (images / f"{s.key}.jpg").write_bytes(fx.jpeg(s.rgb))
    out = fx.write_parquet(tmp_path / "out", samples, parts=2, image_dir=images)  # also _errors/, _manifest/
    ds = doc_code["ParquetDepthDataset"](str(out), size=(24, 32))
    assert len(ds) == 5
    order = [int(r["key"].split("_")[1]) for r in ds.rows]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)
    _check_pairs(list(loader), samples, keep=order)


def test_delta_recipe(tmp_path, samples, doc_code):
    """The Delta recipe on a table holding the Parquet recipe's rows: same pairs, low
    confidence dropped, pinned to the version it opened."""
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    images = tmp_path / "images"
    images.mkdir()
    for s in samples:
        (images / f"{s.key}.jpg").write_bytes(fx.jpeg(s.rgb))
    rows = pq.read_table(fx.write_parquet(tmp_path / "pq", samples, parts=2, image_dir=images))
    write_deltalake(str(tmp_path / "delta"), rows.slice(0, 3))
    write_deltalake(str(tmp_path / "delta"), rows.slice(3), mode="append")
    ds = doc_code["DeltaDepthDataset"](str(tmp_path / "delta"), size=(24, 32))
    assert len(ds) == 5 and ds.version == 1
    order = [int(r["key"].split("_")[1]) for r in ds.rows]
    _check_pairs(list(torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)), samples, keep=order)
    meta = json.loads(rows.column("meta")[2].as_py() or "{}")
    flagged = rows.set_column(rows.schema.get_field_index("meta"), "meta", pa.array(
        [json.dumps({**meta, "low_confidence": True}) if i == 2 else m for i, m in enumerate(rows.column("meta").to_pylist())]))
    write_deltalake(str(tmp_path / "delta"), flagged, mode="overwrite")
    assert len(doc_code["DeltaDepthDataset"](str(tmp_path / "delta"), size=(24, 32))) == 4
    with pytest.raises(ValueError, match="was asked for disparity"):
        doc_code["DeltaDepthDataset"](str(tmp_path / "delta"), size=(24, 32), space="disparity")


def test_recipes_refuse_a_disparity_label_when_asked_for_depth(tmp_path, samples, doc_code):
    """A Depth Anything output (meta.output_space: disparity, 1 = near) read by a depth loss
    would train on inverted targets: both recipes raise, naming the space, and load it when
    asked for disparity."""
    out = fx.write_webdataset(tmp_path / "wds", samples, output_space="disparity")
    tar = [str(next(out.glob("*.tar")))]
    with pytest.raises(ValueError, match="holds disparity"):
        list(doc_code["make_webdataset_loader"](tar, batch_size=2, num_workers=0, size=(24, 32)))
    _check_pairs(list(doc_code["make_webdataset_loader"](tar, batch_size=2, num_workers=0, size=(24, 32),
                                                         space="disparity")), samples, keep=[0, 1, 2, 3, 4])
    out = fx.write_parquet(tmp_path / "pq", samples, image_dir=None, output_space="disparity")
    with pytest.raises(ValueError, match="holds disparity"):
        doc_code["ParquetDepthDataset"](str(out), size=(24, 32))
    assert len(doc_code["ParquetDepthDataset"](str(out), size=(24, 32), space="disparity")) == 5
