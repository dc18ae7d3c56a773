"""#26 item 1: a sample that cannot be written is an error row naming its key, never an
aborted dataset. Each case below used to fail its write (or read) task, so Ray Data ended
the dataset and every shard stayed unfinished on every re-run. Real jobs, real files: a
Parquet kept column Arrow cannot hold, tar members and files whose names are not UTF-8."""

from __future__ import annotations

import functools
import io
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from depthray.job.driver import run_job
from tests.reliability.conftest import (
    assert_exactly_once,
    double_model,
    enc,
    job_config,
    noise_rgb,
    read_outputs,
)

pytestmark = pytest.mark.timeout(300)

RNG = np.random.default_rng(26)

rgb = functools.partial(noise_rgb, RNG)  # rgb(h, w): noise images, this module's stream

KEYS = ["a", "b", "c", "d", "e"]


def odd_columns_parquet(path: Path) -> None:
    """A Spark-style export: `tags` a map<int64, string> (JSON turns an entry into [1, "x"],
    a list Arrow cannot type), `phash` a uint64 (2**64-1 overflows Arrow's int64 inference).
    Row b's tags and row d's phash are the unwritable values; every other value is fine."""
    pq.write_table(pa.table({
        "key": KEYS,
        "image": [enc(rgb(16, 16), "PNG") for _ in KEYS],
        "tags": pa.array([[], [(1, "outdoor")], None, [], []], type=pa.map_(pa.int64(), pa.string())),
        "phash": pa.array([0, 7, 3, 2**64 - 1, 42], type=pa.uint64()),
    }), path)


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file a re-run could change, outside `_jobs/` (its summaries and lease are per run)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "_jobs"}


def assert_rerun_changes_nothing(cfg, out: Path) -> None:
    before = snapshot(out)
    again = run_job(cfg)
    assert (again["shards_skipped"], again["shards_complete"], again["images"], again["errors"]) == (1, 0, 0, 0)
    assert snapshot(out) == before


def written(out: Path, fmt: str) -> tuple[list[dict], list[dict]]:
    """(output rows with their `phash`, error rows); a Delta output read as its table."""
    if fmt == "delta":
        from deltalake import DeltaTable

        rows = DeltaTable(str(out)).to_pyarrow_table(columns=["source", "key", "phash"]).to_pylist()
        return rows, pq.read_table(out / "_errors").to_pylist()
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out), "parquet")
    phash = dict(zip(*pq.read_table(out, columns=["key", "phash"]).to_pydict().values()))
    return [{**r, "phash": phash[r["key"]]} for r in outs], errors


def check_kept_column_job(cfg, out: Path) -> None:
    summary = run_job(cfg)
    assert summary["shards_unfinished"] == {}, summary
    assert (summary["shards_complete"], summary["images"], summary["errors"]) == (1, 3, 2), summary
    assert summary["error_reasons"] == {"write:unwritable": 2}
    assert (out / "_manifest" / "odd.json").exists()
    outs, errors = written(out, cfg.output.format)
    assert_exactly_once({"odd": set(KEYS)}, outs, errors)
    by_key = {e["key"]: e for e in errors}
    assert {(k, e["source"], e["stage"], e["error"]) for k, e in by_key.items()} == {
        ("b", "odd", "write", "unwritable"), ("d", "odd", "write", "unwritable")}
    assert "'b'" in by_key["b"]["message"] and "'tags'" in by_key["b"]["message"], by_key["b"]
    assert "'d'" in by_key["d"]["message"] and "'phash'" in by_key["d"]["message"], by_key["d"]
    assert {r["key"]: r["phash"] for r in outs} == {"a": 0, "c": 3, "e": 42}  # the others keep their columns
    assert_rerun_changes_nothing(cfg, out)


@pytest.mark.parametrize("output_format", ["parquet", "delta"])
def test_an_unwritable_kept_column_value_is_an_error_row_not_an_aborted_job(tmp_path, output_format):
    (tmp_path / "in").mkdir()
    odd_columns_parquet(tmp_path / "in" / "odd.parquet")
    out = tmp_path / "out"
    check_kept_column_job(job_config(str(tmp_path / "in" / "*.parquet"), str(out), double_model(), executor="local",
                                     input={"keep_columns": ["tags", "phash"]}, output={"format": output_format}),
                          out)


def test_an_unwritable_kept_column_value_on_ray(ray_session, tmp_path):
    """The same through Ray Data: the write task finishes, so the dataset is not ended."""
    (tmp_path / "in").mkdir()
    odd_columns_parquet(tmp_path / "in" / "odd.parquet")
    out = tmp_path / "out"
    check_kept_column_job(job_config(str(tmp_path / "in" / "*.parquet"), str(out), double_model(),
                                     input={"keep_columns": ["tags", "phash"]}), out)


def latin1_tar(path: Path, names: list[str]) -> None:
    """A tar as GNU tar writes it on a latin-1 system: member names are the raw bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name in names:
            data = enc(rgb(16, 16), "PNG")
            info = tarfile.TarInfo(f"{name}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_a_tar_member_name_that_is_not_utf8_is_an_error_row(tmp_path, output_format):
    """Python reads the name b'caf\\xe9' as 'caf\\udce9' (a lone surrogate), which no Arrow
    string, Parquet column or tar name of UTF-8 holds: the job aborted in its read stage.
    Now: the sample is a `read` / `bad_key` row under its escaped name, the rest labelled."""
    (tmp_path / "in").mkdir()
    latin1_tar(tmp_path / "in" / "odd.tar", ["plain", "caf\xe9", "zebra"])
    out = tmp_path / "out"
    cfg = job_config(str(tmp_path / "in" / "*.tar"), str(out), double_model(), executor="local",
                     output={"format": output_format})
    summary = run_job(cfg)
    assert summary["shards_unfinished"] == {}, summary
    assert (summary["shards_complete"], summary["images"], summary["errors"]) == (1, 2, 1), summary
    assert (out / "_manifest" / "odd.json").exists()
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out), output_format)
    assert_exactly_once({"odd": {"plain", "caf\\xe9", "zebra"}}, outs, errors)
    [e] = errors
    assert (e["key"], e["stage"], e["error"]) == ("caf\\xe9", "read", "bad_key"), e
    assert "not UTF-8" in e["message"] and "caf\\xe9" in e["message"], e
    assert_rerun_changes_nothing(cfg, out)

