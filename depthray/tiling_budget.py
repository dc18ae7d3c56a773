"""A views budget for tiled inference (`tiling.budget`, `tiling.detail_threshold`).

A tile pays off where the level below lacks detail; over a plane, a wall or the sky the
coarser estimate is already close to what the tile would give. Before a level's tiles run,
each one is scored from what is known then: the fused level below, never the image. The
score is the mean, over the tile's area, of the depth estimate's high-frequency energy

    |ref - box(ref)| / (max(ref) - min(ref))

zero on any plane, large at depth edges and at poles and wires the level below resolved even
partly. The image is not used: its edge energy follows texture on real photos, and in the
benchmark's test double the image *is* the depth, so a gain measured with it would not carry
over (docs/tiling.md). Neither is the level's uncertainty: added to the score it measured
no better on the double.

Tiles below `detail_threshold` are skipped; of the rest, the highest-scoring ones run, at
most a quota per level (`level_quotas`) that keeps the image within `budget` x the plan's
views. A skipped tile is blended as if it had returned the level below over its area, with
its own feather weights (`background`), so tiled and untiled regions meet through the same
ramps as two tiles do; with budget 1 and threshold 0 nothing is skipped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from depthray.tiling import Level, Tile, TilePlan, sample_region

BOX = 5  # side of the box filter whose residual is the "detail" (reference pixels): wider than
# the ~2 px a coarse model blurs an edge over, so blurred edges still score


def level_quotas(plan: TilePlan, budget: float) -> list[int]:
    """Most tiles each level may run so that the image's views stay <= budget x plan.num_views.

    Tiles are cut from the finest level first: a coarser level is few tiles and every finer
    tile is aligned to it and scored from it (cutting the 6 tiles of the intermediate level at
    ratio 16 to 3 cost +19 % AbsRel on yard where cutting the same views at the finest cost
    +1 %, docs/tiling.md)."""
    quotas = [len(lv.tiles) for lv in plan.levels]
    if budget >= 1.0:
        return quotas
    excess = sum(quotas) - max(0, math.floor(budget * plan.num_views + 1e-9) - 1)
    for k in reversed(range(len(quotas))):
        cut = min(max(excess, 0), quotas[k])
        quotas[k] -= cut
        excess -= cut
    return quotas


def max_views(plan: TilePlan, budget: float) -> int:
    """Upper bound of the views an image spends under the budget (what `depthray plan` shows)."""
    return 1 + sum(level_quotas(plan, budget))


def detail_map(ref: torch.Tensor) -> torch.Tensor:
    """Per reference pixel [h,w]: high-frequency energy of the depth estimate, |ref - box(ref)|,
    in units of its depth range. Computed where the box fits inside the map and extended to the
    border by replication: padding the depth instead would make a slanted plane's border look
    detailed. 0 on any plane; all 0 for a map narrower than 3 px (nothing to tell)."""
    h, w = ref.shape
    box = min(BOX, (min(h, w) - 1) // 2 * 2 + 1)
    if box < 3:
        return torch.zeros(h, w, dtype=torch.float32, device=ref.device)
    r = ref.float()[None, None]
    pad = box // 2
    inner = (r[..., pad : h - pad, pad : w - pad] - F.avg_pool2d(r, box, stride=1)).abs()
    rng = float(ref.max() - ref.min())
    return F.pad(inner, (pad, pad, pad, pad), mode="replicate")[0, 0] / max(rng, 1e-6)


def tile_scores(detail: torch.Tensor, level: Level) -> torch.Tensor:
    """Mean of `detail` [h,w] (reference pixels) over each tile's area: [tiles]."""
    rh, rw = detail.shape
    lh, lw = level.size
    # integral image [h+1,w+1], on the CPU: one copy instead of a device sync per tile
    csum = F.pad(detail.detach().double().cpu().cumsum(0).cumsum(1), (1, 0, 1, 0))
    out = []
    for t in level.tiles:
        y0 = min(rh - 1, math.floor(t.top * rh / lh))
        x0 = min(rw - 1, math.floor(t.left * rw / lw))
        y1 = max(y0 + 1, math.ceil((t.top + t.height) * rh / lh))
        x1 = max(x0 + 1, math.ceil((t.left + t.width) * rw / lw))
        total = csum[y1, x1] - csum[y0, x1] - csum[y1, x0] + csum[y0, x0]
        out.append(float(total) / ((y1 - y0) * (x1 - x0)))
    return torch.tensor(out, dtype=torch.float64)


def select_tiles(scores: torch.Tensor, quota: int, threshold: float) -> list[int]:
    """Indices (in plan order) of the tiles to run: score >= threshold, the best `quota`."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep = [i for i in order if float(scores[i]) >= threshold][: max(0, quota)]
    return sorted(keep)


def background(ref: torch.Tensor, uncertainty: torch.Tensor, tile: Tile, level_size: tuple[int, int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """What a skipped tile contributes: the level below over its area [th,tw] (depth, uncertainty)."""
    shape = (tile.height, tile.width)
    return sample_region(ref, tile, level_size, shape), sample_region(uncertainty, tile, level_size, shape)
