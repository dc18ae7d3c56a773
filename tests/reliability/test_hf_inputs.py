"""Hugging Face `datasets` exports as inputs (#26 item 6), every file written by the real
`datasets` package: `cast_column(Image())` + `to_parquet` (null bytes, paths), embedded
bytes, path and URL string columns (local, relative, S3 through the job's storage
settings), `save_to_disk` folders (Dataset and DatasetDict), and a column of the wrong
type refused before Ray. Jobs run the stage chain locally with the test-double model."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from depthray.job.driver import run_job
from tests.reliability.conftest import REPO, assert_exactly_once, double_model, enc, local_job_config, noise_rgb, \
    read_outputs

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

pytestmark = pytest.mark.timeout(300)

rgb = functools.partial(noise_rgb, np.random.default_rng(26))


def write_images(folder: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """JPEG files of distinct sizes (16+4i wide, 20 high): a label's size tells which file
    was read. Returns {name: (width, height)}."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i, name in enumerate(names):
        (folder / name).write_bytes(enc(rgb(20, 16 + 4 * i), "JPEG"))
        sizes[name] = (16 + 4 * i, 20)
    return sizes


def labelled(out: Path) -> tuple[dict[tuple[str, str], dict], list[dict]]:
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    return {(r["source"], r["key"]): r for r in outs}, errors


def cli_run(tmp_path: Path, data: dict, capsys) -> tuple[int, str]:
    from depthray.cli import main as cli_main

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": double_model(), "compute": {"executor": "local"},
                                      "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}}, **data}))
    capsys.readouterr()
    rc = cli_main(["run", str(config)])
    return rc, capsys.readouterr().err


def test_image_cast_parquet_with_null_bytes_reads_each_path(tmp_path, monkeypatch, capsys):
    """(a) through `depthray run`: `cast_column("image", Image())` + `to_parquet` run in the
    images' folder writes {bytes: null, path: "imgs/k.jpg"}; every image is labelled from
    the file next to the Parquet file (not from the folder the job runs in), with
    `meta.source_url`, exit 0. It used to be "image column is empty" for every row."""
    data = tmp_path / "data"
    sizes = write_images(data / "imgs", ["cat.jpg", "dog.jpg", "owl.jpg"])
    monkeypatch.chdir(data)
    ds = datasets.Dataset.from_dict({"image": [f"imgs/{n}" for n in sizes], "caption": ["c", "d", "o"]})
    ds.cast_column("image", datasets.Image()).to_parquet("train.parquet")
    cell = pq.read_table(data / "train.parquet").column("image")[0].as_py()
    assert cell == {"bytes": None, "path": "imgs/cat.jpg"}  # the export this test is about
    (tmp_path / "elsewhere" / "imgs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")  # a relative path read against the cwd finds nothing
    rc, err = cli_run(tmp_path, {"input": {"url": str(data / "train.parquet"), "keep_columns": ["caption"]},
                                 "output": {"url": str(tmp_path / "out")}}, capsys)
    assert rc == 0, err
    rows, errors = labelled(tmp_path / "out")
    assert_exactly_once({"train": {"imgs/cat", "imgs/dog", "imgs/owl"}}, list(rows.values()), errors)
    assert not errors
    for name, (w, h) in sizes.items():
        row = rows[("train", f"imgs/{name[:-4]}")]
        assert (row["width"], row["height"]) == (w, h)
        assert row["meta"]["source_url"] == f"file://{data}/imgs/{name}"
        assert row["meta"]["source_path"] == f"imgs/{name}"
    assert rows[("train", "imgs/dog")]["meta"]["columns"] == {"caption": "d"}


def test_paths_relative_to_another_folder_need_image_root(tmp_path, monkeypatch):
    """A Parquet file exported into another folder than the images' (`to_parquet("export/
    x.parquet")` run beside `imgs/`): each path is a `read` error row naming the file it
    looked for, never a silent skip; `input.image_root` names the folder they are relative to."""
    data = tmp_path / "data"
    sizes = write_images(data / "imgs", ["a.jpg", "b.jpg"])
    monkeypatch.chdir(data)
    ds = datasets.Dataset.from_dict({"image": [f"imgs/{n}" for n in sizes]}).cast_column("image", datasets.Image())
    ds.to_parquet("export/x.parquet")
    summary = run_job(local_job_config(str(data / "export"), str(tmp_path / "out"), double_model()))
    rows, errors = labelled(tmp_path / "out")
    assert summary["shards_complete"] == 1 and not rows
    assert {(e["key"], e["stage"], e["error"]) for e in errors} == {("imgs/a", "read", "missing_image"),
                                                                     ("imgs/b", "read", "missing_image")}
    assert all(f"file://{data}/export/imgs/{e['key'][5:]}.jpg" in e["message"] for e in errors), errors
    run_job(local_job_config(str(data / "export"), str(tmp_path / "out2"), double_model(),
                             input={"image_root": str(data)}))
    rows, errors = labelled(tmp_path / "out2")
    assert not errors and {k: (r["width"], r["height"]) for (_, k), r in rows.items()} == \
        {"imgs/a": sizes["a.jpg"], "imgs/b": sizes["b.jpg"]}


