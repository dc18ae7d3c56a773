"""The parts synthetic scenes are drawn from (depthray/samples.py): a z-buffered canvas, the
camera's pixel rays, textures and colours, and analytic objects (boxes, poles, wires, bars,
planes) that draw themselves with their depth. Pure numpy, vectorised.
"""

from __future__ import annotations

import numpy as np

CAMERA_HEIGHT = 1.6  # metres above the ground plane


class Canvas:
    """Z-buffer: nearest surface wins; colour is written with it."""

    def __init__(self, height: int, width: int, far: float):
        self.depth = np.full((height, width), far, dtype=np.float32)  # [H,W]
        self.rgb = np.zeros((height, width, 3), dtype=np.float32)  # [H,W,3] linear in [0,1]

    def draw(self, rows: slice, cols: slice, depth: np.ndarray, rgb: np.ndarray, mask: np.ndarray) -> None:
        """Composite a surface given on the window (rows, cols); mask marks where it exists."""
        cur = self.depth[rows, cols]
        win = mask & (depth < cur) & (depth > 0)
        np.copyto(cur, depth, where=win)
        np.copyto(self.rgb[rows, cols], rgb, where=win[..., None])


def pixel_rays(height: int, width: int, focal: float, cx: float, cy: float):
    """Normalised ray coordinates u = (x-cx)/f (right), v = (y-cy)/f (down): [1,W], [H,1]."""
    u = ((np.arange(width, dtype=np.float32) + 0.5 - cx) / focal)[None, :]
    v = ((np.arange(height, dtype=np.float32) + 0.5 - cy) / focal)[:, None]
    return u, v


def stripes(a: np.ndarray, period: float) -> np.ndarray:
    """Soft stripes in [0,1] along coordinate `a` (period in the coordinate's units)."""
    return 0.5 + 0.5 * np.sin(a * (2 * np.pi / period))


