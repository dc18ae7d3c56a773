"""`depthray preview`: a contact sheet (PNG) and a one-file HTML page of depth outputs.

Each image shows input | colourised depth (Spectral, red = near) | uncertainty (grey, one
scale shared by the page so brightness compares across images), with its key and scores:
mean uncertainty, the quality verdict when a threshold is given, AbsRel / delta1 when GT is
given. The HTML embeds every image as base64 and sorts by uncertainty in the browser; a
URL fragment such as `#sort=uncertainty-desc` applies a sort on load (shareable links).

A metric output (pipelines/metric_depth.py) shows its metric map in the depth panel, coloured
from the map's own nearest to farthest metres with a colour bar labelled in metres, and the
fit's verdict and held-out abs_rel (depthray/preview_metric.py); a low_confidence fit is flagged.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from depthray.config import StorageConfig
from depthray.io.decode import decode_rgb
from depthray.io.outputs import OutputRecord, index_folder, list_files, read_outputs
from depthray.preview_metric import BAR_H, BAR_TEXT_H, draw_bar, html_bar, legend, metric_caption, metric_panel
from depthray.resize import resize_map, resize_with_holes
from depthray.visualize import colorize_label, colour_bar, side_by_side

log = logging.getLogger(__name__)

THUMB_LONG_SIDE = 256  # HTML thumbnails
SHEET_LONG_SIDE = 160  # contact sheet panels
SHEET_COLUMNS = 4  # items per contact sheet row


@dataclass
class PreviewItem:
    key: str
    depth: np.ndarray  # float32 [H,W] in [0,1]
    image: np.ndarray | None = None  # uint8 [H,W,3]
    uncertainty: np.ndarray | None = None  # float32 [H,W]
    uncertainty_mean: float | None = None
    scores: dict = field(default_factory=dict)  # name -> float, shown under the key
    flagged: bool = False  # low confidence
    space: str = "depth"  # what `depth` holds (meta.output_space): depth or disparity
    metric: np.ndarray | None = None  # float32 [H,W] metres, NaN = no depth (metric outputs)
    fit: dict = field(default_factory=dict)  # meta.metric: the fit, its verdict and reasons


# ----------------------------------------------------------------------------- collecting


def collect_items(
    output_url: str,
    n: int = 32,
    inputs_url: str | None = None,
    gt_url: str | None = None,
    max_uncertainty_mean: float | None = None,
    gt_png_scale: float | None = None,
    storage: StorageConfig | None = None,
) -> list[PreviewItem]:
    """The first `n` records of an output (file order), sorted by key, with inputs, GT scores
    and flags attached."""
    inputs = _input_index(inputs_url, storage) if inputs_url else None
    gt = None
    if gt_url:
        from depthray.evaluate import index_gt

        gt = index_gt(gt_url, storage)
    items = []
    for rec in read_outputs(output_url, with_uncertainty=True, with_image=True, limit=n, storage=storage):
        item = PreviewItem(rec.key, rec.depth, rec.image, rec.uncertainty, rec.uncertainty_mean,
                           space=rec.meta.get("output_space", "depth"), metric=rec.metric,
                           fit=rec.meta.get("metric") or {})
        if item.image is None and inputs is not None and rec.key in inputs[1]:
            fs, paths = inputs
            item.image = decode_rgb(fs.cat_file(paths[rec.key]))  # as displayed (EXIF applied)
        if gt is not None:
            item.scores.update(_gt_scores(rec, gt, gt_png_scale))
        item.flagged, verdict = _verdict(rec, max_uncertainty_mean)
        item.flagged |= item.fit.get("verdict", "ok") != "ok"  # a metric label the fit doubts
        if verdict:
            item.scores["valid_fraction"] = verdict.valid_fraction
        items.append(item)
    log.info("collected %d preview items from %s", len(items), output_url)
    return sorted(items, key=lambda it: it.key)  # parts finish in any order; keys do not


def _input_index(url: str, storage: StorageConfig | None = None):
    fs, files = list_files(url, storage)
    return fs, {k: r["image"] for k, r in index_folder(files).items() if "image" in r}


def _gt_scores(rec: OutputRecord, gt, gt_png_scale) -> dict:
    from depthray.evaluate import DEFAULT_GT_PNG_SCALE, decode_gt
    from depthray.metrics import compute_metrics, metric_errors

    fs, files, masks = gt
    if rec.key not in files:
        return {}
    try:
        g = decode_gt(fs.cat_file(files[rec.key]), files[rec.key], gt_png_scale or DEFAULT_GT_PNG_SCALE)
        m = compute_metrics(resize_map(rec.depth, g.shape), g)
    except ValueError as e:
        log.warning("%s: no GT scores: %s", rec.key, e)
        return {}
    scores = {"abs_rel": m.abs_rel, "delta1": m.delta1}
    if rec.metric is not None:  # the metric map as written against GT in metres: no fit
        scores["m_abs_rel"] = metric_errors(resize_with_holes(rec.metric, g.shape), g).abs_rel
    return scores


def _verdict(rec: OutputRecord, max_uncertainty_mean: float | None):
    """(flagged, QualityVerdict or None): the job's own flag, or the threshold given here."""
    flagged = bool(rec.meta.get("low_confidence", False))
    if max_uncertainty_mean is None or rec.uncertainty is None:
        if max_uncertainty_mean is not None and rec.uncertainty_mean is not None:
            flagged |= rec.uncertainty_mean > max_uncertainty_mean
        return flagged, None
    from depthray.config import QualityConfig
    from depthray.quality import assess

    verdict = assess(rec.depth, rec.uncertainty, QualityConfig(max_uncertainty_mean=max_uncertainty_mean))
    return flagged or not verdict.passed, verdict


