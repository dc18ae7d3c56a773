"""Differential tests: depthray.ensemble.ensemble_depth against diffusers'
MarigoldDepthPipeline.ensemble_depth (a static method: no pipeline is loaded).

Member sets are what Marigold's members look like: one scene, each member with its own scale
and shift, smooth (low-frequency) disagreement plus a little pixel noise; optionally one member
with a flat band or one constant member. Where depthray differs on purpose (closed-form
alignment, the true median at even sizes, the gauge) docs/ensembling.md says why; the tests
below pin each difference down.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthray.ensemble import ensemble_depth, normalize_members, solve_alignment

SIZES = [2, 3, 5, 10]
REDUCTIONS = ["median", "mean"]


def _scene(h: int = 64, w: int = 96) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    d = 0.3 + 0.5 * y + 0.15 * torch.sin(7 * x) ** 2
    d[h // 5 : h // 2, w // 4 : w // 2] = 0.25  # a near box: depth edges
    return (d - d.min()) / (d.max() - d.min())  # [h,w] in [0,1]


def _members(e: int, kind: str, seed: int, size: tuple[int, int] = (64, 96)) -> torch.Tensor:
    """[E,h,w] non-negative members (diffusers expects depth >= 0)."""
    g = torch.Generator().manual_seed(seed)
    gt = _scene(*size)
    s = 0.6 + 0.8 * torch.rand(e, generator=g)  # [E]
    t = 0.3 * torch.rand(e, generator=g) - 0.1  # [E]
    low = torch.randn(e, 1, 6, 8, generator=g)
    smooth = F.interpolate(low, size=gt.shape, mode="bicubic", align_corners=False)[:, 0]  # [E,h,w]
    m = gt * s[:, None, None] + t[:, None, None] + 0.04 * smooth + 0.005 * torch.randn(e, *gt.shape, generator=g)
    if kind == "constant":
        m[-1] = 0.4
    elif kind == "flat":
        m[-1, : gt.shape[0] // 3] = m[-1, : gt.shape[0] // 3].mean()  # a flat (sky-like) band
    return m.clamp_min(0.0)


_torch_median = torch.median


def _true_median(x, dim=None, keepdim=False):
    """torch.median with depthray's even-size rule (mean of the two middle values)."""
    if dim is None or x.shape[dim] % 2:
        return _torch_median(x) if dim is None else _torch_median(x, dim=dim, keepdim=keepdim)
    n = x.shape[dim]
    mid = x.sort(dim=dim).values.narrow(dim, n // 2 - 1, 2).mean(dim=dim, keepdim=keepdim)
    return SimpleNamespace(values=mid)


def _diffusers(members: torch.Tensor, reduction: str, true_median: bool = True, params=None):
    """diffusers' ensemble_depth on [E,h,w] -> depth, uncertainty [h,w].

    true_median: swap in depthray's even-size median (a no-op at odd E). params: the
    alignment to use instead of diffusers' BFGS result (its raw-member parameterisation).
    """
    from diffusers import MarigoldDepthPipeline

    with contextlib.ExitStack() as stack:
        if true_median:
            stack.enter_context(mock.patch.object(torch, "median", _true_median))
        if params is not None:
            stack.enter_context(mock.patch("scipy.optimize.minimize", lambda *a, **k: SimpleNamespace(x=params)))
        depth, unc = MarigoldDepthPipeline.ensemble_depth(members[:, None], output_uncertainty=True,
                                                           reduction=reduction)
    return depth[0, 0], unc[0, 0]


def _ours_as_diffusers_params(members: torch.Tensor) -> np.ndarray:
    """depthray's alignment of [E,h,w] raw members as diffusers' (s, t) on the raw members."""
    x = normalize_members(members[None])  # [1,E,h,w]
    s, t = solve_alignment(x)  # [1,E] x2
    flat = members.flatten(1).double()  # [E,P]
    lo = flat.amin(dim=1)
    rng = (flat.amax(dim=1) - lo).clamp_min(1e-6)
    s, t = s[0].double(), t[0].double()
    return torch.cat([s / rng, t - s * lo / rng]).numpy()


@pytest.mark.parametrize("kind", ["affine+noise", "flat", "constant"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("e", SIZES)
def test_fusion_equals_diffusers_given_the_same_alignment(e, reduction, kind):
    """With the alignment held equal, depth and uncertainty are diffusers' to float precision:
    mean + unbiased std, median + MAD (diffusers' definition: no 1.4826 factor) and the same
    final [0,1] normalisation. Even sizes with the median use the true median (the reference
    is diffusers with that rule swapped in); odd sizes are plain diffusers."""
    members = _members(e, kind, seed=10 * e + 1)
    ref_d, ref_u = _diffusers(members, reduction, params=_ours_as_diffusers_params(members))
    res = ensemble_depth(members[None], reduction)
    assert float(ref_u.mean()) > 1e-3, "a zero reference uncertainty would make this meaningless"
    torch.testing.assert_close(res.depth[0], ref_d, atol=1e-4, rtol=0)
    torch.testing.assert_close(res.uncertainty[0], ref_u, atol=1e-4, rtol=0)


def _members_in_output_units(members: torch.Tensor, params: np.ndarray, reduction: str) -> torch.Tensor:
    """[E,h,w] members aligned by diffusers-parameterised (s, t), in the units of the fused
    output: shifted and scaled by the fused map's min and range, as the last step of
    ensemble_depth does (the true median at even E, as the reference uses)."""
    s, t = (torch.from_numpy(v) for v in np.split(params, 2))
    aligned = members.double() * s[:, None, None] + t[:, None, None]
    e = aligned.shape[0]
    if reduction == "mean":
        fused = aligned.mean(dim=0)
    else:
        fused = aligned.sort(dim=0).values[(e - 1) // 2 : e // 2 + 1].mean(dim=0)
    lo, hi = fused.min(), fused.max()
    return (aligned - lo) / (hi - lo)


@pytest.mark.parametrize("kind", ["affine+noise", "flat"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("e", SIZES)
def test_close_to_diffusers_end_to_end(e, reduction, kind):
    """Against diffusers' own scipy BFGS alignment (true median swapped in at even E).

    Given the same alignment the two fuse identically (the test above, to 1e-4), so every
    end-to-end difference comes from the alignment alone, and it is bounded by how far the two
    alignments place each member (A_i ours, B_i diffusers', both in output units):
    - per pixel, the median and the mean are 1-Lipschitz: |med A - med B| <= max_i |A_i - B_i|,
      |mean A - mean B| <= mean_i |A_i - B_i|;
    - the MAD moves by at most twice that max (each |A_i - med A| moves by |A_i - B_i| plus the
      median's move), the unbiased std by at most ||A - B||_2 / sqrt(E - 1) (centring is a
      projection, so it never lengthens the difference).
    These bounds hold on any CPU, whatever BFGS's numerical gradients do there (diffusers' own
    result moves with the CPU's float paths). What they do not say is that the alignments agree;
    that is the last assertion: no member moves between the two alignments by as much as the
    members disagree with each other (mean |A_i - B_i| below the members' mean absolute
    deviation from the fused map), i.e. the choice of solver stays inside the ensemble's own
    noise. (Which alignment is better is scored on diffusers' own cost in the next test.)"""
    import scipy.optimize

    members = _members(e, kind, seed=100 * e)
    seen = {}
    real = scipy.optimize.minimize

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["params"] = np.array(out.x, dtype=np.float64)
        return out

    with mock.patch("scipy.optimize.minimize", spy):
        ref_d, ref_u = _diffusers(members, reduction)
    res = ensemble_depth(members[None], reduction)
    ours = _members_in_output_units(members, _ours_as_diffusers_params(members), reduction)
    theirs = _members_in_output_units(members, seen["params"], reduction)
    moved = (ours - theirs).abs()  # [E,h,w]
    float_eps = 1e-4  # the same-alignment agreement shown above
    if reduction == "median":
        depth_bound = moved.amax(dim=0)
        unc_bound = 2 * moved.amax(dim=0)
    else:
        depth_bound = moved.mean(dim=0)
        unc_bound = ((ours - theirs) ** 2).sum(dim=0).sqrt() / (e - 1) ** 0.5
    depth_diff = (res.depth[0].double() - ref_d.double()).abs()
    unc_diff = (res.uncertainty[0].double() - ref_u.double()).abs()
    assert float(depth_diff.mean()) <= float(depth_bound.mean()) + float_eps
    assert float((depth_diff - depth_bound).max()) <= float_eps  # pixel by pixel, not only on average
    assert float(unc_diff.mean()) <= float(unc_bound.mean()) + float_eps
    spread = float((theirs - theirs.median(dim=0).values).abs().mean())
    assert float(moved.mean()) < spread, (float(moved.mean()), spread)


@pytest.mark.parametrize("kind", ["affine+noise", "flat"])
@pytest.mark.parametrize("e", SIZES)
def test_closed_form_alignment_beats_diffusers_bfgs_on_its_own_cost(e, kind):
    """Scored on diffusers' own cost function (sum of pairwise RMS + [0,1] regulariser), the
    closed-form alignment (which minimises the sum of pairwise mean squares) is within 5 % of
    diffusers' BFGS result, and from E=5 on it is lower (measured 3-22 % lower across CPU
    float paths): diffusers stops after max_iter=2 BFGS steps, before it converges."""
    import scipy.optimize

    members = _members(e, kind, seed=100 * e)
    seen = {}
    real = scipy.optimize.minimize

    def spy(fun, x0, *args, **kwargs):
        out = real(fun, x0, *args, **kwargs)
        seen.update(fun=fun, cost=float(out.fun))
        return out

    with mock.patch("scipy.optimize.minimize", spy):
        _diffusers(members, "median", true_median=False)
    # Our alignment in diffusers' parameterisation, with the gauge chosen so the fused depth
    # spans [0,1] (the regulariser's optimum; the gauge never changes the output).
    x = normalize_members(members[None])
    s, t = solve_alignment(x)
    fused = (x * s[:, :, None, None] + t[:, :, None, None]).median(dim=1).values  # [1,h,w]
    lo, hi = float(fused.min()), float(fused.max())
    flat = members.flatten(1)
    mn, rng = flat.amin(dim=1), (flat.amax(dim=1) - flat.amin(dim=1)).clamp_min(1e-6)
    s_raw = s[0] / rng / (hi - lo)
    t_raw = (t[0] - s[0] * mn / rng - lo) / (hi - lo)
    ours = seen["fun"](torch.cat([s_raw, t_raw]).double().numpy())
    # The objectives differ (sum of pairwise mean squares here; pairwise RMS plus a range
    # regulariser there), so where two BFGS steps get near diffusers' own optimum (E <= 3) ours
    # may sit a little above it on diffusers' cost: "a little" = 5 %. From E = 5 on, two steps
    # are far from converged and the closed form must simply be better.
    assert ours < 1.05 * seen["cost"]
    if e >= 5:
        assert ours < seen["cost"]


@pytest.mark.parametrize("e", SIZES)
def test_constant_member(e):
    """One member constant (a failed member). Both implementations place it where their
    alignment says: ours by least squares at the other members' average depth, diffusers
    near where min-max normalisation put it (its scale starts at 1e6). With the mean both
    fuse to the same depth. With the median the placements differ, so the depths do too
    (diffusers' placement of such a member is erratic); ours keeps the label inside the
    other members' middle band and the uncertainty keeps flagging the disagreement."""
    # Smaller: diffusers' BFGS crawls with a member at scale 1e6 (~100 s at E=10 on 64x96).
    members = _members(e, "constant", seed=100 * e, size=(32, 48))
    ref_d, _ = _diffusers(members, "mean")
    ours = ensemble_depth(members[None], "mean")
    assert float((ours.depth[0] - ref_d).abs().mean()) < 0.01
    assert float(ours.scale[0, -1].abs()) < 1e-3  # the constant member takes no scale
    ours = ensemble_depth(members[None], "median")
    # With the median, a member with no scale is one outlier among E values: at each pixel the
    # fused depth stays inside the band of the other members' middle order statistics (value j
    # of the sorted E lies between values j-1 and j of the other E-1), an order-statistic fact,
    # so no tolerance from a run: the failed member cannot drag the label. (At E = 2 the true
    # median is the midpoint, so one bad member of two does move it: nothing to bound.)
    if e >= 3:
        x = normalize_members(members[None])
        aligned = (x * ours.scale[:, :, None, None] + ours.shift[:, :, None, None])[0]  # [E,h,w]
        fused = aligned.sort(dim=0).values[(e - 1) // 2 : e // 2 + 1].mean(dim=0)
        others = aligned[:-1].sort(dim=0).values  # [E-1,h,w]
        lo_j, hi_j = ((e - 1) // 2 - 1, (e - 1) // 2) if e % 2 else (e // 2 - 2, e // 2)
        lo, hi = others[lo_j], others[hi_j]
        assert bool(((fused >= lo - 1e-6) & (fused <= hi + 1e-6)).all())
    assert float(ours.uncertainty.mean()) > 0.005


def test_diffusers_lower_median_is_what_depthray_fixes():
    """Plain diffusers at E=2 with the median (given depthray's alignment): depth is the
    pixel-wise nearer (smaller) aligned member and the MAD is 0 everywhere. depthray gives
    the midpoint of the two and a real uncertainty."""
    members = _members(2, "affine+noise", seed=7)
    ref_d, ref_u = _diffusers(members, "median", true_median=False, params=_ours_as_diffusers_params(members))
    assert float(ref_u.abs().max()) == 0.0

    def unit(d):
        return (d - d.min()) / (d.max() - d.min())

    res = ensemble_depth(members[None], "median")
    x = normalize_members(members[None])
    aligned = (x * res.scale[:, :, None, None] + res.shift[:, :, None, None])[0]  # [2,h,w]
    torch.testing.assert_close(ref_d, unit(aligned.amin(dim=0)), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.depth[0], unit(aligned.mean(dim=0)), atol=1e-4, rtol=0)
    assert float((res.depth[0] - ref_d).abs().mean()) > 0.002
    assert float(res.uncertainty.mean()) > 0.005
