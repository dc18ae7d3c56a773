"""Ensembling math on hand-made arrays: known scale/shift recovered, median/MAD, mean/std."""

from __future__ import annotations

import pytest
import torch

from depthray.ensemble import ensemble_depth, fuse, normalize_members, solve_alignment


def _scene(h: int = 24, w: int = 32) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return 0.2 + 0.5 * y + 0.3 * torch.sin(6 * x) ** 2  # [h,w], not constant, not affine in x,y


def test_known_affine_members_are_aligned_exactly():
    gt = _scene()
    scales = torch.tensor([1.0, 0.5, 2.0, 3.0])
    shifts = torch.tensor([0.0, 0.3, -1.0, 5.0])
    members = (gt * scales[:, None, None] + shifts[:, None, None]).unsqueeze(0)  # [1,4,h,w]
    res = ensemble_depth(members, "median")
    expected = (gt - gt.min()) / (gt.max() - gt.min())
    torch.testing.assert_close(res.depth[0], expected, atol=1e-5, rtol=0)
    assert float(res.uncertainty.abs().max()) < 1e-5
    # Aligned members coincide: the recovered parameters undo each member's transform.
    x = normalize_members(members)
    aligned = x * res.scale[:, :, None, None] + res.shift[:, :, None, None]
    assert float((aligned - aligned[:, :1]).abs().max()) < 1e-5
    torch.testing.assert_close(res.scale.mean(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_alignment_recovers_relative_parameters_on_raw_members():
    gt = _scene().unsqueeze(0).unsqueeze(0)  # [1,1,h,w]
    members = torch.cat([gt, 2 * gt + 1], dim=1)  # member 1 = 2*member 0 + 1
    scale, shift = solve_alignment(members)
    # s0*g + t0 == s1*(2g+1) + t1 -> s0 = 2*s1, t0 - t1 = s1. Gauge: sum(s*sd) = sum(sd) with
    # sd = (sd_g, 2 sd_g) -> s0 + 2 s1 = 3, and mean(t) = 0 -> s = (3/2, 3/4), t = (3/8, -3/8).
    torch.testing.assert_close(scale[0, 0] / scale[0, 1], torch.tensor(2.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(scale[0], torch.tensor([3 / 2, 3 / 4]), atol=1e-4, rtol=0)
    torch.testing.assert_close(shift[0], torch.tensor([3 / 8, -3 / 8]), atol=1e-4, rtol=0)


def test_median_and_mad_by_hand():
    a = torch.tensor([[0.0, 1.0]])
    members = torch.stack([a, a * 0 + 0.5, a * 0 + 0.9])[None]  # [1,3,1,2]
    depth, unc = fuse(members, "median")
    # pixel 0: values 0, .5, .9 -> median .5, deviations .5, 0, .4 -> MAD .4
    # pixel 1: values 1, .5, .9 -> median .9, deviations .1, .4, 0 -> MAD .1
    torch.testing.assert_close(depth[0, 0], torch.tensor([0.5, 0.9]))
    torch.testing.assert_close(unc[0, 0], torch.tensor([0.4, 0.1]))


def test_mean_and_std_by_hand():
    members = torch.tensor([[[[1.0]], [[2.0]], [[6.0]]]])  # [1,3,1,1]
    depth, unc = fuse(members, "mean")
    assert float(depth) == pytest.approx(3.0)
    # Unbiased (E - 1) standard deviation, as diffusers' torch.std: sqrt(14 / 2), not sqrt(14 / 3).
    assert float(unc) == pytest.approx((((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) ** 0.5)


def test_even_median_is_the_mean_of_the_two_middle_members():
    # E = 2: depth halfway between the members (not the nearer one), MAD = half the gap.
    members = torch.tensor([[0.2, 0.9], [0.6, 0.1]]).reshape(2, 1, 1, 2).transpose(0, 1)  # [1,2,1,2]
    depth, unc = fuse(members, "median")
    torch.testing.assert_close(depth[0, 0], torch.tensor([0.4, 0.5]))
    torch.testing.assert_close(unc[0, 0], torch.tensor([0.2, 0.4]))
    # E = 4: values 0, .1, .5, .9 -> median .3 (torch.median would say .1, biased near);
    # deviations .3, .2, .2, .6 -> MAD .25.
    members = torch.tensor([0.9, 0.0, 0.5, 0.1]).reshape(1, 4, 1, 1)
    depth, unc = fuse(members, "median")
    assert float(depth) == pytest.approx(0.3)
    assert float(unc) == pytest.approx(0.25)


def test_two_noisy_members_give_a_real_depth_and_uncertainty():
    gen = torch.Generator().manual_seed(1)
    gt = _scene()
    a = gt + 0.03 * torch.randn(gt.shape, generator=gen)
    b = 2 * (gt + 0.03 * torch.randn(gt.shape, generator=gen)) + 1
    res = ensemble_depth(torch.stack([a, b])[None], "median")
    x = normalize_members(torch.stack([a, b])[None])
    aligned = x * res.scale[:, :, None, None] + res.shift[:, :, None, None]  # [1,2,h,w]
    mid = aligned.mean(dim=1)[0]
    expected = (mid - mid.min()) / (mid.max() - mid.min())
    torch.testing.assert_close(res.depth[0], expected, atol=1e-5, rtol=0)  # not the nearer member
    assert float((aligned[0, 0] - aligned[0, 1]).abs().mean()) > 0.01
    # E = 2: both members sit half their distance from the midpoint, so the MAD is exactly
    # that, in output units (divided by the fused map's range, like the depth).
    half = (aligned[0, 0] - aligned[0, 1]).abs() / 2 / (mid.max() - mid.min())
    torch.testing.assert_close(res.uncertainty[0], half, atol=1e-5, rtol=0)
    assert float(res.uncertainty.mean()) > 0.005  # E = 2 disagreement shows up


def test_constant_member_does_not_take_the_scale():
    """A constant member normalises to 0 and its scale is free; a plain mean(s) = 1 gauge let
    it take all the scale and collapse every other member to s = 0."""
    gen = torch.Generator().manual_seed(2)
    gt = _scene()
    real = torch.stack([gt * s + t + 0.01 * torch.randn(gt.shape, generator=gen)
                        for s, t in [(1, 0), (2, 1), (0.5, -2), (3, 0.2)]])  # [4,h,w]
    members = torch.cat([real, torch.full((1, *gt.shape), 0.7)])[None]  # [1,5,h,w]
    res = ensemble_depth(members, "mean")
    assert float(res.scale[0, :4].min()) > 0.8
    assert float(res.scale[0, 4].abs()) < 1e-3
    gtn = (gt - gt.min()) / (gt.max() - gt.min())
    assert float((res.depth[0] - gtn).abs().mean()) < 0.02


def test_noisy_members_fuse_closer_than_any_member():
    gen = torch.Generator().manual_seed(0)
    gt = _scene()
    gtn = (gt - gt.min()) / (gt.max() - gt.min())
    members = torch.stack([
        (gt + 0.05 * torch.randn(gt.shape, generator=gen)) * s + t
        for s, t in [(1, 0), (2, 1), (0.5, -2), (3, 0.2), (1.5, 4)]
    ])[None]
    for reduction in ("median", "mean"):
        res = ensemble_depth(members, reduction)
        assert float(res.depth.min()) == pytest.approx(0.0, abs=1e-6)
        assert float(res.depth.max()) == pytest.approx(1.0, abs=1e-6)
        fused_err = float((res.depth[0] - gtn).abs().mean())
        single = normalize_members(members)[0]
        member_err = min(float((m - gtn).abs().mean()) for m in single)
        assert fused_err < member_err
        assert float(res.uncertainty.mean()) > 0.005  # noise shows up as uncertainty


def test_single_member_is_passed_through():
    m = torch.rand(2, 1, 5, 6)
    res = ensemble_depth(m)
    torch.testing.assert_close(res.depth, m[:, 0])
    assert float(res.uncertainty.abs().max()) == 0.0


def test_views_are_independent_in_a_batch():
    gt = _scene()
    v0 = torch.stack([gt, 2 * gt + 1, gt * 0.1])
    v1 = torch.stack([gt.flip(0), gt.flip(0) * 3, gt.flip(0) - 2])
    both = ensemble_depth(torch.stack([v0, v1]))
    alone = ensemble_depth(v1[None])
    torch.testing.assert_close(both.depth[1], alone.depth[0], atol=1e-6, rtol=0)


def test_bad_reduction_is_rejected():
    with pytest.raises(ValueError, match="median"):
        ensemble_depth(torch.rand(1, 3, 4, 4), "max")
