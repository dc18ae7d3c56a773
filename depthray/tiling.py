"""Tiled inference math (pure functions, torch): plan tiles, feather, align, fuse.

A tiled prediction is built in levels. Level 0 is the global view: the whole image at the
model's processing resolution, which fixes the layout. Each further level cuts the image,
resized to that level's working size, into overlapping square tiles of the model's size.
Every tile (an affine-invariant prediction with its own unknown scale and shift) is aligned
to the level below with a robust scale and shift, then blended with weights that fall
smoothly to zero towards tile borders inside the image.

Fusion variants (`tiling.fusion`; measured in benchmarks/tiling_quality.py, docs/tiling.md):
- ``align``:    one tile level at the working size, tiles aligned to the global view.
- ``lowfreq``:  as ``align``, then the blended tiles' low frequencies are replaced by the
                global view's (tiles give detail, the global view gives layout).
- ``pyramid``:  coarse-to-fine: intermediate levels at 2x, 4x, ... the processing resolution,
                each level's tiles aligned to the fused level below.
- ``pyramid-lowfreq``: ``pyramid``, and each level takes its low frequencies from the one below.
- ``pyramid-split``: ``pyramid`` with a frequency split at the tile scale: each level keeps what
                its tiles see at periods shorter than one tile and takes longer periods from
                the level below (where a tile's own layout error lives; see `split_frequencies`).
- ``pyramid-joint``, ``pyramid-joint-split``: ``pyramid`` / ``pyramid-split`` with each level's
                tiles' scales and shifts solved jointly over their overlaps and the level below
                (depthray/tiling_joint.py; holds a level's tiles until it ends).

Sizes are (height, width) tuples throughout; tiles are given in pixels of their level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from depthray.config import FUSIONS, TilingConfig


def uses_lowfreq(fusion: str) -> bool:
    """Whether a level takes low frequencies from the level below (`fuse_frequencies`)."""
    return fusion.endswith("lowfreq") or fusion.endswith("split")


@dataclass(frozen=True)
class Tile:
    top: int
    left: int
    height: int
    width: int

    @property
    def box(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


@dataclass
class Level:
    size: tuple[int, int]  # working image size of this level
    tiles: list[Tile]
    ramp: tuple[int, int]  # feather length (rows, cols) = overlap between neighbouring tiles


@dataclass
class TilePlan:
    image_size: tuple[int, int]  # input image
    global_size: tuple[int, int]  # the global view the model sees
    fusion: str
    levels: list[Level] = field(default_factory=list)  # tile levels, coarse to fine; [] = global only
    budget: float = 1.0  # tiling.budget / detail_threshold: which tiles run (depthray/tiling_budget.py)
    detail_threshold: float = 0.0

    @property
    def num_tiles(self) -> int:
        return sum(len(lv.tiles) for lv in self.levels)

    @property
    def num_views(self) -> int:
        return 1 + self.num_tiles

    @property
    def tiled(self) -> bool:
        return bool(self.levels)


# ---------------------------------------------------------------------------- planning


def fit_long_side(height: int, width: int, long_side: int, upscale: bool = False) -> tuple[int, int]:
    """Size with the long side at `long_side` (never larger unless `upscale`), aspect kept."""
    scale = long_side / max(height, width)
    if not upscale:
        scale = min(1.0, scale)
    return max(1, round(height * scale)), max(1, round(width * scale))


def global_view_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """The global view: long side at `long_side`, the other side floor(side * long / max), as
    diffusers' Marigold image processor sizes it (round() would give 45 px where diffusers
    gives 44 for a 70x100 image at 64, and a different label); never enlarged here (the model
    enlarges small images with the same rule)."""
    m = max(height, width)
    if m <= long_side:
        return height, width
    return max(1, height * long_side // m), max(1, width * long_side // m)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap`.

    Tiles are spread evenly, so the first starts at 0, the last ends at `length`, and the
    real overlap is the requested one or a little more.
    """
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def cut_level(size: tuple[int, int], tile: int, overlap: float) -> Level:
    """Overlapping tiles of at most tile x tile covering an image of `size`."""
    h, w = size
    th, tw = min(tile, h), min(tile, w)
    rows, cols = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    tiles = [Tile(r, c, th, tw) for r in rows for c in cols]
    # Feather over the smallest overlap on each axis, so neighbours' ramps never leave a gap.
    ramp_h = min((th - (b - a) for a, b in zip(rows, rows[1:])), default=0)
    ramp_w = min((tw - (b - a) for a, b in zip(cols, cols[1:])), default=0)
    return Level(size, tiles, (max(ramp_h, 0), max(ramp_w, 0)))