def checker(a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    return ((np.floor(a / period) + np.floor(b / period)) % 2).astype(np.float32)


def colour(base: np.ndarray, pattern: np.ndarray, contrast: float) -> np.ndarray:
    """Base RGB modulated by a [h,w] pattern in [0,1] -> [h,w,3]."""
    gain = ((1.0 - contrast) + contrast * pattern).astype(np.float32)  # in [0,1]: no clip needed
    return gain[..., None] * np.asarray(base, np.float32)[None, None, :]


def draw_box(canvas: Canvas, rng, u, v, focal, cx, cy, hc) -> None:
    height, width = canvas.depth.shape
    zf = rng.uniform(4.0, 16.0)  # depth of the front face
    bw, bh, bd = rng.uniform(0.5, 2.5), rng.uniform(0.4, 2.2), rng.uniform(0.4, 2.0)
    xl = rng.uniform(-0.5, 0.5) * zf - bw / 2  # world X of the left edge
    base = rng.uniform(0.15, 0.95, 3)
    # Front face: X in [xl, xl+bw], Y in [hc-bh, hc] at depth zf -> a rectangle in pixels.
    c0, c1 = int(np.floor(cx + focal * xl / zf)), int(np.ceil(cx + focal * (xl + bw) / zf))
    r0, r1 = int(np.floor(cy + focal * (hc - bh) / zf)), int(np.ceil(cy + focal * hc / zf))
    c0, c1, r0, r1 = max(c0, 0), min(c1, width), max(r0, 0), min(r1, height)
    if c0 < c1 and r0 < r1:
        rows, cols = slice(r0, r1), slice(c0, c1)
        uu, vv = u[:, cols], v[rows, :]
        x_w, y_w = uu * zf, vv * zf
        z = np.full((r1 - r0, c1 - c0), zf, np.float32)
        grain = stripes(x_w + 0.05 * np.sin(y_w * 7.0), 0.12) * 0.6 + 0.4 * checker(x_w, y_w, 0.3)
        canvas.draw(rows, cols, z, colour(base, grain, 0.45), np.ones_like(z, bool))
    # Side face facing the camera's axis: plane X = xs for z in [zf, zf+bd], drawn on its
    # bounding window only (a full-frame plane per box would dominate the render time).
    if xl < 0 < xl + bw:
        return  # the box straddles the axis: neither side face is visible
    xs = xl + bw if xl + bw < 0 else xl
    zb = zf + bd
    cols_px = sorted([cx + focal * xs / zf, cx + focal * xs / zb])
    c0, c1 = max(int(np.floor(cols_px[0])), 0), min(int(np.ceil(cols_px[1])) + 1, width)
    top = min(cy + focal * (hc - bh) / zf, cy + focal * (hc - bh) / zb)
    r0 = max(int(np.floor(top)), 0)
    r1 = min(int(np.ceil(cy + focal * hc / zf)) + 1, height)
    if c0 >= c1 or r0 >= r1:
        return
    rows, cols = slice(r0, r1), slice(c0, c1)
    z = np.broadcast_to(xs / u[:, cols], (r1 - r0, c1 - c0)).astype(np.float32)
    y_w = v[rows, :] * z
    mask = (z >= zf) & (z <= zb) & (y_w >= hc - bh) & (y_w <= hc)
    side = stripes(z, 0.15) * 0.6 + 0.4 * checker(z, y_w, 0.3)
    canvas.draw(rows, cols, np.where(mask, z, np.inf).astype(np.float32), colour(base * 0.6, side, 0.45), mask)


def draw_pole(canvas: Canvas, rng, focal, cx, cy, hc) -> tuple[float, float, float]:
    """A vertical pole of constant depth; returns its top (col, row, depth) in pixels."""
    height, width = canvas.depth.shape
    zp = rng.uniform(2.5, 14.0)
    pole_h = rng.uniform(2.5, 6.0)
    col = rng.uniform(0.05, 0.95) * width
    wpx = int(rng.integers(1, 4))  # 1-3 px at full resolution, whatever the size
    c0 = int(np.clip(round(col), 0, width - wpx))
    r0 = int(np.clip(np.floor(cy + focal * (hc - pole_h) / zp), 0, height - 1))
    r1 = int(np.clip(np.ceil(cy + focal * hc / zp), r0 + 1, height))
    rows, cols = slice(r0, r1), slice(c0, c0 + wpx)
    z = np.full((r1 - r0, wpx), zp, np.float32)
    shade = np.linspace(0.6, 1.0, wpx, dtype=np.float32)[None, :].repeat(r1 - r0, 0)
    rgb = colour(np.array([0.12, 0.1, 0.08]) * rng.uniform(0.5, 1.5), shade, 0.5)
    canvas.draw(rows, cols, z, rgb, np.ones_like(z, bool))
    return c0 + wpx / 2.0, float(r0), zp


def draw_wire(canvas: Canvas, rng, p1, p2) -> None:
    """A 1-2 px sagging wire between two pole tops; depth varies linearly along it."""
    height, width = canvas.depth.shape
    (x1, y1, z1), (x2, y2, z2) = sorted([p1, p2])
    c0, c1 = int(np.ceil(x1)), int(np.floor(x2))
    if c1 - c0 < 2:
        return
    cols = np.arange(c0, c1, dtype=np.float32)
    t = (cols - x1) / max(x2 - x1, 1e-6)
    sag = rng.uniform(0.02, 0.08) * (x2 - x1)
    row = y1 + (y2 - y1) * t + sag * 4 * t * (1 - t)  # [C] wire centre per column
    z = (z1 + (z2 - z1) * t).astype(np.float32)  # [C]
    thick = rng.uniform(0.6, 1.2)  # half-thickness in pixels -> 1-2 px wires
    r0 = int(np.clip(np.floor(row.min() - thick), 0, height - 1))
    r1 = int(np.clip(np.ceil(row.max() + thick) + 1, r0 + 1, height))
    rr = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5  # [R,1]
    mask = np.abs(rr - row[None, :]) <= thick  # [R,C]
    zz = np.broadcast_to(z[None, :], mask.shape).astype(np.float32)
    rgb = np.broadcast_to(np.array([0.05, 0.05, 0.05], np.float32), mask.shape + (3,)).copy()
    canvas.draw(slice(r0, r1), slice(c0, c1), zz, rgb, mask)


def finish(canvas: Canvas, rng: np.random.Generator, haze_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Haze with distance, mild sensor noise, 8 bits (as step 7 of `_render`)."""
    depth = canvas.depth
    haze = (1.0 - np.exp(-depth / haze_distance))[..., None]  # [H,W,1]
    rgb = canvas.rgb
    rgb += haze * (np.array([0.75, 0.8, 0.85], np.float32) - rgb)
    rgb += 0.01 * rng.standard_normal(size=rgb.shape, dtype=np.float32)
    rgb8 = (np.clip(rgb, 0.0, 1.0, out=rgb) * 255.0 + 0.5).astype(np.uint8)
    return rgb8, depth.astype(np.float32)


def draw_plane_z(canvas: Canvas, rows: slice, cols: slice, z: np.ndarray, rgb: np.ndarray, mask: np.ndarray) -> None:
    canvas.draw(rows, cols, np.where(mask, z, np.inf).astype(np.float32), rgb, mask)


def draw_bar(canvas: Canvas, rng, c0: int, r0: int, r1: int, wpx: int, z: float, base) -> None:
    """A vertical bar wpx pixels wide at constant depth z over rows [r0, r1)."""
    height, width = canvas.depth.shape
    c0 = int(np.clip(c0, 0, width - wpx))
    r0, r1 = int(np.clip(r0, 0, height - 1)), int(np.clip(r1, 1, height))
    if r1 <= r0:
        return
    shade = np.linspace(0.6, 1.0, wpx, dtype=np.float32)[None, :].repeat(r1 - r0, 0)
    zz = np.full((r1 - r0, wpx), z, np.float32)
    canvas.draw(slice(r0, r1), slice(c0, c0 + wpx), zz, colour(base, shade, 0.5), np.ones_like(zz, bool))


def draw_hbar(canvas: Canvas, c0: int, c1: int, r0: int, hpx: int, z0: float, z1: float, base) -> None:
    """A horizontal bar hpx pixels high over columns [c0, c1), depth linear from z0 to z1."""
    height, width = canvas.depth.shape
    c0, c1 = max(c0, 0), min(c1, width)
    r0 = int(np.clip(r0, 0, height - hpx))
    if c1 <= c0:
        return
    z = np.linspace(z0, z1, c1 - c0, dtype=np.float32)[None, :].repeat(hpx, 0)
    shade = np.linspace(0.6, 1.0, hpx, dtype=np.float32)[:, None].repeat(c1 - c0, 1)
    canvas.draw(slice(r0, r0 + hpx), slice(c0, c1), z, colour(base, shade, 0.5), np.ones_like(z, bool))


def draw_indoor_box(canvas: Canvas, rng, focal, cx, cy, hc, zf) -> None:
    """A fronto-parallel box face standing on the floor at depth zf."""
    height, width = canvas.depth.shape
    bw, bh = rng.uniform(0.3, 1.2), rng.uniform(0.4, 2.0)
    xl = rng.uniform(-0.6, 0.6) * zf - bw / 2
    c0, c1 = int(np.floor(cx + focal * xl / zf)), int(np.ceil(cx + focal * (xl + bw) / zf))
    r0, r1 = int(np.floor(cy + focal * (hc - bh) / zf)), int(np.ceil(cy + focal * hc / zf))
    c0, c1, r0, r1 = max(c0, 0), min(c1, width), max(r0, 0), min(r1, height)
    if c0 >= c1 or r0 >= r1:
        return
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    grain = stripes(xx / focal * zf, 0.2) * 0.5 + 0.5 * checker(xx / focal * zf, yy / focal * zf, 0.25)
    z = np.full((r1 - r0, c1 - c0), zf, np.float32)
    canvas.draw(slice(r0, r1), slice(c0, c1), z, colour(rng.uniform(0.15, 0.9, 3), grain, 0.45), np.ones_like(z, bool))
