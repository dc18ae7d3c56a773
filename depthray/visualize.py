"""Colour maps for looking at depth and uncertainty (numpy only, no matplotlib)."""

from __future__ import annotations

import numpy as np

# ColorBrewer "Spectral" (11 classes), the colour map Marigold's own visualisations use:
# red = near (0), violet = far (1).
_SPECTRAL = np.array(
    [
        [0x9E, 0x01, 0x42], [0xD5, 0x3E, 0x4F], [0xF4, 0x6D, 0x43], [0xFD, 0xAE, 0x61],
        [0xFE, 0xE0, 0x8B], [0xFF, 0xFF, 0xBF], [0xE6, 0xF5, 0x98], [0xAB, 0xDD, 0xA4],
        [0x66, 0xC2, 0xA5], [0x32, 0x88, 0xBD], [0x5E, 0x4F, 0xA2],
    ],
    dtype=np.float32,
)


def colorize(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """float HxW -> uint8 HxWx3 with the Spectral map; NaNs become black."""
    v = np.asarray(values, dtype=np.float32)
    lo = float(np.nanmin(v)) if lo is None else lo
    hi = float(np.nanmax(v)) if hi is None else hi
    t = np.clip((v - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    pos = np.nan_to_num(t, nan=0.0) * (len(_SPECTRAL) - 1)
    i = np.minimum(pos.astype(np.int64), len(_SPECTRAL) - 2)
    frac = (pos - i)[..., None]
    rgb = _SPECTRAL[i] * (1 - frac) + _SPECTRAL[i + 1] * frac
    rgb[np.isnan(v)] = 0
    return np.round(rgb).astype(np.uint8)


def colorize_label(values: np.ndarray, space: str = "depth") -> np.ndarray:
    """A stored label in [0,1] -> uint8 HxWx3, red = near whatever the label holds: depth
    (0 = near) as is, disparity (1 = near, `meta.output_space` of transformers models)
    flipped, so a disparity preview does not read as inverted depth."""
    v = np.asarray(values, dtype=np.float32)
    return colorize(1.0 - v if space == "disparity" else v, lo=0.0, hi=1.0)


def colour_bar(width: int, height: int = 8) -> np.ndarray:
    """The Spectral ramp left (lo, red) to right (hi, violet) as uint8 [height,width,3]: the
    bar under a panel `colorize(values, lo, hi)` drew."""
    ramp = np.linspace(0.0, 1.0, max(width, 2), dtype=np.float32)[:width]
    return np.repeat(colorize(ramp[None, :], 0.0, 1.0), height, axis=0)


def bar_ticks(lo: float, hi: float, n: int = 3) -> list[float]:
    """Evenly spaced values from lo to hi, the colour bar's tick positions in its units."""
    return [float(v) for v in np.linspace(lo, hi, n)]


def metres_label(v: float) -> str:
    """Metres as a bar label: 3 significant figures (0.523 m, 12.4 m, 187 m)."""
    return f"{v:.3g} m" if v < 1000 else f"{v:.0f} m"


def colorize_uncertainty(uncertainty: np.ndarray) -> np.ndarray:
    """Uncertainty HxW -> uint8 HxWx3 grey ramp, white = most uncertain (99th percentile)."""
    u = np.asarray(uncertainty, dtype=np.float32)
    hi = float(np.percentile(u, 99)) if u.size else 1.0
    g = np.clip(u / max(hi, 1e-12), 0, 1)
    return np.repeat(np.round(g * 255).astype(np.uint8)[..., None], 3, axis=2)


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Stack uint8 HxWx3 images of equal height left to right with a white gap."""
    h = images[0].shape[0]
    parts = []
    for k, im in enumerate(images):
        if k:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(im)
    return np.concatenate(parts, axis=1)
