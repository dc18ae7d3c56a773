"""Joint per-level scale and shift of all tiles (fusions ``pyramid-joint``, ``pyramid-joint-split``).

The streaming fusions align each tile on its own to the level below (`tiling.align_tile`).
Here all tiles of a level are held until the level ends and their scales and shifts are
solved together, in one small least-squares system (no chain order, so no drift):

    unknowns  (s_i, t_i) per tile i;
    overlaps  s_i d_i + t_i ~ s_j d_j + t_j where two tiles share pixels, weighted by the
              product of their feather weights (the level's own pixel grid: exact matches);
    anchor    s_i d_i + t_i ~ ref over the tile's area at the reference's resolution (the
              fused level below, as align_tile compares), weight ANCHOR per level pixel:
              it fixes the gauge (overlaps alone are met by s = t = 0) and carries layout.

Both are area-averaged to cells of 1/CELLS of a tile side before the solve (averaging is
linear, so consistent tiles still fit exactly); this bounds the cost at ~1-2 s on one CPU
thread for a level of 336 tiles (measured with 128 px and 256 px tiles), and measured
better than finer cells on the benchmark (docs/tiling.md). The solve runs on the CPU.

A few iteratively reweighted passes (Huber on overlaps; Huber then Tukey on the anchor,
like fit_scale_shift) keep blurred edges and thin structures the level below never saw
from pulling the fit. The normal equations are dense, 2N x 2N in float64 (N tiles of one
level: a few hundred at most under max_tiles). A flat tile carries no scale: its s is
pinned to 0 (a stiff ridge), as is a negative s (a flipped tile), and the system solved
again.

Memory: every tile's fused depth and uncertainty of a level are held until it ends, i.e.
2 x tiles x tile area float32 (ratio 16 on a 2048 px image: 336 tiles of 128 px = 44 MB;
a 4000x3000 photo at 768 px: 35 tiles = 165 MB; at 256 px and native size, 336 tiles =
176 MB), on top of the blender's four level-size maps, and on the model's device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from depthray.tiling import Level, Tile, robust_weights, sample_region, tile_weights

CELLS = 16  # samples per tile side the solve works on (overlaps and anchor are area-averaged;
# tuned: full resolution / 32 / 16 / 8 measured, docs/tiling.md)
ANCHOR = 0.03  # anchor weight per level pixel, relative to the overlaps' feather products (tuned:
# 0.01-1 measured on yard/street ratios 8 and 16, docs/tiling.md)


def uses_joint(fusion: str) -> bool:
    """Whether a fusion solves a level's tiles jointly (holds them until the level ends)."""
    return "joint" in fusion


def tile_overlaps(tiles: list[Tile]) -> list[tuple[int, int, Tile]]:
    """(i, j, box) for every pair i < j of tiles sharing at least one pixel; box in level pixels."""
    top = np.array([t.top for t in tiles])
    left = np.array([t.left for t in tiles])
    bottom = top + np.array([t.height for t in tiles])
    right = left + np.array([t.width for t in tiles])
    y0, y1 = np.maximum(top[:, None], top[None]), np.minimum(bottom[:, None], bottom[None])  # [N,N]
    x0, x1 = np.maximum(left[:, None], left[None]), np.minimum(right[:, None], right[None])
    ii, jj = np.nonzero(np.triu((y1 > y0) & (x1 > x0), k=1))
    return [(int(i), int(j), Tile(int(y0[i, j]), int(x0[i, j]), int(y1[i, j] - y0[i, j]), int(x1[i, j] - x0[i, j])))
            for i, j in zip(ii, jj)]


def _local(box: Tile, tile: Tile) -> tuple[slice, slice]:
    """`box` (level pixels) in the coordinates of `tile`."""
    return (slice(box.top - tile.top, box.top - tile.top + box.height),
            slice(box.left - tile.left, box.left - tile.left + box.width))


