"""`depthray eval` and `preview` on metric outputs (pipelines/metric_depth.py, #29): the metric
map is scored in metres as written (no scale or shift fitted), and previewed with a colour bar
in metres.

The output is made by the real job (local executor), as tests/test_metric_pipeline.py makes
its own: synthetic scenes with true metric depth, the test double's relative label, and a
LiDAR-like `lidar.png` member per sample. References below are computed here from the stored
PNG bytes (PIL + numpy), not through depthray's decoders or metrics."""

from __future__ import annotations

import io
import json
import logging
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from depthray.cli import build_parser, main
from depthray.evaluate import evaluate
from depthray.io.tar_samples import tar_bytes
from depthray.metrics import metric_errors
from depthray.preview import collect_items, contact_sheet, render_html
from depthray.preview_metric import legend, metric_caption
from depthray.resize import resize_map, resize_with_holes
from depthray.samples import make_scene
from tests.test_metric_pipeline import H, W, job, lidar_map, scene_image, sparse_bytes

GOOD = ("yard1", "street2")
# yard9: no LiDAR return at all (no fit: an all-empty metric map); yard11: every point at
# one depth (scale unobservable). Both are low_confidence labels.
DOUBTED = {"yard9": "0 valid points", "yard11": "scale unobservable"}


def _write_input(folder) -> dict[str, np.ndarray]:
    folder.mkdir()
    truth, members = {}, []
    for key in (*GOOD, *DOUBTED):
        family, seed = re.fullmatch(r"([a-z]+)(\d+)", key).groups()
        depth = make_scene(H, W, seed=int(seed), family=family)[1].astype(np.float64)
        truth[key] = depth
        sparse = lidar_map(depth, seed=int(seed))
        if key == "yard9":
            sparse[:] = 0
        if key == "yard11":
            sparse = np.where(sparse > 0, 10.0, 0)
        members += [(f"{key}.png", scene_image(depth)), (f"{key}.lidar.png", sparse_bytes(sparse, "png16_mm"))]
    (folder / "00000.tar").write_bytes(tar_bytes(members))
    return truth


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """(tmp, truth, GT folder of {key}.npy in metres, Parquet output, WebDataset output)."""
    tmp = tmp_path_factory.mktemp("metric_views")
    truth = _write_input(tmp / "in")
    gt = tmp / "gt"
    gt.mkdir()
    for key, depth in truth.items():
        np.save(gt / f"{key}.npy", depth.astype(np.float32))
    for fmt in ("parquet", "webdataset"):
        assert main(["run", job(tmp, fmt, fmt=fmt), "--pipeline", "metric_depth"]) == 0
    return tmp, truth, gt, tmp / "parquet", tmp / "webdataset"


def _rows(folder) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(folder).to_pylist()}


def _metres(png: bytes) -> np.ndarray:
    """The metric PNG read as its format says: value / 65535 * the text chunk's scale, NaN = 0."""
    img = Image.open(io.BytesIO(png))
    q = np.asarray(img).astype(np.float64)
    return np.where(q > 0, q / 65535.0 * float(img.text["depthray_metric_scale"]), np.nan)


def _reference(metres: np.ndarray, gt: np.ndarray) -> dict:
    both = np.isfinite(metres) & (gt > 0)
    d, g = metres[both], gt[both].astype(np.float64)
    return {"abs_rel": np.mean(np.abs(d - g) / g), "rmse": math.sqrt(np.mean((d - g) ** 2)),
            "delta1": np.mean(np.maximum(d / g, g / d) < 1.25), "no_depth": 1 - both.sum() / (gt > 0).sum()}


# The eval decodes to float32 (depthray/io/metric_labels.py), the reference here is float64:
# float32 rounding of metres (~6e-8 relative) averaged over pixels stays far below 1e-5.
F32 = 1e-5


