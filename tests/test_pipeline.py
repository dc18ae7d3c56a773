"""The real job against a real S3 protocol server (moto), with the tiny random-weight
Marigold: both input kinds, both output formats, errors, resume. The first test is the job
on a local Ray (2 CPUs); the others are about what inputs and formats become, so they run
the same stage chain in this process (`compute.executor: local`)."""

from __future__ import annotations

import io
import json
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from depthray.config import ConfigError, config_from_dict
from depthray.job.driver import run_job

pytestmark = pytest.mark.timeout(300)


def job_config(tiny_model_dir, input_url, output_url, executor="ray", **sections):
    data = {
        "input": {"url": input_url},
        "output": {"url": output_url},
        "model": {"path": str(tiny_model_dir), "processing_resolution": 64},
        "inference": {"ensemble_size": 2},
        "compute": {"images_per_batch": 4, "executor": executor},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data, require_io=True)


def errors_of(fs, out):
    fs.invalidate_cache()
    if not fs.exists(f"{out}/_errors"):
        return []
    return pq.read_table(f"{out}/_errors", filesystem=fs).to_pylist()


def assert_exactly_once(expected: dict[str, set[str]], output_keys, error_keys):
    """Every (shard, key) of the input appears once across outputs and errors, nothing else."""
    seen = Counter(output_keys) + Counter(error_keys)
    dupes = {k: n for k, n in seen.items() if n > 1}
    assert not dupes, f"duplicated: {dupes}"
    want = {(s, k) for s, keys in expected.items() for k in keys}
    assert set(seen) == want


def test_webdataset_from_s3_to_parquet_with_errors_and_resume(ray_session, s3_bucket, tiny_model_dir,
                                                             make_image, make_tar):
    fs = fsspec.filesystem("s3")
    sizes = [(48, 64), (64, 48), (40, 72), (56, 56)]
    expected: dict[str, set[str]] = {}
    shapes = {}
    for s in range(3):
        members = []
        for i, (h, w) in enumerate(sizes):
            key = f"s{s}_{i}"
            members.append((f"{key}.jpg", make_image(h, w, seed=10 * s + i)))
            shapes[key] = (h, w)
        if s == 1:
            members.append(("s1_bad.jpg", b"\xff\xd8 not really a jpeg"))
            members.append(("s1_noimg.txt", b"caption only"))
        fs.pipe_file(f"{s3_bucket}/in/{s:05d}.tar", make_tar(members))
        expected[f"{s:05d}"] = {name.split(".")[0] for name, _ in members}
    out = f"s3://{s3_bucket}/out"
    cfg = job_config(tiny_model_dir, f"s3://{s3_bucket}/in/{{00000..00002}}.tar", out,
                     output={"format": "parquet", "rows_per_part": 3})

    summary = run_job(cfg)
    assert (summary["shards_complete"], summary["shards_unfinished"]) == (3, {})
    assert (summary["images"], summary["errors"]) == (12, 2)

    table = pq.read_table(f"{s3_bucket}/out", filesystem=fs)  # plain pyarrow, no depthray
    rows = table.to_pylist()
    for r in rows:
        depth = np.asarray(Image.open(io.BytesIO(r["depth"])))
        assert depth.dtype == np.uint16 and depth.shape == shapes[r["key"]] == (r["height"], r["width"])
        assert np.asarray(Image.open(io.BytesIO(r["uncertainty"]))).shape == depth.shape
        assert r["ensemble_size"] == 2 and r["num_views"] >= 1 and r["config_hash"] == cfg.hash()
    errors = errors_of(fs, f"{s3_bucket}/out")
    by_key = {e["key"]: e for e in errors}
    assert (by_key["s1_bad"]["stage"], by_key["s1_bad"]["source"]) == ("decode", "00001")
    assert by_key["s1_noimg"]["error"] == "no_image"
    assert_exactly_once(expected, [(r["source"], r["key"]) for r in rows],
                        [(e["source"], e["key"]) for e in errors])

    manifests = {s: json.loads(fs.cat_file(f"{s3_bucket}/out/_manifest/{s:05d}.json")) for s in range(3)}
    m1 = manifests[1]
    assert (m1["status"], m1["inputs"], m1["outputs"], m1["errors"]) == ("complete", 6, 4, 2)
    assert len(m1["parts"]) >= 2  # rows_per_part=3: the shard was written as several parts
    for p in [*m1["parts"], *m1["error_parts"]]:
        assert fs.exists(f"{s3_bucket}/out/{p}")

    # Crash simulation: shard 00001 lost its manifest (the commit) but its parts remain.
    fs.rm_file(f"{s3_bucket}/out/_manifest/00001.json")
    from depthray.status import job_status

    st = job_status(cfg)  # read over S3: manifests fetched with one concurrent cat
    assert (st["shards_complete"], st["shards_todo"], st["images"], st["errors"]) == (2, ["00001"], 8, 0)
    assert st["last_run"]["run_id"] == summary["run_id"] and st["shards_other_config"] == {}
    other = job_config(tiny_model_dir, cfg.input.url, out, output={"format": "parquet"},
                       inference={"ensemble_size": 3})
    assert job_status(other)["shards_other_config"] == {cfg.hash(): 2}
    again = run_job(cfg)
    fs.invalidate_cache()  # this process listed the bucket before the re-run rewrote it
    assert (again["shards_skipped"], again["shards_complete"]) == (2, 1)
    assert again["images"] == 4 and again["leftover_files_deleted"] == len(m1["parts"]) + len(m1["error_parts"])
    redone = json.loads(fs.cat_file(f"{s3_bucket}/out/_manifest/00001.json"))
    assert redone["run_id"] == again["run_id"] != m1["run_id"]
    untouched = json.loads(fs.cat_file(f"{s3_bucket}/out/_manifest/00000.json"))
    assert untouched["run_id"] == summary["run_id"]
    rows = pq.read_table(f"{s3_bucket}/out", filesystem=fs, columns=["source", "key"]).to_pylist()
    errors = errors_of(fs, f"{s3_bucket}/out")
    assert_exactly_once(expected, [(r["source"], r["key"]) for r in rows],
                        [(e["source"], e["key"]) for e in errors])

    # Nothing left to do: a third run skips everything without starting the graph.
    third = run_job(cfg)
    assert (third["shards_skipped"], third["images"], third["actors"]) == (3, 0, 0)