def test_embedded_bytes_are_read_not_the_path(tmp_path, monkeypatch):
    """(b) Parquet as `push_to_hub` writes it (bytes embedded, the path a bare file name):
    the bytes are labelled, the files they came from may be long gone."""
    data = tmp_path / "data"
    sizes = write_images(data, ["p.jpg", "q.jpg"])
    monkeypatch.chdir(data)
    from datasets.table import embed_table_storage

    ds = datasets.Dataset.from_dict({"image": list(sizes)}).cast_column("image", datasets.Image())
    ds = ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    ds.to_parquet(str(tmp_path / "in" / "hub.parquet"))
    for name in sizes:
        (data / name).unlink()
    assert pq.read_table(tmp_path / "in" / "hub.parquet").column("image")[0].as_py()["bytes"]
    run_job(local_job_config(str(tmp_path / "in"), str(tmp_path / "out"), double_model()))
    rows, errors = labelled(tmp_path / "out")
    assert not errors and {k: (r["width"], r["height"]) for (_, k), r in rows.items()} == \
        {"p": sizes["p.jpg"], "q": sizes["q.jpg"]}
    assert "source_url" not in rows[("hub", "p")]["meta"] and rows[("hub", "p")]["meta"]["source_path"] == "p.jpg"


def test_string_columns_of_paths_and_s3_urls(tmp_path, monkeypatch, s3_bucket, s3_endpoint):
    """(c, d) A column of plain strings (was one `corrupt_shard` TypeError per file):
    absolute paths, paths relative to the Parquet file's folder, and `s3://` URLs read with
    the job's `storage.endpoint_url` (AWS_ENDPOINT_URL unset). A missing file, a missing
    object and a file that is no image are one error row each, naming them; the others
    are labelled."""
    inp, elsewhere = tmp_path / "in", tmp_path / "photos"
    rel = write_images(inp / "imgs", ["r0.jpg", "r1.jpg"])
    absolute = write_images(elsewhere, ["a0.jpg", "a1.jpg", "a2.jpg"])
    s3 = write_images(tmp_path / "s3", ["s0.jpg", "s1.jpg"])
    fs3 = fsspec.filesystem("s3")
    for name in s3:
        fs3.pipe_file(f"{s3_bucket}/pics/{name}", (tmp_path / "s3" / name).read_bytes())
    (elsewhere / "a1.jpg").unlink()  # missing among them
    (inp / "imgs" / "broken.jpg").write_bytes(b"not an image")
    tables = {"abs": [str(elsewhere / n) for n in absolute], "rel": [f"imgs/{n}" for n in [*rel, "broken.jpg"]],
              "remote": [f"s3://{s3_bucket}/pics/{n}" for n in s3] + [f"s3://{s3_bucket}/pics/gone.jpg"]}
    for name, paths in tables.items():
        datasets.Dataset.from_dict({"image": paths}).to_parquet(str(inp / f"{name}.parquet"))
    assert pq.read_schema(inp / "rel.parquet").field("image").type == "string"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    summary = run_job(local_job_config(str(inp / "*.parquet"), str(tmp_path / "out"), double_model(),
                                       storage={"endpoint_url": s3_endpoint, "retries": 1}))
    rows, errors = labelled(tmp_path / "out")
    expected = {"abs": {str(elsewhere / n)[1:-4] for n in absolute}, "rel": {"imgs/r0", "imgs/r1", "imgs/broken"},
                "remote": {f"{s3_bucket}/pics/{n[:-4]}" for n in s3} | {f"{s3_bucket}/pics/gone"}}
    assert_exactly_once(expected, list(rows.values()), errors)
    assert summary["shards_complete"] == 3 and summary["errors"] == 3
    by_key = {e["key"]: e for e in errors}
    missing = by_key[str(elsewhere / "a1")[1:]]
    assert (missing["stage"], missing["error"]) == ("read", "missing_image")
    assert f"file://{elsewhere}/a1.jpg" in missing["message"]
    assert f"s3://{s3_bucket}/pics/gone.jpg" in by_key[f"{s3_bucket}/pics/gone"]["message"]
    broken = by_key["imgs/broken"]
    assert (broken["stage"], broken["error"]) == ("decode", "not_an_image")
    assert broken["message"].startswith(f"file://{inp}/imgs/broken.jpg: "), broken
    sizes = {"abs": absolute, "rel": rel, "remote": s3}
    urls = {"abs": f"file://{elsewhere}/", "rel": f"file://{inp}/imgs/", "remote": f"s3://{s3_bucket}/pics/"}
    for (shard, key), row in rows.items():
        name = key.rsplit("/", 1)[-1] + ".jpg"
        assert (row["width"], row["height"]) == sizes[shard][name]
        assert row["meta"]["source_url"] == urls[shard] + name


