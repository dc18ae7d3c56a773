"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from depthray import metrics as M


def _ramp(h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(1.0, 10.0, size=(h, w)).astype(np.float32)  # GT depth in metres


# The 2x2 hand example: x = prediction, r is orthogonal to 1 and to x, so the least-squares
# fit of gt = 2x + 3 + r on x is exactly s = 2, t = 3 and the aligned depth is 2x + 3.
X = np.array([[0.0, 1.0], [2.0, 3.0]])
R = 0.8 * np.array([[1.0, -1.0], [-1.0, 1.0]])
GT = 2 * X + 3 + R  # [[3.8, 4.2], [6.2, 9.8]]; aligned = [[3, 5], [7, 9]]


def test_affine_transform_of_gt_scores_perfectly_in_depth_space():
    gt = _ramp()
    pred = (gt - 0.7) / 12.0  # any affine map (positive scale) of GT
    m = M.compute_metrics(pred, gt, space="depth")
    assert m.abs_rel == pytest.approx(0.0, abs=1e-6)
    assert m.rmse == pytest.approx(0.0, abs=1e-5)
    assert m.delta1 == 1.0 and m.delta2 == 1.0
    assert m.scale == pytest.approx(12.0, rel=1e-5)
    assert m.shift == pytest.approx(0.7, abs=1e-4)


def test_known_perturbation_gives_hand_computed_metrics():
    m = M.compute_metrics(X, GT, space="depth")
    assert (m.scale, m.shift) == (pytest.approx(2.0), pytest.approx(3.0))
    # |aligned - gt| = 0.8 everywhere; divide by GT 3.8, 4.2, 6.2, 9.8.
    assert m.abs_rel == pytest.approx((0.8 / 3.8 + 0.8 / 4.2 + 0.8 / 6.2 + 0.8 / 9.8) / 4)
    assert m.rmse == pytest.approx(0.8)
    # ratios: 3.8/3 = 1.267 (fails 1.25), 5/4.2, 7/6.2, 9.8/9 pass; all pass 1.5625.
    assert m.delta1 == pytest.approx(0.75)
    assert m.delta2 == pytest.approx(1.0)
    assert m.n_valid == 4


def test_disparity_space_alignment():
    gt = _ramp(seed=1)
    disp_pred = 3.0 / gt + 0.25  # affine-invariant disparity of the GT
    exact = M.compute_metrics(disp_pred, gt, space="disparity")
    assert exact.abs_rel == pytest.approx(0.0, abs=1e-6)
    assert exact.delta1 == 1.0
    # The same disparity read as depth cannot be fitted by an affine map: the spaces differ.
    assert M.compute_metrics(disp_pred, gt, space="depth").abs_rel > 0.1

    # Hand example in disparity space: 1/GT = 2x + 3 + r -> aligned disparity 2x + 3, and
    # AbsRel of the inverted depths is |g/a - 1| with g, a the GT and aligned disparities.
    m = M.compute_metrics(X, 1.0 / GT, space="disparity")
    assert (m.scale, m.shift) == (pytest.approx(2.0), pytest.approx(3.0))
    expected = np.mean([abs(3.8 / 3 - 1), abs(4.2 / 5 - 1), abs(6.2 / 7 - 1), abs(9.8 / 9 - 1)])
    assert m.abs_rel == pytest.approx(expected)
    assert m.delta1 == pytest.approx(0.75)


def test_invalid_pixels_and_mask_are_ignored():
    gt = _ramp(seed=2)
    pred = gt * 0.5 + 1.0
    pred_bad = pred.copy()
    pred_bad[:4] = 1e6  # garbage where the mask excludes it
    mask = np.ones_like(gt, bool)
    mask[:4] = False
    gt_holes = gt.copy()
    gt_holes[5, 5], gt_holes[6, 6], gt_holes[7, 7] = 0.0, np.nan, -1.0
    m = M.compute_metrics(pred_bad, gt_holes, mask=mask)
    assert m.abs_rel == pytest.approx(0.0, abs=1e-6)
    assert m.n_valid == mask.sum() - 3
    # Without the mask the garbage counts and the score is bad: the mask did the work.
    assert M.compute_metrics(pred_bad, gt_holes).abs_rel > 0.1
    # Depth range limits drop pixels too.
    assert M.compute_metrics(pred, gt, max_depth=5.0).n_valid == int((gt <= 5.0).sum())


def test_depth_edges_and_edge_errors_on_a_step():
    gt = np.ones((10, 12), np.float32)
    gt[:, 6:] = 2.0  # a depth step between columns 5 and 6
    edges = M.depth_edges(gt, np.ones_like(gt, bool))
    assert edges[:, 5].all() and edges[:, 6].all() and edges.sum() == 20
    assert M.dilate(edges, 2).sum() == 10 * 6  # columns 3..8

    perfect = M.compute_metrics(gt * 3 + 1, gt)
    assert perfect.edge_abs_rel == pytest.approx(0.0, abs=1e-6)
    assert perfect.soft_edge_error == pytest.approx(0.0, abs=1e-6)
    assert perfect.n_edge == 20

    # Soft edge error forgives an edge one pixel off ...
    shifted = np.ones_like(gt)
    shifted[:, 7:] = 2.0
    assert M.soft_edge_error(shifted, gt, edges) == pytest.approx(0.0)
    # ... but not a blurred one: columns 4..7 at 1.5 -> errors 0.5/1 (col 5), 0.5/2 (col 6).
    blurred = gt.copy()
    blurred[:, 4:8] = 1.5
    assert M.soft_edge_error(blurred, gt, edges) == pytest.approx((0.5 + 0.25) / 2)

    flat = M.compute_metrics(np.linspace(0, 1, 120).reshape(10, 12), np.full((10, 12), 3.0))
    assert math.isnan(flat.edge_abs_rel) and math.isnan(flat.soft_edge_error)


def test_summary_averages_per_image_and_skips_missing_edge_scores():
    a = M.compute_metrics(X, GT)
    b = M.compute_metrics(np.linspace(0, 1, 120).reshape(10, 12), np.full((10, 12), 3.0))
    s = M.summarize([a, b])
    assert s["n_images"] == 2
    assert s["abs_rel"] == pytest.approx((a.abs_rel + b.abs_rel) / 2)
    assert s["edge_abs_rel"] == pytest.approx(a.edge_abs_rel)  # b has no edges
    assert M.summarize([])["abs_rel"] is None


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 40).astype(float)  # many ties
    b = a + rng.normal(0, 2, 40)
    assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="space"):
        M.compute_metrics(X, GT, space="log")
    with pytest.raises(ValueError, match="differ in size"):
        M.compute_metrics(X, np.ones((3, 3)))
    with pytest.raises(ValueError, match="at least 2 valid"):
        M.compute_metrics(X, np.zeros((2, 2)))