def _level_long_sides(target: int, res: int, fusion: str) -> list[int]:
    """Long sides of the tile levels: the target, preceded by 2x, 4x ... res for `pyramid`."""
    sides = []
    if fusion.startswith("pyramid"):
        side = 2 * res
        while side * 1.5 < target:  # an intermediate level must be clearly coarser than the target
            sides.append(side)
            side *= 2
    return sides + [target]


def plan_tiles(height: int, width: int, processing_resolution: int, tiling: TilingConfig,
               global_size: tuple[int, int] | None = None) -> TilePlan:
    """Plan the views of one image: the global view, plus tile levels when tiling applies.

    Steps:
     1. the global view: the image with its long side at the processing resolution, or
        `global_size` when the model says what size it takes the whole image at (its
        `view_size`, models/base.py);
     2. decide whether to tile (`off`; `auto` only above auto_threshold x resolution; `on`
        whenever the working size exceeds one tile);
     3. cut levels of overlapping tiles of the model's size; while the total exceeds
        max_tiles, shrink the working size.
    """
    res = int(processing_resolution)
    fusion = tiling.fusion
    if fusion not in FUSIONS:
        raise ValueError(f"tiling.fusion must be one of {FUSIONS}, got {fusion!r}")
    # 1. Global view.
    plan = TilePlan((height, width), tuple(global_size) if global_size else global_view_size(height, width, res),
                    fusion, budget=tiling.budget, detail_threshold=tiling.detail_threshold)
    # 2. Tile at all?
    long_side = max(height, width)
    if tiling.mode == "off" or (tiling.mode == "auto" and long_side <= tiling.auto_threshold * res):
        return plan
    target = tiling.working_resolution or long_side
    if target <= res:
        return plan  # one tile would be the whole image: the global view already is that
    # 3. Levels; shrink the working size until the tile budget holds.
    while True:
        sides = _level_long_sides(target, res, fusion)
        levels = [cut_level(fit_long_side(height, width, s, upscale=True), res, tiling.overlap) for s in sides]
        if sum(len(lv.tiles) for lv in levels) <= tiling.max_tiles or target <= res:
            break
        target = max(res, int(target * 0.9))
    if target <= res:
        return plan
    plan.levels = levels
    return plan


# ---------------------------------------------------------------------------- weights


def feather_1d(start: int, length: int, total: int, ramp: int) -> torch.Tensor:
    """Blend weights along one axis of a tile: [length], in (0, 1].

    Inside the image the weight rises as a smoothstep over `ramp` pixels from ~0 at the
    tile's border; where the tile touches the image border it stays 1, so every pixel has
    positive total weight. Two neighbours overlapping by exactly `ramp` get weights that
    sum to one, because smoothstep(x) + smoothstep(1 - x) = 1.
    """
    pos = torch.arange(length, dtype=torch.float32) + 0.5  # pixel centres
    inf = torch.full((length,), float("inf"))
    if ramp <= 0:
        return torch.ones(length)
    from_lo = pos / ramp if start > 0 else inf
    from_hi = (length - pos) / ramp if start + length < total else inf
    x = torch.minimum(from_lo, from_hi).clamp(0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)  # smoothstep: zero slope at both ends, no visible kink


def tile_weights(tile: Tile, level: Level, device: torch.device | str = "cpu") -> torch.Tensor:
    """Separable feather weights of one tile: [h,w] on `device` (only the two 1-D ramps
    cross to it, not the [h,w] map)."""
    wy = feather_1d(tile.top, tile.height, level.size[0], level.ramp[0]).to(device)  # [h]
    wx = feather_1d(tile.left, tile.width, level.size[1], level.ramp[1]).to(device)  # [w]
    return wy[:, None] * wx[None, :]


# ---------------------------------------------------------------------------- alignment