def test_eval_scores_the_metric_map_in_metres_as_written(out):
    _, truth, gt, parquet, _ = out
    rows = _rows(parquet)
    report = evaluate(str(parquet), str(gt))
    by_key = {r.key: r for r in report.rows}
    assert set(by_key) == set(truth)
    for key in GOOD:
        ref = _reference(_metres(rows[key]["metric_depth"]), np.load(gt / f"{key}.npy"))
        got = by_key[key].metric
        assert got.abs_rel == pytest.approx(ref["abs_rel"], rel=F32), key
        assert got.rmse == pytest.approx(ref["rmse"], rel=F32), key
        assert got.delta1 == pytest.approx(ref["delta1"], abs=1e-12), key  # a count over pixels
        assert got.no_depth == pytest.approx(ref["no_depth"], abs=1e-12), key
        assert got.abs_rel < 0.1 and got.delta1 > 0.9, key  # the fit held (docs/metric.md: ~0.03)
        meta = json.loads(rows[key]["meta"])["metric"]
        assert by_key[key].verdict == "ok" and by_key[key].held_out_abs_rel == meta["abs_rel"]
        # beside it, the relative label's affine-invariant score, as for any output
        assert by_key[key].metrics.abs_rel < got.abs_rel + 0.05
    # yard9 had no fit: its map holds no depth, so nothing is scored and all of it is missing
    assert by_key["yard9"].metric.no_depth == 1.0 and math.isnan(by_key["yard9"].metric.abs_rel)
    # verdict counts, as the rows' meta says them
    verdicts = {}
    for r in rows.values():
        v = json.loads(r["meta"])["metric"]["verdict"]
        verdicts[v] = verdicts.get(v, 0) + 1
    assert report.summary["metric_verdicts"] == verdicts == {"ok": 2, "low_confidence": 2}
    good = [by_key[k].metric.abs_rel for k in GOOD]
    scored = good + [by_key["yard11"].metric.abs_rel]
    assert report.summary["metric_abs_rel"] == pytest.approx(np.mean(scored), rel=1e-12)
    assert report.summary["metric_abs_rel_by_verdict"]["ok"] == pytest.approx(np.mean(good), rel=1e-12)
    assert report.summary["metric_n_images"] == 3


def test_a_metric_map_at_the_wrong_scale_shows_its_error(out, tmp_path):
    """The same labels with every metric map's metres doubled (PNG values kept, scale chunk
    and meta doubled): an eval that fitted scale/shift would score them as well as the
    originals; scored as written, AbsRel is ~1 while the relative scores do not move."""
    _, _, gt, parquet, _ = out
    table = pq.read_table(parquet)
    doubled, metas = [], []
    for png, meta in zip(table.column("metric_depth").to_pylist(), table.column("meta").to_pylist()):
        img = Image.open(io.BytesIO(png))
        info = PngImagePlugin.PngInfo()
        for k, v in img.text.items():
            info.add_text(k, repr(2 * float(v)) if k == "depthray_metric_scale" else v)
        buf = io.BytesIO()
        img.save(buf, format="PNG", pnginfo=info)
        doubled.append(buf.getvalue())
        m = json.loads(meta)
        m["metric"]["png_scale"] *= 2
        metas.append(json.dumps(m))
    table = table.set_column(table.schema.get_field_index("metric_depth"), "metric_depth", pa.array(doubled))
    table = table.set_column(table.schema.get_field_index("meta"), "meta", pa.array(metas))
    (tmp_path / "wrong").mkdir()
    pq.write_table(table, tmp_path / "wrong" / "part.parquet")
    right = {r.key: r for r in evaluate(str(parquet), str(gt)).rows}
    wrong = {r.key: r for r in evaluate(str(tmp_path / "wrong"), str(gt)).rows}
    for key in GOOD:
        assert wrong[key].metric.abs_rel > 0.8 > 0.1 > right[key].metric.abs_rel, key
        assert wrong[key].metric.median_ratio == pytest.approx(2 * right[key].metric.median_ratio, rel=F32)
        assert wrong[key].metrics.abs_rel == right[key].metrics.abs_rel  # relative label untouched


