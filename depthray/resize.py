"""The one resizer: bilinear, antialiased when shrinking, for tensors on any device and for
numpy maps (evaluation against GT of another size, preview thumbnails)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Bilinear resize of [C,H,W] or [N,C,H,W]; a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    batched = x if x.ndim == 4 else x.unsqueeze(0)
    out = F.interpolate(batched, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return out if x.ndim == 4 else out[0]


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float or uint8 [H,W] / [H,W,C] -> float32 [h,w] / [h,w,C] (size = (h, w)),
    antialiased when shrinking so thin structures average instead of aliasing."""
    arr = np.asarray(values, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t[None] if arr.ndim == 2 else t.permute(2, 0, 1)  # [C,H,W]
    shrink = size[0] < arr.shape[0] or size[1] < arr.shape[1]
    out = resize(t, tuple(size), antialias=shrink)  # [C,h,w]
    return (out[0] if arr.ndim == 2 else out.permute(1, 2, 0)).numpy()


def resize_with_holes(values: np.ndarray, size: tuple[int, int], min_weight: float = 0.999) -> np.ndarray:
    """float [H,W] with NaN holes -> float32 [h,w]: a normalised resize (values and the
    valid mask resized alike, divided), NaN where less than `min_weight` of a pixel's
    footprint was valid, so a hole neither spreads NaN nor pulls its neighbours to 0."""
    arr = np.asarray(values, dtype=np.float32)
    if arr.shape == tuple(size):
        return arr
    ok = np.isfinite(arr)
    weight = resize_map(ok.astype(np.float32), size)  # [h,w]
    summed = resize_map(np.where(ok, arr, 0.0), size)  # [h,w]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight >= min_weight, summed / np.maximum(weight, 1e-12), np.nan).astype(np.float32)
