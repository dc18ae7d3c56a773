"""pipelines/metric_depth.py through the real CLI (local executor): relative depth aligned per
image to the sparse LiDAR-like depth each WebDataset sample carries (#29, the job part).

Input: synthetic scenes with true metric depth (depthray/samples.py); each image is the
scene's true depth as gray level = log depth (the side channel the test double reads,
tests/reliability/doubles.py: LogDepthImageModel), beside a `lidar.png` member made by
`metric_align.lidar_like_points` (64 scanlines, ~5 % of the pixels, 1 % noise, 5 % outliers)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from depthray import metric_align as MA
from depthray.cli import main
from depthray.config import ConfigError, config_from_dict
from depthray.io.codecs import decode_depth_png16
from depthray.io.metric_labels import decode_metric_png16, decode_sparse
from depthray.io.tar_samples import tar_bytes
from depthray.samples import make_scene

H, W = 96, 128
NEAR, FAR = 0.5, 200.0
GOOD = [("yard", 1), ("street", 2), ("indoor", 3)]


def scene_image(depth: np.ndarray) -> bytes:
    """The scene's true depth as an 8-bit gray PNG of log depth over [NEAR, FAR]."""
    g = np.rint(np.log(depth / NEAR) / math.log(FAR / NEAR) * 255).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([g] * 3, axis=-1)).save(buf, format="PNG")
    return buf.getvalue()


def shown_depth(depth: np.ndarray) -> np.ndarray:
    """The true depth as the image holds it (what the double sees, before its own error)."""
    g = np.rint(np.log(depth / NEAR) / math.log(FAR / NEAR) * 255).clip(0, 255)
    return NEAR * np.exp(g / 255 * math.log(FAR / NEAR))


def lidar_map(depth: np.ndarray, seed: int) -> np.ndarray:
    pts = MA.lidar_like_points(depth, np.random.default_rng(seed))
    out = np.zeros(depth.shape)
    out[pts.uv[:, 1], pts.uv[:, 0]] = pts.depth
    return out