def test_parquet_from_s3_to_webdataset_with_passthrough(s3_bucket, tiny_model_dir, tmp_path,
                                                       make_image):
    import webdataset as wds

    fs = fsspec.filesystem("s3")
    expected, inputs = {}, {}
    for s in range(2):
        ids = [f"p{s}/{i}.x" for i in range(3)]  # keys are data: slashes and dots allowed
        imgs = [make_image(40 + 8 * i, 64, seed=100 + 10 * s + i, fmt="PNG") for i in range(3)]
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": ids, "image": imgs}), buf)
        fs.pipe_file(f"{s3_bucket}/pq/part-{s}.parquet", buf.getvalue().to_pybytes())
        expected[f"part-{s}"] = set(ids)
        inputs.update(zip(ids, imgs))
    cfg = job_config(tiny_model_dir, f"s3://{s3_bucket}/pq/*.parquet", f"s3://{s3_bucket}/wds",
                     executor="local", input={"key_column": "id"},
                     output={"format": "webdataset", "include_image": True})
    summary = run_job(cfg)
    assert (summary["shards_complete"], summary["images"], summary["errors"]) == (2, 6, 0)

    seen = []
    for part in fs.glob(f"{s3_bucket}/wds/*.parts/*.tar"):  # one folder per shard
        local = tmp_path / part.rsplit("/", 1)[-1]
        fs.get_file(part, str(local))
        for sample in wds.WebDataset(str(local), shardshuffle=False):  # plain webdataset
            meta = json.loads(sample["json"])
            depth = np.asarray(Image.open(io.BytesIO(sample["depth.png"])))
            h = 40 + 8 * int(meta["key"].split("/")[1].split(".")[0])
            assert depth.shape == (h, 64) == (meta["height"], meta["width"])
            assert sample["png"] == inputs[meta["key"]]  # input passed through unchanged
            seen.append((meta["source"], meta["key"]))
    assert_exactly_once(expected, seen, [])


def test_image_folders_local_with_odd_images(tmp_path, tiny_model_dir):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # display rotated: 60 high, 40 wide
    rotated.save(root / "a" / "rotated.jpg", exif=exif)
    Image.fromarray(rgb).convert("L").save(root / "a" / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "b" / "rgba.png")
    (root / "b" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "depth"
    summary = run_job(job_config(tiny_model_dir, str(root), str(out), executor="local"))
    assert (summary["shards_complete"], summary["images"], summary["errors"]) == (2, 3, 1)
    rows = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert (rows["rotated"]["height"], rows["rotated"]["width"]) == (60, 40)
    assert json.loads(rows["rotated"]["meta"])["exif_orientation"] == 6
    assert np.asarray(Image.open(io.BytesIO(rows["gray"]["depth"]))).shape == (40, 60)
    errors = pq.read_table(out / "_errors").to_pylist()
    # shard names: folder relative to the root + chunk (#18 items 6-7; was "b")
    assert [(e["source"], e["key"], e["error"]) for e in errors] == [("b/chunk-00000", "empty", "empty")]


def test_output_inside_input_is_refused_before_any_work(tmp_path, tiny_model_dir, make_image):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(make_image(16, 16))
    with pytest.raises(ConfigError, match="overlaps input.url"):
        run_job(job_config(tiny_model_dir, str(tmp_path / "imgs"), str(tmp_path / "imgs" / "depth")))
    # A glob over shard files may share a parent folder with the outputs.
    from depthray.io.sources import list_shards
    from depthray.job.checks import check_paths

    (tmp_path / "imgs" / "000.tar").write_bytes(b"")
    cfg = job_config(tiny_model_dir, str(tmp_path / "imgs" / "*.tar"), str(tmp_path / "imgs" / "depth"))
    check_paths(cfg, list_shards(cfg.input, cfg.storage))