def test_webdataset_outputs_score_the_same(out):
    _, _, gt, parquet, wds = out
    a = {r.key: r for r in evaluate(str(parquet), str(gt)).rows}
    b = {r.key: r for r in evaluate(str(wds), str(gt)).rows}
    assert set(a) == set(b)
    for key in GOOD:
        assert b[key].metric.abs_rel == a[key].metric.abs_rel and b[key].verdict == a[key].verdict


def test_gt_units_png_millimetres_and_the_unit_warning(out, tmp_path, caplog):
    """GT as 16-bit PNG in millimetres (the default --gt-png-scale 1000) gives the npy
    score up to the 1 mm rounding; read as if in metres (scale 1), the median ratio shows
    the 1000x and a warning names the unit."""
    _, truth, gt, parquet, _ = out
    mm = tmp_path / "gt_mm"
    mm.mkdir()
    stored = {}
    for key, depth in truth.items():
        stored[key] = np.rint(np.minimum(depth, 65.535) * 1000).astype(np.uint16)
        Image.fromarray(stored[key]).save(mm / f"{key}.png")
    # 65.535 m is the most a 16-bit mm PNG holds: compare below 65.5 m, where it is exact
    near = {k: (v / 1000 <= 65.5) for k, v in stored.items()}
    npy_report = evaluate(str(parquet), str(gt), max_depth=65.5)
    png_report = evaluate(str(parquet), str(mm), max_depth=65.5)
    for a, b in zip(npy_report.rows, png_report.rows):
        if a.key in GOOD:
            # 0.5 mm rounding over depths >= 0.5 m: at most 1e-3 relative per pixel
            assert b.metric.abs_rel == pytest.approx(a.metric.abs_rel, abs=1e-3), a.key
            assert b.metric.n_valid == near[a.key].sum()
    with caplog.at_level(logging.WARNING, logger="depthray.evaluate"):
        raw = evaluate(str(parquet), str(mm), gt_png_scale=1.0)
    assert raw.summary["metric_median_ratio"] < 0.01 and raw.summary["metric_abs_rel"] > 0.99
    assert "is the GT in metres" in caplog.text