# ----------------------------------------------------------------------------- panels


def _thumb_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    s = min(1.0, long_side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def uncertainty_scale(items: list[PreviewItem]) -> float:
    """One grey scale for the whole page: the 99th percentile over all shown uncertainty."""
    vals = [np.percentile(it.uncertainty, 99) for it in items if it.uncertainty is not None and it.uncertainty.size]
    hi = max(vals) if vals else 0.0
    return float(hi) if hi > 0 else 1.0


def panels(item: PreviewItem, long_side: int, unc_hi: float) -> list[np.ndarray]:
    """[input, depth, uncertainty] as uint8 [h,w,3] thumbnails of one size; a metric item's
    depth panel is its metric map on its legend's scale (black = no depth)."""
    size = _thumb_size(*item.depth.shape, long_side)
    if item.image is not None:
        image = np.clip(np.rint(resize_map(item.image, size)), 0, 255).astype(np.uint8)
    else:  # no input stored: a neutral grey tile keeps the grid aligned
        image = np.full(size + (3,), 200, np.uint8)
    if item.metric is None:
        depth = colorize_label(resize_map(item.depth, size), item.space)
    else:
        depth = metric_panel(item.metric, size)
    if item.uncertainty is not None:
        u = np.clip(resize_map(item.uncertainty, size) / unc_hi, 0.0, 1.0)
        unc = np.repeat(np.round(u * 255).astype(np.uint8)[..., None], 3, axis=2)
    else:
        unc = np.full(size + (3,), 128, np.uint8)
    return [image, depth, unc]


def caption(item: PreviewItem) -> str:
    parts = [f"unc {item.uncertainty_mean:.4f}" if item.uncertainty_mean is not None else "unc -"]
    parts += [f"{k} {v:.3f}" for k, v in item.scores.items() if v is not None and math.isfinite(v)]
    if item.flagged:
        parts.append("LOW CONFIDENCE")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- contact sheet


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _clip(draw, text: str, font, width: int) -> str:
    """The text cut to `width` px (ending in ...), so it does not run into the next cell."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(items: list[PreviewItem], cols: int = SHEET_COLUMNS, long_side: int = SHEET_LONG_SIDE) -> np.ndarray:
    """A grid of (input | depth | uncertainty) cells with key and scores: uint8 [H,W,3]. A
    metric item gets a colour bar in metres under its depth panel and its fit's line."""
    if not items:
        raise ValueError("nothing to preview: the output has no records")
    unc_hi = uncertainty_scale(items)
    cells = [side_by_side(*panels(it, long_side, unc_hi)) for it in items]
    legends = [legend(it.metric) for it in items]
    metric = any(lg is not None for lg in legends)
    bar_h = BAR_H + BAR_TEXT_H if metric else 0
    text_h, pad = 34 + (15 if metric else 0), 8
    cell_w = max(c.shape[1] for c in cells)
    cell_h = max(c.shape[0] for c in cells) + bar_h + text_h
    cols = max(1, min(cols, len(cells)))
    rows = math.ceil(len(cells) / cols)
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for i, (item, cell, lg) in enumerate(zip(items, cells, legends)):
        x = pad + (i % cols) * (cell_w + pad)
        y = pad + (i // cols) * (cell_h + pad)
        sheet.paste(Image.fromarray(cell), (x, y))
        if lg is not None:  # under the depth panel, the second of three panels with 4 px gaps
            w = _thumb_size(*item.depth.shape, long_side)[1]
            draw_bar(sheet, draw, font, lg, x + w + 4, y + cell.shape[0] + 2, w)
        ty = y + cell.shape[0] + bar_h + 3
        colour = (190, 0, 0) if item.flagged else (60, 60, 60)
        draw.text((x, ty), item.key[:60], fill=(0, 0, 0), font=font)
        draw.text((x, ty + 15), _clip(draw, caption(item), font, cell_w), fill=colour, font=font)
        if metric:
            draw.text((x, ty + 30), _clip(draw, metric_caption(item.fit), font, cell_w), fill=colour, font=font)
    return np.asarray(sheet)


# ----------------------------------------------------------------------------- HTML


def _data_url(arr: np.ndarray, fmt: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;background:#f4f4f4;color:#222}
h1{font-size:20px;margin:0 0 4px} .meta{color:#555;font-size:13px;margin-bottom:8px}
.controls button{margin-right:6px;padding:4px 10px;border:1px solid #888;background:#fff;cursor:pointer}
.controls button.active{background:#333;color:#fff}
#grid{display:flex;flex-wrap:wrap;gap:12px;margin-top:12px}
.card{background:#fff;padding:6px;margin:0;border:2px solid #ddd;border-radius:4px}
.card.flagged{border-color:#c00}
.card img{display:inline-block;margin-right:3px;vertical-align:top}
.card figcaption{font-size:12px;margin-top:4px} .card .key{font-weight:600;word-break:break-all}
.card .flag{color:#c00;font-weight:600}
.legend{font-size:12px;color:#555;margin-bottom:8px}
.bar{font-size:11px} .bar img{display:block;height:8px;margin:2px 0 0}
.bar .ticks{display:flex;justify-content:space-between}
"""

# Sorting reorders the cards in the DOM. The fragment handler clicks the matching button,
# so a link like preview.html#sort=uncertainty-desc opens sorted, through the same code.
_SCRIPT = """
function sortCards(field, dir) {
  const grid = document.getElementById('grid');
  const cards = Array.from(grid.children);
  const val = c => field === 'key' ? c.dataset.key : parseFloat(c.dataset[field]);
  cards.sort((a, b) => {
    const x = val(a), y = val(b);
    if (field !== 'key') {
      const xn = isNaN(x), yn = isNaN(y);
      if (xn || yn) return xn - yn;  // unknown scores last, whatever the direction
    }
    const c = x < y ? -1 : x > y ? 1 : 0;
    return dir === 'desc' ? -c : c;
  });
  cards.forEach(c => grid.appendChild(c));
  document.body.dataset.sort = field + '-' + dir;
  document.querySelectorAll('.controls button').forEach(
    b => b.classList.toggle('active', b.dataset.sort === field + '-' + dir));
}
document.querySelectorAll('.controls button').forEach(b => b.addEventListener('click', () => {
  const [field, dir] = b.dataset.sort.split('-');
  sortCards(field, dir);
}));
const m = location.hash.match(/sort=([a-z]+-(?:asc|desc))/);
if (m) { const b = document.querySelector('button[data-sort="' + m[1] + '"]'); if (b) b.click(); }
"""


def render_html(items: list[PreviewItem], title: str = "depthray preview", source: str = "") -> str:
    """One self-contained HTML page (images inline as base64) of the items, in their order."""
    unc_hi = uncertainty_scale(items)
    cards = []
    for item in items:
        image, depth, unc = panels(item, THUMB_LONG_SIDE, unc_hi)
        unc_attr = "" if item.uncertainty_mean is None else repr(float(item.uncertainty_mean))
        abs_rel = item.scores.get("abs_rel")
        flag = ' <span class="flag">low confidence</span>' if item.flagged else ""
        bar, fit = "", metric_caption(item.fit)
        if item.metric is not None:
            bar = html_bar(legend(item.metric), depth.shape[1], _data_url(colour_bar(depth.shape[1]), "PNG"))
        fit = f'<div class="fit">{html.escape(fit)}</div>' if fit else ""
        cards.append(
            f'<figure class="card{" flagged" if item.flagged else ""}" data-key="{html.escape(item.key)}" '
            f'data-uncertainty="{unc_attr}" data-absrel="{"" if abs_rel is None else repr(float(abs_rel))}">'
            f'<div><img alt="input" src="{_data_url(image, "JPEG")}">'
            f'<img alt="depth" src="{_data_url(depth, "PNG")}">'
            f'<img alt="uncertainty" src="{_data_url(unc, "PNG")}"></div>{bar}'
            # the caption wraps at the panels' width instead of widening the card
            f'<figcaption style="max-width:{3 * depth.shape[1] + 6}px"><div class="key">{html.escape(item.key)}</div>'
            f"<div>{html.escape(caption(item))}{flag}</div>{fit}</figcaption></figure>"
        )
    buttons = [("uncertainty-desc", "most uncertain first"), ("uncertainty-asc", "least uncertain first"),
               ("key-asc", "by key")]
    if any(it.scores.get("abs_rel") is not None for it in items):
        buttons.append(("absrel-desc", "worst AbsRel first"))
    controls = "".join(f'<button data-sort="{s}" id="sort-{s}">{html.escape(t)}</button>' for s, t in buttons)
    n_flagged = sum(it.flagged for it in items)
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<div class="meta">{len(items)} images from {html.escape(source)}; '
        f"{n_flagged} flagged low confidence</div>"
        '<div class="legend">input | depth (Spectral: red = near, violet = far) | '
        f"uncertainty (black = 0, white &ge; {unc_hi:.4g})"
        + ("; metric labels: the metric map, its bar in metres from its nearest to its farthest "
           "depth (black = no depth)" if any(it.metric is not None for it in items) else "")
        + "</div>"
        f'<div class="controls">Sort: {controls}</div>\n'
        f'<main id="grid">\n' + "\n".join(cards) + "\n</main>\n"
        f"<script>{_SCRIPT}</script>\n"
        "</body></html>\n"
    )


def write_preview(
    output_url: str,
    out_dir: str | Path,
    n: int = 32,
    inputs_url: str | None = None,
    gt_url: str | None = None,
    max_uncertainty_mean: float | None = None,
    storage: StorageConfig | None = None,
) -> tuple[Path, Path]:
    """Write `preview.png` and `preview.html` into out_dir (a local folder); returns both paths."""
    items = collect_items(output_url, n, inputs_url, gt_url, max_uncertainty_mean, storage=storage)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sheet_path, html_path = out / "preview.png", out / "preview.html"
    Image.fromarray(contact_sheet(items)).save(sheet_path)
    html_path.write_text(render_html(items, source=output_url), encoding="utf-8")
    log.info("wrote %s and %s (%d images)", sheet_path, html_path, len(items))
    return sheet_path, html_path
