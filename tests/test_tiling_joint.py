"""The joint per-level solve of tiles' scales and shifts (depthray/tiling_joint.py) as a pure function."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthray.tiling import Tile, cut_level
from depthray.tiling_joint import solve_level, tile_overlaps


def _scene(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return 1.0 + yy + 0.5 * torch.sin(6 * xx) + 0.3 * (xx > 0.5).float()  # [h,w]


def _coarse(depth: torch.Tensor, factor: int = 4) -> torch.Tensor:
    h, w = depth.shape
    return F.interpolate(depth[None, None], (h // factor, w // factor), mode="area")[0, 0]


def test_overlaps_are_every_sharing_pair_once():
    level = cut_level((300, 400), 64, 0.25)
    pairs = tile_overlaps(level.tiles)
    brute = set()
    for i, a in enumerate(level.tiles):
        for j, b in enumerate(level.tiles[i + 1 :], i + 1):
            if min(a.top + a.height, b.top + b.height) > max(a.top, b.top) and \
               min(a.left + a.width, b.left + b.width) > max(a.left, b.left):
                brute.add((i, j))
    assert {(i, j) for i, j, _ in pairs} == brute
    for i, j, box in pairs:  # the box lies inside both tiles
        for t in (level.tiles[i], level.tiles[j]):
            assert t.top <= box.top and box.top + box.height <= t.top + t.height
            assert t.left <= box.left and box.left + box.width <= t.left + t.width


@pytest.mark.parametrize("iters", [1, 6])
def test_recovers_known_per_tile_scales_and_shifts(iters):
    torch.manual_seed(0)
    level = cut_level((300, 400), 64, 0.25)
    depth = _scene(300, 400)
    n = len(level.tiles)
    s_true, t_true = 0.5 + torch.rand(n), torch.randn(n)
    tiles = [(depth[t.box] - t_true[k]) / s_true[k] for k, t in enumerate(level.tiles)]
    out = solve_level(tiles, level.tiles, level, _coarse(depth), iters=iters)
    for k, (s, t) in enumerate(out):
        assert s == pytest.approx(float(s_true[k]), abs=1e-4)
        assert t == pytest.approx(float(t_true[k]), abs=1e-4)


def test_constant_tile_gives_zero_scale_and_no_nan():
    level = cut_level((200, 200), 64, 0.25)
    depth = _scene(200, 200)
    tiles = [depth[t.box].clone() for t in level.tiles]
    tiles[4] = torch.full_like(tiles[4], 0.7)  # a flat tile: no scale in it
    out = solve_level(tiles, level.tiles, level, _coarse(depth))
    assert all(math.isfinite(s) and math.isfinite(t) for s, t in out)
    assert out[4][0] == pytest.approx(0.0, abs=1e-6)
    # its shift puts it at the level of its neighbours and the reference, not at 0.7
    assert 0.7 * out[4][0] + out[4][1] == pytest.approx(float(depth[level.tiles[4].box].mean()), abs=0.1)
    for k, (s, t) in enumerate(out):  # the other tiles stay in place (the flat tile, wrong here
        if k != 4:                      # since the scene under it is not flat, pulls a little)
            assert float((tiles[k] * s + t - tiles[k]).abs().mean()) < 0.03


def test_gauge_is_fixed_by_the_anchor():
    """Overlaps alone are met by any common (s, t) (and by s = t = 0): the reference picks one.
    A reference 2x + 3 of the tiles' depth gives every tile (2, 3), however weak the anchor."""
    level = cut_level((256, 256), 64, 0.25)
    depth = _scene(256, 256)
    tiles = [depth[t.box].clone() for t in level.tiles]
    ref = _coarse(depth) * 2.0 + 3.0
    for anchor in (1e-3, 0.1, 10.0):
        out = solve_level(tiles, level.tiles, level, ref, anchor=anchor)
        for s, t in out:
            assert s == pytest.approx(2.0, abs=1e-3) and t == pytest.approx(3.0, abs=3e-3)


def test_overlaps_outvote_a_reference_that_is_wrong_under_one_tile():
    """A reference offset under one tile only pulls that tile a little when its neighbours
    agree with each other: the overlaps tie it to them (the streaming fit follows the reference)."""
    level = cut_level((256, 256), 64, 0.25)
    depth = _scene(256, 256)
    tiles = [depth[t.box].clone() for t in level.tiles]
    k = len(tiles) // 2 + 1
    tile = level.tiles[k]
    ref_full = depth.clone()
    ref_full[tile.box] += 0.2
    out = solve_level(tiles, level.tiles, level, _coarse(ref_full), anchor=0.01, iters=1)
    assert abs(out[k][1]) < 0.1  # the anchor alone would give +0.2


def test_single_tile_is_the_plain_fit():
    level = cut_level((64, 64), 64, 0.25)
    assert len(level.tiles) == 1
    depth = _scene(64, 64)
    (s, t), = solve_level([depth * 0.5 - 1.0], level.tiles, level, _coarse(depth), iters=1)
    assert s == pytest.approx(2.0, abs=1e-6) and t == pytest.approx(2.0, abs=1e-6)


def test_flipped_tile_is_pinned_not_inverted():
    level = cut_level((200, 200), 64, 0.25)
    depth = _scene(200, 200)
    tiles = [depth[t.box].clone() for t in level.tiles]
    tiles[0] = -tiles[0]  # a tile whose depth order is reversed
    out = solve_level(tiles, level.tiles, level, _coarse(depth))
    assert all(s >= 0 for s, _ in out)
    assert np.isfinite(np.array(out)).all()


def test_tile_overlaps_of_disjoint_tiles_is_empty():
    assert tile_overlaps([Tile(0, 0, 10, 10), Tile(10, 10, 10, 10)]) == []