def test_cli_eval_prints_the_metric_section_and_json(out, capsys):
    _, _, gt, parquet, _ = out
    assert main(["eval", str(parquet), str(gt), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["metric_verdicts"] == {"low_confidence": 2, "ok": 2}
    text = "\n".join(lines[:-1])
    assert "m_abs_rel" in text and "no scale or shift fitted" in text
    assert "verdicts: low_confidence 2" in text and "ok 2" in text
    helptext = " ".join(build_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert "NO scale or shift fitted" in helptext and "takes the GT as metres" in helptext


def test_preview_bar_is_labelled_in_the_maps_metres(out, tmp_path):
    _, _, gt, parquet, _ = out
    rows = _rows(parquet)
    items = {it.key: it for it in collect_items(str(parquet), gt_url=str(gt))}
    for key in GOOD:
        metres = _metres(rows[key]["metric_depth"])
        lo, hi = np.nanmin(metres), np.nanmax(metres)
        lg = legend(items[key].metric)
        assert lg.lo == pytest.approx(lo, rel=F32) and lg.hi == pytest.approx(hi, rel=F32)
        assert hi > 5 * lo > 0  # a real range in metres, not 0..1
        values = [float(t.removesuffix(" m")) for t in lg.labels]
        assert all(t.endswith(" m") for t in lg.labels) and len(values) == 3
        # 3 significant figures: each label within half a unit of its last digit
        for v, want in zip(values, (lo, (lo + hi) / 2, hi)):
            assert abs(v - want) <= 0.5 * 10 ** (math.floor(math.log10(want)) - 2) + 1e-9, (key, v, want)
        meta = json.loads(rows[key]["meta"])["metric"]
        assert metric_caption(items[key].fit) == f"metric ok, held-out abs_rel {meta['abs_rel']:.3f}"
        assert not items[key].flagged
        # with GT: the metric map's own AbsRel (no fit) beside the relative one
        ref = _reference(metres, np.load(gt / f"{key}.npy"))
        assert items[key].scores["m_abs_rel"] == pytest.approx(ref["abs_rel"], rel=F32)
    for key, reason in DOUBTED.items():
        assert items[key].flagged and metric_caption(items[key].fit).startswith(f"metric low_confidence")
        assert reason in metric_caption(items[key].fit)
    assert legend(items["yard9"].metric).labels == ["no metric depth"]
    page = render_html(list(items.values()))
    for key in GOOD:
        for label in legend(items[key].metric).labels:
            assert f"<span>{label}</span>" in page
    assert page.count('class="bar"') == 4 and page.count("data-metres-lo") == 3
    sheet = contact_sheet(list(items.values()))
    # one row of 4 cells: 8 px padding, 96 px panels, the bar (8) and its labels (14), three
    # text lines (key, scores, the fit), 8 px padding
    assert sheet.shape[0] == 8 + 96 + 8 + 14 + 49 + 8
    first = sorted(items)[0]
    assert first in GOOD  # its bar: under its depth panel (x = 8 + 128 + 4), 2 px below the panels
    bar = sheet[8 + 96 + 2: 8 + 96 + 10, 140:268].astype(int)
    assert bar[:, 0, 0].min() > 140 and bar[:, 0, 2].max() < 100  # red = near at the left end
    assert bar[:, -1, 2].min() > 140 and bar[:, -1, 0].max() < 120  # violet = far at the right
    assert (sheet[8 + 96 + 10: 8 + 96 + 24, 140:268].sum(-1) < 200).sum() > 20  # the labels' ink


def test_metres_set_the_labels_and_not_the_colours():
    """Each map is coloured on its own range: the same scene at twice the metres looks the
    same and its bar reads twice the numbers."""
    from depthray.preview_metric import metric_panel

    depth = make_scene(H, W, seed=1, family="yard")[1]
    depth[:4, :4] = np.nan  # a hole: black, and it does not spread
    a, b = legend(depth), legend(2 * depth)
    assert b.lo == pytest.approx(2 * a.lo) and b.hi == pytest.approx(2 * a.hi)
    assert np.array_equal(metric_panel(depth, (48, 64)), metric_panel(2 * depth, (48, 64)))
    panel = metric_panel(depth, (H, W))
    assert (panel[:4, :4] == 0).all() and (panel[5:, 5:].sum(-1) > 0).all()
    near = np.unravel_index(np.nanargmin(depth), depth.shape)
    r, g, bl = panel[near].astype(int)
    assert r > 150 and bl < 100  # Spectral's near end is red


def test_metric_errors_by_hand():
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    pred = np.array([[1.1, 2.0], [np.nan, 16.0]])
    m = metric_errors(pred, gt)
    assert m.n_valid == 4 and m.n_covered == 3 and m.no_depth == 0.25
    assert m.abs_rel == pytest.approx((0.1 + 0.0 + 1.0) / 3)
    assert m.rmse == pytest.approx(math.sqrt((0.01 + 0.0 + 64.0) / 3))
    assert m.delta1 == pytest.approx(2 / 3) and m.median_ratio == pytest.approx(1.1)
    # a mask and a depth range drop pixels from both counts
    m = metric_errors(pred, gt, mask=np.array([[True, True], [True, False]]), max_depth=5.0)
    assert (m.n_valid, m.n_covered, m.abs_rel) == (3, 2, pytest.approx(0.05))


def test_a_hole_stays_a_hole_when_resized():
    values = np.arange(1, 65, dtype=np.float32).reshape(8, 8)
    holed = values.copy()
    holed[0, 0] = np.nan
    up = resize_with_holes(holed, (16, 16))
    plain = resize_map(values, (16, 16))
    assert np.isnan(up[:2, :2]).all()  # the hole, not a blend towards 0
    far = np.zeros((16, 16), bool)
    far[4:, 4:] = True
    np.testing.assert_allclose(up[far], plain[far], rtol=1e-6)
    assert np.isfinite(up[far]).all()