def sparse_bytes(metres: np.ndarray, encoding: str) -> bytes:
    """A sparse map in metres (0 = no return) stored as `encoding`."""
    buf = io.BytesIO()
    if encoding == "npy":
        np.save(buf, np.where(metres > 0, metres, np.nan).astype(np.float32))
    else:
        per_m = {"png16_mm": 1000.0, "png16_kitti": 256.0}[encoding]
        v = np.rint(metres * per_m)
        Image.fromarray(np.where(v <= 65535, v, 0).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def absrel(pred: np.ndarray, gt: np.ndarray) -> float:
    ok = np.isfinite(pred) & (pred > 0)
    return float(np.where(ok, np.abs(np.where(ok, pred, 0) - gt) / gt, 1.0).mean())


def write_input(folder, encoding: str = "png16_mm") -> dict[str, np.ndarray]:
    """One shard: the GOOD scenes with LiDAR, and the cases that must not pass as ok labels."""
    folder.mkdir()
    truth, members = {}, []
    for family, seed in GOOD + [("yard", 7), ("street", 8), ("yard", 9), ("indoor", 10), ("yard", 11)]:
        truth[f"{family}{seed}"] = make_scene(H, W, seed=seed, family=family)[1].astype(np.float64)
    for key, depth in truth.items():
        members.append((f"{key}.png", scene_image(depth)))
        sparse = lidar_map(depth, seed=len(members))
        if key == "yard7":  # no member at all: an error row
            continue
        if key == "street8":  # a member that is no image: an error row
            members.append((f"{key}.lidar.png", b"not a png"))
            continue
        if key == "yard9":  # no return anywhere
            sparse[:] = 0
        if key == "indoor10":  # a handful of points
            keep = np.flatnonzero(sparse)[::40][:5]
            sparse = np.where(np.isin(np.arange(sparse.size), keep).reshape(sparse.shape), sparse, 0)
        if key == "yard11":  # every point at one depth: the scale cannot be seen
            sparse = np.where(sparse > 0, 10.0, 0)
        members.append((f"{key}.lidar.png", sparse_bytes(sparse, encoding)))
    (folder / "00000.tar").write_bytes(tar_bytes(members))
    return truth


def job(tmp, name: str, encoding: str = "png16_mm", fmt: str = "parquet", **model) -> str:
    config = {"input": {"url": str(tmp / "in" / "*.tar")}, "output": {"url": str(tmp / name), "format": fmt},
              "model": {"factory": "tests.reliability.doubles:make_log_depth", "options": model},
              "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
              "compute": {"images_per_batch": 4, "executor": "local"},
              "metric": {"member": "lidar.png", "encoding": encoding}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metric")
    truth = write_input(tmp / "in")
    code = main(["run", job(tmp, "out"), "--pipeline", "metric_depth"])
    rows = {r["key"]: r for r in pq.read_table(tmp / "out").to_pylist()}
    errors = {r["key"]: r for r in pq.read_table(tmp / "out" / "_errors").to_pylist()}
    return tmp, truth, code, rows, errors


def test_metric_maps_are_as_good_as_an_oracle_fit_and_the_held_out_residual_says_so(run):
    _, truth, code, rows, _ = run
    for family, seed in GOOD:
        key = f"{family}{seed}"
        row, gt = rows[key], truth[key]
        meta = json.loads(row["meta"])["metric"]
        assert meta["verdict"] == "ok" and meta["reasons"] == [] and meta["unit"] == "m", (key, meta)
        metric = decode_metric_png16(row["metric_depth"])
        assert metric.shape == gt.shape
        label = decode_depth_png16(row["depth"]).astype(np.float64)  # the relative label as stored
        s, t = MA.fit_relative(label.reshape(-1), gt.reshape(-1))  # oracle: every true pixel
        oracle = absrel(s * label + t, gt)
        ours = absrel(metric, gt)
        assert ours <= 1.10 * oracle, (key, ours, oracle)
        assert abs(meta["abs_rel"] - ours) <= 0.20 * ours, (key, meta["abs_rel"], ours)
        assert 0.01 < ours < 0.1  # the double's error is real, and the fit removes the affine map
        # the fit applies to the stored label: scale * depth png + shift is the metric map
        assert np.allclose(metric, meta["scale"] * label + meta["shift"], rtol=1e-3, atol=2 * meta["png_scale"] / 65535)
        assert meta["points_used"] > 300 and meta["points_held_out"] > 50 and meta["delta1"] > 0.9


def test_a_sample_without_its_member_or_with_a_broken_one_is_an_error_row(run):
    _, truth, code, rows, errors = run
    assert code == 0  # errors are committed; the run fails only past quality.max_error_fraction
    assert set(errors) == {"yard7", "street8"} and set(rows) == set(truth) - set(errors)
    assert errors["yard7"]["error"] == "no_sparse_depth" and "lidar.png" in errors["yard7"]["message"]
    assert errors["street8"]["stage"] == "metric" and errors["street8"]["error"] == "sparse_undecodable"
    assert "lidar.png" in errors["street8"]["message"] and "UnidentifiedImageError" in errors["street8"]["message"]
    for row in rows.values():  # every label that left is a metric label
        assert row["metric_depth"] is not None and "metric" in json.loads(row["meta"])


@pytest.mark.parametrize("key,reason", [("yard9", "0 valid points"), ("indoor10", "only 5 valid points"),
                                        ("yard11", "scale unobservable")])
def test_degenerate_sparse_maps_are_low_confidence_labels_with_the_reason(run, key, reason):
    _, _, _, rows, _ = run
    meta = json.loads(rows[key]["meta"])["metric"]
    assert meta["verdict"] == "low_confidence", meta
    assert any(r.startswith(reason) for r in meta["reasons"]), meta["reasons"]


def test_the_three_encodings_decode_to_the_same_metres():
    depth = make_scene(H, W, seed=1, family="street")[1].astype(np.float64)
    sparse = lidar_map(depth, seed=0)
    sparse[sparse * 1000 > 65535] = 0  # beyond what millimetres in 16 bits hold
    got = {e: decode_sparse(sparse_bytes(sparse, e), e) for e in ("png16_mm", "png16_kitti", "npy")}
    valid = sparse > 0
    for e, m in got.items():
        assert np.array_equal(np.isfinite(m) & (m > 0), valid), e
        assert np.allclose(m[valid], sparse[valid], atol={"png16_mm": 5e-4, "png16_kitti": 2e-3, "npy": 1e-5}[e]), e
    eight_bit = io.BytesIO()
    Image.fromarray((sparse > 0).astype(np.uint8)).save(eight_bit, format="PNG")
    with pytest.raises(ValueError, match="expected a 16-bit grayscale PNG, got PNG mode L"):
        decode_sparse(eight_bit.getvalue(), "png16_kitti")
    with pytest.raises(ValueError, match="png16_mm: UnidentifiedImageError"):
        decode_sparse(sparse_bytes(sparse, "npy"), "png16_mm")


def test_unknown_encodings_and_a_missing_member_are_refused_up_front():
    with pytest.raises(ConfigError, match="metric.encoding: must be one of png16_mm, png16_kitti, npy"):
        config_from_dict({"metric": {"member": "lidar.png", "encoding": "exr"}})
    with pytest.raises(ConfigError, match="metric.member"):
        config_from_dict({"pipeline": "metric_depth"})


def test_npy_members_and_webdataset_outputs_give_the_same_metric_labels(run, tmp_path):
    tmp, truth, _, rows, _ = run
    write_input(tmp_path / "in", encoding="npy")
    assert main(["run", job(tmp_path, "wds", encoding="npy", fmt="webdataset"), "--pipeline", "metric_depth"]) == 0
    import tarfile

    members = {}
    for part in (tmp_path / "wds").rglob("*.tar"):
        with tarfile.open(part) as tf:
            members.update({m.name: tf.extractfile(m).read() for m in tf.getmembers()})
    for family, seed in GOOD:
        key = f"{family}{seed}"
        meta = json.loads(members[f"{key}.json"])
        assert meta["metric"]["encoding"] == "npy" and meta["metric"]["verdict"] == "ok"
        ours = decode_metric_png16(members[f"{key}.metric_depth.png"])
        theirs = decode_metric_png16(rows[key]["metric_depth"])
        assert np.nanmean(np.abs(ours / theirs - 1)) < 0.005, key


def test_the_plain_depth_pipeline_ignores_the_member(run):
    tmp, truth, _, rows, _ = run
    assert main(["run", job(tmp, "plain")]) == 0  # the same config, pipeline depth
    table = pq.read_table(tmp / "plain")
    assert "metric_depth" not in table.column_names
    plain = {r["key"]: r for r in table.to_pylist()}
    assert set(plain) == set(truth)  # no member needed: nothing is an error
    for key, row in plain.items():
        assert "metric" not in json.loads(row["meta"])
        if key in rows:  # the relative label is the same either way
            assert row["depth"] == rows[key]["depth"]
    hashes = {r["config_hash"] for r in plain.values()} | {r["config_hash"] for r in rows.values()}
    assert len(hashes) == 2  # another task, another config hash


def test_a_disparity_label_is_fitted_in_inverse_depth(run, tmp_path):
    """A model whose maps hold disparity (meta.output_space): the fit is made where the
    relation is affine, 1/metric = s * label + t, and is as good as that oracle."""
    tmp, truth, _, _, _ = run
    assert main(["run", job(tmp, "disp", output_space="disparity"), "--pipeline", "metric_depth"]) == 0
    rows = {r["key"]: r for r in pq.read_table(tmp / "disp").to_pylist()}
    for family, seed in GOOD:
        key = f"{family}{seed}"
        row, gt = rows[key], truth[key]
        meta = json.loads(row["meta"])
        assert meta["output_space"] == "disparity" and meta["metric"]["space"] == "disparity"
        assert meta["metric"]["verdict"] == "ok", meta["metric"]
        label = decode_depth_png16(row["depth"]).astype(np.float64)
        s, t = MA.fit_relative(label.reshape(-1), 1.0 / gt.reshape(-1))
        oracle = absrel(1.0 / (s * label + t), gt)
        assert absrel(decode_metric_png16(row["metric_depth"]), gt) <= 1.10 * oracle, key


def test_python_pipelines_metric_depth_py_is_the_same_run(run):
    """`python pipelines/metric_depth.py CONFIG` is `depthray run CONFIG --pipeline
    metric_depth`: it finds every shard of that run's output complete (same config hash)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmp = run[0]
    root = Path(__file__).resolve().parents[1]
    manifests = sorted((tmp / "out" / "_manifest").glob("*.json"))
    before = [p.read_text() for p in manifests]
    done = subprocess.run([sys.executable, str(root / "pipelines" / "metric_depth.py"), job(tmp, "out")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.read_text() for p in manifests] == before and "1 already complete" in done.stdout


def test_on_ray_and_s3_the_metric_labels_are_the_local_ones(run, ray_session, s3_bucket, s3_endpoint):
    """The same task on the Ray executor, input and output on S3 (moto): the same rows and
    error rows as the local run, metric PNGs byte for byte."""
    import s3fs

    from depthray.config import load_config
    from depthray.job.driver import run_job

    tmp, _, _, rows, errors = run
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.put_file(str(tmp / "in" / "00000.tar"), f"{s3_bucket}/in/00000.tar")
    path = tmp / "s3.yaml"
    config = yaml.safe_load(open(job(tmp, "unused")))
    config["input"]["url"] = f"s3://{s3_bucket}/in/*.tar"
    config["output"]["url"] = f"s3://{s3_bucket}/out"
    config["compute"].update(executor="ray", num_actors=1)
    path.write_text(yaml.safe_dump(config))
    summary = run_job(load_config(path, ["pipeline=metric_depth"]))
    assert (summary["images"], summary["errors"], summary["shards_unfinished"]) == (len(rows), len(errors), {})
    got = {r["key"]: r for r in pq.read_table(f"{s3_bucket}/out", filesystem=fs).to_pylist()}
    assert sorted(got) == sorted(rows)
    for key, row in got.items():
        assert row["metric_depth"] == rows[key]["metric_depth"] and row["depth"] == rows[key]["depth"], key
        assert json.loads(row["meta"])["metric"] == json.loads(rows[key]["meta"])["metric"], key
    failed = {r["key"]: r["error"] for r in pq.read_table(f"{s3_bucket}/out/_errors", filesystem=fs).to_pylist()}
    assert failed == {k: r["error"] for k, r in errors.items()}
