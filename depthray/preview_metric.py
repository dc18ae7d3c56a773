"""What a preview shows of a metric label (pipelines/metric_depth.py): the metric map coloured
on its own scale in metres, the colour bar with its labels, and the fit's line.

The scale is the map's nearest to farthest metres (not 0..1, and not shared across images:
each map's bar says what its colours mean); red = near, violet = far, black = no depth.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from depthray.resize import resize_with_holes
from depthray.visualize import bar_ticks, colorize, colour_bar, metres_label

BAR_H, BAR_TEXT_H = 8, 14  # the contact sheet's colour bar and its labels, px


@dataclass
class Legend:
    """A metric map's colour scale: its nearest and farthest metres (None: no depth at all)
    and the bar's tick labels."""

    lo: float | None
    hi: float | None
    labels: list[str]


def legend(metric: np.ndarray | None) -> Legend | None:
    """The full-size metric map's scale in metres; None for a relative label (its panel is
    the label's own 0..1)."""
    if metric is None:
        return None
    ok = np.isfinite(metric) & (metric > 0)
    if not ok.any():
        return Legend(None, None, ["no metric depth"])
    lo, hi = float(metric[ok].min()), float(metric[ok].max())
    return Legend(lo, hi, [metres_label(v) for v in bar_ticks(lo, hi)])


def metric_panel(metric: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The metric map as a uint8 [h,w,3] thumbnail on its legend's scale; a thumbnail pixel
    needs half its footprint in depth, else it is black."""
    lg = legend(metric)
    if lg.lo is None:
        return np.zeros(size + (3,), np.uint8)
    return colorize(resize_with_holes(metric, size, min_weight=0.5), lg.lo, lg.hi)


def metric_caption(fit: dict) -> str:
    """The fit's verdict and held-out abs_rel (against the sparse depths, not GT), with its
    first reason when it is not ok; empty without a fit (a relative label)."""
    if not fit:
        return ""
    verdict = fit.get("verdict", "unknown")
    held = fit.get("abs_rel")
    text = f"metric {verdict}"
    if held is not None and math.isfinite(held):
        text += f", held-out abs_rel {held:.3f}"
    reasons = fit.get("reasons") or []
    if verdict != "ok" and reasons:
        text += f": {reasons[0]}" + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else "")
    return text


def draw_bar(sheet: Image.Image, draw, font, lg: Legend, x: int, y: int, width: int) -> None:
    """The colour bar under a depth panel (x, y: its top left) and its labels: the first at
    the left end, the last at the right, the others centred on their ticks."""
    if lg.lo is not None:
        sheet.paste(Image.fromarray(colour_bar(width, BAR_H)), (x, y))
    n = len(lg.labels)
    for k, text in enumerate(lg.labels):
        tw = draw.textlength(text, font=font)
        cx = x + (width * k / (n - 1) if n > 1 else width / 2)
        tx = cx if k == 0 else cx - tw if k == n - 1 else cx - tw / 2
        draw.text((tx, y + BAR_H + 1), text, fill=(0, 0, 0), font=font)


def html_bar(lg: Legend, width: int, bar_src: str) -> str:
    """The bar under the HTML card's depth panel (after the input panel and its 3 px gap),
    its labels as text and its range in data attributes."""
    img = f'<img alt="colour bar" src="{bar_src}">' if lg.lo is not None else ""
    ticks = "".join(f"<span>{html.escape(t)}</span>" for t in lg.labels)
    rng = "" if lg.lo is None else f' data-metres-lo="{lg.lo!r}" data-metres-hi="{lg.hi!r}"'
    return (f'<div class="bar"{rng} style="margin-left:{width + 3}px;width:{width}px">{img}'
            f'<div class="ticks">{ticks}</div></div>')
