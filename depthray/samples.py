"""Synthetic scenes with known depth: test images for demos, evaluation and benchmarks.

A scene is a pinhole view of a small outdoor "yard": a textured ground plane, a slanted back
wall, slanted side walls of limited height, boxes (a front face at one depth plus a visible
slanted side face), thin poles (1-3 px wide at full resolution, whatever the image size)
and sagging wires between pole tops. Depth is the camera z-distance in metres, finite
everywhere (the back wall closes the scene), larger = farther. Every object carries its own
colour and texture and the scene is hazed with distance, so an image-based model can see
the depth edges.

Rendering is a z-buffer over analytic surfaces, fully vectorised in numpy: about 1 s for a
1500x2000 scene and 5 s for 3000x4000 on one CPU core.

GT depth files written by `write_sample_images` are 16-bit PNGs holding depth in
millimetres (metres * 1000, rounded; 65535 mm is the largest value and no scene reaches it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CAMERA_HEIGHT = 1.6  # metres above the ground plane
DEPTH_PNG_SCALE = 1000.0  # GT PNG value = depth in metres * DEPTH_PNG_SCALE (millimetres)


class _Canvas:
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


def _pixel_rays(height: int, width: int, focal: float, cx: float, cy: float):
    """Normalised ray coordinates u = (x-cx)/f (right), v = (y-cy)/f (down): [1,W], [H,1]."""
    u = ((np.arange(width, dtype=np.float32) + 0.5 - cx) / focal)[None, :]
    v = ((np.arange(height, dtype=np.float32) + 0.5 - cy) / focal)[:, None]
    return u, v


def _stripes(a: np.ndarray, period: float) -> np.ndarray:
    """Soft stripes in [0,1] along coordinate `a` (period in the coordinate's units)."""
    return 0.5 + 0.5 * np.sin(a * (2 * np.pi / period))


def _checker(a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    return ((np.floor(a / period) + np.floor(b / period)) % 2).astype(np.float32)


def _colour(base: np.ndarray, pattern: np.ndarray, contrast: float) -> np.ndarray:
    """Base RGB modulated by a [h,w] pattern in [0,1] -> [h,w,3]."""
    gain = ((1.0 - contrast) + contrast * pattern).astype(np.float32)  # in [0,1]: no clip needed
    return gain[..., None] * np.asarray(base, np.float32)[None, None, :]


def make_scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one random scene: (rgb uint8 [H,W,3], depth float32 [H,W] in metres, > 0).

    The same (height, width, seed) always gives the same scene; the layout is defined in
    metres and scales with the image, except poles and wires, whose width is given in
    pixels so they stay 1-3 px thin at any size.
    """
    if height < 8 or width < 8:
        raise ValueError(f"scene must be at least 8x8 pixels, got {height}x{width}")
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _render(height, width, rng)


def _render(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # 1. Camera: ~60-70 degree horizontal field of view, horizon a bit above the centre.
    focal = width * rng.uniform(0.75, 0.95)
    cx, cy = width / 2.0, height * rng.uniform(0.35, 0.45)
    u, v = _pixel_rays(height, width, focal, cx, cy)
    full = (slice(0, height), slice(0, width))
    hc = CAMERA_HEIGHT

    # 2. Back wall: a plane z = zb + k*X, i.e. z = zb / (1 - k*u); slanted by k.
    zb, k = rng.uniform(18.0, 30.0), rng.uniform(-0.6, 0.6)
    canvas = _Canvas(height, width, far=np.float32(1e4))
    z = np.broadcast_to(zb / (1.0 - k * u), (height, width)).astype(np.float32)
    x_w, y_w = u * z, v * z
    bricks = _checker(x_w + 0.3 * (np.floor(y_w / 0.4) % 2), y_w, 0.8) * 0.5 + 0.5 * _stripes(y_w, 0.4)
    canvas.draw(*full, z, _colour(rng.uniform(0.4, 0.9, 3), bricks, 0.5), np.ones_like(z, bool))

    # 3. Ground plane Y = hc below the camera: z = hc / v for rays looking down.
    z = np.broadcast_to(np.where(v > 1e-4, hc / np.maximum(v, 1e-4), np.inf), (height, width)).astype(np.float32)
    x_w = u * z
    tiles = _checker(x_w, z, 1.0) * 0.6 + 0.4 * _stripes(x_w + z, 0.37)
    canvas.draw(*full, z, _colour(rng.uniform(0.3, 0.7, 3), tiles, 0.6), np.isfinite(z))

    # 4. Side walls: planes X = x0 + a*z of limited height, slanted towards the back.
    for side in (-1.0, 1.0):
        x0, a = side * rng.uniform(3.0, 6.0), side * rng.uniform(-0.15, 0.1)
        wall_h = rng.uniform(1.5, 4.0)
        z = np.broadcast_to(x0 / (u - a), (height, width)).astype(np.float32)
        y_w = v * z
        mask = (z > 0.5) & (y_w <= hc) & (y_w >= hc - wall_h) & np.isfinite(z)
        pattern = _stripes(z, 0.9) * 0.5 + 0.5 * _checker(z, y_w, 0.5)
        z = np.where(mask, z, np.inf).astype(np.float32)
        canvas.draw(*full, z, _colour(rng.uniform(0.3, 0.9, 3), pattern, 0.5), mask)

    # 5. Boxes standing on the ground: a fronto-parallel face and a slanted side face.
    for _ in range(int(rng.integers(4, 8))):
        _draw_box(canvas, rng, u, v, focal, cx, cy, hc)

    # 6. Poles (1-3 px wide, any resolution) and wires sagging between pole tops.
    tops = []
    for _ in range(int(rng.integers(3, 7))):
        tops.append(_draw_pole(canvas, rng, focal, cx, cy, hc))
    for (x1, y1, z1), (x2, y2, z2) in zip(tops[:-1], tops[1:]):
        _draw_wire(canvas, rng, (x1, y1, z1), (x2, y2, z2))

    # 7. Haze with distance (aerial perspective) and mild sensor noise, then 8 bits.
    depth = canvas.depth
    haze = (1.0 - np.exp(-depth / 60.0))[..., None]  # [H,W,1]
    rgb = canvas.rgb
    rgb += haze * (np.array([0.75, 0.8, 0.85], np.float32) - rgb)
    rgb += 0.01 * rng.standard_normal(size=rgb.shape, dtype=np.float32)
    rgb8 = (np.clip(rgb, 0.0, 1.0, out=rgb) * 255.0 + 0.5).astype(np.uint8)
    return rgb8, depth.astype(np.float32)


def _draw_box(canvas: _Canvas, rng, u, v, focal, cx, cy, hc) -> None:
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
        grain = _stripes(x_w + 0.05 * np.sin(y_w * 7.0), 0.12) * 0.6 + 0.4 * _checker(x_w, y_w, 0.3)
        canvas.draw(rows, cols, z, _colour(base, grain, 0.45), np.ones_like(z, bool))
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
    side = _stripes(z, 0.15) * 0.6 + 0.4 * _checker(z, y_w, 0.3)
    canvas.draw(rows, cols, np.where(mask, z, np.inf).astype(np.float32), _colour(base * 0.6, side, 0.45), mask)


def _draw_pole(canvas: _Canvas, rng, focal, cx, cy, hc) -> tuple[float, float, float]:
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
    rgb = _colour(np.array([0.12, 0.1, 0.08]) * rng.uniform(0.5, 1.5), shade, 0.5)
    canvas.draw(rows, cols, z, rgb, np.ones_like(z, bool))
    return c0 + wpx / 2.0, float(r0), zp


def _draw_wire(canvas: _Canvas, rng, p1, p2) -> None:
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


def write_sample_images(
    out_dir: str | Path, n: int = 4, size: tuple[int, int] = (480, 640), seed: int = 0
) -> list[Path]:
    """Write `n` scenes as JPEGs into `out_dir` and their GT depth into `out_dir/../gt/`.

    size is (height, width). GT depth goes to `{parent}/gt/{stem}.depth.png`: 16-bit PNG of
    depth in millimetres (metres * DEPTH_PNG_SCALE). Returns the JPEG paths, sorted.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    gt_dir = out_dir.parent / "gt"
    out_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rgb, depth = make_scene(size[0], size[1], seed=seed + i)
        stem = f"scene_{seed + i:05d}"
        path = out_dir / f"{stem}.jpg"
        Image.fromarray(rgb).save(path, quality=95)
        mm = np.clip(np.round(depth * DEPTH_PNG_SCALE), 1, 65535).astype(np.uint16)
        Image.fromarray(mm).save(gt_dir / f"{stem}.depth.png")
        paths.append(path)
    log.info("wrote %d sample images to %s (GT depth in %s)", n, out_dir, gt_dir)
    return paths


def read_depth_png(path: str | Path) -> np.ndarray:
    """Read a GT depth PNG written by `write_sample_images` -> float32 [H,W] metres."""
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float32) / DEPTH_PNG_SCALE