def robust_weights(r: torch.Tensor, sigma: float, tukey: bool) -> torch.Tensor:
    """IRLS weights of residuals `r` for a robust sigma (1.4826 MAD): Huber (bounded), or
    Tukey's biweight (gross outliers get 0); all ones when the residuals vanish."""
    if sigma <= 1e-12:
        return torch.ones_like(r)
    if tukey:
        return (1 - (r.abs() / (4.685 * sigma)).clamp(max=1.0) ** 2) ** 2
    return (1.345 * sigma / r.abs().clamp_min(1e-12)).clamp(max=1.0)


def fit_scale_shift(
    pred: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor | None = None, iters: int = 10
) -> tuple[float, float]:
    """Robust (s, t) minimising sum w * rho(s * pred + t - ref).

    Iteratively reweighted least squares in float64 on (small) [P] arrays: a few Huber steps
    from the least-squares start (convex, so they cannot lock onto outliers), then Tukey's
    biweight, which gives gross outliers (a pole the reference never saw, a blurred edge)
    zero weight instead of a bounded one. Thresholds scale with the residuals' robust sigma
    (1.4826 MAD). Exact data gives the exact affine map. A flat `pred` carries no scale:
    then s = 0 and t = the weighted mean of ref.
    """
    x = pred.reshape(-1).double()
    y = ref.reshape(-1).double()
    w0 = torch.ones_like(x) if weight is None else weight.reshape(-1).double()
    w = w0
    s, t = 0.0, 0.0
    for it in range(iters):
        sw = w.sum().clamp_min(1e-12)
        mx, my = (w * x).sum() / sw, (w * y).sum() / sw
        vx = (w * (x - mx) ** 2).sum() / sw
        if vx <= 1e-12:
            return 0.0, float(my)
        s_new = max(float((w * (x - mx) * (y - my)).sum() / sw / vx), 0.0)  # never flip depth order
        t_new = float(my - s_new * mx)
        r = (s_new * x + t_new - y).abs()
        sigma = float(1.4826 * r.median())
        converged = abs(s_new - s) < 1e-10 and abs(t_new - t) < 1e-10
        s, t = s_new, t_new
        if converged or sigma <= 1e-12:
            break
        w = w0 * robust_weights(r, sigma, tukey=it >= 3)  # Huber first, then Tukey
    return s, t


