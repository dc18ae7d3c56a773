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

from depthray.scene_parts import (
    CAMERA_HEIGHT,
    Canvas,
    checker,
    colour,
    draw_bar,
    draw_box,
    draw_hbar,
    draw_indoor_box,
    draw_plane_z,
    draw_pole,
    draw_wire,
    finish,
    pixel_rays,
    stripes,
)

log = logging.getLogger(__name__)

DEPTH_PNG_SCALE = 1000.0  # GT PNG value = depth in metres * DEPTH_PNG_SCALE (millimetres)


SCENE_FAMILIES = ("yard", "street", "indoor")


def make_scene(height: int, width: int, seed: int = 0, family: str = "yard") -> tuple[np.ndarray, np.ndarray]:
    """Render one random scene: (rgb uint8 [H,W,3], depth float32 [H,W] in metres, > 0).

    The same (height, width, seed, family) always gives the same scene; the layout is
    defined in metres and scales with the image, except poles, wires, fence pickets and
    table legs, whose width is given in pixels so they stay 1-3 px thin at any size.

    Families: ``yard`` (the default: ground, slanted walls, boxes, a few poles and wires),
    ``street`` (outdoor, dominated by thin structures: a picket fence, a lattice, many
    poles and a web of wires in front of distant facades), ``indoor`` (a room 3-8 m deep:
    floor, ceiling, walls, furniture boxes, tables on thin legs, shelves, a door frame).
    """
    if height < 8 or width < 8:
        raise ValueError(f"scene must be at least 8x8 pixels, got {height}x{width}")
    if family not in SCENE_FAMILIES:
        raise ValueError(f"family must be one of {SCENE_FAMILIES}, got {family!r}")
    rng = np.random.default_rng(seed)
    render = {"yard": _render, "street": _render_street, "indoor": _render_indoor}[family]
    with np.errstate(divide="ignore", invalid="ignore"):
        return render(height, width, rng)


def _camera(height: int, width: int, rng: np.random.Generator, focal_range: tuple[float, float],
            horizon_range: tuple[float, float]):
    """A pinhole camera: focal length (in widths), principal point (horizon at a fraction
    of the height), each pixel's ray (u, v) and the full-frame slice."""
    focal = width * rng.uniform(*focal_range)
    cx, cy = width / 2.0, height * rng.uniform(*horizon_range)
    u, v = pixel_rays(height, width, focal, cx, cy)
    return focal, cx, cy, u, v, (slice(0, height), slice(0, width))


