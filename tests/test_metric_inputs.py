"""pipelines/metric_depth.py with its sparse depth in a Parquet / Arrow column (`metric.column`),
into a Delta table, and the row's top-level `low_confidence` for a poor metric fit (#29).

The inputs are tests/test_metric_pipeline.py's: the same images and LiDAR-like PNGs
(metric_align.lidar_like_points), once as WebDataset samples, once as table rows holding the
very same bytes, so the metric labels must be the WebDataset run's byte for byte."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from depthray.cli import main
from depthray.quality import QualityVerdict, row_verdict
from tests.test_metric_pipeline import GOOD, write_input

GOOD_KEYS = {f"{family}{seed}" for family, seed in GOOD}


def members_of(tar_path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a WebDataset tar."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def table_of(samples: dict[str, dict[str, bytes]]) -> pa.Table:
    """The samples as rows: key, image bytes, LiDAR PNG bytes (null where the sample has none)."""
    keys = sorted(samples)
    return pa.table({"key": keys, "image": [samples[k]["png"] for k in keys],
                     "lidar": pa.array([samples[k].get("lidar.png") for k in keys], pa.binary())})


def job(tmp, name: str, url: str, fmt: str = "parquet", **metric) -> str:
    config = {"input": {"url": url, "key_column": None if url.endswith(".tar") else "key"},
              "output": {"url": str(tmp / name), "format": fmt},
              "model": {"factory": "tests.reliability.doubles:make_log_depth"},
              "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
              "compute": {"images_per_batch": 4, "executor": "local"},
              "pipeline": "metric_depth", "metric": {"encoding": "png16_mm", **metric}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def rows_of(folder) -> tuple[dict, dict]:
    rows = {r["key"]: r for r in pq.read_table(folder).to_pylist()}
    errors = {r["key"]: r for r in pq.read_table(folder / "_errors").to_pylist()}
    return rows, errors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metric_inputs")
    write_input(tmp / "in")
    samples = members_of(tmp / "in" / "00000.tar")
    (tmp / "pq").mkdir()
    pq.write_table(table_of(samples), tmp / "pq" / "00000.parquet")
    assert main(["run", job(tmp, "wds", str(tmp / "in" / "*.tar"), member="lidar.png")]) == 0
    assert main(["run", job(tmp, "parquet", str(tmp / "pq" / "*.parquet"), column="lidar")]) == 0
    return tmp, samples, rows_of(tmp / "wds"), rows_of(tmp / "parquet")


def assert_same_labels(got: tuple[dict, dict], want: tuple[dict, dict], column: str) -> None:
    (rows, errors), (wds_rows, wds_errors) = got, want
    assert sorted(rows) == sorted(wds_rows) and GOOD_KEYS <= set(rows)
    for key, row in rows.items():
        theirs = wds_rows[key]
        assert row["metric_depth"] == theirs["metric_depth"] and row["depth"] == theirs["depth"], key
        ours, want_meta = json.loads(row["meta"])["metric"], json.loads(theirs["meta"])["metric"]
        assert (ours.pop("column"), ours.pop("member")) == (column, None)
        assert (want_meta.pop("column"), want_meta.pop("member")) == (None, "lidar.png")
        assert ours == want_meta, key
    assert {k: (e["stage"], e["error"]) for k, e in errors.items()} == \
        {k: (e["stage"], e["error"]) for k, e in wds_errors.items()} == \
        {"yard7": ("read", "no_sparse_depth"), "street8": ("metric", "sparse_undecodable")}
    assert errors["yard7"]["message"] == f"column {column!r} (metric.column) is null"
    assert f"column {column!r}" in errors["street8"]["message"]


def test_a_parquet_column_gives_the_webdataset_members_metric_labels(runs):
    _, _, wds, parquet = runs
    assert_same_labels(parquet, wds, "lidar")


def test_a_datasets_save_to_disk_column_gives_the_same_labels(runs):
    """Hugging Face `datasets`: the rows in a Dataset (binary features) saved with
    save_to_disk (Arrow IPC stream files), the sparse depth named by its column."""
    datasets = pytest.importorskip("datasets")
    tmp, samples, wds, _ = runs
    table = table_of(samples).rename_columns(["key", "image", "scan"])
    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Value("binary"),
                                  "scan": datasets.Value("binary")})
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).save_to_disk(str(tmp / "hf"))
    assert main(["run", job(tmp, "hf_out", str(tmp / "hf"), column="scan")]) == 0
    assert_same_labels(rows_of(tmp / "hf_out"), wds, "scan")


def test_a_poor_metric_fit_makes_the_row_low_confidence_for_every_reader(runs):
    """A stock reader keeps rows with `low_confidence == false` (docs/training.md): it must
    never take a metric label whose fit is low_confidence, and the reason names the fit."""
    _, _, (rows, _), _ = runs
    meta = {k: json.loads(r["meta"]) for k, r in rows.items()}
    for key, reason in (("yard9", "metric fit: 0 valid points"), ("indoor10", "metric fit: only 5 valid points"),
                        ("yard11", "metric fit: scale unobservable")):
        assert meta[key]["metric"]["verdict"] == "low_confidence"
        assert meta[key]["low_confidence"] is True, (key, meta[key])
        assert meta[key]["quality"]["passed"] is True  # the relative label's own check passed: the fit decides
        assert any(r.startswith(reason) for r in meta[key]["low_confidence_reasons"]), meta[key]
    for key in GOOD_KEYS:
        assert meta[key]["metric"]["verdict"] == "ok"
        assert meta[key]["low_confidence"] is False and "low_confidence_reasons" not in meta[key], meta[key]
    kept = {k for k, m in meta.items() if not m.get("low_confidence", False)}
    assert kept == GOOD_KEYS


def test_row_verdict_joins_the_quality_check_and_the_metric_fit():
    passed = QualityVerdict(True, 0.01, 1.0, None, None, 0.05, [])
    failed = QualityVerdict(False, 0.2, 1.0, 0.1, None, 0.05, ["uncertainty_mean 0.2 > max_uncertainty_mean 0.1"])
    ok = {"verdict": "ok", "reasons": []}
    poor = {"verdict": "low_confidence", "reasons": ["only 5 valid points"]}
    assert row_verdict(passed, None) == passed.to_meta()  # the depth pipeline's rows: as before
    assert row_verdict(passed, ok)["low_confidence"] is False
    got = row_verdict(failed, poor)
    assert got["low_confidence"] is True and got["low_confidence_reasons"] == [
        "quality: uncertainty_mean 0.2 > max_uncertainty_mean 0.1", "metric fit: only 5 valid points"]
    assert row_verdict(None, {"reasons": []}) == {"low_confidence": True, "low_confidence_reasons":
                                                  ["metric fit: verdict None"]}  # no verdict is no pass
    assert row_verdict(None, None) == {}


def test_a_delta_output_holds_the_metric_labels(runs):
    deltalake = pytest.importorskip("deltalake")
    tmp, _, (rows, _), _ = runs
    assert main(["run", job(tmp, "delta", str(tmp / "in" / "*.tar"), fmt="delta", member="lidar.png")]) == 0
    table = deltalake.DeltaTable(str(tmp / "delta")).to_pyarrow_table()
    got = {r["key"]: r for r in table.to_pylist()}
    assert sorted(got) == sorted(rows)
    for key, row in got.items():
        assert row["metric_depth"] == rows[key]["metric_depth"] and row["depth"] == rows[key]["depth"], key
        assert json.loads(row["meta"]) == json.loads(rows[key]["meta"]), key


def _refused(capsys, tmp, name: str, url: str, **metric) -> str:
    assert main(["run", job(tmp, name, url, **metric)]) == 2
    return capsys.readouterr().err


def test_a_sparse_column_that_is_missing_or_of_another_type_stops_the_job_before_ray(runs, tmp_path, capsys):
    tmp = runs[0]
    pq_url = str(tmp / "pq" / "*.parquet")
    err = _refused(capsys, tmp_path, "missing", pq_url, column="lidr")
    assert "metric.column 'lidr': no such column" in err and "lidar" in err, err
    err = _refused(capsys, tmp_path, "unnamed", pq_url, member="lidar.png")
    assert "metric.column: input" in err and "Parquet/Arrow table" in err, err
    err = _refused(capsys, tmp_path, "keyed", pq_url, column="key")
    assert "metric.column 'key'" in err and "of type string" in err, err
    err = _refused(capsys, tmp_path, "tar", str(tmp / "in" / "*.tar"), column="lidar")
    assert "metric.member: input" in err and "WebDataset shards" in err, err
    assert not any(tmp_path.glob("*/_manifest"))  # nothing was labelled