def sample_region(ref: torch.Tensor, tile: Tile, level_size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear samples of `ref` [h,w] over a tile's area (in level pixels) on an out_size grid."""
    lh, lw = level_size
    oh, ow = out_size
    # Centres of the output cells, in level pixels, then in grid_sample's [-1,1] of ref.
    ys = tile.top + (torch.arange(oh, dtype=torch.float32, device=ref.device) + 0.5) * (tile.height / oh)
    xs = tile.left + (torch.arange(ow, dtype=torch.float32, device=ref.device) + 0.5) * (tile.width / ow)
    gy, gx = ys / lh * 2 - 1, xs / lw * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # [oh,ow,2] (x,y)
    out = F.grid_sample(ref[None, None].float(), grid[None], mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, 0]  # [oh,ow]


def align_tile(
    depth: torch.Tensor, tile: Tile, level_size: tuple[int, int], ref: torch.Tensor
) -> tuple[float, float]:
    """Scale and shift that map a tile's depth [h,w] onto the reference [rh,rw].

    The fit runs at the reference's own resolution over the tile's area: the tile is
    area-downsampled to the size its area has in the reference, so a sharp tile is not
    compared with the blur of an upsampled coarse map.
    """
    rh, rw = ref.shape
    oh = max(2, min(tile.height, round(tile.height * rh / level_size[0])))
    ow = max(2, min(tile.width, round(tile.width * rw / level_size[1])))
    small = F.interpolate(depth[None, None].float(), (oh, ow), mode="area")[0, 0]  # [oh,ow]
    target = sample_region(ref, tile, level_size, (oh, ow))  # [oh,ow]
    return fit_scale_shift(small, target)


# ---------------------------------------------------------------------------- fusion


class TileBlender:
    """Weighted running sums over one level; tiles are added one at a time (streaming).

    Memory: four float32 maps of the level size, whatever the number of tiles, on `device`
    (the model's, so a GPU model's tiles are fused without a trip through the host).
    """

    def __init__(self, size: tuple[int, int], device: torch.device | str = "cpu"):
        self.size = size
        self.wsum = torch.zeros(size, device=device)  # [H,W] sum w
        self.dsum = torch.zeros(size, device=device)  # [H,W] sum w*d
        self.d2sum = torch.zeros(size, device=device)  # [H,W] sum w*d^2 (tile disagreement)
        self.usum = torch.zeros(size, device=device)  # [H,W] sum w*u^2

    def add(self, tile: Tile, depth: torch.Tensor, uncertainty: torch.Tensor, weight: torch.Tensor) -> None:
        """depth, uncertainty, weight: [h,w], depth already aligned to the level's units."""
        box = tile.box
        self.wsum[box] += weight
        self.dsum[box] += weight * depth
        self.d2sum[box] += weight * depth * depth
        self.usum[box] += weight * uncertainty * uncertainty

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused depth [H,W] and uncertainty [H,W]: the tiles' own (ensemble) uncertainty and
        their disagreement where they overlap, added in quadrature.

        Computed in place over the running sums (a 12 MP level would otherwise need several
        48 MB temporaries), so the blender is spent afterwards.
        """
        w = self.wsum.clamp_min_(1e-12)
        depth = self.dsum.div_(w)
        spread = self.d2sum.div_(w).sub_(depth * depth).clamp_min_(0.0)
        uncertainty = self.usum.div_(w).add_(spread).sqrt_()
        self.wsum = self.dsum = self.d2sum = self.usum = torch.empty(0)
        return depth, uncertainty


def replace_low_frequencies(fine: torch.Tensor, coarse: torch.Tensor, cutoff: float = 4.0) -> torch.Tensor:
    """fine [H,W] with its low frequencies taken from coarse [h,w] (h <= H).

    Both are area-downsampled to a grid `cutoff` times coarser than `coarse`, and their
    difference is upsampled bilinearly and added to `fine`: layout (frequencies below that
    grid) comes from `coarse`, detail from `fine`. The grid is coarser than `coarse` itself
    because a model's output is blurrier than its pixel grid: at its own grid the coarse
    map's blurred edges would be copied into the sharp tiles.
    """
    h, w = coarse.shape
    return _swap_below_grid(fine, coarse, (max(1, round(h / cutoff)), max(1, round(w / cutoff))))


def split_frequencies(fine: torch.Tensor, coarse: torch.Tensor, period: float) -> torch.Tensor:
    """fine [H,W] with the periods longer than `period` (in fine pixels) taken from coarse [h,w].

    The same operation as `replace_low_frequencies`, with the cut given on the fine map's own
    pixel grid: both maps are area-averaged over cells of `period` x `period` fine pixels and
    the difference is upsampled bilinearly and added. Cut at one tile (period = the tile
    size), each tile keeps what it sees within its own extent (detail, depth edges), while the
    tile's layout error, which spans the tile (a model's error tied to position in its view),
    is replaced by the level below, which saw the same area in the middle of a larger view.
    """
    h, w = fine.shape
    return _swap_below_grid(fine, coarse, (max(1, round(h / period)), max(1, round(w / period))))


def _swap_below_grid(fine: torch.Tensor, coarse: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """fine [H,W] + upsampled (area-mean of coarse - area-mean of fine) over `grid` cells."""
    down_fine = F.interpolate(fine[None, None], grid, mode="area")  # [1,1,gh,gw]
    down_coarse = F.interpolate(coarse[None, None].float(), grid, mode="area")  # [1,1,gh,gw]
    correction = F.interpolate(down_coarse - down_fine, fine.shape, mode="bilinear",
                               align_corners=False)[0, 0]  # [H,W]
    return correction.add_(fine)


def fuse_frequencies(fused: torch.Tensor, reference: torch.Tensor, plan: TilePlan, k: int) -> torch.Tensor:
    """A finished level k's fused map [Hk,Wk], with low frequencies from `reference` [h,w] (the
    level below) as the plan's fusion asks: unchanged for align / pyramid, below a grid 4x
    coarser than the reference for the *lowfreq modes, below one tile for pyramid-split."""
    if plan.fusion.endswith("split"):
        tile = plan.levels[k].tiles[0]
        return split_frequencies(fused, reference, max(tile.height, tile.width))
    if uses_lowfreq(plan.fusion):
        return replace_low_frequencies(fused, reference)
    return fused