def test_save_to_disk_folders_are_shards_named_stably_and_resume(tmp_path, monkeypatch):
    """(e) `save_to_disk` folders (Arrow IPC streams + state.json): a Dataset in two files,
    a DatasetDict's splits; shards named by file (and split); a `cache-*.arrow` that
    `.map()` leaves beside them is no shard; a re-run redoes nothing."""
    src = tmp_path / "src"
    sizes = write_images(src, [f"{i}.jpg" for i in range(3)])
    monkeypatch.chdir(src)
    ds = datasets.Dataset.from_dict({"image": list(sizes), "n": [0, 1, 2]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    datasets.load_from_disk(str(tmp_path / "saved")).map(lambda x: {"m": 1})
    assert list((tmp_path / "saved").glob("cache-*.arrow"))  # the stray file this test is about
    datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    for name in sizes:
        (src / name).unlink()  # save_to_disk embedded the bytes
    cases = {"saved": {"data-00000-of-00002": {"0", "1"}, "data-00001-of-00002": {"2"}},
             "dd": {"train/data-00000-of-00001": {"0", "1"}, "test/data-00000-of-00001": {"2"}}}
    for folder, expected in cases.items():
        cfg = local_job_config(str(tmp_path / folder), str(tmp_path / f"out-{folder}"), double_model(),
                               input={"keep_columns": ["n"]})
        first = run_job(cfg)
        assert (first["shards_complete"], first["images"], first["errors"]) == (2, 3, 0), first
        rows, errors = labelled(tmp_path / f"out-{folder}")
        assert_exactly_once(expected, list(rows.values()), errors)
        for (_, key), row in rows.items():
            assert (row["width"], row["height"]) == sizes[f"{key}.jpg"] and row["meta"]["columns"] == {"n": int(key)}
        again = run_job(cfg)
        assert (again["shards_skipped"], again["shards_complete"], again["images"]) == (2, 0, 0), again


@pytest.mark.parametrize("column", ["int", "list"])
def test_a_column_of_another_type_is_refused_before_ray(tmp_path, capsys, column):
    """(f) An image column of ints or lists (`datasets` wrote it) is exit 2 naming the
    column, its type and what is read, before Ray starts and before anything is written:
    the int case through `python -m depthray run`, the list case through the CLI in-process."""
    (tmp_path / "in").mkdir()
    values = [1, 2] if column == "int" else [["a.jpg"], ["b.jpg"]]
    datasets.Dataset.from_dict({"image": values}).to_parquet(str(tmp_path / "in" / "x.parquet"))
    data = {"input": {"url": str(tmp_path / "in")}, "output": {"url": str(tmp_path / "out")}}
    if column == "list":
        rc, err = cli_run(tmp_path, data, capsys)
        typename = "list<element: string>"
    else:
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({**data, "model": double_model()}))  # executor: ray
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        env.pop("RAY_ADDRESS", None)
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "depthray", "run", str(config)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        rc, err = done.returncode, done.stderr
        assert time.monotonic() - start < 60 and "Starting execution" not in done.stdout + err
        typename = "int64"
    assert rc == 2, err
    assert f"input.image_column 'image' in file://{tmp_path}/in/x.parquet is of type {typename}" in err, err
    assert "a struct with bytes/path fields" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "_manifest").exists()
