"""`depthray eval` on Parquet, WebDataset and folder outputs; GT as PNG / npy / pfm; S3."""

from __future__ import annotations

import json

import numpy as np
import pytest

from depthray import cli, metrics
from depthray.evaluate import evaluate, read_pfm
from tests import output_fixtures as fx

WRITERS = {"parquet": fx.write_parquet, "webdataset": fx.write_webdataset, "folder": fx.write_folder}


@pytest.fixture(scope="module")
def samples():
    return fx.make_samples(4)


def _expected(samples, gt_of=lambda s: s.gt):
    """Per-key metrics computed directly on what the reader should decode."""
    return {s.key: metrics.compute_metrics(fx.decoded_pred(s), gt_of(s)) for s in samples}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_eval_matches_direct_metrics_for_every_output_format(tmp_path, samples, fmt):
    pred = WRITERS[fmt](tmp_path / "pred", samples)
    gt = fx.write_gt(tmp_path / "gt", samples, "npy")
    report = evaluate(str(pred), str(gt))
    exp = _expected(samples)
    assert sorted(r.key for r in report.rows) == sorted(exp)
    for r in report.rows:
        assert r.metrics.abs_rel == pytest.approx(exp[r.key].abs_rel, rel=1e-6)
        assert r.metrics.delta1 == pytest.approx(exp[r.key].delta1)
    # img_000 is an exact affine map of GT (up to 16-bit quantisation): AbsRel ~ 0.
    by_key = {r.key: r for r in report.rows}
    assert by_key["img_000"].metrics.abs_rel < 1e-3
    # More noise -> worse scores, and the stored uncertainty ranks it exactly.
    abs_rels = [by_key[f"img_{i:03d}"].metrics.abs_rel for i in range(4)]
    assert abs_rels == sorted(abs_rels) and abs_rels[3] > 0.05
    assert report.summary["uncertainty_abs_rel_spearman"] == pytest.approx(1.0)
    assert report.summary["abs_rel"] == pytest.approx(np.mean([m.abs_rel for m in exp.values()]))
    assert report.summary["n_images"] == 4 and report.summary["n_failed"] == 0


def test_gt_formats_agree_and_missing_and_unmatched_are_counted(tmp_path, samples):
    pred = fx.write_folder(tmp_path / "pred", samples[:3])
    reports = {}
    for fmt in ("png", "npy", "pfm"):
        gt = fx.write_gt(tmp_path / f"gt_{fmt}", samples[1:], fmt)
        reports[fmt] = evaluate(str(pred), str(gt))
    for fmt, rep in reports.items():
        assert rep.missing == ["img_003"] and rep.unmatched == ["img_000"], fmt
        assert rep.summary["n_images"] == 2
    # png holds millimetres: same AbsRel up to the 1 mm rounding, RMSE in metres.
    assert reports["png"].summary["abs_rel"] == pytest.approx(reports["npy"].summary["abs_rel"], rel=1e-2)
    assert reports["png"].summary["rmse"] == pytest.approx(reports["npy"].summary["rmse"], rel=1e-2)
    assert reports["pfm"].summary["abs_rel"] == pytest.approx(reports["npy"].summary["abs_rel"], rel=1e-6)


def test_pfm_reader_orientation(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    fx.write_pfm(tmp_path / "a.pfm", arr)
    np.testing.assert_array_equal(read_pfm((tmp_path / "a.pfm").read_bytes()), arr)


def test_valid_mask_resize_and_disparity(tmp_path, samples):
    s = samples[0]
    bad = fx.Sample(s.key, s.rgb, s.gt, s.pred.copy(), s.unc)
    bad.pred[:10] = 1.0 - bad.pred[:10]  # wrong where the mask will exclude it
    pred = fx.write_folder(tmp_path / "pred", [bad])
    gt = fx.write_gt(tmp_path / "gt", [s], "npy")
    unmasked = evaluate(str(pred), str(gt)).summary["abs_rel"]
    mask = np.ones(s.gt.shape, np.uint8) * 255
    mask[:10] = 0
    from PIL import Image

    Image.fromarray(mask).save(gt / f"{s.key}.mask.png")
    masked = evaluate(str(pred), str(gt)).summary["abs_rel"]
    assert masked < 1e-3 < unmasked

    # A prediction at half resolution is resized to the GT and still scores well.
    small = fx.Sample(s.key, s.rgb, s.gt, np.asarray(Image.fromarray(s.pred).resize((32, 24))), s.unc[::2, ::2])
    half = evaluate(str(fx.write_folder(tmp_path / "small", [small])), str(gt)).rows[0]
    up = np.asarray(Image.fromarray(fx.decoded_pred(small)).resize((64, 48), Image.BILINEAR))
    direct = metrics.compute_metrics(up, s.gt, mask.astype(bool))
    assert half.metrics.n_valid == mask.astype(bool).sum()
    assert half.metrics.abs_rel == pytest.approx(direct.abs_rel) and half.metrics.abs_rel < 0.1

    # Disparity space: a stored affine disparity scores ~0 only when evaluated as disparity.
    disp = 1.0 / s.gt
    disp_sample = fx.Sample(s.key, s.rgb, s.gt, ((disp - disp.min()) / np.ptp(disp)).astype(np.float32), s.unc)
    dpred = str(fx.write_folder(tmp_path / "disp", [disp_sample]))
    gt_nomask = str(fx.write_gt(tmp_path / "gt2", [s], "npy"))
    assert evaluate(dpred, gt_nomask, space="disparity").summary["abs_rel"] < 2e-3
    assert evaluate(dpred, gt_nomask, space="depth").summary["abs_rel"] > 0.05


def test_cli_eval_prints_rows_summary_and_json_last(tmp_path, samples, capsys):
    pred = fx.write_webdataset(tmp_path / "pred", samples)
    gt = fx.write_gt(tmp_path / "gt", samples, "png")
    assert cli.main(["eval", str(pred), str(gt), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {"abs_rel", "delta1", "delta2", "rmse", "n_images", "edge_abs_rel", "n_missing"} <= summary.keys()
    assert summary["n_images"] == 4 and summary["space"] == "depth"
    text = "\n".join(lines[:-1])
    assert all(s.key in text for s in samples) and "summary" in text
    # --space disparity is passed through (and changes the numbers for depth predictions)
    cli.main(["eval", str(pred), str(gt), "--json", "--no-rows", "--space", "disparity"])
    disp = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert disp["space"] == "disparity" and disp["abs_rel"] != pytest.approx(summary["abs_rel"])


def test_eval_reads_s3(tmp_path, samples, s3_bucket, capsys):
    import s3fs

    pred = fx.write_parquet(tmp_path / "pred", samples)
    gt = fx.write_gt(tmp_path / "gt", samples, "png")
    fs = s3fs.S3FileSystem()
    fs.put(str(pred), f"{s3_bucket}/out", recursive=True)
    fs.put(str(gt), f"{s3_bucket}/gt", recursive=True)
    assert cli.main(["eval", f"s3://{s3_bucket}/out", f"s3://{s3_bucket}/gt", "--json"]) == 0
    remote = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    local = evaluate(str(pred), str(gt)).summary
    assert remote["n_images"] == 4 and remote["abs_rel"] == pytest.approx(local["abs_rel"])