def solve_level(
    depths: list[torch.Tensor],
    tiles: list[Tile],
    level: Level,
    ref: torch.Tensor,
    anchor: float | None = None,
    iters: int = 6,
) -> list[tuple[float, float]]:
    """Scales and shifts (s_i, t_i) of all tiles of a level, solved jointly (module docstring).

    depths: one [h,w] map per tile (the tile's own units); ref: the level below [rh,rw].
    iters = 1 is plain weighted least squares; more add robust reweighting passes.
    """
    lam = ANCHOR if anchor is None else anchor
    n, k = len(tiles), 2
    # Tiles stay float32 at full size (a level's tiles in float64 would double the memory
    # held); only the pooled samples below are float64. Each tile's depth enters centred on
    # its mean m (solve for u = t + s m): its basis is (d - m, 1).
    cpu = [d.detach().to("cpu", torch.float32) for d in depths]
    means = [float(d.double().mean()) for d in cpu]

    def basis(pooled: torch.Tensor, q: int) -> torch.Tensor:  # pooled depth [P] -> [k,P]
        d = pooled.double() - means[q]
        return torch.stack([d, torch.ones_like(d)])

    # Overlap samples: (i, j, Bi, Bj, w): the two tiles' bases [k,P] on the shared box, area-
    # averaged over cells of `cell` px (linear, so exact data still fits exactly; it bounds the
    # cost at ~(tile / cell)^2 samples per overlap), w the cells' summed feather products.
    cell = max(1, max(max(t.height, t.width) for t in tiles) // CELLS)
    feathers = [tile_weights(t, level) for t in tiles]
    pairs = []
    for i, j, box in tile_overlaps(tiles):
        li, lj = _local(box, tiles[i]), _local(box, tiles[j])
        grid = (-(-box.height // cell), -(-box.width // cell))
        maps = torch.stack([cpu[i][li], cpu[j][lj], feathers[i][li] * feathers[j][lj]])  # [3,bh,bw]
        pooled = F.adaptive_avg_pool2d(maps[None], grid)[0].reshape(3, -1)
        w = pooled[2].double() * (box.height * box.width / (grid[0] * grid[1]))
        if float(w.sum()) > 0:
            pairs.append((i, j, basis(pooled[0], i), basis(pooled[1], j), w))
    # Anchor samples: each tile area-downsampled to its area's size in ref (as align_tile),
    # at most CELLS x CELLS.
    rh, rw = ref.shape
    anchors = []
    for q, (t, d) in enumerate(zip(tiles, cpu)):
        oh = max(2, min(t.height, CELLS, round(t.height * rh / level.size[0])))
        ow = max(2, min(t.width, CELLS, round(t.width * rw / level.size[1])))
        small = basis(F.interpolate(d[None, None], (oh, ow), mode="area").reshape(-1), q)  # [k,P]
        target = sample_region(ref.detach().cpu(), t, level.size, (oh, ow)).double().reshape(-1)
        anchors.append((small, target, lam * t.height * t.width / (oh * ow)))
    # Flat samples: rows [S,2k] of the equations' coefficients, their unknowns' indices, weights.
    ar = torch.arange(k)
    if pairs:
        p_rows = torch.cat([torch.cat([bi, -bj]).T for _, _, bi, bj, _ in pairs])  # [Sp,2k]
        p_idx = torch.cat([torch.cat([k * i + ar, k * j + ar]).expand(len(w), 2 * k) for i, j, _, _, w in pairs])
        p_w = torch.cat([w for *_, w in pairs])
        p_id = torch.cat([torch.full((len(w),), q) for q, (*_, w) in enumerate(pairs)])
    else:
        p_rows, p_w = torch.zeros(0, 2 * k, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        p_idx, p_id = torch.zeros(0, 2 * k, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    a_rows = torch.cat([small.T for small, _, _ in anchors])  # [Sa,k]
    a_idx = torch.cat([(k * q + ar).expand(small.shape[1], k) for q, (small, _, _) in enumerate(anchors)])
    a_tgt = torch.cat([target for _, target, _ in anchors])
    a_w = torch.cat([torch.full_like(target, wq) for _, target, wq in anchors])
    a_id = torch.cat([torch.full((len(target),), q) for q, (_, target, _) in enumerate(anchors)])
    p_rw, a_rw = torch.ones_like(p_w), torch.ones_like(a_w)  # robust weights, updated per pass
    # Tiles whose s is held at 0: flat ones (no scale in them) and, below, flipped ones.
    pinned = torch.tensor([float(d.max() - d.min()) <= 1e-6 * max(1.0, float(d.abs().max())) for d in cpu])
    x = torch.zeros(k * n, dtype=torch.float64)
    s_rows = torch.arange(0, k * n, k)
    # `iters` passes in all; a pass that finds a flipped tile pins it (s held at 0; a pinned
    # tile whose s comes out at -0 counts again) and skips the reweighting, as measured.
    for it in range(max(1, iters)):
        a_mat = torch.zeros(k * n, k * n, dtype=torch.float64)
        rhs = torch.zeros(k * n, dtype=torch.float64)
        for rows, idx, eq, w in ((p_rows, p_idx, p_id, p_w * p_rw), (a_rows, a_idx, a_id, a_w * a_rw)):
            m = rows.shape[1]
            outer = (rows[:, :, None] * (rows * w[:, None])[:, None, :]).reshape(-1, m * m)  # [S,m*m]
            blocks = torch.zeros(int(eq.max()) + 1 if len(eq) else 0, m * m, dtype=torch.float64)
            blocks.index_add_(0, eq, outer)  # one m x m block per overlap / per anchor
            first = idx[torch.searchsorted(eq, torch.arange(len(blocks)))]  # [B,m] unknowns
            a_mat.index_put_((first[:, :, None].expand(-1, m, m), first[:, None, :].expand(-1, m, m)),
                             blocks.reshape(-1, m, m), accumulate=True)
        rhs.index_put_((a_idx,), a_rows * (a_w * a_rw * a_tgt)[:, None], accumulate=True)
        # A tiny ridge on every s keeps the system regular; pinned tiles get a stiff one.
        scale = float(a_mat.diagonal().abs().max().clamp_min(1e-12))
        a_mat[s_rows, s_rows] += torch.where(pinned, 1e6 * scale, 1e-10 * scale)
        x = torch.linalg.solve(a_mat, rhs)
        if bool((x[s_rows] < 0).any()):  # never flip depth order: pin and solve again
            pinned |= x[s_rows] < 0
            continue
        if it + 1 >= iters:
            break
        res_p = (p_rows * x[p_idx]).sum(1)
        res_a = (a_rows * x[a_idx]).sum(1) - a_tgt
        if len(res_p):
            p_rw = robust_weights(res_p, float(1.4826 * res_p.abs().median()), tukey=False)
        a_rw = robust_weights(res_a, float(1.4826 * res_a.abs().median()), tukey=it >= 3)
    coef = x.reshape(n, k).clone()
    coef[:, 0].clamp_(min=0.0)
    coef[:, 1] -= coef[:, 0] * torch.tensor(means, dtype=torch.float64)  # u -> t
    return [(float(row[0]), float(row[1])) for row in coef]