def _render(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # 1. Camera: ~60-70 degree horizontal field of view, horizon a bit above the centre.
    focal, cx, cy, u, v, full = _camera(height, width, rng, (0.75, 0.95), (0.35, 0.45))
    hc = CAMERA_HEIGHT

    # 2. Back wall: a plane z = zb + k*X, i.e. z = zb / (1 - k*u); slanted by k.
    zb, k = rng.uniform(18.0, 30.0), rng.uniform(-0.6, 0.6)
    canvas = Canvas(height, width, far=np.float32(1e4))
    z = np.broadcast_to(zb / (1.0 - k * u), (height, width)).astype(np.float32)
    x_w, y_w = u * z, v * z
    bricks = checker(x_w + 0.3 * (np.floor(y_w / 0.4) % 2), y_w, 0.8) * 0.5 + 0.5 * stripes(y_w, 0.4)
    canvas.draw(*full, z, colour(rng.uniform(0.4, 0.9, 3), bricks, 0.5), np.ones_like(z, bool))

    # 3. Ground plane Y = hc below the camera: z = hc / v for rays looking down.
    z = np.broadcast_to(np.where(v > 1e-4, hc / np.maximum(v, 1e-4), np.inf), (height, width)).astype(np.float32)
    x_w = u * z
    tiles = checker(x_w, z, 1.0) * 0.6 + 0.4 * stripes(x_w + z, 0.37)
    canvas.draw(*full, z, colour(rng.uniform(0.3, 0.7, 3), tiles, 0.6), np.isfinite(z))

    # 4. Side walls: planes X = x0 + a*z of limited height, slanted towards the back.
    for side in (-1.0, 1.0):
        x0, a = side * rng.uniform(3.0, 6.0), side * rng.uniform(-0.15, 0.1)
        wall_h = rng.uniform(1.5, 4.0)
        z = np.broadcast_to(x0 / (u - a), (height, width)).astype(np.float32)
        y_w = v * z
        mask = (z > 0.5) & (y_w <= hc) & (y_w >= hc - wall_h) & np.isfinite(z)
        pattern = stripes(z, 0.9) * 0.5 + 0.5 * checker(z, y_w, 0.5)
        z = np.where(mask, z, np.inf).astype(np.float32)
        canvas.draw(*full, z, colour(rng.uniform(0.3, 0.9, 3), pattern, 0.5), mask)

    # 5. Boxes standing on the ground: a fronto-parallel face and a slanted side face.
    for _ in range(int(rng.integers(4, 8))):
        draw_box(canvas, rng, u, v, focal, cx, cy, hc)

    # 6. Poles (1-3 px wide, any resolution) and wires sagging between pole tops.
    tops = []
    for _ in range(int(rng.integers(3, 7))):
        tops.append(draw_pole(canvas, rng, focal, cx, cy, hc))
    for (x1, y1, z1), (x2, y2, z2) in zip(tops[:-1], tops[1:]):
        draw_wire(canvas, rng, (x1, y1, z1), (x2, y2, z2))

    # 7. Haze with distance (aerial perspective) and mild sensor noise, then 8 bits.
    depth = canvas.depth
    haze = (1.0 - np.exp(-depth / 60.0))[..., None]  # [H,W,1]
    rgb = canvas.rgb
    rgb += haze * (np.array([0.75, 0.8, 0.85], np.float32) - rgb)
    rgb += 0.01 * rng.standard_normal(size=rgb.shape, dtype=np.float32)
    rgb8 = (np.clip(rgb, 0.0, 1.0, out=rgb) * 255.0 + 0.5).astype(np.uint8)
    return rgb8, depth.astype(np.float32)


def _render_street(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Outdoor scene of thin structures: facades far away, a fence, a lattice, poles, wires."""
    focal, cx, cy, u, v, full = _camera(height, width, rng, (0.7, 0.9), (0.4, 0.5))
    hc = CAMERA_HEIGHT
    canvas = Canvas(height, width, far=np.float32(1e4))
    # Facades: a few far slanted planes side by side, at 30-80 m.
    edges = np.sort(rng.uniform(0, width, int(rng.integers(2, 5))))
    bounds = [0, *[int(e) for e in edges], width]
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        if c1 <= c0:
            continue
        zb, k = rng.uniform(30.0, 80.0), rng.uniform(-0.4, 0.4)
        cols = slice(c0, c1)
        z = np.broadcast_to(zb / (1.0 - k * u[:, cols]), (height, c1 - c0)).astype(np.float32)
        pattern = checker(u[:, cols] * z, v * z, 2.0) * 0.5 + 0.5 * stripes(v * z, 3.0)
        canvas.draw(full[0], cols, z, colour(rng.uniform(0.4, 0.9, 3), pattern, 0.5), np.ones_like(z, bool))
    # Ground.
    z = np.broadcast_to(np.where(v > 1e-4, hc / np.maximum(v, 1e-4), np.inf), (height, width)).astype(np.float32)
    x_w = u * z
    canvas.draw(*full, z, colour(rng.uniform(0.3, 0.6, 3), checker(x_w, z, 1.5) * 0.5 + 0.5 * stripes(z, 0.5), 0.5),
                np.isfinite(z))
    # A picket fence across the view at 6-15 m: pickets 1-3 px wide, a top rail.
    zf = rng.uniform(6.0, 15.0)
    fence_h = rng.uniform(0.8, 1.6)
    r_top, r_bot = int(cy + focal * (hc - fence_h) / zf), int(np.ceil(cy + focal * hc / zf))
    span = sorted(rng.uniform(0.0, 1.0, 2) * width)
    pitch = max(4.0, focal * rng.uniform(0.08, 0.2) / zf)  # picket spacing in pixels
    base = rng.uniform(0.5, 0.95, 3)
    for c in np.arange(span[0], span[1], pitch):
        draw_bar(canvas, rng, int(c), r_top, r_bot, int(rng.integers(1, 4)), zf, base)
    draw_hbar(canvas, int(span[0]), int(span[1]), r_top, 2, zf, zf, base)
    # A lattice (trellis) nearer: a grid of 1-2 px bars.
    zl = rng.uniform(3.0, 6.0)
    lc0, lr0 = int(rng.uniform(0.0, 0.6) * width), int(rng.uniform(0.1, 0.5) * height)
    lw, lh = int(rng.uniform(0.15, 0.35) * width), int(rng.uniform(0.2, 0.4) * height)
    step = max(5, int(focal * 0.25 / zl))
    lbase = rng.uniform(0.2, 0.6, 3)
    for c in range(lc0, lc0 + lw, step):
        draw_bar(canvas, rng, c, lr0, lr0 + lh, int(rng.integers(1, 3)), zl, lbase)
    for r in range(lr0, lr0 + lh, step):
        draw_hbar(canvas, lc0, lc0 + lw, r, int(rng.integers(1, 3)), zl, zl, lbase)
    # Many poles and a web of wires between their tops (and across to the next but one).
    tops = [draw_pole(canvas, rng, focal, cx, cy, hc) for _ in range(int(rng.integers(6, 12)))]
    for (a, b) in zip(tops[:-1], tops[1:]):
        draw_wire(canvas, rng, a, b)
    for (a, b) in zip(tops[:-2], tops[2:]):
        draw_wire(canvas, rng, a, b)
    # A few boxes (parked things) for sharp, larger depth edges.
    for _ in range(int(rng.integers(2, 5))):
        draw_box(canvas, rng, u, v, focal, cx, cy, hc)
    return finish(canvas, rng, 80.0)


def _render_indoor(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A room: floor, ceiling, back and side walls, furniture boxes, tables on thin legs,
    shelves and a door frame. Depth 0.8-9 m."""
    focal, cx, cy, u, v, full = _camera(height, width, rng, (0.55, 0.75), (0.42, 0.55))  # wider lens indoors
    hc = rng.uniform(1.2, 1.6)
    ceil_h = rng.uniform(2.5, 3.2)  # ceiling height above the floor
    canvas = Canvas(height, width, far=np.float32(1e4))
    # Back wall, slanted.
    zb, k = rng.uniform(5.0, 9.0), rng.uniform(-0.4, 0.4)
    z = np.broadcast_to(zb / (1.0 - k * u), (height, width)).astype(np.float32)
    canvas.draw(*full, z, colour(rng.uniform(0.5, 0.9, 3), stripes(u * z, 0.6), 0.3), np.ones_like(z, bool))
    # Side walls X = x0 (full height).
    for side in (-1.0, 1.0):
        x0 = side * rng.uniform(1.8, 3.5)
        z = np.broadcast_to(x0 / u, (height, width)).astype(np.float32)
        mask = (z > 0.3) & np.isfinite(z)
        pattern = stripes(z, 0.7) * 0.4 + 0.6 * checker(z, v * z, 0.45)
        draw_plane_z(canvas, *full, z, colour(rng.uniform(0.4, 0.9, 3), pattern, 0.4), mask)
    # Floor (Y = hc) and ceiling (Y = hc - ceil_h).
    zf = np.broadcast_to(np.where(v > 1e-4, hc / np.maximum(v, 1e-4), np.inf), (height, width)).astype(np.float32)
    canvas.draw(*full, zf, colour(rng.uniform(0.3, 0.6, 3), checker(u * zf, zf, 0.5), 0.5), np.isfinite(zf))
    up = hc - ceil_h  # negative: above the camera
    zc = np.broadcast_to(np.where(v < -1e-4, up / np.minimum(v, -1e-4), np.inf), (height, width)).astype(np.float32)
    canvas.draw(*full, zc, colour(rng.uniform(0.8, 0.95, 3), stripes(u * zc, 1.2), 0.2), np.isfinite(zc))
    # Door frame on the back wall: two posts and a lintel 2-3 px.
    dc = int(rng.uniform(0.15, 0.8) * width)
    dw = int(focal * rng.uniform(0.8, 1.0) / zb)
    r_top, r_bot = int(cy + focal * (hc - 2.0) / zb), int(cy + focal * hc / zb)
    dbase = rng.uniform(0.2, 0.5, 3)
    zd = zb * 0.97
    for c in (dc, dc + dw):
        draw_bar(canvas, rng, c, r_top, r_bot, 3, zd, dbase)
    draw_hbar(canvas, dc, dc + dw + 3, r_top, 3, zd, zd, dbase)
    # Furniture: boxes (cupboards, sofa) on the floor.
    for _ in range(int(rng.integers(3, 6))):
        draw_indoor_box(canvas, rng, focal, cx, cy, hc, rng.uniform(2.5, zb - 0.5))
    # Tables: a top slab on four thin legs.
    for _ in range(int(rng.integers(1, 3))):
        zt = rng.uniform(1.5, 4.5)
        xt = rng.uniform(-1.0, 1.0)
        tw, td, th = rng.uniform(0.8, 1.6), rng.uniform(0.5, 0.9), rng.uniform(0.7, 0.8)
        base = rng.uniform(0.3, 0.8, 3)
        for zl, xl in ((zt, xt), (zt, xt + tw), (zt + td, xt), (zt + td, xt + tw)):
            c = int(cx + focal * xl / zl)
            draw_bar(canvas, rng, c, int(cy + focal * (hc - th) / zl), int(np.ceil(cy + focal * hc / zl)),
                      int(rng.integers(1, 4)), zl, base * 0.7)
        top_r = int(cy + focal * (hc - th) / zt)
        c0, c1 = int(cx + focal * xt / zt), int(cx + focal * (xt + tw) / zt)
        draw_hbar(canvas, c0, c1, top_r - 3, max(3, int(focal * 0.04 / zt)), zt, zt, base)
    # Shelves on a side: thin horizontal boards at one depth.
    zs = rng.uniform(2.0, 5.0)
    sc0 = int(rng.uniform(0.0, 0.7) * width)
    sbase = rng.uniform(0.3, 0.7, 3)
    for level in np.linspace(0.3, 1.9, int(rng.integers(3, 6))):
        draw_hbar(canvas, sc0, sc0 + int(focal * 0.9 / zs), int(cy + focal * (hc - level) / zs), 2, zs, zs, sbase)
    return finish(canvas, rng, 30.0)


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
